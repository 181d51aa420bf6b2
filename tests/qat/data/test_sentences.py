"""Sentence-encoder data: held-out sentences, tokenization with padding / truncation, resume, errors."""

from __future__ import annotations

import pytest
import torch

from qat.data import SentenceDataModule, split_sentences
from qat.data.corpus import read_documents
from tests.qat.data.tokenizers_for_tests import NumberTokenizer, word_tokenizer

TEXT = ("the value of a name is an object. this is a statement with words!\n\n"
        "it can return the value of an expression. the class is in the module of a function.\n"
        "a function can return a value or not. the name of the class is the name of the module?\n"
        "short one. the value of a name is an object.")  # 6 distinct sentences of >= 5 words


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def test_last_sentences_are_held_out_and_never_trained_on(text_file):
    dm = SentenceDataModule(word_tokenizer(), [text_file], max_length=16, batch_size=2, val_sentences=2)
    dm.setup()
    sentences = split_sentences([TEXT])
    assert len(sentences) == 6
    assert dm.train_set.sentences == sentences[:4] and dm.val_set.sentences == sentences[4:]
    assert not set(dm.train_set.sentences) & set(dm.val_set.sentences)
    assert dm.summary() == "sentence data: 4 train sentences, 2 validation sentences (max_length=16)"


def test_batches_pad_to_the_longest_sentence_and_truncate_to_max_length(text_file):
    tokenizer = word_tokenizer()
    dm = SentenceDataModule(tokenizer, [text_file], max_length=12, batch_size=3, val_sentences=3)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
    expected = tokenizer(dm.val_set.sentences, truncation=True, max_length=12, padding=True, return_tensors="pt")
    for key in batch:
        assert batch[key].dtype == torch.long and torch.equal(batch[key], expected[key]), key
    # the 3 held-out sentences are 12, 11 and 13 tokens with [CLS] / [SEP]: the last is truncated, the middle padded
    assert batch["attention_mask"].sum(1).tolist() == [12, 11, 12] and batch["input_ids"].shape == (3, 12)
    padded = batch["attention_mask"] == 0
    assert (batch["input_ids"][padded] == tokenizer.pad_token_id).all()


def test_training_batches_resume_mid_epoch(text_file):
    dm = SentenceDataModule(word_tokenizer(), None, max_length=32, batch_size=8, max_train_sentences=64)
    dm.setup()
    ids = lambda loader: [batch["input_ids"].tolist() for batch in loader]  # noqa: E731
    reference = ids(dm.train_dataloader())
    resumed = dm.train_dataloader()
    resumed.load_state_dict({"epoch": 0, "batches_done": 5, "epoch_complete": False})
    assert len(reference) == 8 and ids(resumed) == reference[5:]
    other_seed = SentenceDataModule(word_tokenizer(), None, max_length=32, batch_size=8, max_train_sentences=64, seed=1)
    other_seed.setup()
    assert ids(other_seed.train_dataloader()) != reference


def test_default_corpus_split_is_deterministic():
    first, second = (SentenceDataModule(word_tokenizer(), max_length=32) for _ in range(2))
    first.setup()
    second.setup()
    sentences = split_sentences(read_documents(None))
    assert first.train_set.sentences == second.train_set.sentences
    assert first.val_set.sentences == sentences[-len(first.val_set):]
    assert len(first.val_set) == round(len(sentences) * 0.1)


@pytest.mark.parametrize("kwargs, message", [
    ({"max_length": 128}, r"max_length=128 is above the model's maximum sequence length 64 \(the tokenizer's"),
    ({"max_length": 32, "max_positions": 16}, r"max_length=32 is above the model's maximum sequence length 16"),
    ({"val_fraction": 0.0}, "val_fraction=0.0 must be between 0 and 1"),
    ({"max_train_sentences": 0}, "max_train_sentences=0 must be a positive integer"),
])
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SentenceDataModule(word_tokenizer(), **{"max_length": 32, **kwargs})


def test_a_tokenizer_without_padding_is_refused():
    with pytest.raises(ValueError, match="the tokenizer has no pad token"):
        SentenceDataModule(word_tokenizer(with_pad=False), max_length=32)
    with pytest.raises(ValueError, match="the tokenizer has no pad token"):
        SentenceDataModule(NumberTokenizer(), max_length=32)


@pytest.mark.parametrize("kwargs, message", [
    ({"val_sentences": 6}, "gives 6 sentences of at least 5 words: too few to hold out 6 for validation"),
    ({"vocab_size": 20}, "the tokenizer produced token id 3[0-9], outside the model's vocabulary of 20 entries"),
])
def test_corpus_problems_are_refused_at_setup(text_file, kwargs, message):
    dm = SentenceDataModule(word_tokenizer(), [text_file], max_length=16, **kwargs)
    with pytest.raises(ValueError, match=message):
        dm.setup()


def test_extra_train_files_add_training_sentences_and_leave_the_held_out_set_alone(text_file, tmp_path):
    extra = tmp_path / "extra.txt"
    held_out = split_sentences([TEXT])[-1]
    extra.write_text(f"an extra sentence of seven words here. {held_out} the value of a name is an object.",
                     encoding="utf-8")
    plain = SentenceDataModule(word_tokenizer(), [text_file], max_length=16, batch_size=2, val_sentences=2)
    more = SentenceDataModule(word_tokenizer(), [text_file], max_length=16, batch_size=2, val_sentences=2,
                              extra_train_files=str(extra))
    plain.setup()
    more.setup()
    assert more.val_set.sentences == plain.val_set.sentences
    # the extra text first, then the corpus's training sentences, each once; the held-out sentence left out
    assert more.train_set.sentences == ["an extra sentence of seven words here.", *plain.train_set.sentences]


def test_train_clauses_add_the_clauses_of_training_sentences_only(text_file, tmp_path):
    path = tmp_path / "clauses.txt"
    path.write_text("one two three four five, six seven eight nine ten; a b c. the value of a name is an object. "
                    "held out one, two three four five six. held out two is here too.", encoding="utf-8")
    plain = SentenceDataModule(word_tokenizer(), [str(path)], max_length=16, batch_size=2, val_sentences=2)
    more = SentenceDataModule(word_tokenizer(), [str(path)], max_length=16, batch_size=2, val_sentences=2,
                              train_clauses=True)
    plain.setup()
    more.setup()
    assert more.val_set.sentences == plain.val_set.sentences == ["held out one, two three four five six.",
                                                                   "held out two is here too."]
    # the training sentences, then their clauses of >= 5 words ("a b c." is too short; nothing from held-out text)
    clauses = ["one two three four five", "six seven eight nine ten"]
    assert more.train_set.sentences == [*plain.train_set.sentences, *clauses]
    with pytest.raises(ValueError, match="train_clauses='yes' must be true or false"):
        SentenceDataModule(word_tokenizer(), max_length=16, train_clauses="yes")


def test_token_dropout_drops_inner_tokens_anew_each_epoch_and_resumes_alike():
    dm = SentenceDataModule(word_tokenizer(), None, max_length=32, batch_size=8, max_train_sentences=64,
                            train_token_dropout=0.3)
    plain = SentenceDataModule(word_tokenizer(), None, max_length=32, batch_size=8, max_train_sentences=64)
    dm.setup()
    plain.setup()
    loader = dm.train_dataloader()
    epochs = [[batch["input_ids"] for batch in loader] for _ in range(2)]
    clean = [batch["input_ids"] for batch in plain.train_dataloader()]  # the same order in epoch 0
    kept = sum(int((b != 0).sum()) for b in epochs[0]) / sum(int((b != 0).sum()) for b in clean)
    assert 0.6 < kept < 0.85  # 30 % of the inner tokens; [CLS] / [SEP] always kept
    for dropped, full in zip(epochs[0], clean, strict=True):
        assert torch.equal(dropped[:, 0], full[:, 0])  # [CLS] first
    dropping = loader.dataset  # a TokenDropout over the clean sentences, following the loader's epoch
    assert dropping.source is dm.train_set and dropping.sampler is loader.epoch_sampler
    by_epoch = []
    for epoch in (0, 1):
        dropping.sampler.epoch = epoch
        by_epoch.append([dropping[i]["input_ids"].tolist() for i in range(len(dropping))])
    assert by_epoch[0] != by_epoch[1]  # other drops each epoch
    resumed = dm.train_dataloader()
    resumed.load_state_dict({"epoch": 1, "batches_done": 3, "epoch_complete": False})
    assert all(torch.equal(a["input_ids"], b) for a, b in zip(list(resumed), epochs[1][3:], strict=True))
    validation = zip(dm.val_dataloader(), plain.val_dataloader(), strict=True)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in validation)  # never dropped
    with pytest.raises(ValueError, match=r"train_token_dropout=1\.0 must be in \[0, 1\)"):
        SentenceDataModule(word_tokenizer(), max_length=16, train_token_dropout=1.0)
