"""Each metric against a hand computation on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qat.eval import metrics


def test_accuracy_and_agreement_count_rows_by_hand():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0], [0.0, 1.0]])  # argmax 0, 1, 0, 1
    reference = torch.tensor([[2.0, 1.0], [3.0, 0.0], [5.0, 1.0], [1.0, 0.0]])  # argmax 0, 0, 0, 0
    labels = torch.tensor([0, 1, 1, 1])
    assert metrics.accuracy(logits, labels) == 0.75  # rows 0, 1, 3
    assert metrics.agreement(logits, reference) == 0.5  # rows 0, 2


def test_flips_count_each_direction_separately_on_a_hand_made_pair():
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    reference = torch.tensor([0, 1, 2, 0, 0, 5])  # right, right, right, wrong, wrong, right
    model = torch.tensor([0, 2, 1, 3, 1, 5])  # right, wrong, wrong, right, wrong, right
    got = metrics.flips(model, reference, labels)
    assert got["correct_to_wrong"] == 2  # rows 1, 2
    assert got["wrong_to_correct"] == 1  # row 3
    assert got["changed"] == 4  # rows 1, 2, 3, 4 (row 4: wrong -> another wrong)
    assert got["count"] == 6
    assert got["correct_to_wrong_rate"] == 2 / 6
    assert got["wrong_to_correct_rate"] == 1 / 6


def test_flips_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.flips(torch.tensor([0, 1]), torch.tensor([0, 1, 2]), torch.tensor([0, 1]))


def test_mean_kl_equals_torch_kl_div_and_a_hand_value():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    q = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    kl = metrics.mean_kl(q.log(), p.log())  # model q, reference p: KL(p || q)
    torch_kl = float(F.kl_div(q.log(), p, reduction="batchmean"))
    hand = (0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
            + 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)) / 2
    # float32 softmax/log of the inputs: agreement to ~1e-7 relative
    assert kl == pytest.approx(torch_kl, rel=1e-6)
    assert kl == pytest.approx(hand, rel=1e-6)
    assert metrics.mean_kl(p.log(), p.log()) == pytest.approx(0.0, abs=1e-7)


def test_ece_of_a_perfectly_calibrated_toy_is_zero():
    # confidence 0.75 on 4 rows, 3 of which are right; confidence 1.0 on 2 rows, both right
    probs = torch.tensor([[0.75, 0.25]] * 4 + [[1.0, 0.0]] * 2)
    labels = torch.tensor([0, 0, 0, 1, 0, 0])
    assert metrics.ece(probs, labels) == pytest.approx(0.0, abs=1e-7)
    bins = metrics.reliability_bins(probs, labels)
    assert [(b["count"], b["confidence"], b["accuracy"]) for b in bins] == [(4, 0.75, 0.75), (2, 1.0, 1.0)]


def test_ece_of_an_overconfident_toy_matches_the_hand_value():
    probs = torch.tensor([[0.9, 0.1]] * 2)  # confidence 0.9, accuracy 0.5
    labels = torch.tensor([0, 1])
    assert metrics.ece(probs, labels) == pytest.approx(0.4, abs=1e-6)
    bins = metrics.reliability_bins(probs, labels)
    expected = sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / 2
    assert expected == pytest.approx(0.4, abs=1e-6)


def test_per_class_is_worst_first_with_sizes():
    logits = torch.eye(3)[[0, 0, 1, 2, 2, 0]]  # predictions 0, 0, 1, 2, 2, 0
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    rows = metrics.per_class(logits, labels)
    assert rows == [{"slice": "1", "size": 2, "accuracy": 0.5}, {"slice": "2", "size": 2, "accuracy": 0.5},
                    {"slice": "0", "size": 2, "accuracy": 1.0}]


def test_perplexity_and_ratio_from_nll():
    labels = torch.tensor([0, 1])
    uniform = torch.zeros(2, 4)  # NLL log 4: perplexity 4
    sharper = torch.tensor([[math.log(2), 0, 0, 0], [0, math.log(2), 0, 0]])  # p(label) = 2/5
    assert metrics.perplexity(uniform, labels) == pytest.approx(4.0, rel=1e-6)
    assert metrics.perplexity(sharper, labels) == pytest.approx(2.5, rel=1e-6)
    assert metrics.perplexity_ratio(uniform, sharper, labels) == pytest.approx(4.0 / 2.5, rel=1e-6)


def test_language_model_logits_are_flattened_to_tokens():
    logits = torch.zeros(2, 3, 5)
    logits[..., 1] = 1.0
    labels = torch.ones(2, 3, dtype=torch.long)
    labels[0, 0] = 0
    assert metrics.accuracy(logits, labels) == 5 / 6


@pytest.mark.parametrize(("fp", "ptq", "qat", "expected"), [
    (0.99, 0.90, 0.99, 100.0),     # accuracy: all of the gap back
    (0.99, 0.90, 0.945, 50.0),
    (0.10, 0.50, 0.20, 75.0),      # lower is better (KL, ECE): the sign comes from the gap
    (0.99, 0.99, 0.98, None),      # no gap
])
def test_gap_recovered(fp, ptq, qat, expected):
    got = metrics.gap_recovered(fp, ptq, qat)
    assert got == (None if expected is None else pytest.approx(expected))
