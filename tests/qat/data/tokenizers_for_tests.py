"""Tokenizers for the data tests, built locally (no download).

    NumberTokenizer   the text "3 4 5" is the ids [3, 4, 5]: every packing / split can be checked exactly
    word_tokenizer()  a Hugging Face PreTrainedTokenizerFast over a WordLevel vocabulary, with BERT-style
                      [CLS] ... [SEP] around single sentences, [PAD] and an [EOS] token
"""

from __future__ import annotations

from typing import Optional

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]
WORDS = ["the", "a", "of", "to", "and", "is", "in", "it", "that", "for", "be", "with", "as", "on", "are", "this",
         "an", "by", "or", "not", "if", "from", "at", "can", "which", "statement", "value", "object", "function",
         "name", "class", "module", "return", "expression"]


class NumberTokenizer:
    """`encode` reads whitespace-separated integers; an optional EOS id and model_max_length, like Hugging Face."""

    def __init__(self, eos_token_id: Optional[int] = None, model_max_length: int = int(1e30)) -> None:
        self.eos_token_id, self.model_max_length = eos_token_id, model_max_length

    def encode(self, text: str) -> list[int]:
        return [int(word) for word in text.split()]


def word_tokenizer(model_max_length: int = 64, with_pad: bool = True):
    """A small Hugging Face fast tokenizer: ids 0-4 are the special tokens, then WORDS; anything else is [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    extra = {"pad_token": "[PAD]"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]",
                                   model_max_length=model_max_length,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"], **extra)
