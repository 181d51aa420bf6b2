"""A status line on stderr while a benchmark runs: what it is timing now (rich's spinner, where rich is installed).

Example:
    >>> with status("int4 kernels"):
    ...     update("timing 4096x4096 bfloat16 M=64")
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

_spinner: Optional[Any] = None  # the live status while `status` runs


@contextmanager
def status(text: str) -> Iterator[None]:
    """Show `text` with a spinner on stderr while the block runs (on a terminal; nothing is shown otherwise).

    Lines printed on stdout meanwhile go above the spinner on a terminal and unchanged into a pipe or file.
    """
    global _spinner
    try:
        from rich.console import Console
        from rich.live import Live
        from rich.spinner import Spinner
    except ImportError:  # rich comes with qat, not with the kernels alone: no status line then
        yield
        return
    spinner = Spinner("dots", text)
    with Live(spinner, console=Console(stderr=True, soft_wrap=True), transient=True, refresh_per_second=8,
              redirect_stdout=sys.stdout.isatty(), redirect_stderr=True):
        _spinner = spinner
        try:
            yield
        finally:
            _spinner = None


def update(text: str) -> None:
    """Say what runs now (a no-op outside `status`)."""
    if _spinner is not None:
        _spinner.update(text=text)
