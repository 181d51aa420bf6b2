"""Pruning survives export: the report is recorded in `qat.sparsity`, and the 2:4 zeros are exact codes."""

from __future__ import annotations

import pytest
import torch
from qat.kernels.reference import dequantize_int4
from safetensors import safe_open
from torch import nn

import qat
from qat.export.inspect import inspect_checkpoint
from qat.export.manifest import read_manifest
from qat.export.reader import read_header
from qat.prune import attach_masks, remove_masks


def pruned_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    model, _ = qat.prepare(model, qat.QuantSpec(weight=qat.QuantizerConfig(group_size=32)))
    layer = model[0]
    mask = torch.ones_like(layer.weight, dtype=torch.bool).view(32, 16, 4)
    mask[..., :2] = False  # 2 of every 4 consecutive inputs pruned
    attach_masks(model, {"0": layer})
    layer.weight_mask.copy_(mask.view(32, 64))
    return model


def test_sparsity_report_is_recorded_and_the_file_holds_the_2_4_pattern(tmp_path):
    model = pruned_model()
    report = remove_masks(model).as_dict()
    path = tmp_path / "pruned.safetensors"
    qat.export_model(model, path, sparsity=report)
    manifest = read_manifest(read_header(path))
    assert manifest.sparsity == report and manifest.sparsity["layers"]["0"]["2:4"] is True
    header = read_header(path)
    with safe_open(str(path), "pt") as handle:
        packed, scales = handle.get_tensor("0.weight_packed"), handle.get_tensor("0.weight_scales")
    weights = dequantize_int4(packed, scales, None, 32).view(32, 16, 4)
    assert torch.equal(weights[..., :2], torch.zeros_like(weights[..., :2]))  # exact zeros, sign included
    assert not torch.signbit(weights[..., :2]).any()
    assert header.metadata["qat.sparsity"]
    assert "0.5000 over 1 layer(s), 1 with a 2:4 pattern" in str(inspect_checkpoint(path))


def test_unpruned_files_have_no_sparsity_entry(tmp_path):
    model, _ = qat.prepare(nn.Sequential(nn.Linear(32, 8)), qat.QuantSpec(weight=qat.QuantizerConfig(group_size=32)))
    qat.export_model(model, tmp_path / "dense.safetensors")
    assert read_manifest(read_header(tmp_path / "dense.safetensors")).sparsity is None


def test_a_non_dict_sparsity_is_refused(tmp_path):
    model, _ = qat.prepare(nn.Sequential(nn.Linear(32, 8)), qat.QuantSpec(weight=qat.QuantizerConfig(group_size=32)))
    with pytest.raises(qat.ExportError, match="sparsity must be a dict"):
        qat.export_model(model, tmp_path / "x.safetensors", sparsity=[0.5])
