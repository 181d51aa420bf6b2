"""qat.data.sampling: the nucleus kept is transformers' top-p set, draws follow its renormalised
probabilities, and the cached decode loop (the batched Llama decoder, or another model's own forward and
cache) continues sequences as the model's own greedy `generate` does."""

from __future__ import annotations

import pytest
import torch

from qat.data.sampling import nucleus, sample_nucleus, sample_sequences
from tests.qat.hf.tiny_models import save_tiny_llama


@pytest.mark.parametrize("top_p, scale, candidates", [(0.95, 3.0, 1024), (0.9, 0.5, 64), (0.5, 8.0, 16), (1.0, 1.0, 8)])
def test_the_nucleus_is_the_set_transformers_top_p_keeps_with_the_models_probabilities(top_p, scale, candidates):
    from transformers import TopPLogitsWarper

    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(0)) * scale
    probs, ids = nucleus(logits, top_p, candidates)
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, ids, probs > 0)
    theirs = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone())) if top_p < 1 else torch.ones_like(kept)
    assert torch.equal(kept, theirs)
    # a kept token's probability is the model's own softmax, not renormalised yet
    softmax = logits.softmax(-1)
    chosen = probs > 0
    torch.testing.assert_close(probs[chosen], softmax.gather(-1, ids)[chosen], rtol=1e-5, atol=0)


def test_rows_whose_candidates_hold_too_little_mass_are_fully_sorted_and_the_others_kept():
    logits = torch.stack([torch.zeros(3001), torch.arange(3001.0)])  # a flat row and a peaked one
    probs, ids = nucleus(logits, 0.9, candidates=16)
    assert probs.shape == (2, 3001)  # widened to the vocabulary for the flat row
    # a uniform row: the mass before token k is k / 3001, under 0.9 up to k = 2700
    assert int((probs[0] > 0).sum()) == 2701
    # the peaked row: probabilities 0.632, 0.233, 0.086, ... (ratio 1/e); the mass before the third is 0.865 < 0.9
    assert sorted(ids[1][probs[1] > 0].tolist()) == [2998, 2999, 3000]


def test_draws_follow_the_renormalised_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    draws = torch.cat([sample_nucleus(logits.expand(4000, 4), top_p=0.7) for _ in range(5)]).reshape(-1)
    counts = torch.bincount(draws, minlength=4).float() / draws.numel()
    # the nucleus at 0.7 is {0, 1} (0.5 then 0.3: the mass before token 1 is 0.5 < 0.7); renormalised 0.625 / 0.375;
    # 20,000 draws: standard error 0.0034, the bound is 4 of them
    assert counts[2] == 0 and counts[3] == 0
    assert abs(float(counts[0]) - 0.625) < 0.014


def test_short_rows_draw_from_their_full_nucleus_and_the_others_from_their_candidates():
    flat, peaked = torch.zeros(3001), torch.arange(3001.0)
    logits = torch.stack([flat, peaked] * 500)  # rows 0, 2, ...: flat (its top 16 hold 0.5 %); 1, 3, ...: peaked
    torch.manual_seed(0)
    draws = sample_nucleus(logits, top_p=0.9, candidates=16).reshape(-1)
    # the flat row's nucleus is its 2701 first tokens in sort order: 500 draws land far beyond 16 candidates
    assert len(set(draws[0::2].tolist())) > 300
    assert set(draws[1::2].tolist()) <= {2998, 2999, 3000}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(save_tiny_llama(tmp_path_factory.mktemp("sampling")))).eval()


def test_a_vanishing_top_p_continues_as_greedy_generate_does(tiny_llama):
    first = torch.tensor([[5], [9], [17]])
    ours = sample_sequences(tiny_llama, first, new_tokens=10, top_p=1e-9)
    theirs = tiny_llama.generate(input_ids=first, attention_mask=torch.ones_like(first), do_sample=False,
                                 max_new_tokens=10, min_new_tokens=10, pad_token_id=0)
    assert torch.equal(ours, theirs)


def test_suppressed_tokens_are_never_drawn_and_the_shape_is_the_prompt_plus_the_new_tokens(tiny_llama):
    first = torch.tensor([[3], [4]])
    greedy = sample_sequences(tiny_llama, first, new_tokens=6, top_p=1e-9)
    banned = sorted(set(greedy[:, 1:].reshape(-1).tolist()))
    torch.manual_seed(0)
    out = sample_sequences(tiny_llama, first, new_tokens=6, temperature=0.7, top_p=1e-9, suppressed=banned)
    assert out.shape == (2, 7) and torch.equal(out[:, :1], first)
    assert not set(out[:, 1:].reshape(-1).tolist()) & set(banned)


def test_a_non_positive_temperature_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="temperature"):
        sample_sequences(tiny_llama, torch.tensor([[1]]), new_tokens=2, temperature=0.0)


def test_a_model_the_batched_decoder_cannot_run_samples_through_its_own_forward_and_cache():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()
    first = torch.tensor([[5], [9]])
    ours = sample_sequences(gpt2, first, new_tokens=8, top_p=1e-9)
    theirs = gpt2.generate(input_ids=first, attention_mask=torch.ones_like(first), do_sample=False,
                           max_new_tokens=8, min_new_tokens=8, pad_token_id=0)
    assert torch.equal(ours, theirs)
