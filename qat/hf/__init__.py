"""Hugging Face models in qat: loading (folder, `pkg:` package folder, GGUF file), generation.

    HFSource / load_hf_model / load_tokenizer   qat.hf.load
    generate                                    qat.hf.generate (`qat generate FILE "prompt"`)
    LlamaDecoder                                qat.hf.llama_decoder (the `qat` generation engine)
    fuse_linears                                qat.hf.fused_linear (q|k|v, gate|up as one call)

How batches and outputs of these models are handled lives in `qat.tasks`
('causal_lm', 'embedding'); `prepare` quantizes their Linear layers and ties.
"""

from qat.hf.load import HFLoadError, hf_architecture, load_hf_model, load_tokenizer, resolve_path
from qat.recipe import HFSource

__all__ = ["HFLoadError", "HFSource", "hf_architecture", "load_hf_model", "load_tokenizer", "resolve_path"]
