"""Sharded QAT: FSDP2 on 2 CPU processes (gloo) against DDP on TinyLM, and the strategies qat refuses.

With 2 ranks both strategies average the same two gradients (a sum of two floats does not depend on
the order, and halving is exact), the forward sees the same whole weights, and the calibration
ranges are rank 0's in both: the sharded run ends bit-identical to the DDP run, and its int4
file holds the same bytes.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from torch import nn

from qat.config import ConfigError
from qat.export import export_model
from qat.lightning.sharding import check_shardable, layer_groups
from qat.recipe import load_recipe
from qat.run.build import build, model_from_checkpoint
from qat.swap import prepare
from tests.qat.run.dist_script import TINY, TINYLM
from tests.qat.run.helpers import assert_same_state, fast_recipe
from tests.qat.run.test_ddp_faults import run_dist

CHECKPOINT = ("tinylm_w4", "version_0", "checkpoints", "last.ckpt")


@pytest.fixture(scope="module")
def ddp_and_fsdp2(tinylm_runs):
    return {strategy: tinylm_runs[strategy].joinpath(*CHECKPOINT) for strategy in ("ddp", "fsdp2")}


@pytest.mark.slow
def test_fsdp2_run_ends_bit_identical_to_ddp(ddp_and_fsdp2):
    ddp, fsdp2 = (torch.load(ddp_and_fsdp2[s], weights_only=True) for s in ("ddp", "fsdp2"))
    assert ddp["global_step"] == fsdp2["global_step"] == 12
    assert ddp["state_dict"].keys() == fsdp2["state_dict"].keys()
    for key, value in ddp["state_dict"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, fsdp2["state_dict"][key]), key
    scales = [k for k in ddp["state_dict"] if k.endswith("weight_quantizer.scale")]
    assert len(scales) == 6  # every quantized layer's learned scale took part
    assert fsdp2["callbacks"]["QuantizationSchedule"]["quantized"]


def safetensors_parts(path) -> tuple[dict, bytes]:
    """(header as a dict, the tensor bytes): the file is 8 bytes of header length, the JSON header, the data."""
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + length]), raw[8 + length:]


@pytest.mark.slow
def test_int4_file_from_the_sharded_checkpoint_equals_the_ddp_one(ddp_and_fsdp2, tmp_path):
    """Equal tensor bytes and an equal header. Not byte for byte: safetensors writes the header's
    metadata keys in a hash order that changes from process to process (its Rust HashMap), so even two
    exports of one model in two processes differ there; the keys and values are the same."""
    files = {}
    for strategy, checkpoint in ddp_and_fsdp2.items():
        model, architecture, _ = model_from_checkpoint(checkpoint)
        files[strategy] = tmp_path / f"{strategy}.safetensors"
        export_model(model, files[strategy], architecture=architecture, recipe_hash="same-state")
    (ddp_header, ddp_data), (fsdp2_header, fsdp2_data) = (safetensors_parts(files[s]) for s in ("ddp", "fsdp2"))
    assert ddp_data == fsdp2_data and len(ddp_data) > 40_000  # every code, scale and float tensor
    assert ddp_header == fsdp2_header


def test_fsdp1_is_refused_with_the_strategy_to_use(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.strategy='fsdp'.*use trainer\.strategy=fsdp2"):
        build(fast_recipe(tmp_path, "trainer.strategy=fsdp"))


def test_export_at_the_end_of_a_sharded_run_is_refused_with_the_alternative(tmp_path):
    recipe = fast_recipe(tmp_path, *TINY, "trainer.strategy=fsdp2", "export.enabled=true", path=TINYLM)
    with pytest.raises(ConfigError, match="qat export RUN_DIR"):
        build(recipe)


def test_per_tensor_scales_are_named_before_fsdp2_refuses_them():
    recipe = load_recipe(TINYLM, ["quant.activation={bits: 8, granularity: tensor}"])
    model, _ = prepare(nn.Sequential(nn.Linear(64, 64)), recipe.quant)
    with pytest.raises(ConfigError, match=r"0-dim parameters: 0\.input_quantizer\.scale.*granularity 'channel'"):
        check_shardable(model)
    channel, _ = prepare(nn.Sequential(nn.Linear(64, 64)), load_recipe(TINYLM).quant)
    check_shardable(channel)  # group / channel scales are at least 1-dim: nothing to refuse


@pytest.mark.slow
def test_fsdp2_rank_killed_then_resumed_ends_bit_identical(ddp_and_fsdp2, tmp_path):
    killed = run_dist(tmp_path, "kill", "7", "trainer.strategy=fsdp2")
    # gloo words the dead peer as "reset" or "closed" depending on timing (as in test_ddp_faults)
    peer_gone = ("Connection reset by peer", "Connection closed by peer", "caused by a remote worker crashing")
    assert killed.returncode != 0 and any(text in killed.stderr for text in peer_gone)
    resumed = run_dist(tmp_path, "resume", "trainer.strategy=fsdp2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(ddp_and_fsdp2["fsdp2"], weights_only=True)["state_dict"]
    actual = torch.load(tmp_path.joinpath(*CHECKPOINT), weights_only=True)["state_dict"]
    assert_same_state(expected, actual)  # tensors and the quantizers' switches (extra states)


def test_extra_states_reach_the_quantizers_when_a_loader_skips_them():
    """Lightning loads a full checkpoint into a FSDP2 model tensor by tensor: torch hands quantizers a
    placeholder instead of their switches, which they ignore; the strategy then applies the saved ones."""
    from torch.distributed.checkpoint.state_dict import _EXTRA_STATE

    from qat.lightning.sharding import apply_extra_states

    model, _ = prepare(nn.Sequential(nn.Linear(64, 64)), load_recipe(TINYLM).quant)
    quantizer = model[0].weight_quantizer
    quantizer.set_extra_state(_EXTRA_STATE())  # ignored: the switches stay as they were
    assert quantizer.enabled and quantizer.initialized and not quantizer.frozen
    saved = {"0.weight_quantizer._extra_state": {"enabled": False, "calibrating": False, "frozen": True,
                                                 "initialized": True}, "0.weight": torch.zeros(1)}
    assert apply_extra_states(model, saved) == 1
    assert not quantizer.enabled and quantizer.frozen and not quantizer.scale.requires_grad


def test_tied_layers_form_one_fsdp2_group(tmp_path):
    from qat.run.models import build_model

    recipe = fast_recipe(tmp_path, "model.args.tie_embeddings=true", "quant.rules=[]", path=TINYLM)
    model, _ = build_model(recipe)
    assert model.embed.weight is model.lm_head.weight
    groups = {tuple(sorted(name for name, m in model.named_modules() if any(m is g for g in group)))
              for group in layer_groups(model)}
    assert ("embed", "lm_head") in groups  # together: FSDP2 refuses one parameter in two groups
    assert {("qkv",), ("proj",), ("mlp.0",), ("mlp.2",)} <= groups


@pytest.mark.slow
def test_fsdp2_with_a_tied_embedding_and_head_ends_bit_identical_to_ddp(tmp_path):
    """SmolLM2-style tying (one table for the embedding and the head, one quantizer) under both strategies."""
    states = {}
    for strategy in ("ddp", "fsdp2"):
        done = run_dist(tmp_path / strategy, "full", f"trainer.strategy={strategy}", "model.args.tie_embeddings=true",
                        "quant.rules=[]", "trainer.max_steps=6")  # 4 float steps, calibration, 2 QAT steps
        assert done.returncode == 0, done.stderr[-3000:]
        states[strategy] = torch.load(tmp_path.joinpath(strategy, *CHECKPOINT), weights_only=True)["state_dict"]
    assert_same_state(states["ddp"], states["fsdp2"])
    assert torch.equal(states["fsdp2"]["model.embed.weight"], states["fsdp2"]["model.lm_head.weight"])
