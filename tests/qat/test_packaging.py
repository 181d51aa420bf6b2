"""pyproject.toml lists its packages explicitly: a new subpackage missing there imports in the source tree
and in an editable install, but not from a wheel. Every package folder must be listed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    package_dir = setuptools.get("package-dir", {})
    folders = {"qat." + ".".join(init.parent.relative_to(ROOT / "qat").parts)
               for init in (ROOT / "qat").rglob("__init__.py") if init.parent != ROOT / "qat"} | {"qat"}
    folders |= {"qat.kernels." + ".".join(init.parent.relative_to(ROOT / "kernels").parts)
                for init in (ROOT / "kernels").rglob("__init__.py") if init.parent != ROOT / "kernels"}
    assert package_dir.get("qat.kernels") == "kernels"
    assert folders - listed == set(), f"package folders missing from pyproject.toml's packages: {folders - listed}"


def test_the_compiled_kernels_sources_ship_with_the_package():
    """kernels/native.py builds kernels/csrc/*.cpp on first use: a wheel without them loses the fast CPU paths."""
    from qat.kernels import native

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "csrc/*.cpp" in setuptools["package-data"]["qat.kernels"]
    shipped = {path.name for path in (ROOT / "kernels" / "csrc").glob("*.cpp")}
    assert {source.name for source in native.SOURCES} == shipped
