"""Sentence batches for sentence encoders (e.g. MiniLM): sentences split from a text corpus.

    corpus -> sentences (`qat.data.corpus.split_sentences`: each distinct sentence once)
           -> train (first sentences) | validation (last sentences: the end of the corpus)
           -> tokenized with the model's tokenizer (special tokens, truncation to `max_length`)

Each distinct sentence appears once, so no held-out sentence is ever trained on. `extra_train_files`
adds the sentences of more text to the training split only (a held-out sentence found there is left
out), so the held-out set stays the corpus's own last sentences; `train_clauses` adds the clauses of the
training sentences (`qat.data.corpus.split_clauses`), more distinct inputs from the same text. Batches are
dicts {"input_ids", "attention_mask"} (plus "token_type_ids" when the tokenizer gives them) of
(B, L) int64 tensors, padded to the longest sentence of the batch (L <= max_length).
`eval_corpora` adds validation on other text, as in `TextDataModule`: one loader per named domain after
the held-out end of the corpus, evenly spaced sentences of it, none that is a training sentence.

Example:
    >>> dm = SentenceDataModule(tokenizer, max_length=128, batch_size=32)
    >>> dm.setup("fit"); batch = next(iter(dm.train_dataloader()))
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from qat.data.corpus import read_documents, split_clauses, split_sentences
from qat.data.loading import ResumableLoader
from qat.data.text import domain_corpora
from qat.data.token_dropout import TokenDropout
from qat.data.tokenize import check_ids_in_vocab, check_length, check_split_settings

_PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0}  # input_ids pad with the tokenizer's pad id


class PadCollate:
    """Stacks samples of variable length into (B, L) tensors, padding on the right to the longest."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        longest = max(sample["input_ids"].numel() for sample in samples)
        batch = {}
        for key in samples[0]:
            fill = self.pad_id if key == "input_ids" else _PAD_VALUES.get(key, 0)
            out = torch.full((len(samples), longest), fill, dtype=torch.long)
            for row, sample in enumerate(samples):
                out[row, : sample[key].numel()] = sample[key]
            batch[key] = out
        return batch


class TokenizedSentences(Dataset):
    """Sentences and their token ids; item i is {"input_ids", "attention_mask"[, "token_type_ids"]} of shape (L_i,)."""

    def __init__(self, sentences: list[str], encoded: dict[str, list[list[int]]]) -> None:
        self.sentences, self.encoded = sentences, encoded

    def __len__(self) -> int:
        return len(self.sentences)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: torch.tensor(values[index], dtype=torch.long) for key, values in self.encoded.items()}


class SentenceDataModule(pl.LightningDataModule):
    """Sentence batches for an encoder, from local .txt / .jsonl files or Python's pydoc topics.

    Args:
        tokenizer: a Hugging Face style tokenizer: `tokenizer(list_of_str, truncation=True, max_length=L)`
            returns {"input_ids", "attention_mask"[, "token_type_ids"]}; `pad_token_id` is needed.
        files: corpus files (see `qat.data.corpus.read_documents`); None or [] = the pydoc topics.
        max_length: tokens per sentence at most (special tokens included); longer ones are truncated.
        batch_size: sentences per training batch; `val_batch_size` for validation (default: the same).
        val_fraction: share of the sentences held out (at least one), unless `val_sentences` is given.
        seed: seed of the training order.
        min_words: sentences with fewer words are dropped (see `split_sentences`).
        max_train_sentences: keep only the first this-many training sentences (None = all).
        extra_train_files: more text for training only, in `files`' spelling ('stdlib:docstrings' included):
            its sentences come first, then the corpus's training sentences, each once; held-out ones left out.
        train_clauses: also train on the clauses of the training sentences (pieces between ", ", "; ", ": " and
            parentheses with at least `min_words` words), after them, each once; none equal to a held-out sentence.
        train_token_dropout: drop each inner token of a training sentence with this probability, drawn anew
            per epoch (`qat.data.token_dropout.TokenDropout`); validation is never dropped. 0 = off.
        vocab_size, max_positions: the model's vocabulary size and maximum length, checked as in
            `TextDataModule`.
        eval_corpora: other text to validate on, one domain each (`qat.data.text.domain_corpora`, as in
            `TextDataModule`): e.g. `["debian:licenses", "sklearn:descr", {name: notes, files: [a.txt]}]`. Each
            gives `eval_sentences` evenly spaced sentences of its own (split as the corpus is; each once, none
            that is also a training sentence; all of them when it has fewer); `val_dataloader()` is then a list,
            the held-out sentences first and one loader per domain after them, in order (`eval_domains` names
            them). A file that is also a training file (`files`, `extra_train_files`) is refused.
        eval_sentences: sentences per domain (default: as many as the held-out split has).
    """

    def __init__(self, tokenizer: Any, files: Optional[Sequence[str]] = None, max_length: int = 128,
                 batch_size: int = 32, val_fraction: float = 0.1, val_sentences: Optional[int] = None, seed: int = 0,
                 min_words: int = 5, max_train_sentences: Optional[int] = None, vocab_size: Optional[int] = None,
                 max_positions: Optional[int] = None, val_batch_size: Optional[int] = None,
                 extra_train_files: Optional[Sequence[str]] = None, train_clauses: bool = False,
                 train_token_dropout: float = 0.0, eval_corpora: Optional[Sequence[Any]] = None,
                 eval_sentences: Optional[int] = None) -> None:
        super().__init__()
        check_length(max_length, "max_length", tokenizer, max_positions)
        check_split_settings(val_fraction, batch_size=batch_size, val_sentences=val_sentences,
                             max_train_sentences=max_train_sentences, val_batch_size=val_batch_size,
                             eval_sentences=eval_sentences)
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError("the tokenizer has no pad token (pad_token_id is None): sentence batches need padding")
        self.tokenizer, self.max_length, self.seed = tokenizer, max_length, seed
        self.files = [files] if isinstance(files, str) else files
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.val_fraction, self.val_sentences, self.min_words = val_fraction, val_sentences, min_words
        self.max_train_sentences, self.vocab_size = max_train_sentences, vocab_size
        self.extra_train_files = [extra_train_files] if isinstance(extra_train_files, str) else extra_train_files
        if not isinstance(train_clauses, bool):
            raise ValueError(f"train_clauses={train_clauses!r} must be true or false")
        if not 0.0 <= train_token_dropout < 1.0:
            raise ValueError(f"train_token_dropout={train_token_dropout!r} must be in [0, 1)")
        self.train_clauses, self.train_token_dropout = train_clauses, train_token_dropout
        self.eval_corpora, self.eval_sentences = domain_corpora(eval_corpora), eval_sentences
        training = set(self.files or ()) | set(self.extra_train_files or ())
        overlap = {f for files in self.eval_corpora.values() for f in files} & training
        if overlap:
            raise ValueError(f"eval_corpora name training files {sorted(overlap)}: an evaluation domain is text the "
                             "model never trains on; drop them from one of the two lists")
        self.train_set: Optional[TokenizedSentences] = None
        self.val_set: Optional[TokenizedSentences] = None
        self.domain_sets: dict[str, TokenizedSentences] = {}

    @property
    def eval_domains(self) -> list[str]:
        """The names of the `eval_corpora` domains: validation loaders 1, 2, ... (0 is the held-out sentences)."""
        return list(self.eval_corpora)

    def _split(self) -> tuple[list[str], list[str]]:
        sentences = split_sentences(read_documents(self.files), min_words=self.min_words)
        if self.val_sentences is not None:
            num_val = self.val_sentences
        else:
            num_val = max(1, math.floor(len(sentences) * self.val_fraction + 0.5))
        if len(sentences) < 2 or num_val >= len(sentences):
            source = "the default corpus" if not self.files else f"corpus files {list(self.files)}"
            raise ValueError(f"{source} gives {len(sentences)} sentences of at least {self.min_words} words: too few "
                             f"to hold out {num_val} for validation and train on the rest; add text")
        train, val = sentences[: len(sentences) - num_val], sentences[len(sentences) - num_val:]
        if self.extra_train_files:  # extra sentences first (each once, none held out), then the corpus's own
            extra = split_sentences(read_documents(self.extra_train_files), min_words=self.min_words)
            held_out, seen = set(val), set(extra)
            train = [s for s in extra if s not in held_out] + [s for s in train if s not in seen]
        if self.max_train_sentences is not None:
            train = train[: self.max_train_sentences]
        if self.train_clauses:
            train = train + split_clauses(train, self.min_words, exclude=val)
        return train, val

    def _domain_sentences(self, name: str, files: Sequence[str], count: int, trained: set[str]) -> list[str]:
        """`count` evenly spaced sentences of a domain corpus (all when it has fewer), none in `trained`."""
        candidates = [s for s in split_sentences(read_documents(files), min_words=self.min_words) if s not in trained]
        if not candidates:
            raise ValueError(f"eval_corpora {name!r} ({list(files)}) gives no sentence of at least {self.min_words} "
                             "words that is not also a training sentence")
        wanted = min(len(candidates), count)
        picks = torch.linspace(0, len(candidates) - 1, wanted).round().long().unique().tolist()
        return [candidates[i] for i in picks]

    def _tokenize(self, sentences: list[str]) -> TokenizedSentences:
        encoded = self.tokenizer(sentences, truncation=True, max_length=self.max_length)
        keys = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encoded]
        fields = {key: [list(row) for row in encoded[key]] for key in keys}
        check_ids_in_vocab(torch.tensor([i for row in fields["input_ids"] for i in row]), self.vocab_size)
        return TokenizedSentences(sentences, fields)

    def setup(self, stage: Optional[str] = None) -> None:
        """Split the corpus into sentences, hold out the last ones, tokenize (once; later calls do nothing)."""
        if self.train_set is not None:
            return
        train, val = self._split()
        count, trained = self.eval_sentences or len(val), set(train)
        self.domain_sets = {name: self._tokenize(self._domain_sentences(name, files, count, trained))
                            for name, files in self.eval_corpora.items()}
        self.train_set, self.val_set = self._tokenize(train), self._tokenize(val)

    def _require_setup(self) -> None:
        if self.train_set is None:
            raise RuntimeError("call setup() before asking for data loaders")

    def train_dataloader(self) -> ResumableLoader:
        self._require_setup()
        dataset = self.train_set
        if self.train_token_dropout > 0:
            dataset = TokenDropout(self.train_set, self.train_token_dropout, self.seed)
        loader = ResumableLoader(dataset, batch_size=self.batch_size, shuffle=True, seed=self.seed,
                                 collate_fn=PadCollate(int(self.tokenizer.pad_token_id)))
        if isinstance(dataset, TokenDropout):
            dataset.sampler = loader.epoch_sampler  # the drops follow the loader's epoch, resume included
        return loader

    def val_dataloader(self) -> Union[DataLoader, list[DataLoader]]:
        """The held-out sentences; with `eval_corpora`, a list: them, then one loader per domain."""
        self._require_setup()
        collate = PadCollate(int(self.tokenizer.pad_token_id))
        main = DataLoader(self.val_set, batch_size=self.val_batch_size, shuffle=False, collate_fn=collate)
        if not self.domain_sets:
            return main
        return [main, *(DataLoader(sentences, batch_size=self.val_batch_size, shuffle=False, collate_fn=collate)
                        for sentences in self.domain_sets.values())]

    def summary(self) -> str:
        """One line: sentences of each split (and of each evaluation domain)."""
        self._require_setup()
        domains = "".join(f", {name} {len(sentences)} sentences" for name, sentences in self.domain_sets.items())
        return (f"sentence data: {len(self.train_set)} train sentences, {len(self.val_set)} validation sentences"
                f"{domains} (max_length={self.max_length})")
