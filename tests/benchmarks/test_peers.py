"""The peer comparison (benchmarks/peers) on a tiny local Llama: the scoring is exact where the math is, and
the whole harness runs end to end with every peer installed here (a peer that is not gets a row naming why).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.peers import smollm2
from benchmarks.peers.harness import Candidate, Failed, Reference, markdown_table, module_logits, tensor_bytes
from qat.recipe import load_recipe
from qat.run.train import train
from tests.qat.hf.test_train_hf import LLAMA
from tests.qat.hf.tiny_models import VOCAB, save_tiny_llama


def tiny_model():
    from transformers import LlamaForCausalLM

    from tests.qat.hf.tiny_models import tiny_llama_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def blocks(count: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (count, length), generator=generator).tolist()


def test_float_candidate_scores_zero_kl_full_agreement_and_its_own_perplexity() -> None:
    model = tiny_model()
    text = {"a": blocks(3, 12, 0), "b": blocks(2, 9, 1)}
    reference = Reference.from_blocks(text, model)
    row = reference.score(Candidate("float", module_logits(model), 4 * reference.parameters, 0.0))
    assert row.kl == 0.0 and row.top1 == 1.0 and row.bits_per_weight == 32.0
    for domain, domain_blocks in text.items():  # perplexity by hand: exp of the mean next-token cross-entropy
        with torch.no_grad():
            losses = [F.cross_entropy(model(input_ids=torch.tensor([ids])).logits[0, :-1], torch.tensor(ids[1:]),
                                      reduction="sum") for ids in domain_blocks]
        expected = math.exp(float(sum(losses)) / sum(len(ids) - 1 for ids in domain_blocks))
        assert row.perplexity[domain] == pytest.approx(expected, rel=1e-5)  # float32 sums in another order


def test_kl_and_agreement_of_a_different_model_against_a_hand_computed_value() -> None:
    model, other = tiny_model(), tiny_model()
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)  # sharper logits: same argmax everywhere, a positive KL
    text = {"a": blocks(2, 10, 3)}
    row = Reference.from_blocks(text, model).score(Candidate("x", module_logits(other), 0, None))
    with torch.no_grad():
        p = torch.cat([F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1], -1) for ids in text["a"]])
        q = torch.cat([F.log_softmax(other(input_ids=torch.tensor([ids])).logits[0, :-1], -1) for ids in text["a"]])
    assert row.kl == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-4)
    assert row.kl > 0 and row.top1 == 1.0


def test_tied_tensors_count_once_in_the_weight_bytes() -> None:
    model = tiny_model()  # embedding and head tied: one (64, 64) float32 table
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    expected = sum(p.numel() for p in model.parameters()) * 4  # parameters() yields a tied tensor once
    assert tensor_bytes(state) == expected


def test_failed_peer_gets_a_row_with_its_error() -> None:
    reference = Reference(blocks={"a": [[1, 2, 3]]}, parameters=10)
    table = markdown_table(reference, [Failed("llama.cpp", "ModuleNotFoundError: No module named 'llama_cpp'")])
    assert "| llama.cpp | failed: ModuleNotFoundError: No module named 'llama_cpp' |" in table


@pytest.mark.slow
def test_the_comparison_runs_end_to_end_on_a_tiny_run(tmp_path: Path, capsys) -> None:
    """A tiny QAT + KD run, then the SmolLM2 comparison script on its file: every section gives rows (scored,
    or a row naming the failure), and qat's rows are scored."""
    folder = save_tiny_llama(tmp_path / "llama", intermediate_size=128)  # every Linear takes groups of 64
    recipe = load_recipe(None, [*LLAMA, f"model.hf.path={folder}", f"logging.run_dir={tmp_path / 'runs'}",
                                "export.enabled=true"])
    summary = train(recipe, quiet=True)
    run_dir = Path(summary["run_dir"])
    out = tmp_path / "peers.md"
    smollm2.main(["--file", str(run_dir / "model.safetensors"), "--recipe", str(run_dir / "recipe.yaml"),
                  "--tokens", "64", "--work", str(tmp_path / "work"), "--skip", "torchao-qat", "llama.cpp",
                  "--output", str(out)])
    table = out.read_text()
    for label in ("float (fp32)", "qat round-to-nearest, min-max", "qat GPTQ (recipe start)",
                  "qat recipe file (QAT + KD)"):
        assert f"| {label} | " in table and f"| {label} | failed" not in table
    assert "ONNX Runtime MatMulNBits RTN g64" in table or "| onnxruntime | failed" in table
    assert "| torchao int4 weight-only g64, minmax (bf16) | " in table or "| torchao | failed" in table
    assert "| torchao int4 weight-only g128, minmax (bf16) | failed: group_size 128 does not divide" in table
