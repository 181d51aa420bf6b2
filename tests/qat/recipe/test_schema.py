"""Every field of the recipe schema has a docstring of its own: the string literal right under it
(litgpt's `args.py` style), read from the source with `ast`. A new field without one fails here."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Iterator, Optional

import pytest

from qat.config import LayerConfig, QuantizerConfig, QuantRule, QuantSpec
from qat.recipe import Recipe
from qat.recipe.schema import HFSource, TargetConfig


def nested_dataclasses(annotation: object) -> Iterator[type]:
    """The dataclasses inside a resolved type annotation (`Optional[X]`, `List[X]`, `Dict[str, X]`, X)."""
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        yield annotation
    for argument in typing.get_args(annotation):
        yield from nested_dataclasses(argument)


def reachable(*roots: type) -> list[type]:
    """`roots` and every dataclass their fields hold, however deep, in the order first met."""
    found: list[type] = []
    todo = list(roots)
    while todo:
        cls = todo.pop(0)
        if cls in found:
            continue
        found.append(cls)
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            todo.extend(nested_dataclasses(hints[item.name]))
    return found


def field_docstrings(cls: type) -> dict[str, str]:
    """{field name: the string literal right after its annotated assignment} of `cls` and its bases."""
    docs: dict[str, str] = {}
    for owner in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(owner):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(owner))).body[0].body
        for node, following in zip(body, [*body[1:], None], strict=True):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            if (isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[node.target.id] = following.value.value
            else:
                docs.pop(node.target.id, None)
    return docs


def undocumented(cls: type) -> list[str]:
    docs = field_docstrings(cls)
    return [item.name for item in dataclasses.fields(cls) if not docs.get(item.name, "").strip()]


SCHEMA = reachable(Recipe, QuantSpec, LayerConfig)


def test_the_walk_reaches_every_section() -> None:
    names = {cls.__name__ for cls in SCHEMA}
    assert {"Recipe", "ModelConfig", "HFSource", "TargetConfig", "ScheduleConfig", "OptimizerConfig",
            "TrainerConfig", "LoggingConfig", "ExportConfig", "ReportConfig", "DistillConfig", "PruneConfig",
            "QuantSpec", "QuantizerConfig", "QuantRule", "LayerConfig"} <= names
    assert {HFSource, TargetConfig, QuantizerConfig, QuantRule} <= set(reachable(Recipe))


@pytest.mark.parametrize("cls", SCHEMA, ids=lambda cls: cls.__name__)
def test_every_field_has_a_docstring_under_it(cls: type) -> None:
    assert undocumented(cls) == [], f"{cls.__module__}.{cls.__name__}: fields without a docstring under them"


@dataclasses.dataclass
class _Half:
    documented: int = 0
    """Has one."""
    bare: Optional[str] = None


@dataclasses.dataclass
class _Derived(_Half):
    extra: float = 1.0
    """Has one too."""


def test_the_check_finds_an_undocumented_field() -> None:
    assert undocumented(_Half) == ["bare"]
    assert undocumented(_Derived) == ["bare"]  # inherited fields are read from the class that declares them
    assert field_docstrings(_Derived) == {"documented": "Has one.", "extra": "Has one too."}
