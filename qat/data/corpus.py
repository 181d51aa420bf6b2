"""Text corpora: Python's bundled documentation (the default) or local .txt / .jsonl files.

A corpus is a list of documents; `read_corpus` joins them into one string with blank lines.
Tokenizers see one document at a time (`read_documents`), so an end-of-sequence token can
separate documents.

    default corpus   the values of `pydoc_data.topics.topics` (ships with every CPython),
                     in sorted key order: about 80 documents, 465k characters of English
                     reference text on Python 3.11. Deterministic for a given Python version.
    .txt             one document per file, read as UTF-8
    .jsonl           one document per line: a JSON object with a string field "text"
    stdlib:docstrings  the name, in a file list: the docstrings of the standard library's top-level
                     modules (`stdlib_docstrings`; about 3,900 documents, 9,000 sentences on 3.11)
    debian:licenses  the licence texts of Debian's base-files (/usr/share/common-licenses, every
                     Debian and Ubuntu system: legal English; 14 files, 237k characters on bookworm)
    sklearn:descr    scikit-learn's dataset descriptions (sklearn/datasets/descr/*.rst: scientific
                     prose with a few tables; 14 files, 43k characters in scikit-learn 1.x)

The last two are the built-in out-of-domain evaluation corpora (`TextDataModule(eval_corpora=...)`):
English of other kinds than the Python documentation the default corpus is.

Example:
    >>> text = read_corpus(None)                      # the pydoc topics
    >>> docs = read_documents(["notes.txt", "more.jsonl"])
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import sysconfig
from pathlib import Path
from typing import Iterable, Optional, Sequence

DOCUMENT_SEPARATOR = "\n\n"
STDLIB_DOCSTRINGS = "stdlib:docstrings"
DEBIAN_LICENSES = "debian:licenses"
SKLEARN_DESCR = "sklearn:descr"
COMMON_LICENSES = Path("/usr/share/common-licenses")


def default_documents() -> list[str]:
    """The texts of Python's `pydoc_data.topics`, in sorted key order (one document per topic)."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def default_corpus() -> str:
    """The English text of Python's bundled `pydoc_data.topics`, joined in sorted key order by blank lines."""
    return DOCUMENT_SEPARATOR.join(default_documents())


def stdlib_docstrings() -> list[str]:
    """The docstrings (module, class, function) of the standard library's top-level modules: files in name
    order, docstrings in `ast.walk` order, cleaned as `inspect.cleandoc` does. The sources are parsed, never
    imported; files that do not parse are skipped. Deterministic for a given Python version."""
    documents = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text:
                    documents.append(text)
    return documents


def debian_licenses(folder: Path = COMMON_LICENSES) -> list[str]:
    """The licence texts Debian's base-files package installs (`/usr/share/common-licenses`), one document per
    file in name order; the links there (GPL -> GPL-3 and the like) are skipped, so no text comes twice."""
    if not folder.is_dir():
        raise FileNotFoundError(f"built-in corpus {DEBIAN_LICENSES!r} is not on this machine: it is read from {folder} "
                                "(Debian's base-files package; Debian and Ubuntu systems have it)")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink())
    return [text for p in files if (text := p.read_text(encoding="utf-8", errors="replace")).strip()]


def sklearn_descriptions() -> list[str]:
    """scikit-learn's dataset descriptions (`sklearn/datasets/descr/*.rst`), one document per file in name order;
    found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "descr" if spec and \
        spec.submodule_search_locations else None
    files = sorted(folder.glob("*.rst")) if folder is not None and folder.is_dir() else []
    if not files:
        where = folder if folder is not None else "sklearn/datasets/descr/*.rst"
        raise FileNotFoundError(f"built-in corpus {SKLEARN_DESCR!r} is not on this machine: it is read from {where} "
                                "(pip install scikit-learn; the [dev] and [examples] extras have it)")
    return [p.read_text(encoding="utf-8") for p in files]


# The corpora a file list may name instead of a path, and what reads each.
BUILTIN_CORPORA = {STDLIB_DOCSTRINGS: stdlib_docstrings, DEBIAN_LICENSES: debian_licenses,
                   SKLEARN_DESCR: sklearn_descriptions}


def _read_text_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"corpus file {path} is not UTF-8 text: {err}") from None
    return [text]


def _read_jsonl_file(path: Path) -> list[str]:
    documents = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"corpus file {path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or "text" not in record:
                raise ValueError(f'{where}: expected a JSON object with a "text" field')
            if not isinstance(record["text"], str):
                raise ValueError(f'{where}: the "text" field is a {type(record["text"]).__name__}, not a string')
            documents.append(record["text"])
    return documents


def read_documents(files: Optional[Sequence[str]] = None) -> list[str]:
    """The documents of local .txt / .jsonl files, or of the default corpus when `files` is None or empty.

    Raises FileNotFoundError for a missing file and ValueError for an unknown suffix, a file
    without text, a JSONL line without a string "text" field (naming file and line).
    """
    if not files:
        return default_documents()
    if isinstance(files, (str, Path)):
        files = [str(files)]
    documents: list[str] = []
    for name in files:
        if str(name) in BUILTIN_CORPORA:
            documents.extend(BUILTIN_CORPORA[str(name)]())
            continue
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist (or is not a file)")
        suffix = path.suffix.lower()
        if suffix == ".txt":
            found = _read_text_file(path)
        elif suffix == ".jsonl":
            found = _read_jsonl_file(path)
        else:
            raise ValueError(f"corpus file {path}: unsupported suffix {suffix!r}; use .txt or .jsonl")
        found = [doc for doc in found if doc.strip()]
        if not found:
            raise ValueError(f"corpus file {path} is empty (no text)")
        documents.extend(found)
    return documents


def read_corpus(files: Optional[Sequence[str]] = None) -> str:
    """One string: the documents of `read_documents(files)` joined by blank lines (default corpus if no files)."""
    return DOCUMENT_SEPARATOR.join(read_documents(files))


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CLAUSE_BREAK = re.compile(r"[,;:]\s+|\s+\(|\)\s+")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


def split_sentences(documents: Sequence[str], min_words: int = 5, max_chars: int = 500) -> list[str]:
    """Sentences of the documents, in order, each once (first occurrence kept).

    Rule (simple and deterministic): paragraphs are split at blank lines, whitespace inside a
    paragraph collapses to single spaces, and a sentence ends after ".", "!" or "?" followed by
    whitespace. Sentences with fewer than `min_words` words or more than `max_chars` characters
    (code listings, tables) are dropped.

    >>> split_sentences(["One two three four five. Six seven eight nine ten!"])
    ['One two three four five.', 'Six seven eight nine ten!']
    """
    seen: set[str] = set()
    sentences = []
    for document in documents:
        for paragraph in _PARAGRAPH_BREAK.split(document):
            flat = " ".join(paragraph.split())
            for sentence in _SENTENCE_END.split(flat):
                if len(sentence.split()) < min_words or len(sentence) > max_chars or sentence in seen:
                    continue
                seen.add(sentence)
                sentences.append(sentence)
    return sentences


def split_clauses(sentences: Sequence[str], min_words: int = 5, exclude: Iterable[str] = ()) -> list[str]:
    """The clauses of `sentences`, in order, each once: the pieces between ", ", "; ", ": " and parentheses
    with at least `min_words` words, none equal to a sentence given or to one in `exclude`.

    >>> split_clauses(["One two three four five, six seven eight nine ten (and more)."])
    ['One two three four five', 'six seven eight nine ten']
    """
    seen = set(sentences) | set(exclude)
    clauses = []
    for sentence in sentences:
        for piece in _CLAUSE_BREAK.split(sentence):
            piece = piece.strip()
            if len(piece.split()) >= min_words and piece not in seen:
                seen.add(piece)
                clauses.append(piece)
    return clauses
