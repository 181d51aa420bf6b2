"""The `qat` command's parser: built without torch (so `--help` is instant), every option explained,
`--version`, and choice lists that name what the implementing modules define."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

import qat
from qat import arguments
from qat.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "pytorch_lightning", "transformers", "omegaconf")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_building_the_parser_imports_no_heavy_module():
    code = ("import sys, qat.cli; qat.cli.build_parser(); "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_every_subcommand_and_option_has_help():
    parser = build_parser()
    subparsers = subcommands(parser)
    assert set(subparsers) == {"train", "export", "inspect", "verify", "eval", "sweep", "bench", "generate",
                               "monitor"}
    listed = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))._choices_actions
    assert all(choice.help for choice in listed)
    bare = [f"qat {name} {action.option_strings or action.dest}" for name, sub in subparsers.items()
            for action in sub._actions if not (isinstance(action.help, str) and action.help.strip())]
    assert bare == []
    for name, sub in subparsers.items():
        assert sub.description, f"qat {name} has no description"
        sub.format_help()  # every help string formats (no stray % in them)


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"qat {qat.__version__}"


def test_the_choice_lists_name_what_the_commands_implement():
    from qat.export.targets import TARGETS
    from qat.export.targets.cli import INPUT_DTYPES
    from qat.hf.generate import ENGINES
    from qat.run.sweep import METHODS

    assert sorted(arguments.EXPORT_TARGETS) == sorted(TARGETS)
    assert sorted(arguments.INPUT_DTYPES) == sorted(INPUT_DTYPES)
    assert list(arguments.SWEEP_METHODS) == list(METHODS)
    assert list(arguments.GENERATE_ENGINES) == list(ENGINES)


def test_bench_takes_its_options_from_the_kernels_and_refuses_unknown_ones(capsys):
    args = build_parser().parse_args(["bench", "--shapes", "64x128,32x64", "--rows", "1,3", "--only", "a,b"])
    assert (args.shapes, args.rows, args.only, args.write, args.output) == (
        [(64, 128), (32, 64)], [1, 3], ["a", "b"], False, None)
    with pytest.raises(SystemExit, match="unrecognized arguments: --no-such-option"):
        main(["bench", "--no-such-option"])
