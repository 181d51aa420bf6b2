"""The batched Llama decoder computes what the Hugging Face forward computes for every row of a batch.

Tolerance: float32 weights, the two sides differ only in the order of float32 sums (q|k|v as one
matmul, one-query attention written as two matmuls): 1e-5 relative to the largest logit.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from qat.hf.batched_decoder import BatchedLlamaDecoder
from tests.qat.hf.tiny_models import VOCAB, tiny_llama_config

EXACT = 1e-5


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(params=[{}, {"num_key_value_heads": 4}], ids=["gqa", "mha"])
def model(request):
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(**request.param)).eval()


def test_prefill_then_steps_give_the_logits_of_the_full_forward_for_every_row(model):
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = model(input_ids=ids).logits.float()  # (3, 12, V): position t sees tokens 0..t
    decoder = BatchedLlamaDecoder(model, batch_size=3, max_length=12)
    rows = [decoder.forward(ids[:, :4])]  # the prompt: logits after position 3
    rows += [decoder.forward(ids[:, t:t + 1]) for t in range(4, 12)]
    ours = torch.stack(rows, dim=1)  # logits after positions 3..11
    assert ours.shape == (3, 9, VOCAB) and ours.dtype == torch.float32
    assert relative(ours, theirs[:, 3:]) < EXACT
    # fusing q|k|v and gate|up left the model computing what it computed
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits.float(), theirs)


def test_bad_shapes_and_lengths_are_refused_with_the_reason(model):
    decoder = BatchedLlamaDecoder(model, batch_size=2, max_length=4)
    with pytest.raises(ValueError, match=r"\(2, P\)"):
        decoder.forward(torch.zeros(3, 1, dtype=torch.long))
    decoder.forward(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="empty cache"):
        decoder.forward(torch.zeros(2, 2, dtype=torch.long))
    decoder.forward(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="exceed the reserved 4"):
        decoder.forward(torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        BatchedLlamaDecoder(model, batch_size=1, max_length=65)


def test_a_model_of_another_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(ValueError, match="cannot run this model"):
        BatchedLlamaDecoder(gpt2, batch_size=1, max_length=8)
