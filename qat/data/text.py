"""Language-model text data: tokenize a corpus, pack it into fixed-length blocks, split, serve.

    corpus -> documents -> token ids (EOS after each document) -> one stream
    stream -> blocks of `seq_len` (the leftover tokens at the START are dropped, so the
              blocks end exactly at the end of the corpus)
    blocks -> train (first blocks) | validation (last blocks: the end of the corpus)

Training and validation are whole, disjoint blocks: no validation sequence is ever trained on.
`eval_corpora` adds validation on other text (one loader per named domain, after the held-out end of
the training corpus): those corpora are only ever validation data, never training or calibration.
Batches are dicts {"input_ids", "attention_mask", "labels"} of (B, T) int64 tensors; labels are
the input ids (the model shifts them) and the mask is all ones (packed blocks have no padding).
Training batches come from a `ResumableLoader`, so a killed run resumes at the exact batch.

Example:
    >>> dm = TextDataModule(tokenizer, seq_len=256, batch_size=4, val_tokens=8192)
    >>> dm.setup("fit"); batch = next(iter(dm.train_dataloader()))   # batch["input_ids"]: (4, 256)
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from qat.data.corpus import BUILTIN_CORPORA, DEBIAN_LICENSES, SKLEARN_DESCR, default_corpus, read_corpus, read_documents
from qat.data.loading import ResumableLoader
from qat.data.tokenize import (
    check_ids_in_vocab,
    check_length,
    check_split_settings,
    encode_documents,
    encode_text,
    tokenizer_eos_id,
)

__all__ = ["DEFAULT_DOMAIN_NAMES", "PackedBlocks", "TextDataModule", "default_corpus", "domain_corpora",
           "pack_tokens", "read_corpus"]

TokenIds = Union[Sequence[int], Tensor]
# The domain name of a built-in corpus named alone in `eval_corpora` (a file alone is named by its stem).
DEFAULT_DOMAIN_NAMES = {DEBIAN_LICENSES: "legal", SKLEARN_DESCR: "science"}
_DOMAIN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def domain_corpora(eval_corpora: Optional[Sequence[Any]]) -> dict[str, list[str]]:
    """The named corpora of `eval_corpora`: {domain name: its file list}, in the order given.

    An entry is a built-in corpus name (`debian:licenses` -> 'legal', `sklearn:descr` -> 'science'), a
    file (named by its stem), or a mapping `{name: NAME, files: FILE or [FILES]}`. Names are letters,
    digits, '_', '.', '-' (they end metric names: `val/ppl/NAME`) and distinct.
    """
    corpora: dict[str, list[str]] = {}
    for entry in eval_corpora or ():
        if isinstance(entry, Mapping):
            unknown = set(entry) - {"name", "files"}
            if unknown or "files" not in entry:
                raise ValueError(f"eval_corpora entry {dict(entry)}: expected {{name: NAME, files: FILES}}")
            files = entry["files"]
            files = [files] if isinstance(files, str) else [str(f) for f in files]
            name = entry.get("name") or _default_domain_name(files[0] if files else "")
        elif isinstance(entry, str):
            files, name = [entry], _default_domain_name(entry)
        else:
            raise ValueError(f"eval_corpora entry {entry!r}: expected a file, a built-in corpus name "
                             f"({', '.join(BUILTIN_CORPORA)}) or {{name: NAME, files: FILES}}")
        if not files:
            raise ValueError(f"eval_corpora entry {name!r} names no files")
        if not _DOMAIN_NAME.fullmatch(str(name)):
            raise ValueError(f"eval_corpora name {name!r}: use letters, digits, '_', '.' or '-' (it ends the metric "
                             "names, val/ppl/NAME)")
        if name in corpora:
            raise ValueError(f"eval_corpora: two corpora are named {name!r}; give each a distinct name")
        corpora[str(name)] = files
    return corpora


def _default_domain_name(source: str) -> str:
    if source in BUILTIN_CORPORA:
        return DEFAULT_DOMAIN_NAMES.get(source, source.partition(":")[2])
    return Path(source).stem


def _as_stream(token_ids: Union[TokenIds, Sequence[TokenIds]], eos_id: Optional[int]) -> Tensor:
    """One 1-D int64 stream from a flat sequence or a list of documents, EOS after each document."""
    first = token_ids[0] if not isinstance(token_ids, Tensor) and len(token_ids) > 0 else None
    is_documents = isinstance(first, (list, tuple)) or (isinstance(first, Tensor) and first.dim() > 0)
    documents = token_ids if is_documents else [token_ids]
    pieces = []
    for document in documents:
        piece = torch.as_tensor(document, dtype=torch.long).reshape(-1)
        if eos_id is not None:
            piece = torch.cat([piece, torch.tensor([eos_id], dtype=torch.long)])
        pieces.append(piece)
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)


def pack_tokens(token_ids: Union[TokenIds, Sequence[TokenIds]], seq_len: int, eos_id: Optional[int] = None,
                drop: str = "tail") -> Tensor:
    """Pack token ids into a (num_blocks, seq_len) int64 tensor of consecutive tokens.

    `token_ids` is one flat sequence (list of ints or 1-D tensor) or a list of documents (each a
    list / tensor); with `eos_id`, an EOS token follows every document (a flat sequence is one
    document). The stream is cut into `len // seq_len` blocks; the remaining tokens are dropped at
    the end (`drop="tail"`) or at the start (`drop="head"`, so the last block ends the stream).

    >>> pack_tokens([1, 2, 3, 4, 5], seq_len=2)
    tensor([[1, 2],
            [3, 4]])
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} must be a positive integer")
    if drop not in ("tail", "head"):
        raise ValueError(f"drop={drop!r} must be 'tail' or 'head'")
    stream = _as_stream(token_ids, eos_id)
    num_blocks = stream.numel() // seq_len
    start = stream.numel() - num_blocks * seq_len if drop == "head" else 0
    return stream[start:start + num_blocks * seq_len].reshape(num_blocks, seq_len).clone()


class PackedBlocks(Dataset):
    """Blocks of token ids served as causal-LM samples {"input_ids", "attention_mask", "labels"} of shape (T,)."""

    def __init__(self, blocks: Tensor) -> None:
        self.blocks = blocks  # (N, T) int64

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        ids = self.blocks[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


class TextDataModule(pl.LightningDataModule):
    """Causal-LM batches from a text corpus (local .txt / .jsonl files or Python's pydoc topics).

    Args:
        tokenizer: the model's tokenizer (Hugging Face style: `encode`, `eos_token_id`, `model_max_length`).
        files: corpus files (see `qat.data.corpus.read_documents`); None or [] = the pydoc topics.
        seq_len: tokens per block (T).
        batch_size: blocks per training batch; `val_batch_size` for validation (default: the same).
        val_fraction: share of the blocks held out for validation (at least one block), unless
            `val_tokens` is given: then ceil(val_tokens / seq_len) blocks are held out.
        seed: seed of the training order (epoch e is permutation(seed, e)).
        max_train_blocks: keep only the first this-many training blocks (None = all).
        vocab_size: the model's vocabulary size; a token id >= it is an error (tokenizer / model mismatch).
        max_positions: the model's maximum sequence length (else the tokenizer's model_max_length, if known).
        eos_id: the token put after each document; None = the tokenizer's EOS (none if it has none),
            -1 = no separator.
        join_documents: tokenize the corpus as one text (`read_corpus`: documents joined by blank
            lines, no EOS) instead of document by document.
        eval_corpora: other text to validate on, one domain each (see `domain_corpora`): e.g.
            `["debian:licenses", "sklearn:descr", {name: notes, files: [a.txt, b.jsonl]}]`. Each is
            tokenized and packed like the training corpus and gives `eval_tokens` tokens of evenly
            spaced blocks (all its blocks when it has fewer); `val_dataloader()` is then a list, the
            held-out end of the training corpus first and one loader per domain after it, in order
            (`eval_domains` names them). A corpus file that is also a training file is refused.
        eval_tokens: tokens per domain (default: as many as the held-out end of the training corpus).

    Every problem (empty or too-short corpus, seq_len above the model's limit, mismatched
    tokenizer) is a ValueError raised by the constructor or `setup`, before any training.
    """

    def __init__(self, tokenizer: Any, files: Optional[Sequence[str]] = None, seq_len: int = 256,
                 batch_size: int = 4, val_fraction: float = 0.1, val_tokens: Optional[int] = None, seed: int = 0,
                 max_train_blocks: Optional[int] = None, vocab_size: Optional[int] = None,
                 max_positions: Optional[int] = None, eos_id: Optional[int] = None,
                 val_batch_size: Optional[int] = None, join_documents: bool = False,
                 eval_corpora: Optional[Sequence[Any]] = None, eval_tokens: Optional[int] = None) -> None:
        super().__init__()
        check_length(seq_len, "seq_len", tokenizer, max_positions)
        check_split_settings(val_fraction, batch_size=batch_size, val_tokens=val_tokens,
                             max_train_blocks=max_train_blocks, val_batch_size=val_batch_size)
        self.tokenizer, self.seq_len, self.seed = tokenizer, seq_len, seed
        self.files = [files] if isinstance(files, str) else files
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.val_fraction, self.val_tokens, self.max_train_blocks = val_fraction, val_tokens, max_train_blocks
        self.vocab_size, self.join_documents = vocab_size, join_documents
        self.eos_id = tokenizer_eos_id(tokenizer) if eos_id is None else (None if eos_id == -1 else eos_id)
        self.eval_corpora = domain_corpora(eval_corpora)
        self.eval_tokens = eval_tokens
        check_split_settings(val_fraction, eval_tokens=eval_tokens)
        overlap = {f for files in self.eval_corpora.values() for f in files} & set(self.files or ())
        if overlap:
            raise ValueError(f"eval_corpora name training files {sorted(overlap)}: an evaluation domain is text the "
                             "model never trains on; drop them from one of the two lists")
        self.train_set: Optional[PackedBlocks] = None
        self.val_set: Optional[PackedBlocks] = None
        self.domain_sets: dict[str, PackedBlocks] = {}

    @property
    def eval_domains(self) -> list[str]:
        """The names of the `eval_corpora` domains: validation loaders 1, 2, ... (0 is the training corpus' end)."""
        return list(self.eval_corpora)

    def _num_val_blocks(self, num_blocks: int) -> int:
        if self.val_tokens is not None:
            return math.ceil(self.val_tokens / self.seq_len)
        return max(1, math.floor(num_blocks * self.val_fraction + 0.5))  # half rounds up

    def _stream(self, files: Optional[Sequence[str]]) -> Tensor:
        if self.join_documents:
            stream = _as_stream(encode_text(self.tokenizer, read_corpus(files)), None)
        else:
            stream = _as_stream(encode_documents(self.tokenizer, read_documents(files)), self.eos_id)
        check_ids_in_vocab(stream, self.vocab_size)
        return stream

    def _domain_blocks(self, name: str, files: Sequence[str], tokens: int) -> Tensor:
        """`tokens` tokens (rounded up to whole blocks) of a domain corpus: evenly spaced blocks over it."""
        blocks = pack_tokens(self._stream(files), self.seq_len, drop="head")
        if blocks.shape[0] == 0:
            raise ValueError(f"eval_corpora {name!r} ({list(files)}) gives fewer tokens than one block of "
                             f"seq_len={self.seq_len}")
        wanted = min(blocks.shape[0], math.ceil(tokens / self.seq_len))
        picks = torch.linspace(0, blocks.shape[0] - 1, wanted).round().long().unique()
        return blocks[picks]

    def _blocks(self) -> Tensor:
        """All blocks of the corpus, (N, seq_len), the last one ending at the corpus' end."""
        stream = self._stream(self.files)
        if stream.numel() < 2 * self.seq_len:
            source = "the default corpus" if not self.files else f"corpus files {list(self.files)}"
            raise ValueError(f"{source} gives {stream.numel()} tokens: fewer than 2 blocks of seq_len={self.seq_len} "
                             f"(need at least {2 * self.seq_len}: one to train on, one to validate); "
                             "add text or lower seq_len")
        return pack_tokens(stream, self.seq_len, drop="head")

    def setup(self, stage: Optional[str] = None) -> None:
        """Read, tokenize, pack and split the corpus (once; later calls do nothing)."""
        if self.train_set is not None:
            return
        blocks = self._blocks()
        num_val = self._num_val_blocks(blocks.shape[0])
        if num_val >= blocks.shape[0]:
            raise ValueError(f"validation takes {num_val} of the corpus' {blocks.shape[0]} blocks of "
                             f"{self.seq_len} tokens: nothing left to train on; lower val_tokens / val_fraction")
        train_blocks = blocks[: blocks.shape[0] - num_val]
        if self.max_train_blocks is not None:
            train_blocks = train_blocks[: self.max_train_blocks]
        self.val_set = PackedBlocks(blocks[blocks.shape[0] - num_val:])
        tokens = self.eval_tokens or num_val * self.seq_len
        self.domain_sets = {name: PackedBlocks(self._domain_blocks(name, files, tokens))
                            for name, files in self.eval_corpora.items()}
        self.train_set = PackedBlocks(train_blocks)

    def _require_setup(self) -> None:
        if self.train_set is None:
            raise RuntimeError("call setup() before asking for data loaders")

    def train_dataloader(self) -> ResumableLoader:
        self._require_setup()
        return ResumableLoader(self.train_set, batch_size=self.batch_size, shuffle=True, seed=self.seed)

    def val_dataloader(self) -> Union[DataLoader, list[DataLoader]]:
        """The held-out end of the training corpus; with `eval_corpora`, a list: it, then one loader per domain."""
        self._require_setup()
        main = DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False)
        if not self.domain_sets:
            return main
        return [main, *(DataLoader(blocks, batch_size=self.val_batch_size, shuffle=False)
                        for blocks in self.domain_sets.values())]

    def summary(self) -> str:
        """One line: blocks and tokens of each split (and of each evaluation domain)."""
        self._require_setup()
        train, val = len(self.train_set), len(self.val_set)
        domains = "".join(f", {name} {len(blocks) * self.seq_len} tokens" for name, blocks in self.domain_sets.items())
        return (f"text data: {train} train blocks ({train * self.seq_len} tokens), {val} validation blocks "
                f"({val * self.seq_len} tokens) of seq_len={self.seq_len}{domains}")
