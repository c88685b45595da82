"""Tests for stability.py: the criterion alpha* = 1 / lambda_max(J^-1 C) of METHOD.md §3 against closed
forms, numpy, finite differences of the real alpha-Rényi objective and a short simulation on the toys."""
import math

import numpy as np
import pytest
import torch

import stability
from stability import (DTYPE, Problem, contradicting_logistic, critical_alpha, gaussian_clusters, gaussian_log_lik,
                       renyi_objective, second_order_change, spread_growth, stability_matrices, symmetric_offsets,
                       well_specified_logistic)


def shifted_gaussian(prior_precision, separation=1.5, n_train=60, seed=0):
    """N(mu, 1) on random two-cluster data centred at 0.7, not at 0: theta* != 0 and,
    with a prior, the mean gradient Lambda theta* at theta* is not zero."""
    generator = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n_train,), generator=generator).to(DTYPE) * 2 - 1
    x = 0.7 + separation * signs + torch.randn(n_train, generator=generator, dtype=DTYPE)
    return Problem("shifted gaussian", gaussian_log_lik, (x,), 1, prior_precision)


@pytest.mark.parametrize("separation", [0.0, 0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("prior_precision", [0.0, 0.5, 2.0])
def test_gaussian_closed_form(separation, prior_precision):
    # x = +-a + z with mean 0, mean square 1 + a^2: mu* = 0, J = 1 + Lambda, C = 1 + a^2
    theta_star, information, gradient_moment = stability_matrices(gaussian_clusters(separation, prior_precision))
    assert abs(theta_star.item()) < 1e-12
    assert information.item() == pytest.approx(1 + prior_precision, abs=1e-12)
    assert gradient_moment.item() == pytest.approx(1 + separation ** 2, abs=1e-12)
    expected = (1 + prior_precision) / (1 + separation ** 2)  # the target is 1e-3; the data make it exact
    assert critical_alpha(information, gradient_moment) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("prior_precision", [0.0, 1.0])
def test_gaussian_closed_form_random_data(prior_precision):
    # any data: mu* = mean(x) / (1 + Lambda), J = 1 + Lambda, C = mean((x - mu*)^2), uncentred
    problem = shifted_gaussian(prior_precision)
    (x,) = problem.data
    mu_star = x.mean() / (1 + prior_precision)
    theta_star, information, gradient_moment = stability_matrices(problem)
    assert theta_star.item() == pytest.approx(mu_star.item(), abs=1e-12)
    assert gradient_moment.item() == pytest.approx((x - mu_star).pow(2).mean().item(), abs=1e-12)
    expected = (1 + prior_precision) / (x - mu_star).pow(2).mean().item()
    assert critical_alpha(information, gradient_moment) == pytest.approx(expected, abs=1e-12)


def finite_difference(problem, theta_star, offsets, alpha):
    """F(theta* + offsets) - F(theta*) of the real objective (renyi_loss + prior_penalty)."""
    collapsed = theta_star.repeat(len(offsets), 1)  # (M, D)
    spread = renyi_objective(problem, (collapsed + offsets)[None], [alpha])
    return (spread - renyi_objective(problem, collapsed[None], [alpha])).item()


@pytest.mark.parametrize("problem", [shifted_gaussian(1.0), contradicting_logistic(n_train=200, prior_precision=0.3)],
                         ids=["gaussian", "logistic"])
@pytest.mark.parametrize("n_members", [2, 3])
@pytest.mark.parametrize("alpha_over_critical", [0.5, 0.9, 1.1, 2.0])
def test_second_order_change_matches_finite_difference(problem, n_members, alpha_over_critical):
    # The expansion drops O(eps^3): relative to the size of its quadratic terms,
    # (1/2M) sum_m o_m^T (alpha C + J) o_m, the error is O(eps) = 1e-3 (measured: <= 6e-5).
    theta_star, information, gradient_moment = stability_matrices(problem)
    alpha = alpha_over_critical * critical_alpha(information, gradient_moment)
    for seed in range(3):
        offsets = symmetric_offsets(n_members, problem.n_params, 1e-3, seed)  # (M, D)
        predicted = second_order_change(information, gradient_moment, alpha, offsets).item()
        actual = finite_difference(problem, theta_star, offsets, alpha)
        size = second_order_change(-information, gradient_moment, alpha, offsets).item()  # J -> -J: alpha C + J
        assert abs(actual - predicted) <= 1e-3 * size
        assert math.copysign(1, actual) == math.copysign(1, predicted)
        if alpha_over_critical < 1:
            assert predicted < 0  # below alpha*, alpha C - J is negative definite: every spread costs


@pytest.mark.parametrize("n_members", [2, 4])
def test_spread_along_top_direction_pays_above_critical_alpha(n_members):
    # Above alpha*, the top generalised eigenvector u of C u = lambda J u is a spread that pays.
    problem = contradicting_logistic(n_train=200, prior_precision=0.3)
    theta_star, information, gradient_moment = stability_matrices(problem)
    eigenvalues, eigenvectors = np.linalg.eig(np.linalg.solve(information.numpy(), gradient_moment.numpy()))
    top = torch.tensor(eigenvectors[:, eigenvalues.real.argmax()].real, dtype=DTYPE)  # (D,)
    signs = torch.tensor([1.0, -1.0] * (n_members // 2), dtype=DTYPE)  # (M,), sums to zero
    offsets = 1e-3 * signs[:, None] * top / top.norm()  # (M, D)
    alpha_star = critical_alpha(information, gradient_moment)
    for alpha, sign in [(0.9 * alpha_star, -1), (1.1 * alpha_star, 1)]:
        predicted = second_order_change(information, gradient_moment, alpha, offsets).item()
        actual = finite_difference(problem, theta_star, offsets, alpha)
        assert sign * predicted > 0 and sign * actual > 0
        assert actual == pytest.approx(predicted, rel=1e-2)


@pytest.mark.parametrize("n_train", [2000, 20000])
def test_well_specified_control_is_near_one(n_train):
    # With labels drawn from the model, C -> J as N grows (information equality) and alpha* -> 1.
    # lambda_max of the noisy estimate of J^-1 C ~ I is biased up and fluctuates on the scale
    # sqrt(D / N) (over 20 seeds: 1 - alpha* = 1.3 +- 0.6 in those units at N = 2000 and 20000),
    # so the tolerance is 4 sqrt(D / N): 0.15 at N = 2000, 0.05 at N = 20000.
    problem = well_specified_logistic(n_train=n_train)
    alpha_star = critical_alpha(*stability_matrices(problem)[1:])
    assert abs(alpha_star - 1) < 4 * math.sqrt(problem.n_params / n_train)


def test_contradicting_labels_split_well_below_one():
    # the misspecified problem is far from the control: conflict shows up as alpha* < 1
    assert critical_alpha(*stability_matrices(contradicting_logistic())[1:]) < 0.8


@pytest.mark.parametrize("seed", range(5))
def test_critical_alpha_matches_numpy_eigensolver(seed):
    rng = np.random.default_rng(seed)
    n_params = int(rng.integers(1, 7))
    factor = rng.normal(size=(n_params, n_params))
    information = factor @ factor.T + 0.1 * np.eye(n_params)  # positive definite
    gradients = rng.normal(size=(int(rng.integers(1, 10)), n_params))
    gradient_moment = gradients.T @ gradients  # positive semi-definite, rank-deficient when few rows
    expected = 1 / np.linalg.eigvals(np.linalg.inv(information) @ gradient_moment).real.max()
    actual = critical_alpha(torch.tensor(information), torch.tensor(gradient_moment))
    assert actual == pytest.approx(expected, rel=1e-9)


def test_critical_alpha_without_gradient_spread_is_infinite():
    assert critical_alpha(torch.eye(2, dtype=DTYPE), torch.zeros(2, 2, dtype=DTYPE)) == math.inf


@pytest.mark.parametrize("diagonal", [[1.0, -0.5], [1.0, 0.0]], ids=["indefinite", "singular"])
def test_critical_alpha_rejects_non_positive_definite_information(diagonal):
    information = torch.diag(torch.tensor(diagonal, dtype=DTYPE))
    with pytest.raises(ValueError, match="J is not positive definite"):
        critical_alpha(information, torch.eye(2, dtype=DTYPE))


@pytest.mark.parametrize("problem", [gaussian_clusters(2.0), gaussian_clusters(2.0, 2.0),
                                     contradicting_logistic(n_train=200, prior_precision=0.3)],
                         ids=["gaussian", "gaussian-prior", "logistic-prior"])
def test_simulated_spread_decays_below_and_grows_above_critical_alpha(problem):
    # 40 steps: the top direction changes by 0.8 or 1.2 per step, far beyond the initial decay of the rest
    theta_star, information, gradient_moment = stability_matrices(problem)
    alpha_star = critical_alpha(information, gradient_moment)
    growth = spread_growth(problem, theta_star, information, [0.8 * alpha_star, 1.2 * alpha_star], 2, n_steps=40)
    assert growth[0] < 1 < growth[1]


def test_observed_threshold_is_smallest_grown_alpha():
    growth = torch.tensor([0.1, 0.5, 2.0, 0.9, 3.0])  # a non-monotone dip above the threshold is ignored
    assert stability.observed_threshold([0.1, 0.2, 0.3, 0.4, 0.5], growth) == 0.3
    assert math.isnan(stability.observed_threshold([0.1, 0.2], torch.tensor([0.5, 0.9])))


def test_command_writes_its_figures_under_out_dir_and_no_tracked_file(tmp_path, monkeypatch):
    """python stability.py draws into --out_dir; a smaller grid and problem list keep the test fast."""
    monkeypatch.setattr(stability, "ALPHAS", [0.25, 0.75, 1.0])
    monkeypatch.setattr(stability, "N_STEPS", 5)
    monkeypatch.setattr(stability, "table_problems", lambda: [stability.gaussian_clusters(1.0)])
    monkeypatch.setattr(stability, "gaussian_phase_diagram", lambda separations, n_steps=30: (
        torch.zeros(len(separations), 3), [1 / (1 + a ** 2) for a in separations]))
    stability.main([f"--out_dir={tmp_path / 'figures'}"])
    assert sorted(p.name for p in (tmp_path / 'figures').iterdir()) == ["phase.png", "spread.png"]
