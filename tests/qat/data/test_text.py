"""Causal-LM text data: exact packing, the end-of-corpus validation split, batches, determinism,
mid-epoch resume and every refused set-up.

Most tests use NumberTokenizer over files of consecutive integers, so token i of the stream is
the number i and every block's content is known exactly.
"""

from __future__ import annotations

import pytest
import torch

from qat.data import TextDataModule, pack_tokens
from tests.qat.data.tokenizers_for_tests import NumberTokenizer, word_tokenizer


def numbers_file(tmp_path, name, start, stop):
    path = tmp_path / name
    path.write_text(" ".join(str(i) for i in range(start, stop)), encoding="utf-8")
    return str(path)


def blocks_of(dataset):
    return [tuple(dataset[i]["input_ids"].tolist()) for i in range(len(dataset))]


def test_pack_tokens_cuts_consecutive_blocks_and_drops_the_tail_or_the_head():
    assert torch.equal(pack_tokens(list(range(10)), seq_len=3), torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]]))
    assert torch.equal(pack_tokens(torch.arange(10), 3, drop="head"), torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]]))
    assert pack_tokens([1, 2], seq_len=3).shape == (0, 3) and pack_tokens([], seq_len=3).dtype == torch.long


def test_pack_tokens_puts_eos_after_every_document():
    documents = [[1, 2], torch.tensor([3]), [4, 5, 6]]  # stream 1 2 E 3 E 4 5 6 E
    assert torch.equal(pack_tokens(documents, seq_len=4, eos_id=99), torch.tensor([[1, 2, 99, 3], [99, 4, 5, 6]]))
    assert torch.equal(pack_tokens([7, 8, 9], seq_len=2, eos_id=0), torch.tensor([[7, 8], [9, 0]]))
    assert torch.equal(pack_tokens(documents, seq_len=3), torch.tensor([[1, 2, 3], [4, 5, 6]]))


@pytest.mark.parametrize("kwargs, message", [({"seq_len": 0}, "seq_len=0 must be a positive integer"),
                                             ({"seq_len": 2, "drop": "middle"}, "drop='middle' must be")])
def test_pack_tokens_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pack_tokens([1, 2, 3], **kwargs)


def test_validation_is_the_last_whole_blocks_and_training_never_sees_them(tmp_path):
    files = [numbers_file(tmp_path, "a.txt", 0, 50), numbers_file(tmp_path, "b.txt", 50, 100)]
    dm = TextDataModule(NumberTokenizer(), files, seq_len=8, batch_size=2, val_fraction=0.25)
    dm.setup("fit")
    # 100 tokens = 12 blocks of 8 + 4 left over at the start (dropped); 3 blocks (25%) validate.
    assert blocks_of(dm.val_set) == [tuple(range(s, s + 8)) for s in (76, 84, 92)]
    assert blocks_of(dm.train_set) == [tuple(range(s, s + 8)) for s in range(4, 76, 8)]
    assert not set(blocks_of(dm.val_set)) & set(blocks_of(dm.train_set))
    assert dm.summary() == ("text data: 9 train blocks (72 tokens), 3 validation blocks (24 tokens) of seq_len=8")


def test_documents_are_separated_by_the_tokenizers_eos(tmp_path):
    files = [numbers_file(tmp_path, "a.txt", 0, 5), numbers_file(tmp_path, "b.txt", 5, 11)]
    dm = TextDataModule(NumberTokenizer(eos_token_id=1000), files, seq_len=3, val_fraction=0.25)
    dm.setup()  # stream 0..4 E 5..10 E: 13 tokens, 4 blocks, the first token dropped
    assert blocks_of(dm.train_set) + blocks_of(dm.val_set) == [(1, 2, 3), (4, 1000, 5), (6, 7, 8), (9, 10, 1000)]
    no_eos = TextDataModule(NumberTokenizer(eos_token_id=1000), files, seq_len=3, val_fraction=0.25, eos_id=-1)
    no_eos.setup()
    assert blocks_of(no_eos.val_set) == [(8, 9, 10)]
    joined = TextDataModule(NumberTokenizer(eos_token_id=1000), files, seq_len=3, val_fraction=0.25,
                            join_documents=True)  # one text "0 .. 4\n\n5 .. 10": no EOS
    joined.setup()
    assert blocks_of(joined.train_set) + blocks_of(joined.val_set) == [(2, 3, 4), (5, 6, 7), (8, 9, 10)]


def test_val_tokens_and_max_train_blocks(tmp_path):
    files = [numbers_file(tmp_path, "a.txt", 0, 80)]
    dm = TextDataModule(NumberTokenizer(), files, seq_len=8, val_tokens=17, max_train_blocks=2)
    dm.setup()
    assert len(dm.val_set) == 3 and blocks_of(dm.val_set)[0] == tuple(range(56, 64))  # ceil(17 / 8) blocks
    assert blocks_of(dm.train_set) == [tuple(range(0, 8)), tuple(range(8, 16))]


def test_batches_are_dicts_of_long_tensors_with_labels_and_an_all_ones_mask(tmp_path):
    dm = TextDataModule(NumberTokenizer(), [numbers_file(tmp_path, "a.txt", 0, 100)], seq_len=8, batch_size=4)
    dm.setup()
    for batch in (next(iter(dm.train_dataloader())), next(iter(dm.val_dataloader()))):
        assert set(batch) == {"input_ids", "attention_mask", "labels"}
        assert all(value.dtype == torch.long for value in batch.values())
        assert torch.equal(batch["labels"], batch["input_ids"])
        assert torch.equal(batch["attention_mask"], torch.ones_like(batch["input_ids"]))
    assert next(iter(dm.train_dataloader()))["input_ids"].shape == (4, 8)


def epoch_batches(loader):
    return [batch["input_ids"].tolist() for batch in loader]


def test_training_order_is_seeded_and_validation_fixed(tmp_path):
    files = [numbers_file(tmp_path, "a.txt", 0, 400)]
    make = lambda seed: TextDataModule(NumberTokenizer(), files, seq_len=8, batch_size=4, seed=seed)  # noqa: E731
    first, again, other = make(0), make(0), make(1)
    for dm in (first, again, other):
        dm.setup()
    assert epoch_batches(first.train_dataloader()) == epoch_batches(again.train_dataloader())
    assert epoch_batches(first.train_dataloader()) != epoch_batches(other.train_dataloader())
    assert epoch_batches(first.val_dataloader()) == epoch_batches(other.val_dataloader())
    assert [row for batch in epoch_batches(first.val_dataloader()) for row in batch] == \
        [list(block) for block in blocks_of(first.val_set)]  # in corpus order


def test_resume_mid_epoch_gives_exactly_the_remaining_batches(tmp_path):
    dm = TextDataModule(NumberTokenizer(), [numbers_file(tmp_path, "a.txt", 0, 400)], seq_len=8, batch_size=4)
    dm.setup()
    loader = dm.train_dataloader()
    reference = [epoch_batches(loader) for _ in range(2)]
    resumed = dm.train_dataloader()
    resumed.load_state_dict({"epoch": 0, "batches_done": 3, "epoch_complete": False})
    assert epoch_batches(resumed) == reference[0][3:]
    assert epoch_batches(resumed) == reference[1]


def test_default_corpus_with_a_hugging_face_tokenizer():
    tokenizer = word_tokenizer(model_max_length=512)
    dm = TextDataModule(tokenizer, seq_len=128, batch_size=2, val_tokens=1024, vocab_size=len(tokenizer))
    dm.setup()
    assert len(dm.val_set) == 8 and len(dm.train_set) > 100
    stream = torch.cat([dm.train_set.blocks.flatten(), dm.val_set.blocks.flatten()])
    assert (stream == tokenizer.eos_token_id).sum() > 50  # one EOS per pydoc topic
    assert not (stream == tokenizer.convert_tokens_to_ids("[CLS]")).any()  # no special tokens added per document


@pytest.mark.parametrize("kwargs, message", [
    ({"seq_len": 1}, "seq_len=1 must be an integer >= 2"),
    ({"seq_len": 64, "max_positions": 32}, "seq_len=64 is above the model's maximum sequence length 32 "
                                           r"\(max_positions\)"),
    ({"val_fraction": 1.0}, "val_fraction=1.0 must be between 0 and 1"),
    ({"batch_size": 0}, "batch_size=0 must be a positive integer"),
    ({"val_tokens": -8}, "val_tokens=-8 must be a positive integer"),
])
def test_bad_arguments_are_refused_at_construction(tmp_path, kwargs, message):
    files = [numbers_file(tmp_path, "a.txt", 0, 100)]
    with pytest.raises(ValueError, match=message):
        TextDataModule(NumberTokenizer(), files, **{"seq_len": 8, **kwargs})


def test_seq_len_above_the_tokenizers_known_maximum_is_refused_and_an_unknown_maximum_ignored():
    with pytest.raises(ValueError, match=r"seq_len=256 is above the model's maximum sequence length 128 "
                                         r"\(the tokenizer's model_max_length\)"):
        TextDataModule(NumberTokenizer(model_max_length=128), seq_len=256)
    TextDataModule(NumberTokenizer(), seq_len=100_000)  # int(1e30): Hugging Face's "unknown"


@pytest.mark.parametrize("stop, kwargs, message", [
    (15, {}, r"gives 15 tokens: fewer than 2 blocks of seq_len=8 \(need at least 16"),
    (40, {"val_tokens": 40}, "validation takes 5 of the corpus' 5 blocks of 8 tokens: nothing left to train on"),
    (40, {"vocab_size": 39}, "the tokenizer produced token id 39, outside the model's vocabulary of 39 entries: "
                             "the tokenizer does not match the model"),
])
def test_corpus_problems_are_refused_at_setup(tmp_path, stop, kwargs, message):
    dm = TextDataModule(NumberTokenizer(), [numbers_file(tmp_path, "a.txt", 0, stop)], seq_len=8, **kwargs)
    with pytest.raises(ValueError, match=message):
        dm.setup()


def test_loaders_before_setup_are_refused():
    with pytest.raises(RuntimeError, match="call setup"):
        TextDataModule(NumberTokenizer()).train_dataloader()
