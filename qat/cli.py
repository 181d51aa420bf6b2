"""The `qat` command: `qat train | export | inspect | verify | eval | sweep | bench | generate`.

Example:
    $ qat train recipes/digits_w4a4.yaml optimizer.lr=3e-3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from qat.config import ConfigError


def _train(args: argparse.Namespace) -> int:
    from qat.recipe import load_recipe
    from qat.run.train import train

    recipe_path, overrides = args.recipe, list(args.overrides)
    if recipe_path is not None and "=" in recipe_path:  # `qat train key=value` with the default recipe
        recipe_path, overrides = None, [recipe_path, *overrides]
    recipe = load_recipe(recipe_path or default_recipe(), overrides)
    train(recipe)
    return 0


DEFAULT_RECIPE = "recipes/digits_w2a4.yaml"


def default_recipe() -> Path:
    """The default recipe: ./recipes/digits_w2a4.yaml, else the one in qat's source checkout."""
    here = Path(DEFAULT_RECIPE)
    return here if here.is_file() else Path(__file__).resolve().parents[1] / DEFAULT_RECIPE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qat", description="Quantization-aware training down to 4 bits.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run a recipe: qat train [RECIPE.yaml] [key=value ...]")
    train.add_argument("recipe", nargs="?", help=f"recipe YAML (default: {DEFAULT_RECIPE})")
    train.add_argument("overrides", nargs="*", help="recipe overrides, e.g. optimizer.lr=1e-3")
    train.set_defaults(func=_train)
    bench = commands.add_parser("bench", help="time the int4 kernels side by side (python -m qat.kernels.bench)",
                                add_help=False)
    bench.set_defaults(func=_bench)
    _add_optional_commands(commands)
    from qat.hf.generate import add_generate_parser

    add_generate_parser(commands)
    return parser


def _bench(args: argparse.Namespace) -> int:
    from qat.kernels.bench import main as bench_main

    bench_main(list(args.bench_args))
    return 0


# Third-party packages whose absence may hide a command (with a message saying what to install).
OPTIONAL_DEPENDENCIES = {"safetensors": "safetensors"}


def optional_import_missing(err: ImportError) -> Optional[str]:
    """The pip package to install when `err` is an optional dependency that is really missing,
    else None: an ImportError raised inside qat itself is a bug and must not hide a command."""
    if not isinstance(err, ModuleNotFoundError) or err.name is None:
        return None
    return OPTIONAL_DEPENDENCIES.get(err.name.partition(".")[0])


def _add_optional_commands(commands: argparse._SubParsersAction) -> None:
    try:
        from qat.export.inspect import add_inspect_parser
        from qat.run.export import add_export_parser
    except ImportError as err:
        package = optional_import_missing(err)
        if package is None:
            raise
        print(f"qat: `export` and `inspect` are unavailable: {err}; install it with `pip install {package}`",
              file=sys.stderr)
        return
    add_export_parser(commands)
    add_inspect_parser(commands)
    from qat.export.verify import add_verify_parser

    add_verify_parser(commands)
    from qat.run.evaluate import add_eval_parser
    from qat.run.sweep import add_sweep_parser

    add_eval_parser(commands)
    add_sweep_parser(commands)


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
