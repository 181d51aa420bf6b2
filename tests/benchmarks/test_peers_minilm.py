"""The MiniLM peer comparison (benchmarks/peers/minilm.py) on a tiny local BERT: the scoring is exact where the
math is, and the whole harness runs end to end (every section gives scored rows, or rows naming why a peer
could not run; a peer that is not installed here is skipped by its assertion, which says so)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from benchmarks.peers import minilm
from benchmarks.peers.harness import Failed
from qat.export import export_model
from qat.recipe import load_recipe
from qat.recipe.loading import recipe_to_yaml
from qat.run.eval_sources import EvalSources
from qat.run.models import architecture_of, load_float_model
from tests.qat.hf.test_train_hf import encoder_recipe
from tests.qat.hf.tiny_models import save_tiny_bert

DOMAIN_TEXT = ("The licensee may copy and distribute the program in source form. Each copy must carry this notice "
               "and the name of the author. Nothing here grants a right to use the trademarks of the licensor. "
               "Redistribution in binary form must reproduce the notice in the documentation.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(recipe yaml, qat int4 file, scratch folder) of a tiny BERT: GPTQ int4 g32, no training (fast), with a
    second validation domain read from a local text file."""
    root = tmp_path_factory.mktemp("minilm_peers")
    notes = root / "notes.txt"
    notes.write_text(" ".join([DOMAIN_TEXT] * 3))
    recipe = encoder_recipe(root, save_tiny_bert(root / "bert"), "schedule.weight_rounding=gptq",
                            f"data.args.eval_corpora=[{{name: notes, files: [{notes}]}}]")
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(recipe_to_yaml(recipe))
    sources = EvalSources(recipe, root, None)
    model = sources.ptq_model(minilm.calibration_batches(recipe, sources.datamodule()))
    file = root / "model.safetensors"
    export_model(model, file, architecture=architecture_of(recipe, model))
    return recipe_path, file, root


def test_float_scores_cosine_one_full_agreement_and_32_bits(tiny) -> None:
    recipe_path, _, _ = tiny
    recipe = load_recipe(recipe_path)
    model = load_float_model(recipe).eval()
    batches = minilm.domain_batches(EvalSources(recipe, recipe_path.parent, None).datamodule())
    assert list(batches) == [minilm.HELD_OUT, "notes"]
    reference = minilm.EmbeddingReference.from_batches(batches, model)
    row = reference.score(minilm.torch_encoder("float", model, None, ""))
    assert row.cosine == pytest.approx({d: 1.0 for d in batches}, abs=1e-6)
    assert row.nn_agreement == {d: 1.0 for d in batches} and row.bits_per_weight == 32.0


def test_cosine_and_agreement_of_another_model_against_hand_computed_values(tiny) -> None:
    recipe_path, _, _ = tiny
    recipe = load_recipe(recipe_path)
    model, other = load_float_model(recipe).eval(), load_float_model(recipe).eval()
    weight = other.encoder.layer[0].output.dense.weight
    with torch.no_grad():
        weight.add_(0.5 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    held_out = minilm.domain_batches(EvalSources(recipe, recipe_path.parent, None).datamodule())[minilm.HELD_OUT]
    batches = {minilm.HELD_OUT: held_out}
    row = minilm.EmbeddingReference.from_batches(batches, model).score(minilm.torch_encoder("x", other, None, ""))

    def pooled(m, batch):  # mean over unmasked tokens, then unit length: sentence-transformers' embedding
        with torch.no_grad():
            hidden = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    mine = torch.cat([pooled(other, b) for b in held_out])
    ref = torch.cat([pooled(model, b) for b in held_out])
    assert row.cosine[minilm.HELD_OUT] == pytest.approx(float((mine * ref).sum(-1).mean()), abs=1e-5)
    assert row.cosine[minilm.HELD_OUT] < 0.9999
    nearest = lambda e: (e @ e.T).fill_diagonal_(-2.0).argmax(-1)  # noqa: E731  (unit rows: cosine >= -1)
    assert row.nn_agreement[minilm.HELD_OUT] == pytest.approx(float((nearest(mine) == nearest(ref)).float().mean()))
    assert row.nn_agreement[minilm.HELD_OUT] < 1.0


def test_a_failing_peer_becomes_a_row_with_its_error() -> None:
    def refuses():
        raise ValueError("group_size 128 does not divide in_features of ['x']\nmore")
    failed = minilm.attempt("torchao g128", refuses)
    assert failed == Failed("torchao g128", "ValueError: group_size 128 does not divide in_features of ['x']")
    reference = minilm.EmbeddingReference(batches={"a": [], "b": []},
                                          float_embeddings={"a": torch.zeros(3, 4), "b": torch.zeros(2, 4)})
    table = minilm.markdown_table(reference, [failed])
    assert "| a (3): cosine / NN | b (2): cosine / NN |" in table
    assert "| torchao g128 | failed: ValueError: group_size 128 does not divide in_features of ['x'] | | |" in table


def test_the_comparison_runs_end_to_end_on_a_tiny_bert(tiny) -> None:
    recipe_path, file, root = tiny
    out = root / "minilm.md"
    minilm.main(["--file", str(file), "--recipe", str(recipe_path), "--groups", "32", "--work", str(root / "work"),
                 "--output", str(out)])
    table = out.read_text()
    assert "| float (fp32) | 1.0000 / 1.000 | 1.0000 / 1.000 | 32.00 |" in table
    for label in ("float (bf16)", "qat round-to-nearest, min-max", "qat GPTQ (recipe start)",
                  "qat GPTQ, embedding tables float", "qat recipe file (QAT + KD)"):
        assert f"| {label} | " in table and f"| {label} | failed" not in table
    peers = {"torchao": ["torchao int4 weight-only g32, minmax (bf16)", "torchao int4 weight-only g32, hqq (bf16)"],
             "onnxruntime": ["ONNX Runtime, float", "ONNX Runtime MatMulNBits RTN g32",
                             "ONNX Runtime MatMulNBits HQQ g32", "qat recipe file -> ONNX, in ONNX Runtime"]}
    for package, labels in peers.items():
        if importlib.util.find_spec(package) is None:
            assert f"| {package} | failed: ModuleNotFoundError" in table, f"{package} not installed: its row says so"
            continue
        for label in labels:
            assert f"| {label} | " in table and f"| {label} | failed" not in table
