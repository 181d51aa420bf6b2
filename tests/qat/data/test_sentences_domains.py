"""Evaluation domains of SentenceDataModule (`eval_corpora`): one validation loader per named corpus after the
held-out sentences, evenly spaced sentences of it, each once, none that is also a training sentence."""

from __future__ import annotations

import re

import pytest

from qat.data import SentenceDataModule, split_sentences
from qat.data.corpus import SKLEARN_DESCR, read_documents
from qat.data.loading import validation_loaders, validation_names
from tests.qat.data.tokenizers_for_tests import word_tokenizer

TRAIN = " ".join(f"training sentence number {i} is here." for i in range(20))  # 20 sentences, the last 4 held out
LEGAL = " ".join(f"legal sentence number {i} is here." for i in range(10))
# 2 sentences that are training sentences, 1 repeated, 3 of its own, 1 too short
SCIENCE = ("training sentence number 3 is here. the science sentence one is here. the science sentence one is here. "
           "training sentence number 5 is here. too short here. the science sentence two is here. "
           "the science sentence three is here.")


def text_tokenizer():
    """word_tokenizer's layout ([CLS] ... [SEP], [PAD]) over every word of this file's texts, so ids read back."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(re.findall(r"\w+|[^\w\s]+", TRAIN + LEGAL + SCIENCE + " extra")))
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", model_max_length=64,
                                   model_input_names=["input_ids", "attention_mask"])


def decode(loader, tokenizer):
    """The sentences of a loader's batches, read back from their token ids ("is here ." for "is here.")."""
    return [tokenizer.decode([i for i, m in zip(row, mask, strict=True) if m], skip_special_tokens=True)
            for batch in loader for row, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist(),
                                                     strict=True)]


def spaced(sentence):
    return sentence.replace(".", " .")


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, text in {"train": TRAIN, "legal": LEGAL, "science": SCIENCE}.items():
        paths[name] = tmp_path / f"{name}.txt"
        paths[name].write_text(text, encoding="utf-8")
    return {name: str(path) for name, path in paths.items()}


def make(files, **kwargs):
    settings = dict(files=[files["train"]], max_length=16, batch_size=4, val_sentences=4,
                    eval_corpora=[files["legal"], {"name": "sci", "files": [files["science"]]}])
    settings.update(kwargs)
    dm = SentenceDataModule(text_tokenizer(), **settings)
    dm.setup("fit")
    return dm


def test_one_loader_per_domain_after_the_held_out_sentences_evenly_spaced(files):
    dm = make(files)
    assert dm.eval_domains == ["legal", "sci"] and validation_names(dm) == ["", "legal", "sci"]
    loaders = validation_loaders(dm)
    assert list(loaders) == ["", "legal", "sci"]
    train = split_sentences([TRAIN])
    assert dm.val_set.sentences == train[16:] and dm.train_set.sentences == train[:16]
    # legal: 10 sentences, 4 wanted (eval_sentences unset: as many as held out): 0, 3, 6, 9
    assert dm.domain_sets["legal"].sentences == [f"legal sentence number {i} is here." for i in (0, 3, 6, 9)]
    # sci: the training sentences and the repeat are left out, the short one dropped: 3 left, all of them
    assert dm.domain_sets["sci"].sentences == [f"the science sentence {n} is here." for n in ("one", "two", "three")]
    # the loaders hold exactly those sentences, in that order
    tokenizer = dm.tokenizer
    assert decode(loaders["legal"], tokenizer) == [spaced(s) for s in dm.domain_sets["legal"].sentences]
    assert decode(loaders["sci"], tokenizer) == [spaced(s) for s in dm.domain_sets["sci"].sentences]
    assert decode(loaders[""], tokenizer) == [spaced(s) for s in train[16:]]
    assert dm.summary() == ("sentence data: 16 train sentences, 4 validation sentences, legal 4 sentences, "
                            "sci 3 sentences (max_length=16)")


def test_eval_sentences_sets_the_count_per_domain(files):
    dm = make(files, eval_sentences=3)  # 0, 4.5 (half to even: 4), 9
    assert dm.domain_sets["legal"].sentences == [f"legal sentence number {i} is here." for i in (0, 4, 9)]
    dm = make(files, eval_sentences=100)
    assert len(dm.domain_sets["legal"]) == 10 and len(dm.domain_sets["sci"]) == 3


def test_no_domain_sentence_is_trained_on_and_the_training_split_is_unchanged(files):
    dm = make(files, eval_sentences=100, train_clauses=True)
    plain = make(files, eval_corpora=None, train_clauses=True)
    assert dm.train_set.sentences == plain.train_set.sentences and dm.val_set.sentences == plain.val_set.sentences
    trained = set(dm.train_set.sentences)
    assert all(not set(sentences.sentences) & trained for sentences in dm.domain_sets.values())
    assert not isinstance(plain.val_dataloader(), list) and plain.eval_domains == []
    # a domain sentence that an extra training file adds is left out of the domain too
    extra = files["science"].replace("science.txt", "extra.txt")
    with open(extra, "w", encoding="utf-8") as handle:
        handle.write("the science sentence two is here. an extra sentence is here.")
    more = make(files, extra_train_files=[extra])
    assert more.domain_sets["sci"].sentences == ["the science sentence one is here.",
                                                 "the science sentence three is here."]


def test_a_training_file_is_refused_as_a_domain(files):
    with pytest.raises(ValueError, match=r"eval_corpora name training files \[.*train\.txt'\]"):
        make(files, eval_corpora=[files["train"]])
    with pytest.raises(ValueError, match=r"eval_corpora name training files \[.*legal\.txt'\]"):
        make(files, extra_train_files=[files["legal"]])


@pytest.mark.parametrize("kwargs, message", [
    ({"eval_corpora": [{"name": "bad name", "files": ["a.txt"]}]}, "use letters, digits"),
    ({"eval_corpora": ["a/x.txt", "b/x.txt"]}, "two corpora are named 'x'"),
    ({"eval_corpora": [3]}, "expected a file, a built-in corpus name"),
    ({"eval_sentences": 0}, "eval_sentences=0 must be a positive integer"),
])
def test_bad_entries_are_refused_at_construction(files, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SentenceDataModule(text_tokenizer(), [files["train"]], max_length=16, **kwargs)


def test_a_domain_with_no_sentence_of_its_own_is_an_error_naming_it(files, tmp_path):
    copy = tmp_path / "copy.txt"
    copy.write_text("training sentence number 1 is here. too short.", encoding="utf-8")
    with pytest.raises(ValueError, match=r"eval_corpora 'copy' .* gives no sentence of at least 5 words that is "
                                         r"not also a training sentence"):
        make(files, eval_corpora=[str(copy)])
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match=r"missing\.txt does not exist"):
        make(files, eval_corpora=[missing])


def test_a_built_in_domain_is_named_by_its_kind():
    dm = SentenceDataModule(word_tokenizer(), max_length=32, val_sentences=8, eval_corpora=[SKLEARN_DESCR])
    dm.setup()
    assert dm.eval_domains == ["science"] and len(dm.domain_sets["science"]) == 8
    sentences = split_sentences(read_documents([SKLEARN_DESCR]))
    assert dm.domain_sets["science"].sentences[0] == sentences[0]
    assert dm.domain_sets["science"].sentences[-1] == sentences[-1]
