"""qat file -> ONNX (MatMulNBits), checked by running ONNX Runtime against qat.load on the reference kernel.

Tolerance: ONNX Runtime's MLAS kernels sum the K products of each output in another order
than torch's float32 GEMM (and dequantize blockwise), so outputs differ by float32
rounding only. Measured worst: 3.7e-7 of the largest |logit| (TinyLM, K <= 256); the tests
allow ONNX_TOLERANCE = 1e-5. The weights themselves map exactly (tested bit for bit below).
"""

from __future__ import annotations

import pytest
import torch
from deploy_models import (
    LLAMA_KV_HEADS,
    digits_validation,
    export_bert,
    export_digits,
    export_llama,
    export_tiny_lm,
    relative_deviation,
    weight_config,
)

import qat
from qat import QuantSpec
from qat.export.pack import dequantize_codes
from qat.export.targets import ConversionError, convert
from qat.export.targets.matmul_nbits import choose_layout, dequantize_nbits, nbits_tensors

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from qat.export.targets.onnx import export_onnx, onnx_session, run_onnx  # noqa: E402
from qat.export.verify import verify  # noqa: E402

ONNX_TOLERANCE = 1e-5


@pytest.mark.parametrize(("k", "group_size", "block", "repeat"),
                         [(64, 16, 16, 1), (256, 128, 128, 1), (96, 48, 16, 3), (512, 256, 128, 2), (9, 9, 16, 1),
                          (200, 200, 256, 1)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matmul_nbits_layout_dequantizes_to_our_weights_exactly(k: int, group_size: int, block: int, repeat: int,
                                                                symmetric: bool) -> None:
    generator = torch.Generator().manual_seed(k + group_size)
    n, groups = 6, k // group_size
    codes = torch.randint(0, 16, (n, k), generator=generator, dtype=torch.uint8)
    scales = (torch.rand(n, groups, generator=generator) + 0.01).half()
    zeros = torch.randint(0, 16, (n, groups), generator=generator, dtype=torch.uint8) if not symmetric else \
        torch.full((n, groups), 8, dtype=torch.uint8)
    layout = choose_layout(k, group_size)
    assert (layout.block_size, layout.repeat) == (block, repeat)
    b, block_scales, zero_points = nbits_tensors(codes, scales, zeros, layout, default_zero=symmetric)
    assert b.shape == (n, layout.blocks, block // 2) and block_scales.shape == (n, layout.blocks)
    assert (zero_points is None) == symmetric
    expected = dequantize_codes(codes, scales, None if symmetric else zeros, 8, group_size)
    assert torch.equal(dequantize_nbits(b, block_scales, zero_points, k), expected)


@pytest.mark.parametrize(("k", "group_size"), [(96, 24), (300, 300), (64, 8)])
def test_groups_matmul_nbits_cannot_hold_have_no_layout(k: int, group_size: int) -> None:
    assert choose_layout(k, group_size) is None


@pytest.mark.slow
def test_digits_cnn_onnx_runtime_agrees_with_qat_load(tmp_path) -> None:
    images, _ = digits_validation()
    export_digits(tmp_path / "digits.safetensors", images)
    report = export_onnx(tmp_path / "digits.safetensors", tmp_path / "digits.onnx")
    assert report.matmul_nbits == ["classifier.1", "classifier.4"]
    assert set(report.dequantized) == {"features.0", "features.3"}
    expected = qat.load(tmp_path / "digits.safetensors", kernel_backend="reference")(images)
    actual = run_onnx(onnx_session(tmp_path / "digits.onnx"), (images,))
    assert relative_deviation(actual, expected) < ONNX_TOLERANCE
    assert torch.equal(actual.argmax(1), expected.argmax(1))  # top-1 identical on all 359 validation images
    graph = onnx.load(tmp_path / "digits.onnx").graph
    nodes = [node for node in graph.node if node.op_type == "MatMulNBits"]
    assert len(nodes) == 2 and all(node.domain == "com.microsoft" for node in nodes)
    attributes = {a.name: a.i for a in nodes[0].attribute}
    assert attributes == {"K": 1024, "N": 128, "bits": 4, "block_size": 128, "accuracy_level": 0}
    assert verify(tmp_path / "digits.onnx").passed  # the golden data travelled into metadata_props


@pytest.mark.slow
def test_tiny_lm_asymmetric_codes_travel_unchanged_shapes_are_dynamic_and_verify_catches_edits(tmp_path) -> None:
    export_tiny_lm(tmp_path / "lm.safetensors", symmetric=False, quantizer="lsq_plus")
    export_onnx(tmp_path / "lm.safetensors", tmp_path / "lm.onnx", accuracy_level=1)
    loaded = qat.load(tmp_path / "lm.safetensors", kernel_backend="reference")
    session = onnx_session(tmp_path / "lm.onnx")
    for shape in [(2, 16), (1, 5), (3, 32)]:
        tokens = torch.randint(0, 64, shape, generator=torch.Generator().manual_seed(shape[1]))
        assert relative_deviation(run_onnx(session, (tokens,)), loaded(tokens)) < ONNX_TOLERANCE
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(tmp_path / "lm.onnx").graph.initializer}
    packed = loaded.qkv.weight_packed  # (192, 32): K = 64, group 32 -> 2 blocks of 16 bytes per row
    b = next(torch.from_numpy(v.copy()) for v in initializers.values() if v.shape == (192, 2, 16))
    assert torch.equal(b.reshape(192, 32), packed)  # the stored bytes, unchanged
    assert verify(tmp_path / "lm.onnx").passed  # accuracy_level 1: float32, the exact tolerance
    _scale_one_row(tmp_path / "lm.onnx", [256, 2])  # mlp.0 (N=256, K=64, groups of 32), edited after conversion
    report = verify(tmp_path / "lm.onnx")
    assert not report.passed and report.deviation > 1e-3


def _scale_one_row(path, shape: list[int]) -> None:
    model = onnx.load(path)
    scales = next(i for i in model.graph.initializer if list(i.dims) == shape)
    values = onnx.numpy_helper.to_array(scales).copy()
    values[3] *= 1.5  # one output row's scales
    scales.CopyFrom(onnx.numpy_helper.from_array(values, scales.name))
    onnx.save(model, path)


@pytest.mark.slow
def test_bert_from_a_local_config_onnx_runtime_agrees(tmp_path) -> None:
    pytest.importorskip("transformers")
    export_bert(tmp_path / "bert.safetensors")
    report = export_onnx(tmp_path / "bert.safetensors", tmp_path / "bert.onnx")
    assert len(report.matmul_nbits) == 13  # 2 layers x (q, k, v, attention output, intermediate, output), pooler
    loaded = qat.load(tmp_path / "bert.safetensors", kernel_backend="reference")
    session = onnx_session(tmp_path / "bert.onnx")
    for shape in [(2, 12), (1, 5), (3, 20)]:
        ids = torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(shape[1]))
        assert relative_deviation(run_onnx(session, (ids,)), loaded(ids).logits) < ONNX_TOLERANCE


@pytest.mark.slow
def test_llama_causal_lm_onnx_runtime_agrees_at_other_batch_and_length(tmp_path) -> None:
    pytest.importorskip("transformers")
    export_llama(tmp_path / "llama.safetensors")  # golden input (1, 8): traced with batch 2, shapes stay dynamic
    export_onnx(tmp_path / "llama.safetensors", tmp_path / "llama.onnx")
    loaded = qat.load(tmp_path / "llama.safetensors", kernel_backend="reference")
    session = onnx_session(tmp_path / "llama.onnx")
    for shape in [(1, 8), (2, 5), (1, 20)]:
        ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(shape[1]))
        assert relative_deviation(run_onnx(session, (ids,)), loaded(ids).logits) < ONNX_TOLERANCE


@pytest.mark.parametrize("tie", [False, True])
def test_llama_with_a_kv_cache_prefill_then_steps_equal_the_whole_sequence(tmp_path, tie) -> None:
    """A prompt of 5 tokens from an empty cache, then one token at a time feeding the presents back:
    every position's logits as `qat.load` gives for the whole sequence at once (same float32 tolerance)."""
    from qat.cli import main
    from qat.export.targets.onnx_cache import empty_cache

    export_llama(tmp_path / "llama.safetensors", tie=tie, symmetric=False)
    assert main(["export", str(tmp_path / "llama.safetensors"), "--to", "onnx", "--kv-cache",
                 "-o", str(tmp_path / "llama-kv.onnx")]) == 0
    session = onnx_session(tmp_path / "llama-kv.onnx")
    assert [i.name for i in session.get_inputs()] == ["input_ids", "past_keys", "past_values"]
    loaded = qat.load(tmp_path / "llama.safetensors", kernel_backend="reference")
    for batch in (1, 2):
        ids = torch.randint(0, 128, (batch, 9), generator=torch.Generator().manual_seed(batch))
        keys, values = (t.numpy() for t in empty_cache(loaded.config, batch))
        logits, keys, values = session.run(None, {"input_ids": ids[:, :5].numpy(), "past_keys": keys,
                                                  "past_values": values})
        rows = [torch.from_numpy(logits)]
        for position in range(5, 9):
            logits, keys, values = session.run(None, {"input_ids": ids[:, position:position + 1].numpy(),
                                                      "past_keys": keys, "past_values": values})
            rows.append(torch.from_numpy(logits))
        assert keys.shape == (2, batch, LLAMA_KV_HEADS, 9, 16)
        assert relative_deviation(torch.cat(rows, dim=1), loaded(ids).logits) < ONNX_TOLERANCE


def test_kv_cache_graphs_are_refused_for_other_models(tmp_path) -> None:
    export_tiny_lm(tmp_path / "tiny.safetensors")
    with pytest.raises(ConversionError, match="KV cache: model type 'TinyLM'"):
        convert(tmp_path / "tiny.safetensors", "onnx", tmp_path / "tiny.onnx", kv_cache=True)
    assert not (tmp_path / "tiny.onnx").exists()


def test_unsupported_layers_are_refused_by_name(tmp_path) -> None:
    export_tiny_lm(tmp_path / "w5.safetensors", group_size=64, bits=5)
    with pytest.raises(ConversionError, match=r"layer 'qkv': 5-bit weights; MatMulNBits is written for at most 4"):
        export_onnx(tmp_path / "w5.safetensors", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("symmetric", [True, False])
def test_two_and_three_bit_layers_are_matmul_nbits_in_four_bit_containers_exactly(tmp_path, bits, symmetric) -> None:
    export_tiny_lm(tmp_path / "lm.safetensors", bits=bits, group_size=32, symmetric=symmetric)
    report = export_onnx(tmp_path / "lm.safetensors", tmp_path / "lm.onnx")
    assert report.dequantized == {"embed": "embedding table, exact dequantized values"}  # every Linear: MatMulNBits
    loaded = qat.load(tmp_path / "lm.safetensors", kernel_backend="reference")
    graph = onnx.load(tmp_path / "lm.onnx").graph
    initializers = {i.name: torch.from_numpy(onnx.numpy_helper.to_array(i).copy()) for i in graph.initializer}
    for node in (node for node in graph.node if node.op_type == "MatMulNBits"):
        attributes = {a.name: a.i for a in node.attribute}
        assert attributes["bits"] == 4
        b, scales = initializers[node.input[1]], initializers[node.input[2]]
        zero_points = initializers[node.input[3]] if len(node.input) > 3 and node.input[3] else None
        weight = dequantize_nbits(b, scales, zero_points, attributes["K"])
        matches = [name for name, module in loaded.named_modules() if hasattr(module, "dequantized_weight")
                   and tuple(module.dequantized_weight().shape) == tuple(weight.shape)
                   and torch.equal(module.dequantized_weight().float(), weight)]
        assert matches, f"{node.name}: no layer of the qat file dequantizes to this node's weight exactly"
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    assert relative_deviation(run_onnx(onnx_session(tmp_path / "lm.onnx"), (tokens,)), loaded(tokens)) < ONNX_TOLERANCE


@pytest.mark.slow
def test_the_default_recipes_w2a4_digits_file_runs_its_linear_layers_as_matmul_nbits(tmp_path) -> None:
    images, _ = digits_validation()
    export_digits(tmp_path / "digits.safetensors", images, weight_bits=2)
    report = export_onnx(tmp_path / "digits.safetensors", tmp_path / "digits.onnx")
    assert report.matmul_nbits == ["classifier.1", "classifier.4"]
    expected = qat.load(tmp_path / "digits.safetensors", kernel_backend="reference")(images)
    actual = run_onnx(onnx_session(tmp_path / "digits.onnx"), (images,))
    assert relative_deviation(actual, expected) < ONNX_TOLERANCE
    assert torch.equal(actual.argmax(1), expected.argmax(1))
    assert verify(tmp_path / "digits.onnx").passed


def test_a_file_without_golden_inputs_needs_example_inputs(tmp_path) -> None:
    from export_test_models import MLP

    model, _ = qat.prepare(MLP(), QuantSpec(weight=weight_config(group_size=16)))
    qat.export_model(model, tmp_path / "m.safetensors", architecture={"_target_": "export_test_models.MLP"})
    with pytest.raises(ConversionError, match="no golden inputs in the file"):
        export_onnx(tmp_path / "m.safetensors", tmp_path / "m.onnx")
