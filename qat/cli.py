"""The `qat` command: `qat train | export | inspect | verify | eval | sweep | bench | generate | monitor`.

The parser is built from qat.arguments (argparse only), so `qat --help` and `qat COMMAND --help`
import no torch; each handler below imports the module implementing its command when it runs.

Example:
    $ qat train recipes/digits_w4a4.yaml optimizer.lr=3e-3
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import qat
from qat import arguments
from qat.arguments import DEFAULT_RECIPE
from qat.errors import ConfigError


def _train(args: argparse.Namespace) -> int:
    from qat.recipe import load_recipe
    from qat.run.train import train

    recipe_path, overrides = args.recipe, list(args.overrides)
    if recipe_path is not None and "=" in recipe_path:  # `qat train key=value` with the default recipe
        recipe_path, overrides = None, [recipe_path, *overrides]
    recipe = load_recipe(recipe_path or default_recipe(), overrides)
    train(recipe)
    return 0


def default_recipe() -> Path:
    """The default recipe: ./recipes/digits_w2a4.yaml, else the one in qat's source checkout."""
    here = Path(DEFAULT_RECIPE)
    return here if here.is_file() else Path(__file__).resolve().parents[1] / DEFAULT_RECIPE


# Third-party packages whose absence makes a command unavailable (with a message saying what to install).
OPTIONAL_DEPENDENCIES = {"safetensors": "safetensors"}


def optional_import_missing(err: ImportError) -> Optional[str]:
    """The pip package to install when `err` is an optional dependency that is really missing,
    else None: an ImportError raised inside qat itself is a bug and must not hide a command."""
    if not isinstance(err, ModuleNotFoundError) or err.name is None:
        return None
    return OPTIONAL_DEPENDENCIES.get(err.name.partition(".")[0])


@contextmanager
def _unless_missing(command: str) -> Iterator[None]:
    """Around a handler's import (seconds: torch, Lightning), with a spinner on stderr meanwhile: a missing
    optional dependency ends the command with what to install; any other ImportError (one raised inside
    qat itself is a bug) propagates."""
    from rich.console import Console  # here, not at the top: `qat --help` does without it

    try:
        with Console(stderr=True).status(f"qat {command}: starting (importing torch)"):
            yield
    except ImportError as err:
        package = optional_import_missing(err)
        if package is None:
            raise
        raise SystemExit(f"qat: `{command}` is unavailable: {err}; install it with `pip install {package}`") from err


def _handler(command: str, module: str, function: str):
    """The handler of `qat COMMAND`: imports `module` when the command runs, then calls its `function`(args)."""
    def handle(args: argparse.Namespace) -> int:
        with _unless_missing(command):
            run = getattr(__import__(module, fromlist=[function]), function)
        return run(args)

    return handle


def _bench(args: argparse.Namespace) -> int:
    unknown = getattr(args, "bench_args", None)  # main hands the bench whatever its parser did not take
    if unknown:
        raise SystemExit(f"qat bench: error: unrecognized arguments: {' '.join(unknown)}")
    with _unless_missing("bench"):
        from qat.kernels.bench import run

    run(args)
    return 0


# Each subcommand's parser (qat.arguments) and handler, in `qat --help` order.
COMMANDS = (
    (arguments.add_train_parser, _train),
    (arguments.add_export_parser, _handler("export", "qat.run.export", "run_export")),
    (arguments.add_inspect_parser, _handler("inspect", "qat.export.inspect", "run_inspect")),
    (arguments.add_verify_parser, _handler("verify", "qat.export.verify", "run_verify")),
    (arguments.add_eval_parser, _handler("eval", "qat.run.evaluate", "run_eval")),
    (arguments.add_sweep_parser, _handler("sweep", "qat.run.sweep", "run_sweep")),
    (arguments.add_bench_parser, _bench),
    (arguments.add_generate_parser, _handler("generate", "qat.hf.generate", "run_generate")),
    (arguments.add_monitor_parser, _handler("monitor", "qat.run.monitor", "run_monitor")),
)


def build_parser() -> argparse.ArgumentParser:
    """The `qat` parser; building it imports no command's implementation."""
    parser = argparse.ArgumentParser(prog="qat", description="Quantization-aware training down to 4 bits.")
    parser.add_argument("--version", action="version", version=f"qat {qat.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add_parser, handler in COMMANDS:
        add_parser(commands).set_defaults(func=handler)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = rest  # every option belongs to the benchmark's own parser
    elif rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides = [*args.overrides, *rest]  # key=value overrides written after options
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args) or 0)
    except (ConfigError, FileNotFoundError) as err:
        print(f"qat: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
