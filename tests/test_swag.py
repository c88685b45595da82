"""Tests for swag.py: the running moments against numpy, the covariance of many draws against
scale * (diag(var) + D^T D / (K - 1)), SWA at scale 0, early sampling with fewer deviations than
max_rank, and S draws run as one S-member batched ensemble equal to S separate single adapters."""
import copy

import numpy as np
import pytest
import torch

from lora import add_lora
from model import GPT, GPTConfig
from trainer import learning_rate
from baselines.swag import SWAG, SWAGCollector, load_members, member_views, sample_members, swag_learning_rate

TINY = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)


def swag_of(vectors, max_rank):
    """A SWAG over two tensors (shapes (2,) and (1, 3), so flattening is exercised) that has collected vectors."""
    first, second = torch.zeros(2), torch.zeros(1, 3)
    swag = SWAG([first, second], max_rank)
    for vector in vectors:
        first.copy_(torch.as_tensor(vector[:2]))
        second.copy_(torch.as_tensor(vector[2:]).view(1, 3))
        swag.collect()
    return swag


def known_vectors(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)) * np.array([1.0, 0.1, 2.0, 0.5, 1.0]) + np.array([3.0, -1.0, 0.0, 0.5, 2.0])


def test_moments_and_deviations_match_numpy():
    vectors = known_vectors(7)
    swag = swag_of(vectors, max_rank=4)
    as_float32 = vectors.astype(np.float32).astype(np.float64)   # what the float32 parameters held
    np.testing.assert_allclose(swag.mean.numpy(), as_float32.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(swag.variance.numpy(), as_float32.var(0), rtol=1e-9, atol=1e-12)
    running_means = np.cumsum(as_float32, 0) / np.arange(1, 8)[:, None]
    expected_deviations = (as_float32 - running_means)[-4:]        # the last K = 4 of the 7
    np.testing.assert_allclose(torch.stack(swag.deviations).numpy(), expected_deviations, rtol=0, atol=1e-12)
    assert swag.n_collected == 7


@pytest.mark.parametrize("n_collected, max_rank", [(9, 4), (4, 10)])   # K = max_rank, and K = 4 < max_rank
def test_covariance_of_draws_matches_diagonal_plus_low_rank(n_collected, max_rank):
    """50k draws: every entry of the sample covariance within 0.035 * max diagonal of the implied one.

    The standard error of a covariance entry from n draws is sqrt((s_ii s_jj + s_ij^2) / n)
    <= sqrt(2 / n) * max diagonal = 0.0063 * max diagonal, so the tolerance is over 5 standard errors;
    the mean is held to 5 standard errors, 5 * sqrt(s_ii / n).
    """
    swag = swag_of(known_vectors(n_collected, seed=1), max_rank)
    scale = 0.5
    deviations = torch.stack(swag.deviations)                      # (K, P)
    n_deviations = min(n_collected, max_rank)
    assert deviations.shape == (n_deviations, 5)
    implied = scale * (torch.diag(swag.variance) + deviations.T @ deviations / (n_deviations - 1))
    generator = torch.Generator().manual_seed(0)
    n_draws = 50_000
    draws = torch.stack([swag.sample(scale, generator) for _ in range(n_draws)])  # (n, P)
    assert ((draws.mean(0) - swag.mean).abs() < 5 * (implied.diagonal() / n_draws).sqrt()).all()
    empirical = torch.cov(draws.T)
    assert (empirical - implied).abs().max() < 0.03 * implied.diagonal().max()


def test_scale_zero_returns_the_mean_swa():
    swag = swag_of(known_vectors(5), max_rank=3)
    assert torch.equal(swag.sample(0.0), swag.mean)


def test_sampling_before_two_collections():
    with pytest.raises(RuntimeError, match="before any collect"):
        SWAG([torch.zeros(3)]).sample()
    swag = swag_of(known_vectors(1), max_rank=5)                  # one snapshot: zero spread, no low-rank part
    assert len(swag.deviations) == 1
    torch.testing.assert_close(swag.sample(0.5), swag.mean, rtol=0, atol=1e-14)


def test_swag_learning_rate_decays_to_swag_lr_then_holds_it():
    config = dict(learning_rate=1e-2, min_lr=1e-4, warmup_iters=2, max_iters=20, swag_start=10, swag_lr=1e-3)
    assert swag_learning_rate(0, config) == learning_rate(0, config)                # warm-up unchanged
    assert swag_learning_rate(2, config) == pytest.approx(1e-2)                      # the peak
    assert swag_learning_rate(6, config) == pytest.approx(1e-3 + 0.5 * (1e-2 - 1e-3))  # half-way down the cosine
    assert [swag_learning_rate(it, config) for it in (10, 15, 19)] == [1e-3] * 3


def test_collector_reads_live_parameters_on_schedule():
    torch.manual_seed(0)
    model = GPT(TINY)
    params = add_lora(model, n_members=2, rank=2, lora_alpha=4)
    collector = SWAGCollector(start=4, every=3, max_rank=5)
    snapshots = []
    for done in range(1, 11):
        with torch.no_grad():
            for p in params:
                p.add_(0.1 * torch.randn_like(p))                    # an optimizer step, in place
        collector(done, model)
        if done in (7, 10):                                          # (done - 4) % 3 == 0 after the start
            snapshots.append([torch.cat([v.reshape(-1) for v in member_views(model, m)]) for m in range(2)])
    assert [swag.n_collected for swag in collector.swags] == [2, 2]
    for m, swag in enumerate(collector.swags):
        expected = (snapshots[0][m].double() + snapshots[1][m].double()) / 2
        torch.testing.assert_close(swag.mean, expected, rtol=0, atol=1e-12)


def test_draws_run_as_one_batched_ensemble_equal_to_separate_adapters():
    """S draws in one S-member forward pass give the logits of each draw loaded alone as a 1-member model."""
    torch.manual_seed(0)
    base = GPT(TINY)
    single = copy.deepcopy(base)
    add_lora(single, n_members=1, rank=2, lora_alpha=4)
    swags = []
    for seed in (1, 2):                                               # MultiSWAG: two trained members
        swag = SWAG(member_views(single, 0), max_rank=3)
        for step in range(4):                                         # four made-up iterates of the member
            iterate = torch.randn(swag.mean.numel(), generator=torch.Generator().manual_seed(10 * seed + step))
            load_members(single, [iterate])
            swag.collect()
        swags.append(swag)
    ensemble = copy.deepcopy(base)
    add_lora(ensemble, n_members=6, rank=2, lora_alpha=4)
    sample_members(ensemble, swags, scale=0.5, generator=torch.Generator().manual_seed(7))
    idx = torch.randint(0, TINY.vocab_size, (3, 9))
    logits = ensemble(idx)                                            # (6, B, T, V) in one pass
    generator = torch.Generator().manual_seed(7)
    for member, swag in enumerate([swags[0]] * 3 + [swags[1]] * 3):  # the same draws, in the same order
        load_members(single, [swag.sample(0.5, generator)])
        torch.testing.assert_close(logits[member], single(idx)[0], rtol=0, atol=1e-5)
    assert (logits[0] - logits[1]).abs().max() > 1e-3                  # the draws really differ
    with pytest.raises(ValueError, match="do not split evenly"):
        sample_members(ensemble, swags * 2 + swags[:1], scale=0.5)
