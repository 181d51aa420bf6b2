"""Self-generated distillation text (qat.data.generated) on the tiny local Llama: sampling settings, the
on-disk cache (hit, resume after a kill, a corrupt file, the key), the RNG left alone, and the training mix."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from qat.data import GeneratedTextDataModule, TextDataModule, generate_blocks
from qat.data import generated as gen
from qat.data.generated import GenerationCache, GenerationSettings, mix_indices, sampler_dtype, weights_digest
from qat.data.loading import calibration_loader, validation_loaders
from tests.qat.data.tokenizers_for_tests import WORDS, word_tokenizer
from tests.qat.hf.tiny_models import VOCAB, save_tiny_llama

SPECIAL = [0, 1, 2, 3, 4]
REAL_GENERATE_BATCH = gen.generate_batch
SETTINGS = GenerationSettings(seq_len=12, temperature=1.0, top_p=0.9, batch_size=4, seed=3)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from transformers import LlamaForCausalLM

    folder = save_tiny_llama(tmp_path_factory.mktemp("gen_llama"))
    return LlamaForCausalLM.from_pretrained(str(folder)).eval()


def blocks(teacher, root, count=10, settings=SETTINGS, **kwargs):
    return generate_blocks(teacher, count, settings, excluded_first_tokens=SPECIAL, cache_root=root, progress=False,
                           **kwargs)


class KilledError(Exception):
    """Stands for the process being killed between two batches."""


class Counting:
    """Wraps gen.generate_batch: counts the batches generated, and can stop (like a kill) before one."""

    def __init__(self, monkeypatch, stop_at=None):
        self.calls, self.stop_at, self.real = [], stop_at, REAL_GENERATE_BATCH
        monkeypatch.setattr(gen, "generate_batch", self)

    def __call__(self, model, index, *args):
        if index == self.stop_at:
            raise KilledError
        self.calls.append(index)
        return self.real(model, index, *args)


def test_sequences_have_the_length_first_tokens_outside_the_specials_and_no_eos(teacher, tmp_path):
    out = blocks(teacher, tmp_path, count=10)
    assert out.shape == (10, 12) and out.dtype == torch.long
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB
    assert not set(out[:, 0].tolist()) & set(SPECIAL)
    assert not (out == teacher.generation_config.eos_token_id).any()  # suppressed: every sequence is whole
    assert len(set(map(tuple, out.tolist()))) == 10


def test_generation_leaves_the_callers_random_state_and_the_teachers_mode_alone(teacher, tmp_path):
    teacher.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    blocks(teacher, tmp_path, count=4)
    assert torch.equal(torch.get_rng_state(), before) and teacher.training
    teacher.eval()


def test_a_cache_hit_returns_identical_tokens_without_generating(teacher, tmp_path, monkeypatch):
    first = blocks(teacher, tmp_path, count=10)
    counting = Counting(monkeypatch)
    again = blocks(teacher, tmp_path, count=10)
    assert torch.equal(first, again) and counting.calls == []
    assert torch.equal(blocks(teacher, tmp_path, count=6), first[:6]) and counting.calls == []
    more = blocks(teacher, tmp_path, count=14)  # one more batch: only it is generated
    assert torch.equal(more[:10], first) and counting.calls == [3]


def test_a_killed_generation_resumes_from_the_batches_it_stored(teacher, tmp_path, monkeypatch):
    whole = blocks(teacher, tmp_path / "uninterrupted", count=16)
    Counting(monkeypatch, stop_at=2)
    with pytest.raises(KilledError):
        blocks(teacher, tmp_path / "killed", count=16)
    (folder,) = (tmp_path / "killed").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["batches"]) == ["0", "1"]
    counting = Counting(monkeypatch)
    resumed = blocks(teacher, tmp_path / "killed", count=16)
    assert counting.calls == [2, 3] and torch.equal(resumed, whole)


def test_a_batch_file_that_does_not_match_its_hash_is_generated_again(teacher, tmp_path, monkeypatch):
    first = blocks(teacher, tmp_path, count=8)
    (folder,) = tmp_path.iterdir()
    torch.save(torch.zeros(4, 12, dtype=torch.long), folder / "batch_00001.pt")
    counting = Counting(monkeypatch)
    assert torch.equal(blocks(teacher, tmp_path, count=8), first) and counting.calls == [1]


def test_the_cache_key_holds_the_weights_and_every_setting(teacher, tmp_path):
    digest = weights_digest(teacher)
    key = GenerationCache(digest, SETTINGS, VOCAB, SPECIAL, tmp_path).key
    changed = [GenerationCache(digest, GenerationSettings(**{**SETTINGS.__dict__, name: value}), VOCAB, SPECIAL,
                               tmp_path).key
               for name, value in (("temperature", 0.7), ("top_p", 1.0), ("batch_size", 2), ("seed", 4),
                                   ("seq_len", 16), ("dtype", "bfloat16"))]
    changed.append(GenerationCache("0" * 64, SETTINGS, VOCAB, SPECIAL, tmp_path).key)
    changed.append(GenerationCache(digest, SETTINGS, VOCAB, [0], tmp_path).key)
    assert len({key, *changed}) == len(changed) + 1
    other = blocks(teacher, tmp_path, count=4, settings=GenerationSettings(**{**SETTINGS.__dict__, "temperature": 0.5}))
    assert not torch.equal(other, blocks(teacher, tmp_path, count=4)) and len(list(tmp_path.iterdir())) == 2
    perturbed = {k: v.clone() for k, v in teacher.state_dict().items()}
    perturbed["lm_head.weight"][0, 0] += 1.0
    assert weights_digest(_with_state(teacher, perturbed)) != digest


@pytest.mark.parametrize(("bf16", "amx", "expected"), [(True, False, "bfloat16"), (False, True, "bfloat16"),
                                                      (False, False, "float32")])
def test_auto_sampler_dtype_is_bfloat16_only_where_the_cpu_multiplies_it_natively(monkeypatch, bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert sampler_dtype("auto") == expected
    assert sampler_dtype("auto", "cuda") == "bfloat16"
    assert sampler_dtype("float32", "cuda") == "float32" and sampler_dtype("bfloat16") == "bfloat16"


def test_the_data_module_keys_its_cache_by_the_resolved_sampler_dtype(monkeypatch, teacher):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    dm = GeneratedTextDataModule(word_tokenizer(model_max_length=64), teacher=teacher, seq_len=12)
    assert dm.settings.dtype == "float32"
    with pytest.raises(ValueError, match="generation dtype='float16'"):
        GeneratedTextDataModule(word_tokenizer(model_max_length=64), teacher=teacher, seq_len=12,
                                generation_dtype="float16")


def _with_state(model, state):
    import copy

    clone = copy.deepcopy(model)
    clone.load_state_dict(state)
    return clone


@pytest.mark.parametrize("bad, message", [(dict(temperature=0.0), "temperature"), (dict(top_p=0.0), "top_p"),
                                          (dict(batch_size=0), "batch_size"), (dict(seq_len=1), "length")])
def test_bad_generation_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        GenerationSettings(**{**SETTINGS.__dict__, **bad})


@pytest.mark.parametrize("num_user, num_generated, weight, size, generated", [
    (30, 8, 0.25, 40, 10), (30, 8, 0.5, 60, 30), (10, 40, 0.5, 80, 40), (30, 8, None, 38, 8), (30, 8, 1.0, 8, 8),
    (30, 8, 0.0, 30, 0)])
def test_mixing_gives_the_stated_share_and_every_block_each_epoch(num_user, num_generated, weight, size, generated):
    index = mix_indices(num_user, num_generated, weight)
    assert len(index) == size and sum(source for source, _ in index) == generated
    used = Counter(index)
    if weight != 1.0:
        assert {i for s, i in used if s == 0} == set(range(num_user))
    if weight != 0.0:
        assert {i for s, i in used if s == 1} == set(range(num_generated))


def words_file(tmp_path):
    """Words of the test tokenizer in a seeded random order: distinct training blocks."""
    import random

    path = tmp_path / "words.txt"
    rng = random.Random(0)
    path.write_text(" ".join(rng.choice(WORDS) for _ in range(12 * 50)), encoding="utf-8")
    return str(path)


def module(teacher, tmp_path, **kwargs):
    settings = dict(files=[words_file(tmp_path)], seq_len=12, batch_size=4, val_tokens=48, max_train_blocks=30,
                    generated_sequences=8, generated_weight=0.25, generation_batch_size=4,
                    cache_dir=str(tmp_path / "cache"), progress=False,
                    vocab_size=VOCAB, eval_corpora=["sklearn:descr"])
    settings.update(kwargs)
    dm = GeneratedTextDataModule(word_tokenizer(model_max_length=64), teacher=teacher, **settings)
    dm.setup("fit")
    return dm


def rows_of(loader):
    return [tuple(r) for b in loader for r in b["input_ids"].tolist()]


def test_the_training_epoch_mixes_user_and_generated_blocks_by_weight_and_validation_stays_user_text(teacher,
                                                                                                      tmp_path):
    dm = module(teacher, tmp_path)
    generated = {tuple(r) for r in dm.generated_set.blocks.tolist()}
    user = {tuple(r) for r in dm.user_train_set.blocks.tolist()}
    assert len(generated) == 8 and len(user) == 30 and not generated & user
    epoch = rows_of(dm.train_dataloader())
    assert len(epoch) == 40 and sum(r in generated for r in epoch) == 10  # 25 %, exactly
    assert set(epoch) == generated | user
    validation = {r for loader in validation_loaders(dm).values() for r in rows_of(loader)}
    assert not validation & generated
    assert dm.teacher is None  # let go after setup
    assert "8 generated blocks, 25% of the 40 training blocks" in dm.summary()
    # the generated blocks are those generate_blocks gives for the data module's settings (seed = seed)
    excluded = gen._special_ids(dm.tokenizer)  # the tokenizer's special tokens: [PAD], [UNK], [EOS]
    again = generate_blocks(teacher, 8, dm.settings, excluded_first_tokens=excluded, cache_root=tmp_path / "cache",
                            progress=False)
    assert excluded == [0, 1, 4] and dm.settings.seed == 0 and torch.equal(dm.generated_set.blocks, again)


def test_weight_zero_generates_nothing_and_needs_no_teacher(tmp_path):
    dm = module(None, tmp_path, generated_weight=0.0)
    assert len(dm.generated_set) == 0 and len(dm.train_set) == 30 and not (tmp_path / "cache").exists()


def test_no_teacher_is_an_error_saying_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="needs the teacher model"):
        module(None, tmp_path)


@pytest.mark.parametrize("source", ["mix", "user", "generated"])
def test_calibration_batches_come_from_the_chosen_source_in_training_order(teacher, tmp_path, source):
    dm = module(teacher, tmp_path, calibration_source=source)
    generated = {tuple(r) for r in dm.generated_set.blocks.tolist()}
    user = {tuple(r) for r in dm.user_train_set.blocks.tolist()}
    rows = rows_of(calibration_loader(dm))
    expected = {"mix": generated | user, "user": user, "generated": generated}[source]
    assert set(rows) == expected and len(rows) == len(rows_of(dm.train_dataloader()) if source == "mix" else expected)
    if source == "mix":  # the training loader itself: the first batches a run trains on
        assert rows == rows_of(dm.train_dataloader())


def test_a_data_module_without_a_calibration_loader_calibrates_on_its_training_batches(tmp_path):
    dm = TextDataModule(word_tokenizer(model_max_length=64), files=[words_file(tmp_path)], seq_len=12, batch_size=4,
                        val_tokens=48)
    dm.setup("fit")
    assert not hasattr(dm, "calibration_dataloader")
    assert rows_of(calibration_loader(dm)) == rows_of(dm.train_dataloader())


def test_an_unknown_calibration_source_is_refused_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match="calibration_source='teacher': use one of mix, user, generated"):
        module(None, tmp_path, generated_weight=0.0, calibration_source="teacher")
