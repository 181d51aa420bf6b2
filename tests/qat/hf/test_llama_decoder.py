"""The lean Llama decoder computes what the Hugging Face forward computes, on float and int4 models.

Tolerances: with float weights, or int4 weights on an exact kernel (`dequant`, `reference`), the
decoder and transformers differ only in the order of float32 sums (q|k|v as one matmul, attention
written out): 1e-5 relative to the largest logit. Against the bf16 int4pack kernel the per-layer
bf16 rounding is the same on both sides but may land on different rows: 2e-2, and the same argmax.
"""

from __future__ import annotations

import time

import pytest
import torch
from qat.kernels.cpu import int4pack_available
from qat.kernels.native import native_module
from transformers import LlamaForCausalLM

import qat
from qat.control import calibrate
from qat.export import export_model
from qat.hf.fused_linear import fuse_linears
from qat.hf.generate import choose_engine, generate, pick_token, tokenizer_for
from qat.hf.llama_decoder import LlamaDecoder, unsupported_reason
from qat.recipe import load_recipe
from qat.run.models import architecture_of, build_model
from tests.qat.data.tokenizers_for_tests import word_tokenizer
from tests.qat.hf.test_train_hf import LLAMA
from tests.qat.hf.tiny_models import VOCAB, tiny_llama_config

EXACT = 1e-5
INT4PACK = 2e-2


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids[None]).logits[0].float()


def decoded_logits(decoder: LlamaDecoder, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of every position: the prompt's from prefill, then one step per further token."""
    rows = [decoder.prefill(ids[:prompt], all_logits=True)]
    rows += [decoder.step(int(token))[None] for token in ids[prompt:]]
    return torch.cat(rows)


@pytest.fixture(scope="module")
def int4_files(tmp_path_factory, llama_folder):
    """Two int4 files of the tiny Llama: uniform (asymmetric g64) and mixed (symmetric k_proj, float gate_proj)."""
    folder = tmp_path_factory.mktemp("int4_llama")
    files = {}
    mixed = ["quant.weight.quantizer=lsq",  # lsq_plus learns zero points: symmetric layers need lsq
             "quant.rules=[{name: '.*k_proj', symmetric: true}, {name: '.*gate_proj', skip: true}]"]
    for name, overrides in (("uniform", ["quant.rules=[]"]), ("mixed", mixed)):
        recipe = load_recipe(None, [*LLAMA, f"model.hf.path={llama_folder}", f"logging.run_dir={folder}",
                                    *overrides])
        model, _ = build_model(recipe)
        calibrate(model, [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))}])
        files[name] = folder / f"{name}.safetensors"
        export_model(model, files[name], architecture=architecture_of(recipe, model))
    return files


@pytest.mark.parametrize("overrides", [
    {},
    {"num_key_value_heads": 4, "tie_word_embeddings": False, "attention_bias": True, "mlp_bias": True},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16}},
], ids=["gqa-tied", "mha-untied-biases", "llama3-rope"])
@pytest.mark.parametrize("fused_ops", [True, False], ids=["compiled-step", "tensor-step"])
def test_float_model_prefill_and_steps_match_transformers(overrides, fused_ops):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    ids = torch.randint(0, VOCAB, (24,))
    expected = hf_logits(model, ids)
    decoder = LlamaDecoder(model, max_length=32, fused_ops=fused_ops)
    assert (decoder._ops is not None) == (fused_ops and native_module() is not None)
    assert relative(decoded_logits(decoder, ids, prompt=9), expected) < EXACT
    assert decoder.length == 24
    decoder.reset()  # a cached sequence continued by a chunk of several tokens (the masked path)
    decoder.forward(ids[:5])
    assert relative(decoder.forward(ids[5:], all_logits=True), expected[5:]) < EXACT
    assert relative(hf_logits(model, ids), expected) == 0.0  # the model itself is unchanged by the fusion


@pytest.mark.parametrize("architecture", ["Mistral", "Qwen2"])
def test_other_llama_layout_architectures_match_transformers(architecture):
    import transformers

    config = getattr(transformers, f"{architecture}Config")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=32)
    torch.manual_seed(0)
    model = getattr(transformers, f"{architecture}ForCausalLM")(config).eval()
    ids = torch.randint(0, VOCAB, (24,))
    for fused_ops in (True, False):  # Qwen2's q|k|v biases through both steps
        decoder = LlamaDecoder(model, max_length=32, fused_ops=fused_ops)
        assert relative(decoded_logits(decoder, ids, prompt=9), hf_logits(model, ids)) < EXACT
    if architecture == "Mistral":  # full attention equals the sliding window only while the sequence fits in it
        with pytest.raises(ValueError, match="sliding window of 32"):
            LlamaDecoder(model, max_length=33)


def test_fused_projections_share_the_layers_storage():
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    attention = model.model.layers[0].self_attn
    fused = fuse_linears([attention.q_proj, attention.k_proj, attention.v_proj])
    assert fused.kind == "dense" and fused.sizes == [64, 32, 32]
    base = attention.q_proj.weight.data_ptr()
    assert attention.k_proj.weight.data_ptr() == base + 64 * 64 * 4  # views of one (128, 64) weight
    x = torch.randn(3, 64)
    expected = torch.cat([attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)], dim=-1)
    assert torch.allclose(fused(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["uniform", "mixed"])
@pytest.mark.parametrize("backend", ["dequant", "reference"])
def test_int4_file_on_an_exact_kernel_matches_transformers(int4_files, kind, backend):
    model = qat.load(int4_files[kind], kernel_backend=backend)
    attention = model.model.layers[0].self_attn
    assert (attention.k_proj.weight_zeros is None) == (kind == "mixed")  # symmetric k: explicit 8s when fused
    ids = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(1))
    expected = hf_logits(model, ids)
    decoder = LlamaDecoder(model, max_length=20)
    kinds = {layer.qkv.kind for layer in decoder.layers}, {layer.gate_up.kind for layer in decoder.layers}
    assert kinds == (({"int4"}, {"int4"}) if kind == "uniform" else ({"int4"}, {"separate"}))
    assert relative(decoded_logits(decoder, ids, prompt=7), expected) < EXACT


@pytest.mark.skipif(not int4pack_available(), reason="no vectorized int4pack kernel on this CPU")
def test_int4_file_on_the_int4pack_kernel_matches_transformers_within_bf16(int4_files):
    model = qat.load(int4_files["uniform"], kernel_backend="cpu_int4pack")
    ids = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(2))
    expected = hf_logits(model, ids)
    got = decoded_logits(LlamaDecoder(model, max_length=20), ids, prompt=7)
    assert relative(got, expected) < INT4PACK
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_what_the_decoder_cannot_run_is_refused_with_the_reason(bert_folder):
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(str(bert_folder))
    assert "'bert'" in unsupported_reason(bert)
    with pytest.raises(ValueError, match="bert"):
        LlamaDecoder(bert)
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sliding = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                           num_attention_heads=4, use_sliding_window=True, max_window_layers=0))
    assert "sliding-window" in unsupported_reason(sliding)
    gelu = LlamaForCausalLM(tiny_llama_config(hidden_act="gelu"))
    assert "gelu" in unsupported_reason(gelu)
    assert choose_engine(gelu, "auto") == "hf"
    with pytest.raises(ValueError, match=r"gelu.*--engine hf"):
        choose_engine(gelu, "qat")
    with pytest.raises(ValueError, match="unknown engine"):
        choose_engine(gelu, "fast")


def test_lengths_past_the_model_or_the_reservation_are_refused():
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    with pytest.raises(ValueError, match="65 tokens exceed the model's 64 positions"):
        LlamaDecoder(model, max_length=65)
    decoder = LlamaDecoder(model, max_length=4)
    decoder.prefill(torch.tensor([1, 2, 3]))
    decoder.step(5)
    with pytest.raises(ValueError, match="5 tokens exceed the reserved 4"):
        decoder.step(6)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        decoder.prefill(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="token id 64 is outside the model's vocabulary of 64"):
        decoder.prefill(torch.tensor([1, 64]))
    with pytest.raises(ValueError, match="token id -1 is outside"):
        decoder.step(-1)


def test_a_bf16_decoder_keeps_the_tensor_step():
    """The compiled operations are float32 only: a bf16 residual stream runs the tensor ops."""
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    assert LlamaDecoder(model, max_length=8, dtype=torch.bfloat16)._ops is None


def test_both_engines_generate_the_same_greedy_tokens(int4_files):
    model = qat.load(int4_files["uniform"], kernel_backend="dequant")
    tokenizer = tokenizer_for(str(int4_files["uniform"]))
    ours = generate(model, tokenizer, "the value of a function", max_new_tokens=8, engine="qat")
    theirs = generate(model, tokenizer, "the value of a function", max_new_tokens=8, engine="hf")
    assert (ours.engine, theirs.engine) == ("qat", "hf")
    assert ours.text == theirs.text and ours.new_tokens == theirs.new_tokens
    assert generate(model, tokenizer, "the value", max_new_tokens=3, engine="auto").engine == "qat"


def test_hf_engine_timings_exclude_the_first_calls_kernel_choice(monkeypatch):
    """The first call at a new number of rows may time kernel candidates: the timed prefill must not pay for it
    (it did, and decode time = whole generate - prefill came out <= 0: 2e10 tokens/s)."""
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    forward, seen = model.forward, set()

    def slow_first_call_per_length(*args, **kwargs):
        length = kwargs["input_ids"].shape[1]
        if length not in seen:
            seen.add(length)
            time.sleep(0.3 if length > 1 else 0.01)  # a one-time kernel choice at this many rows: the prompt's
            # costs more than a decode step's (more rows to time), as the int4 file's autotuning did
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", slow_first_call_per_length)
    model.generation_config.eos_token_id = None  # all six tokens, whatever they are
    result = generate(model, word_tokenizer(model_max_length=64), "the value of a function", max_new_tokens=6,
                      engine="hf")
    assert result.new_tokens == 6 and 0 < result.decode_tokens_per_s < 1e5 and result.prefill_tokens_per_s < 1e5


def test_generation_stops_at_the_end_of_sequence_token(int4_files):
    model = qat.load(int4_files["uniform"], kernel_backend="dequant")
    tokenizer = tokenizer_for(str(int4_files["uniform"]))
    model.generation_config.eos_token_id = list(range(VOCAB))  # every token ends the sequence
    assert generate(model, tokenizer, "the value", max_new_tokens=8, engine="qat").new_tokens == 1


def test_sampling_filters_and_seed():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert pick_token(logits) == 1
    assert pick_token(logits, sample=True, top_k=1) == 1  # top-k 1 is greedy
    assert pick_token(logits, sample=True, top_p=1e-3) == 1  # the first token is always kept
    # top_p 0.5 keeps tokens 1 and 3 (probabilities ~0.47 and ~0.43: 0.47 < 0.5, so 3 is kept)
    drawn = {pick_token(logits, sample=True, top_p=0.5, generator=torch.Generator().manual_seed(s))
             for s in range(40)}
    assert drawn == {1, 3}
    seeded = [pick_token(logits, sample=True, temperature=5.0, generator=torch.Generator().manual_seed(7))
              for _ in range(2)]
    assert seeded[0] == seeded[1]
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    for bad, match in (({"temperature": 0.0}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_k": -1}, "top_k")):
        with pytest.raises(ValueError, match=match):
            generate(model, None, "x", sample=True, **bad)
