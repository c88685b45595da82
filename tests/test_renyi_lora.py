"""Tests for renyi_lora.py's losses and routing (test_readouts.py has its read-outs): every check
compares against an independent reference (a pure-Python loop, the plain formula under float64
autograd, or a number worked out by hand)."""
import math

import pytest
import torch

import torch.nn.functional as F

from renyi_lora import (alpha_at, label_smoothed_nll, predictive_loss, prior_penalty, renyi_loss, responsibilities,
                        responsibility_entropy, sequence_logprobs, ual_smoothing, vb_loss)


def reference_l_alpha(column, alpha):
    """l_alpha(x) for one example in pure Python, shifted by the max so it is exact for any logp."""
    n_members = len(column)
    if alpha == 0:
        return math.fsum(column) / n_members
    top = max(column)
    summed = math.fsum(math.exp(alpha * (v - top)) for v in column)
    return top + (math.log(summed) - math.log(n_members)) / alpha


def reference_renyi_loss(logp, alpha):
    """-(1/B) sum_i l_alpha(x_i) from a (M, B) tensor, in Python floats."""
    columns = logp.double().t().tolist()                        # B lists of M values
    return -math.fsum(reference_l_alpha(c, alpha) for c in columns) / len(columns)


def plain_renyi_loss(logp, alpha):
    """The textbook formula, no shifting: fine in float64 for moderate logp, used for autograd."""
    return -(torch.log(torch.exp(alpha * logp).mean(dim=0)) / alpha).mean()


def moderate_logp(n_members=4, batch=6, seed=0):
    torch.manual_seed(seed)
    return -3.0 * torch.rand(n_members, batch, dtype=torch.float64) - 0.5  # (M, B) in [-3.5, -0.5]


# ---------------------------------------------------------------------------
# alpha-Rényi loss: value and gradient against the plain formula

@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0, 2.0, 5.0])
def test_renyi_loss_value_and_gradient_match_plain_formula(alpha):
    logp = moderate_logp().requires_grad_()
    loss = renyi_loss(logp, alpha)
    (grad,) = torch.autograd.grad(loss, logp)
    plain_logp = logp.detach().clone().requires_grad_()
    plain = plain_renyi_loss(plain_logp, alpha)
    (plain_grad,) = torch.autograd.grad(plain, plain_logp)
    assert loss.item() == pytest.approx(plain.item(), abs=1e-12)
    assert loss.item() == pytest.approx(reference_renyi_loss(logp, alpha), abs=1e-12)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 4.0])
def test_renyi_gradient_is_minus_responsibilities_over_batch(alpha):
    logp = moderate_logp(n_members=3, batch=5, seed=1).requires_grad_()
    (grad,) = torch.autograd.grad(renyi_loss(logp, alpha), logp)
    batch = logp.shape[1]
    torch.testing.assert_close(grad, -responsibilities(logp.detach(), alpha) / batch, rtol=1e-10, atol=1e-12)


def test_responsibilities_are_a_softmax_over_members_summing_to_one():
    logp = moderate_logp(n_members=3, batch=4, seed=2)
    alpha = 0.7
    weights = responsibilities(logp, alpha)
    for i, column in enumerate(logp.t().tolist()):
        exps = [math.exp(alpha * v) for v in column]
        for m, e in enumerate(exps):
            assert weights[m, i].item() == pytest.approx(e / sum(exps), abs=1e-12)
    torch.testing.assert_close(weights.sum(dim=0), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(responsibilities(logp, 0), torch.full_like(logp, 1 / 3))
    very_negative = torch.tensor([[-1e4], [-1e4 + 2.0]], dtype=torch.float32)  # (2, 1)
    expected_second = 1 / (1 + math.exp(-2.0))
    assert responsibilities(very_negative, 1.0)[1, 0].item() == pytest.approx(expected_second, abs=1e-6)


def test_responsibility_entropy_hand_values():
    weights = torch.tensor([[0.25, 1.0, 0.5, 0.7], [0.25, 0.0, 0.5, 0.1], [0.25, 0.0, 0.0, 0.1],
                            [0.25, 0.0, 0.0, 0.1]], dtype=torch.float64)    # (M=4, B=4)
    expected = [math.log(4), 0.0, math.log(2), -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))]
    torch.testing.assert_close(responsibility_entropy(weights), torch.tensor(expected, dtype=torch.float64))


# ---------------------------------------------------------------------------
# The limits alpha = 0, alpha = 1, alpha -> 0, alpha -> infinity

def test_alpha_zero_is_vb_loss_exactly():
    # Dyadic values: every sum and mean is exact, so both reductions must agree bit for bit.
    logp = torch.tensor([[-1.0, -2.5, -0.25], [-3.0, -0.5, -4.75]])  # (2, 3)
    assert torch.equal(renyi_loss(logp, 0), vb_loss(logp))
    assert vb_loss(logp).item() == 12.0 / 6
    random_logp = moderate_logp()
    assert renyi_loss(random_logp, 0).item() == pytest.approx(vb_loss(random_logp).item(), abs=1e-15)


def test_alpha_zero_is_vb_loss_bit_for_bit_on_random_logp():
    torch.manual_seed(2)
    logp = -10 * torch.rand(3, 5)                               # (M, B) float32
    assert torch.equal(renyi_loss(logp, 0), vb_loss(logp))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_one_is_predictive_loss(dtype):
    logp = moderate_logp().to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert renyi_loss(logp, 1).item() == pytest.approx(predictive_loss(logp).item(), abs=tol)
    assert predictive_loss(logp).item() == pytest.approx(reference_renyi_loss(logp, 1.0), abs=tol)


def test_vb_and_predictive_loss_hand_values():
    logp = torch.tensor([[math.log(0.2)], [math.log(0.6)]], dtype=torch.float64)  # (2, 1)
    assert vb_loss(logp).item() == pytest.approx(-(math.log(0.2) + math.log(0.6)) / 2, abs=1e-15)
    assert predictive_loss(logp).item() == pytest.approx(-math.log(0.4), abs=1e-15)


def test_small_alpha_is_within_1e_4_of_vb_in_float64():
    logp = moderate_logp()
    assert abs(renyi_loss(logp, 1e-6).item() - vb_loss(logp).item()) < 1e-4
    assert renyi_loss(logp, 1e-6).item() == pytest.approx(reference_renyi_loss(logp, 1e-6), abs=1e-9)


def test_small_alpha_is_within_1e_4_of_vb_in_float32():
    logp = moderate_logp().float()
    assert abs(renyi_loss(logp, 1e-6).item() - vb_loss(logp).item()) < 1e-4


@pytest.mark.parametrize("alpha", [1e3, 1e6])
def test_large_alpha_approaches_max_minus_log_m_over_alpha(alpha):
    logp = torch.tensor([[-1.0, -4.0], [-2.0, -3.0], [-5.0, -3.5]], dtype=torch.float64)  # (3, 2)
    expected = -((-1.0 - math.log(3) / alpha) + (-3.0 - math.log(3) / alpha)) / 2
    assert renyi_loss(logp, alpha).item() == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------
# Numerical stability for very negative log-likelihoods

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [1e-3, 0.5, 1.0, 3.0])
def test_renyi_loss_stable_near_minus_1e4(dtype, alpha):
    torch.manual_seed(3)
    logp = (-1e4 - 20 * torch.rand(4, 5, dtype=torch.float64)).to(dtype).requires_grad_()
    loss = renyi_loss(logp, alpha)
    (grad,) = torch.autograd.grad(loss, logp)
    tol = 1e-2 if dtype == torch.float32 else 1e-8             # float32 spacing at 1e4 is ~1e-3
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(reference_renyi_loss(logp.detach(), alpha), abs=tol)
    expected_grad = -responsibilities(logp.detach().double(), alpha) / logp.shape[1]
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 10.0])
def test_dominant_member_gives_max_minus_log_m_over_alpha(dtype, alpha):
    # Member 1 wins example 0 by 3000 nats and member 0 wins example 1 by 5000: exp(-alpha * 3000) is 0.
    logp = torch.tensor([[-1e4, -2000.0], [-7000.0, -7000.0], [-1e4, -9000.0]], dtype=dtype)  # (3, 2)
    expected = -((-7000.0 - math.log(3) / alpha) + (-2000.0 - math.log(3) / alpha)) / 2
    loss = renyi_loss(logp, alpha)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("alpha", [-0.5, -1e-9, float("nan"), float("inf"), float("-inf")])
def test_invalid_alpha_raises(alpha):
    logp = moderate_logp()
    with pytest.raises(ValueError):
        renyi_loss(logp, alpha)
    with pytest.raises(ValueError):
        responsibilities(logp, alpha)


# ---------------------------------------------------------------------------
# sequence_logprobs against a slow loop over (m, b, t)

def slow_sequence_logprobs(logits, labels):
    """logits: (M, B, T, V), labels: (B, T) -> (M, B) nested lists; logits at t score labels at t+1."""
    logits, labels = logits.double().tolist(), labels.tolist()
    result = []
    for member_logits in logits:
        row = []
        for b, example_logits in enumerate(member_logits):
            total = 0.0
            for t in range(len(example_logits) - 1):
                target = labels[b][t + 1]
                if target == -100:
                    continue
                scores = example_logits[t]
                top = max(scores)
                log_normaliser = top + math.log(math.fsum(math.exp(s - top) for s in scores))
                total += scores[target] - log_normaliser
            row.append(total)
        result.append(row)
    return result


def tiny_batch(dtype=torch.float64):
    torch.manual_seed(4)
    logits = (3 * torch.randn(2, 3, 6, 5, dtype=torch.float64)).to(dtype)  # (M, B, T, V)
    labels = torch.tensor([
        [-100, -100, 2, 4, 1, -100],   # prompt, 3 response tokens, padding
        [-100, 0, 3, 3, 2, 1],         # 5 response tokens
        [4, -100, -100, -100, -100, -100],  # label at position 0 is never predicted: 0 tokens
    ])                                                           # (B, T)
    return logits, labels


def test_sequence_logprobs_matches_slow_loop():
    logits, labels = tiny_batch()
    expected = torch.tensor(slow_sequence_logprobs(logits, labels))  # (M, B)
    with_members = sequence_logprobs(logits, labels)
    without_members = sequence_logprobs(logits[1], labels)
    assert with_members.shape == (2, 3) and without_members.shape == (3,)
    torch.testing.assert_close(with_members.double(), expected.double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(without_members.double(), expected[1].double(), rtol=0, atol=1e-5)
    assert with_members[:, 2].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sequence_logprobs_returns_float32(dtype):
    logits, labels = tiny_batch(dtype)
    out = sequence_logprobs(logits, labels)
    assert out.dtype == torch.float32
    expected = torch.tensor(slow_sequence_logprobs(logits, labels))  # from the same (rounded) logits
    torch.testing.assert_close(out.double(), expected.double(), rtol=0, atol=1e-5)


def test_sequence_logprobs_ignores_minus_infinity_where_the_label_is_masked():
    """A masked position may hold any logits, -inf included (its stand-in target 0 then has log p = -inf):
    it must not turn the sum into nan (-inf * 0), and its gradient must be 0."""
    logits, labels = tiny_batch()
    expected = sequence_logprobs(logits, labels)
    masked = logits.clone().requires_grad_()
    blocked = torch.zeros_like(logits, dtype=torch.bool)
    blocked[:, 0, [0, 4], 0] = True                         # example 0's positions 0 and 4 predict masked labels
    out = sequence_logprobs(masked.masked_fill(blocked, float('-inf')), labels)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert masked.grad.isfinite().all() and masked.grad[:, 0, [0, 4]].abs().max() == 0


# ---------------------------------------------------------------------------
# UAL: per-example label smoothing

def torch_smoothed_cross_entropy(logits, labels, eps):
    """PyTorch's own label smoothing, one example at a time: F.cross_entropy(label_smoothing=eps_i), summed."""
    losses = []
    for b in range(labels.shape[0]):
        targets = labels[b, 1:]
        keep = targets != -100
        if not keep.any():
            losses.append(torch.zeros((), dtype=logits.dtype))
            continue
        losses.append(F.cross_entropy(logits[b, :-1][keep], targets[keep], reduction="sum",
                                      label_smoothing=float(eps[b])))
    return torch.stack(losses)                                   # (B,)


def test_label_smoothing_zero_is_the_nll_and_one_is_the_uniform_cross_entropy():
    logits, labels = tiny_batch()
    torch.testing.assert_close(label_smoothed_nll(logits, labels, torch.zeros(3)), -sequence_logprobs(logits, labels))
    uniform = torch.zeros(2, 3)                                  # sum over response tokens of mean_v -log p(v)
    for m in range(2):
        for b in range(3):
            for t in range(5):
                if labels[b, t + 1] != -100:
                    uniform[m, b] += -logits[m, b, t].log_softmax(-1).mean().item()
    torch.testing.assert_close(label_smoothed_nll(logits, labels, torch.ones(3)), uniform, rtol=0, atol=1e-5)


def test_per_example_smoothing_matches_torch_label_smoothing_example_by_example():
    logits, labels = tiny_batch()
    eps = torch.tensor([0.0, 0.3, 0.9])
    out = label_smoothed_nll(logits, labels, eps)                # (M, B)
    for m in range(2):
        torch.testing.assert_close(out[m].double(), torch_smoothed_cross_entropy(logits[m], labels, eps), rtol=0,
                                   atol=1e-5)
    # each example really gets its own eps: swapping two of them changes exactly those two losses
    swapped = label_smoothed_nll(logits, labels, eps[[1, 0, 2]])
    assert (swapped[:, :2] - out[:, :2]).abs().min() > 1e-3 and torch.equal(swapped[:, 2], out[:, 2])


def test_ual_smoothing_is_the_linear_map():
    torch.testing.assert_close(ual_smoothing(torch.tensor([0.0, 0.5, 1.0]), 0.1, 0.3), torch.tensor([0.1, 0.2, 0.3]))


# ---------------------------------------------------------------------------
# Prior

def test_prior_penalty_hand_value():
    params = [torch.tensor([[1.0, 2.0], [3.0, 4.0]])]          # ||theta||^2 = 30
    # weight * 30 / (2 * sigma_p^2 * N * M) = 2 * 30 / (2 * 0.25 * 10 * 2) = 6
    assert prior_penalty(params, n_train=10, n_members=2, sigma_p=0.5, weight=2.0).item() == pytest.approx(6.0)
    assert prior_penalty(params, n_train=10, n_members=2).item() == pytest.approx(30 / 40)


def test_prior_penalty_matches_per_member_sum():
    torch.manual_seed(5)
    n_members = 3
    lora_A = torch.randn(n_members, 2, 4, dtype=torch.float64)  # (M, r, in)
    lora_B = torch.randn(n_members, 5, 2, dtype=torch.float64)  # (M, out, r)
    squared = math.fsum(lora_A[m].pow(2).sum().item() + lora_B[m].pow(2).sum().item() for m in range(n_members))
    expected = 0.3 * squared / (2 * 1.5 ** 2 * 100 * n_members)
    penalty = prior_penalty([lora_A, lora_B], n_train=100, n_members=n_members, sigma_p=1.5, weight=0.3)
    assert penalty.item() == pytest.approx(expected, rel=1e-12)


def test_alpha_at_holds_then_ramps_linearly():
    assert [alpha_at(it, 2.0, 250) for it in (0, 125, 249, 250, 400)] == [0.0, 1.0, 2.0 * 249 / 250, 2.0, 2.0]
    held = [alpha_at(it, 2.0, 250, hold_iters=125) for it in (0, 124, 125, 150, 250, 251)]
    assert held == [0.0, 0.0, 0.0, pytest.approx(2.0 * 25 / 125), 2.0, 2.0]
    assert alpha_at(0, 3.0, 0) == 3.0                                  # no ramp: the full alpha from step 0


@pytest.mark.parametrize("hold, ramp", [(125, 100), (-1, 10)])
def test_alpha_at_refuses_a_hold_outside_the_ramp(hold, ramp):
    """A hold that outlasts the ramp would hold and then jump, unlike the formula."""
    with pytest.raises(ValueError, match="must lie within the ramp"):
        alpha_at(0, 2.0, ramp, hold)
