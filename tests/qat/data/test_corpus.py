"""Corpora: the default pydoc text, local .txt / .jsonl files and their errors, the sentence rule."""

from __future__ import annotations

import inspect
import json
import textwrap

import pytest

from qat.data import default_corpus, read_corpus, read_documents, split_sentences
from qat.data.corpus import STDLIB_DOCSTRINGS, stdlib_docstrings


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_default_corpus_is_the_pydoc_topics_in_sorted_key_order():
    from pydoc_data.topics import topics

    corpus = default_corpus()
    assert corpus == "\n\n".join(topics[key] for key in sorted(topics))
    assert corpus.startswith(topics[min(topics)]) and corpus == default_corpus()
    assert read_corpus(None) == corpus and read_corpus([]) == corpus
    assert read_documents(None) == [topics[key] for key in sorted(topics)]


def test_text_files_are_one_document_each_and_jsonl_lines_one_each(tmp_path):
    first = write(tmp_path / "a.txt", "first file\nline two\n")
    records = write(tmp_path / "b.jsonl", json.dumps({"text": "doc one", "id": 1}) + "\n\n"
                    + json.dumps({"text": "doc two"}) + "\n")
    assert read_documents([first, records]) == ["first file\nline two\n", "doc one", "doc two"]
    assert read_corpus([first, records]) == "first file\nline two\n\n\ndoc one\n\ndoc two"
    assert read_documents(first) == ["first file\nline two\n"]  # one path as a plain string


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "  \n", "corpus file .*empty.txt is empty"),
    ("empty.jsonl", "\n", "corpus file .*empty.jsonl is empty"),
    ("no_text.jsonl", '{"text": "ok"}\n{"body": "x"}\n', r'no_text.jsonl, line 2: expected a JSON object with'),
    ("bad.jsonl", '{"text": "ok"}\n\n{"text": \n', r"bad.jsonl, line 3: not valid JSON"),
    ("number.jsonl", '{"text": 3}\n', r'number.jsonl, line 1: the "text" field is a int, not a string'),
    ("list.jsonl", '["text"]\n', r"list.jsonl, line 1: expected a JSON object"),
    ("notes.md", "words", r"notes.md: unsupported suffix '.md'; use .txt or .jsonl"),
])
def test_bad_corpus_files_are_refused_naming_the_file(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(ValueError, match=message):
        read_corpus([path])


def test_missing_and_non_utf8_files_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"corpus file .*missing\.txt does not exist"):
        read_corpus([str(tmp_path / "missing.txt")])
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text"):
        read_corpus([str(tmp_path / "latin1.txt")])


def test_sentence_rule_splits_paragraphs_and_sentence_ends_and_drops_short_or_repeated_ones():
    documents = ["The first sentence has six words. Short one.\nThe third sentence wraps\nover two lines!",
                 "Is this a question with words? Yes.\n\nA new paragraph starts here now\n\n"
                 "The first sentence has six words."]
    assert split_sentences(documents) == [
        "The first sentence has six words.", "The third sentence wraps over two lines!",
        "Is this a question with words?", "A new paragraph starts here now"]
    assert split_sentences(documents, min_words=1)[1] == "Short one."
    assert split_sentences(["word " * 200 + "end."], max_chars=500) == []


def test_default_corpus_gives_thousands_of_distinct_sentences():
    sentences = split_sentences(read_documents(None))
    assert len(sentences) > 2000 and len(set(sentences)) == len(sentences)
    assert all(len(s.split()) >= 5 and len(s) <= 500 for s in sentences)


def test_stdlib_docstrings_are_the_standard_library_docstrings_parsed_not_imported():
    documents = stdlib_docstrings()
    assert len(documents) > 1000 and all(isinstance(d, str) and d.strip() for d in documents)
    assert inspect.getdoc(textwrap.dedent) in documents and inspect.getdoc(textwrap) in documents
    assert read_documents([STDLIB_DOCSTRINGS]) == documents
