"""Evaluation domains of TextDataModule (`eval_corpora`): named corpora that are only ever validation data,
one validation loader each after the training corpus' held-out end; and the built-in corpora they name.

NumberTokenizer over files of integers: token i is the number i, so every block's content is known.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qat.data import TextDataModule
from qat.data.corpus import BUILTIN_CORPORA, COMMON_LICENSES, DEBIAN_LICENSES, SKLEARN_DESCR, read_documents
from qat.data.loading import domain_key, main_validation_loader, validation_loaders, validation_names
from qat.data.text import domain_corpora
from tests.qat.data.test_text import numbers_file
from tests.qat.data.tokenizers_for_tests import NumberTokenizer


def rows(loader):
    return [tuple(row) for batch in loader for row in batch["input_ids"].tolist()]


def make(tmp_path, **kwargs):
    train = numbers_file(tmp_path, "train.txt", 0, 400)
    legal = numbers_file(tmp_path, "legal.txt", 1000, 1100)
    science = numbers_file(tmp_path, "science.txt", 2000, 2050)
    settings = dict(files=[train], seq_len=10, batch_size=4, val_tokens=40, eos_id=-1,
                    eval_corpora=[legal, {"name": "sci", "files": [science]}])
    settings.update(kwargs)
    dm = TextDataModule(NumberTokenizer(), **settings)
    dm.setup("fit")
    return dm


def test_one_validation_loader_per_domain_after_the_training_text_with_evenly_spaced_blocks(tmp_path):
    dm = make(tmp_path)
    assert dm.eval_domains == ["legal", "sci"] and validation_names(dm) == ["", "legal", "sci"]
    loaders = validation_loaders(dm)
    assert list(loaders) == ["", "legal", "sci"]
    assert rows(loaders[""]) == [tuple(range(s, s + 10)) for s in (360, 370, 380, 390)]  # the end, as before
    # legal: 10 blocks of 10, 4 wanted (val_tokens=40): blocks 0, 3, 6, 9 of the corpus
    assert rows(loaders["legal"]) == [tuple(range(1000 + 10 * b, 1010 + 10 * b)) for b in (0, 3, 6, 9)]
    # sci: 5 blocks, 4 wanted (eval_tokens=None: as many tokens as the main validation split): 0, 1, 3, 4
    assert rows(loaders["sci"]) == [tuple(range(2000 + 10 * b, 2010 + 10 * b)) for b in (0, 1, 3, 4)]
    assert rows(main_validation_loader(dm)) == rows(loaders[""])
    assert "legal 40 tokens, sci 40 tokens" in dm.summary()


def test_eval_tokens_sets_the_tokens_per_domain_and_a_short_domain_gives_all_its_blocks(tmp_path):
    dm = make(tmp_path, eval_tokens=25)  # 3 blocks: 0, 4.5 (round half to even: 4), 9
    assert rows(validation_loaders(dm)["legal"]) == [tuple(range(1000 + 10 * b, 1010 + 10 * b)) for b in (0, 4, 9)]
    dm = make(tmp_path, eval_tokens=1000)
    assert rows(validation_loaders(dm)["sci"]) == [tuple(range(2000 + 10 * b, 2010 + 10 * b)) for b in range(5)]


def test_domain_blocks_never_appear_in_training_or_calibration_batches(tmp_path):
    dm = make(tmp_path)
    domain_rows = {r for name, loader in validation_loaders(dm).items() if name for r in rows(loader)}
    domain_tokens = {t for r in domain_rows for t in r}
    trained = [r for epoch in range(2) for r in rows(dm.train_dataloader())]
    assert len(trained) == 2 * 36 and not domain_tokens & {t for r in trained for t in r}
    # and the training split is exactly what it is without eval_corpora
    plain = make(tmp_path, eval_corpora=None)
    assert rows(plain.train_dataloader()) == rows(dm.train_dataloader()) and plain.val_dataloader() is not None
    assert not isinstance(plain.val_dataloader(), list)


def test_no_eval_corpora_keeps_one_loader_and_plain_metric_names(tmp_path):
    dm = make(tmp_path, eval_corpora=[])
    assert dm.eval_domains == [] and list(validation_loaders(dm)) == [""]
    assert domain_key("ppl", "") == "ppl" and domain_key("val/ppl", "legal") == "val/ppl/legal"


def test_domain_names_from_built_ins_files_and_mappings():
    assert domain_corpora([DEBIAN_LICENSES, SKLEARN_DESCR, "a/notes.jsonl", {"name": "x", "files": "b.txt"}]) == {
        "legal": [DEBIAN_LICENSES], "science": [SKLEARN_DESCR], "notes": ["a/notes.jsonl"], "x": ["b.txt"]}


@pytest.mark.parametrize("corpora, message", [
    (["a.txt", "b/a.txt"], "two corpora are named 'a'"),
    ([{"name": "bad name", "files": ["a.txt"]}], "use letters, digits"),
    ([{"name": "x"}], "expected {name: NAME, files: FILES}"),
    ([{"name": "x", "files": []}], "names no files"),
    ([3], "expected a file, a built-in corpus name"),
])
def test_bad_eval_corpora_are_refused(corpora, message):
    with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}").replace("(", r"\(")):
        domain_corpora(corpora)


def test_a_training_file_is_refused_as_an_evaluation_domain(tmp_path):
    train = numbers_file(tmp_path, "train.txt", 0, 100)
    with pytest.raises(ValueError, match="eval_corpora name training files"):
        TextDataModule(NumberTokenizer(), files=[train], seq_len=10, eval_corpora=[train])


def test_a_domain_shorter_than_one_block_is_an_error_naming_it(tmp_path):
    tiny = numbers_file(tmp_path, "tiny.txt", 5000, 5005)
    with pytest.raises(ValueError, match=r"eval_corpora 'tiny'.*fewer tokens than one block of seq_len=10"):
        make(tmp_path, eval_corpora=[tiny])


def test_a_missing_built_in_corpus_is_one_line_naming_it_and_where_it_is_read_from(tmp_path, monkeypatch):
    from qat.data import corpus

    monkeypatch.setitem(BUILTIN_CORPORA, DEBIAN_LICENSES, lambda: corpus.debian_licenses(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError) as err:
        read_documents([DEBIAN_LICENSES])
    assert str(err.value).count("\n") == 0
    assert f"built-in corpus 'debian:licenses' is not on this machine: it is read from {tmp_path / 'absent'}" in str(
        err.value)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"built-in corpus 'sklearn:descr' is not on this machine: it is read "
                                                 r"from sklearn/datasets/descr/.*pip install scikit-learn"):
        read_documents([SKLEARN_DESCR])


@pytest.mark.skipif(not COMMON_LICENSES.is_dir(), reason="not a Debian-based machine")
def test_debian_licenses_are_the_regular_files_of_common_licenses_in_name_order_links_skipped():
    files = sorted(p for p in COMMON_LICENSES.iterdir() if p.is_file() and not p.is_symlink())
    documents = read_documents([DEBIAN_LICENSES])
    assert documents == [p.read_text(encoding="utf-8") for p in files] and len(documents) >= 10
    assert any("GNU GENERAL PUBLIC LICENSE" in d for d in documents)


def test_sklearn_descriptions_are_the_rst_files_of_its_datasets_package():
    import sklearn

    folder = Path(sklearn.__file__).parent / "datasets" / "descr"
    documents = read_documents([SKLEARN_DESCR])
    assert documents == [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.rst"))]
    assert any("Iris" in d for d in documents) and all(isinstance(d, str) and d.strip() for d in documents)


def test_built_in_domains_through_a_real_tokenizer_word_level(tmp_path):
    from tests.qat.data.tokenizers_for_tests import word_tokenizer

    dm = TextDataModule(word_tokenizer(model_max_length=64), seq_len=32, batch_size=2, val_tokens=64,
                        eval_corpora=[SKLEARN_DESCR], vocab_size=64)
    dm.setup("fit")
    science = validation_loaders(dm)["science"]
    assert sum(b["input_ids"].shape[0] for b in science) == 2
    assert all(torch.equal(b["labels"], b["input_ids"]) for b in science)
