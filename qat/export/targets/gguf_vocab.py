"""The tokenizer of a GGUF export: copied from a GGUF file, or none (token ids only).

llama.cpp reads its tokenizer from the `tokenizer.*` keys of the model file. A qat file holds
no tokenizer, but it records where the model came from (`hf_source`); when that is a GGUF file
(SmolLM2's package ships one), its `tokenizer.*` keys are copied unchanged, so llama.cpp
tokenizes exactly as the original release does. `vocab=FILE.gguf` names another file to copy
them from. With neither, the file gets `tokenizer.ggml.model = "none"`: llama.cpp loads it
and runs token ids, but cannot turn text into tokens.

Example:
    >>> fields, origin = tokenizer_fields(manifest, vocab=None, vocab_size=49152)
    >>> fields[0]    # (key, value, GGUF value type, element type of an array or None)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from qat.export.targets.errors import ConversionError
from qat.hf.load import resolve_path

PREFIX = "tokenizer."
Field = tuple[str, Any, Any, Any]


def vocab_source(manifest: Any, vocab: Optional[str | os.PathLike]) -> Optional[Path]:
    """The GGUF file to copy the tokenizer from: `vocab`, else the model's own GGUF source, else None."""
    if vocab is not None:
        path = Path(vocab)
        if not path.is_file():
            raise ConversionError(f"cannot convert to gguf: vocabulary file {path} does not exist")
        return path
    source = (manifest.architecture or {}).get("hf_source") or {}
    if not source.get("gguf_file"):
        return None

    path = resolve_path(source["path"]) / source["gguf_file"]
    return path if path.is_file() else None


def read_tokenizer(path: Path, vocab_size: int) -> list[Field]:
    """The `tokenizer.*` keys of the GGUF file `path`, checked against the model's vocabulary size."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as err:  # the gguf reader raises ValueError, struct and numpy errors on bad files
        raise ConversionError(f"cannot convert to gguf: cannot read the vocabulary file {path}: {err}") from None
    fields = []
    for name, field in reader.fields.items():
        if not name.startswith(PREFIX):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        fields.append((name, field.contents(), main, sub))
    tokens = next((value for name, value, _, _ in fields if name == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise ConversionError(f"cannot convert to gguf: {path} holds no tokenizer (no tokenizer.ggml.tokens)")
    if len(tokens) != vocab_size:
        raise ConversionError(f"cannot convert to gguf: the tokenizer of {path} has {len(tokens)} tokens, "
                              f"the model's vocabulary {vocab_size}")
    return fields


def tokenizer_fields(manifest: Any, vocab: Optional[str | os.PathLike], vocab_size: int) -> tuple[list[Field], str]:
    """The tokenizer keys to write and where they came from (a path, or 'none (token ids only)')."""
    import gguf

    path = vocab_source(manifest, vocab)
    if path is None:
        return [("tokenizer.ggml.model", "none", gguf.GGUFValueType.STRING, None)], "none (token ids only)"
    return read_tokenizer(path, vocab_size), str(path)
