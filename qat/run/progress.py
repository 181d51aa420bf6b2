"""What a long `qat` command is doing, on stderr: a rich spinner naming the stage that runs, and one line
per finished stage with its time, so `qat eval` and `qat sweep` never sit silent.

Stdout is left alone: lines printed there meanwhile show above the spinner on a terminal and go
unchanged into a pipe or file.

Example:
    >>> with stages("qat eval") as stage:
    ...     stage("loading the data")
    ...     stage("comparing the models")      # prints "qat eval: loading the data (0.4 s)"
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Optional

from rich.console import Console
from rich.live import Live
from rich.spinner import Spinner


@contextmanager
def stages(title: str, console: Optional[Console] = None) -> Iterator[Callable[[str], None]]:
    """Yields `stage(text)`: the stage running from now on. A stage ends at the next one or at the end of
    the block (when the block raises, its last stage is not reported as done)."""
    console = console or Console(stderr=True, soft_wrap=True)  # long lines wrap in the terminal, unbroken
    spinner = Spinner("dots", f"{title}: starting")
    running: dict[str, float] = {}  # the running stage's text -> its start time (one entry at most)

    def finish() -> None:
        for text, start in running.items():
            console.print(f"{title}: {text} ({time.perf_counter() - start:.1f} s)", style="dim", markup=False,
                          highlight=False)
        running.clear()

    def stage(text: str) -> None:
        finish()
        running[text] = time.perf_counter()
        spinner.update(text=f"{title}: {text}")

    with Live(spinner, console=console, transient=True, refresh_per_second=8,
              redirect_stdout=sys.stdout.isatty(), redirect_stderr=True):
        yield stage
        finish()
