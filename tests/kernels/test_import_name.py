"""`qat.kernels` is the kernels folder's import name, and importing it needs torch alone."""

from __future__ import annotations

import json
import subprocess
import sys

CHECK = """
import json, sys
import qat.kernels.dispatch
heavy = ("omegaconf", "pytorch_lightning", "lightning", "wandb", "safetensors", "torchmetrics", "rich")
print(json.dumps({
    "file": qat.kernels.__file__,
    "heavy": sorted(m for m in sys.modules if m.split(".")[0] in heavy),
    "qat": sorted(m for m in sys.modules if m.startswith("qat") and not m.startswith("qat.kernels")),
}))
"""


def test_importing_qat_kernels_loads_no_training_or_export_stack():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout
    found = json.loads(out)
    assert found["file"].endswith("kernels/__init__.py")
    assert found["heavy"] == []
    assert not [m for m in found["qat"] if m.startswith(("qat.export", "qat.lightning", "qat.recipe", "qat.run.build"))]


def test_qat_prepare_is_the_function_and_no_module_shares_its_name():
    code = ("import importlib.util, qat.run.build, qat; "
            "print(callable(qat.prepare), importlib.util.find_spec('qat.prepare') is None, qat.load.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "qat.export.load"]


def test_top_level_name_kernels_is_not_installed():
    code = "import importlib.util; print(importlib.util.find_spec('kernels') is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "True"
