"""Tests for the read-outs (renyi_lora.py's entropies, evaluate.py's AUROC and ECE): against a pure-Python
loop or a number worked out by hand."""
import math

import pytest
import torch

from evaluate import auroc, ece
from renyi_lora import expected_entropy, mutual_information, predictive_entropy


# ---------------------------------------------------------------------------
# Uncertainty read-outs

def entropy(p):
    return -math.fsum(x * math.log(x) for x in p if x > 0)


def test_entropies_hand_values():
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)  # (M=2, V=3)
    total = entropy([0.75, 0.25])
    aleatoric = (math.log(2) + 0.0) / 2
    assert predictive_entropy(probs).item() == pytest.approx(total, abs=1e-12)
    assert expected_entropy(probs).item() == pytest.approx(aleatoric, abs=1e-12)
    assert mutual_information(probs).item() == pytest.approx(total - aleatoric, abs=1e-12)


def test_mutual_information_is_zero_when_members_agree():
    member = [0.2, 0.3, 0.5]
    probs = torch.tensor([member, member, member])             # (M=3, V=3)
    assert predictive_entropy(probs).item() == pytest.approx(entropy(member), abs=1e-6)
    assert expected_entropy(probs).item() == pytest.approx(entropy(member), abs=1e-6)
    assert mutual_information(probs).item() == pytest.approx(0.0, abs=1e-6)


def test_mutual_information_is_log_2_for_two_certain_disagreeing_members():
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])  # (M=2, V=4)
    assert predictive_entropy(probs).item() == pytest.approx(math.log(2), abs=1e-6)
    assert expected_entropy(probs).item() == 0.0
    assert mutual_information(probs).item() == pytest.approx(math.log(2), abs=1e-6)


def test_mutual_information_nonnegative_and_equal_to_difference_with_batch_axes():
    torch.manual_seed(6)
    probs = torch.softmax(2 * torch.randn(4, 3, 2, 7, dtype=torch.float64), dim=-1)  # (M, B, T, V)
    mi = mutual_information(probs)
    assert mi.shape == (3, 2)
    assert (mi >= 0).all()
    for b in range(3):
        for t in range(2):
            members = probs[:, b, t].tolist()
            mixture = [sum(col) / 4 for col in zip(*members)]
            expected = entropy(mixture) - sum(entropy(p) for p in members) / 4
            assert mi[b, t].item() == pytest.approx(expected, abs=1e-12)


def test_weighted_mutual_information_hand_values_and_ends():
    """sum_m w_m p_m against sum_m w_m H(p_m); uniform weights give the unweighted read-outs, one member's none."""
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)  # (M=2, V=3)
    weights = torch.tensor([0.25, 0.75], dtype=torch.float64)
    total, aleatoric = entropy([0.875, 0.125]), 0.25 * math.log(2)
    assert predictive_entropy(probs, weights).item() == pytest.approx(total, abs=1e-12)
    assert expected_entropy(probs, weights).item() == pytest.approx(aleatoric, abs=1e-12)
    assert mutual_information(probs, weights).item() == pytest.approx(total - aleatoric, abs=1e-12)
    uniform = torch.full((2,), 0.5, dtype=torch.float64)
    assert mutual_information(probs, uniform).item() == pytest.approx(mutual_information(probs).item(), abs=1e-12)
    assert mutual_information(probs, torch.tensor([0.0, 1.0], dtype=torch.float64)).item() == pytest.approx(0, abs=1e-12)


def test_posterior_weighted_information_adds_up_to_the_sequence_information():
    """The chain rule: over two-token responses y drawn from the sequence mixture (1/M) sum_m p_m(y), the expected
    sum of the per-token information, each token's members weighted by p_m(y_<t) (posterior_weights), is
    I(member; y) = H(mixture over whole responses) - mean_m H(p_m over whole responses), enumerated here."""
    torch.manual_seed(3)
    n_members, vocab = 3, 4
    first = torch.softmax(2 * torch.randn(n_members, vocab, dtype=torch.float64), -1)             # p_m(y_1)
    second = torch.softmax(2 * torch.randn(n_members, vocab, vocab, dtype=torch.float64), -1)    # p_m(y_2 | y_1)
    joint = first.unsqueeze(-1) * second                                                        # (M, V, V): p_m(y)
    sequence_information = entropy((joint.mean(0)).flatten().tolist()) - sum(
        entropy(joint[m].flatten().tolist()) for m in range(n_members)) / n_members
    uniform = torch.full((n_members,), 1 / n_members, dtype=torch.float64)
    expected = mutual_information(first, uniform).item()                                         # the first token
    for y1 in range(vocab):
        mixture_y1 = first[:, y1].mean().item()                                                   # p(y_1)
        posterior = first[:, y1] / first[:, y1].sum()                                             # w_m after y_1
        expected += mixture_y1 * mutual_information(second[:, y1], posterior).item()
    assert expected == pytest.approx(sequence_information, abs=1e-10)


# ---------------------------------------------------------------------------
# Evaluation: AUROC and ECE

def test_auroc_hand_cases():
    # Pairs (pos, neg): (1,2) lose, (1,0) win, (2,2) tie, (2,0) win -> (2 + 0.5) / 4
    assert auroc([1.0, 2.0], [2.0, 0.0]) == 0.625
    assert auroc([3.0, 4.0, 5.0], [0.0, 1.0]) == 1.0
    assert auroc([0.0, 1.0], [3.0, 4.0, 5.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0]) == 0.5
    assert auroc(torch.tensor([0.9, 0.1, 0.6]), torch.tensor([0.2, 0.5])) == pytest.approx(4 / 6)
    with pytest.raises(ValueError):
        auroc([], [1.0])


def test_ece_hand_cases():
    confidence = [0.2, 0.4, 0.6, 0.9, 1.0]
    correct = [False, True, True, False, True]
    # 2 bins: [0, .5) holds .2, .4 (acc 1/2, conf .3); [.5, 1] holds .6, .9, 1 (acc 2/3, conf 2.5/3)
    assert ece(confidence, correct, n_bins=2) == pytest.approx(2 / 5 * 0.2 + 3 / 5 * (1 / 6), abs=1e-12)
    # 3 bins: {.2} acc 0; {.4, .6} acc 1, conf .5; {.9, 1.0} acc 1/2, conf .95
    assert ece(confidence, torch.tensor(correct), n_bins=3) == pytest.approx(
        1 / 5 * 0.2 + 2 / 5 * 0.5 + 2 / 5 * 0.45, abs=1e-12)


def test_ece_confidence_one_falls_in_last_bin():
    # Together in bin 9: |1/2 - 0.975| = 0.475. Dropped or binned alone, it would give 0.025 or 0.525.
    assert ece([1.0, 0.95], [False, True], n_bins=10) == pytest.approx(0.475, abs=1e-12)
    assert ece([1.0, 1.0], [True, True]) == 0.0
