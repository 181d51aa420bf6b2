"""llama.cpp itself (llama-cpp-python, built by `make`) runs our GGUF files like `qat.load` does.

Tiny Llamas from local configs (random weights): symmetric groups (Q4_0), asymmetric groups
(Q4_1), tied embeddings (the table written once as token_embd), no tokenizer (token ids only).
llama.cpp rounds activations to 8 bits (Q8_0 / Q8_1 blocks of 32) for its 4-bit dot products
and keeps the KV cache in float16, so logits are compared with a tolerance, against
`qat.load` on the exact reference kernel with float32 activations; the real SmolLM2 file is
checked in tests/qat/hf/test_real_models.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from deploy_models import export_llama

import qat
from qat.export.targets.gguf import export_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python did not build (`make llama` builds it)")
from qat.export.targets.llama_cpp_run import llama_greedy, llama_logits, open_llama  # noqa: E402

# max |llama.cpp - qat.load| / max |qat.load| over the logits: measured 0.003-0.012 on these models
# (three seeds each; 8-bit activation rounding, float16 KV cache); the bound leaves a margin of 2.5x.
TOLERANCE = 0.03


@pytest.mark.parametrize(("options", "kind"), [
    ({"group_size": 32}, "Q4_0"),
    ({"group_size": 64, "symmetric": False, "quantizer": "lsq_plus"}, "Q4_1"),
    ({"group_size": 32, "tie": True}, "Q4_0"),
])
def test_llama_cpp_logits_match_qat_load(tmp_path: Path, options: dict, kind: str) -> None:
    export_llama(tmp_path / "llama.safetensors", **options)
    report = export_gguf(tmp_path / "llama.safetensors", tmp_path / "llama.gguf")
    assert report.types["blk.0.ffn_down.weight"] == kind
    loaded = qat.load(tmp_path / "llama.safetensors", kernel_backend="reference")
    ids = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = loaded(input_ids=torch.tensor([ids])).logits[0]  # (24, 128)
    llm = open_llama(tmp_path / "llama.gguf", n_ctx=64)
    got = llama_logits(llm, ids)
    assert got.shape == expected.shape
    deviation = float((got - expected).abs().max() / expected.abs().max())
    assert deviation < TOLERANCE, deviation
    assert int((got.argmax(-1) != expected.argmax(-1)).sum()) <= 1  # measured: none of 24 differ


def test_llama_cpp_greedy_continuation_reuses_its_cache(tmp_path: Path) -> None:
    """Decoding token by token through llama.cpp's KV cache gives the argmax of a full forward pass."""
    export_llama(tmp_path / "llama.safetensors", group_size=32)
    export_gguf(tmp_path / "llama.safetensors", tmp_path / "llama.gguf")
    llm = open_llama(tmp_path / "llama.gguf", n_ctx=64)
    prompt = [5, 17, 99, 3]
    run = llama_greedy(llm, prompt, 8)
    assert len(run.tokens) == 8 and run.prefill_s > 0 and run.decode_s > 0
    full = llama_logits(llm, prompt + run.tokens[:-1])
    assert full[len(prompt) - 1:].argmax(-1).tolist() == run.tokens
