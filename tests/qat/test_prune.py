"""Pruning: the cubic schedule, exact mask counts, N:M along the input dimension, global
magnitude, the callback's schedule by step, exact zeros after fake-quant, and the 2:4 pattern
in an exported int4 file."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from torch import nn

from qat.config import QuantizerConfig, QuantSpec
from qat.export import export_model, load
from qat.export.format import PACKED, SCALES, ZEROS
from qat.export.manifest import read_manifest
from qat.export.pack import dequantize_weight, quantized_codes
from qat.export.reader import read_header
from qat.lightning.pruning import Pruning
from qat.prune import (
    MASK,
    attach_masks,
    cubic_sparsity,
    global_magnitude_masks,
    magnitude_mask,
    nm_mask,
    remove_masks,
    satisfies_nm,
    select_layers,
    sparsity_report,
    update_masks,
)
from qat.recipe import PruneConfig
from qat.swap import prepare


def distinct_weight(*shape: int, seed: int = 0) -> torch.Tensor:
    """Weights with distinct magnitudes (a permutation of 1..numel, random signs): no ties."""
    gen = torch.Generator().manual_seed(seed)
    numel = int(torch.tensor(shape).prod())
    values = (torch.randperm(numel, generator=gen) + 1).float() / numel
    signs = torch.randint(0, 2, (numel,), generator=gen).float() * 2 - 1
    return (values * signs).reshape(shape)


def test_cubic_schedule_matches_zhu_and_gupta_at_and_between_update_points():
    # s_t = 0.5 + (0 - 0.5) * (1 - (t - 10) / 10)^3, updated every 5 steps
    values = {s: cubic_sparsity(s, 0.5, 0.0, start_step=10, end_step=20, frequency=5) for s in range(0, 30)}
    assert all(values[s] == 0.0 for s in range(0, 15))
    assert all(values[s] == 0.5 - 0.5 * 0.5**3 for s in range(15, 20))
    assert all(values[s] == 0.5 for s in range(20, 30))
    assert cubic_sparsity(3, 0.8, 0.2, start_step=0, end_step=4, frequency=1) == 0.8 - 0.6 * 0.25**3
    assert cubic_sparsity(7, 0.5, start_step=7, end_step=7) == 0.5  # no ramp: one shot


def test_magnitude_mask_prunes_exactly_the_smallest_and_only_shrinks():
    weight = distinct_weight(8, 16)
    previous = torch.ones_like(weight, dtype=torch.bool)
    for sparsity in (0.1, 0.33, 0.5, 0.77):
        mask = magnitude_mask(weight, sparsity, previous)
        assert int((~mask).sum()) == round(sparsity * weight.numel())
        assert weight.abs()[~mask].max() < weight.abs()[mask].min()
        assert not (mask & ~previous).any()  # nothing pruned comes back
        previous = mask


def test_magnitude_mask_breaks_ties_by_position():
    mask = magnitude_mask(torch.ones(2, 4), 0.25)
    assert mask.flatten().tolist() == [False, False, True, True, True, True, True, True]


def test_nm_mask_keeps_the_two_largest_of_every_group_of_four_inputs():
    weight = distinct_weight(6, 32)
    mask = nm_mask(weight, 2, 4)
    groups, kept = weight.abs().reshape(-1, 4), mask.reshape(-1, 4)
    assert (kept.sum(1) == 2).all()
    top2 = torch.zeros_like(kept).scatter(1, groups.topk(2, dim=1).indices, True)
    assert torch.equal(kept, top2)
    assert satisfies_nm(weight * mask, 2, 4) and not satisfies_nm(weight, 2, 4)


def test_partial_nm_mask_has_the_exact_count_and_never_breaks_the_pattern():
    weight = distinct_weight(4, 64, seed=3)
    previous = torch.ones_like(weight, dtype=torch.bool)
    for sparsity in (0.1, 0.25, 0.4, 0.5):
        mask = nm_mask(weight, 2, 4, sparsity, previous)
        assert int((~mask).sum()) == round(sparsity * weight.numel())
        assert ((~mask).reshape(-1, 4).sum(1) <= 2).all()
        assert not (mask & ~previous).any()
        previous = mask
    assert satisfies_nm(weight * previous, 2, 4)


def test_nm_groups_a_convolution_along_its_flattened_inputs():
    weight = distinct_weight(3, 2, 2, 2)  # (O, I, kh, kw): 8 inputs per output channel
    mask = nm_mask(weight, 2, 4)
    assert ((mask.reshape(3, 2, 4)).sum(-1) == 2).all()
    with pytest.raises(ValueError, match=r"input dimension \(9\) to be a multiple of m=4"):
        nm_mask(torch.randn(4, 1, 3, 3), 2, 4)
    with pytest.raises(ValueError, match="above the most a 2:4 pattern prunes"):
        nm_mask(weight, 2, 4, 0.6)


def test_global_magnitude_uses_one_threshold_across_layers():
    # |a| = k/320 and |b| = j/32 +- 1/1000 never tie
    weights = {"a": distinct_weight(4, 8, seed=1) * 0.1, "b": distinct_weight(4, 8, seed=2) + 1e-3}
    masks = global_magnitude_masks(weights, 0.5)
    pruned = torch.cat([weights[k].abs()[~masks[k]] for k in weights])
    kept = torch.cat([weights[k].abs()[masks[k]] for k in weights])
    assert pruned.numel() == 32 and pruned.max() < kept.min()
    assert int((~masks["a"]).sum()) > int((~masks["b"]).sum())  # the small layer loses more


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc1 = nn.Linear(64, 64)
        self.fc2 = nn.Linear(64, 32)

    def forward(self, x):  # (B, 1, 6, 6) -> (B, 32)
        return self.fc2(torch.relu(self.fc1(self.conv(x).flatten(1))))


def test_layer_selection_skips_what_n_m_cannot_prune_and_honours_regexes():
    model = MLP()
    assert select_layers(model, nm_group=4) == (["fc1", "fc2"], {"conv": "input dimension 9 is not a multiple of m=4"})
    assert select_layers(model, include=["fc.*"], exclude=["fc2"]) == (["fc1"], {"fc2": "excluded by prune.exclude"})
    with pytest.raises(ValueError, match="match no Linear or Conv2d layer"):
        select_layers(model, include=["head"])


def test_masks_are_buffers_in_the_state_dict_and_removal_bakes_them_in():
    model = MLP()
    attach_masks(model, ["fc1"])
    assert f"fc1.{MASK}" in model.state_dict() and model.fc1.weight_mask.dtype == torch.bool
    update_masks(model, ["fc1"], 0.5, "nm")
    report = remove_masks(model)
    assert not hasattr(model.fc1, MASK) and f"fc1.{MASK}" not in model.state_dict()
    assert report.layers[0].pruned == 64 * 64 // 2 and report.total == 0.5 and report.layers[0].pattern_2_4
    assert int((model.fc1.weight == 0).sum()) == 64 * 64 // 2


def test_callback_reaches_the_schedule_sparsity_exactly_at_each_step():
    config = PruneConfig(enabled=True, method="magnitude", sparsity=0.6, initial_sparsity=0.1, start_step=4,
                         end_step=16, frequency=3)
    model = MLP()
    callback = Pruning(config)
    module = SimpleNamespace(model=model)
    callback.setup(None, module, "fit")
    trainer = SimpleNamespace(global_step=0, is_global_zero=False, loggers=[])
    for step in range(20):
        trainer.global_step = step
        callback.on_train_batch_start(trainer, module, None, step)
        target = cubic_sparsity(step, 0.6, 0.1, 4, 16, 3)
        for name in ("conv", "fc1", "fc2"):
            layer = model.get_submodule(name)
            assert int((~layer.weight_mask).sum()) == round(target * layer.weight.numel()), (step, name)
            assert int((layer.weight == 0).sum()) >= round(target * layer.weight.numel())
    assert callback.update_steps == [4, 7, 10, 13, 16]
    assert callback.state_dict() == {"applied_sparsity": 0.6, "update_steps": [4, 7, 10, 13, 16]}


QUANT_CASES = {
    "sym-group": QuantizerConfig(bits=4, group_size=16),
    "asym-lsq_plus-channel": QuantizerConfig(bits=4, symmetric=False, granularity="channel", quantizer="lsq_plus"),
    "asym-3bit-tensor": QuantizerConfig(bits=3, symmetric=False, granularity="tensor", quantizer="lsq_plus"),
}


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_pruned_weights_are_exactly_zero_after_fake_quant_and_get_no_gradient(case):
    torch.manual_seed(0)
    model, _ = prepare(MLP(), QuantSpec(weight=QUANT_CASES[case], activation=None))
    with torch.no_grad():  # a non-zero zero point: 0 must still quantize to exactly 0
        model.fc1.weight.add_(0.05)
        model.fc1.weight_quantizer.zero_point.fill_(3.0)
    attach_masks(model, ["fc1"])
    model.fc1.weight_mask.copy_(nm_mask(model.fc1.weight, 2, 4))  # the stored weight keeps its values
    quantized = model.fc1.quantized_weight()
    assert (quantized[~model.fc1.weight_mask] == 0).all()
    assert (model.fc1.weight[~model.fc1.weight_mask] != 0).any()
    quantized.sum().backward()
    assert (model.fc1.weight.grad[~model.fc1.weight_mask] == 0).all()
    codes, _, zeros = quantized_codes(model.fc1.weight_quantizer, model.fc1.weight * model.fc1.weight_mask)
    groups = codes.reshape(codes.shape[0], zeros.shape[1], -1).float()  # (N, G, g)
    assert torch.equal((groups == zeros.unsqueeze(-1)).reshape_as(codes)[~model.fc1.weight_mask],
                       torch.ones(int((~model.fc1.weight_mask).sum()), dtype=torch.bool))


def test_the_2_4_pattern_holds_in_the_exported_int4_file(tmp_path):
    torch.manual_seed(0)
    model, _ = prepare(MLP(), QuantSpec(weight=QuantizerConfig(bits=4, group_size=32), activation=None))
    names, _ = select_layers(model, nm_group=4)
    update_masks(model, names, 0.5, "nm")
    expected_weights = {name: model.get_submodule(name).quantized_weight().detach() for name in names}
    remove_masks(model)
    path = tmp_path / "pruned.safetensors"
    export_model(model, path)
    manifest = read_manifest(read_header(path))
    stored = safetensors.torch.load_file(str(path))
    for name in names:
        tensors = {key: stored[f"{name}.{key}"] for key in (PACKED, SCALES, ZEROS) if f"{name}.{key}" in stored}
        weight = dequantize_weight(manifest.layers[name].weight, tensors)
        assert satisfies_nm(weight, 2, 4) and int((weight == 0).sum()) == weight.numel() // 2, name
        assert torch.equal(weight, expected_weights[name]), name  # the file holds the fake-quant weights
    assert sparsity_report(model).layers == []  # the masks were baked in and dropped before export
    assert set(load(path, model=MLP()).state_dict()) >= {"fc1.weight_packed", "fc2.weight_packed"}
