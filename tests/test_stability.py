"""Tests for stability.py and stability_toys.py: the criterion alpha* = 1 / lambda_max(J^-1 C) of
METHOD.md §3 against closed forms, numpy, finite differences of the real alpha-Rényi objective and
a short simulation; the matrix-free estimate on a LoRA adapter against dense autograd matrices; the
command's refusals."""
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
import stability
import stability_toys
import train_sft
from checkpoint import load_base, save_checkpoint
from config import run_script
from lora import add_lora, lora_parameters
from model import GPT, GPTConfig
from renyi_lora import sequence_logprobs
from stability import critical_alpha, second_order_change
from stability_toys import (DTYPE, Problem, contradicting_logistic, gaussian_clusters, gaussian_log_lik,
                            renyi_objective, spread_growth, stability_matrices, symmetric_offsets,
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
    assert stability_toys.observed_threshold([0.1, 0.2, 0.3, 0.4, 0.5], growth) == 0.3
    assert math.isnan(stability_toys.observed_threshold([0.1, 0.2], torch.tensor([0.5, 0.9])))


# -----------------------------------------------------------------------------
# alpha* of a LoRA adapter (stability.estimate_critical_alpha) against dense autograd matrices

ALL_TARGETS = ('c_attn', 'c_proj', 'c_fc')


def tiny_adapter(targets, seed=0, n_examples=40, length=12, n_prompt=7):
    """A random 1-layer GPT (width 8, vocabulary 32) in float64 with one rank-1 adapter whose B is not
    zero, and random examples (the last length - n_prompt tokens trained on) in two batches."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=8))
    add_lora(model, 1, 1, 2.0, targets=targets)
    model.double()
    with torch.no_grad():
        for param in lora_parameters(model):
            param.normal_(0, 0.3)
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 32, (n_examples, length), generator=generator)
    labels = idx.masked_fill(torch.arange(length) < n_prompt, -100)
    return model, [(idx[:16], labels[:16]), (idx[16:], labels[16:])]


def dense_matrices(model, batches):
    """J_data = -(1/N) sum_i H_i (P, P) by torch.autograd.functional.hessian and G (N, P) by its jacobian, of
    the flat adapter vector: a route independent of stability.py's torch.func and double backward."""
    params = lora_parameters(model)
    names = [name for name, _ in model.named_parameters() if name.endswith(('lora_A', 'lora_B'))]
    idx, labels = (torch.cat(parts) for parts in zip(*batches))

    def log_likelihoods(flat):                                       # (P,) -> (N,)
        chunks = flat.split([param.numel() for param in params])
        values = {name: chunk.view_as(param) for name, chunk, param in zip(names, chunks, params)}
        return sequence_logprobs(functional_call(model, values, (idx,)), labels)[0]

    theta = torch.cat([param.detach().flatten() for param in params])
    with sdpa_kernel(SDPBackend.MATH):
        information = torch.autograd.functional.hessian(lambda flat: -log_likelihoods(flat).mean(), theta,
                                                             vectorize=True)
        gradients = torch.autograd.functional.jacobian(log_likelihoods, theta, vectorize=True)
    return information, gradients


@pytest.fixture(scope="module")
def adapted():
    """The tiny adapter on every target (P = 128, N = 40) and its dense J_data and G, made once."""
    model, batches = tiny_adapter(ALL_TARGETS)
    return model, batches, *dense_matrices(model, batches)


def positive_prior(information):
    """A prior precision that makes J = J_data + Lambda I positive definite at this random point."""
    return 0.05 + max(0.0, -torch.linalg.eigvalsh(information).min().item())


def test_gradients_and_hessian_products_match_dense_autograd(adapted):
    # sequence_logprobs takes its log-softmax in float32 on either route, hence 1e-6, not float64's 1e-12
    model, batches, information, gradients = adapted
    assert torch.allclose(stability.per_example_gradients(model, batches), gradients, rtol=0,
                          atol=1e-6 * gradients.abs().max())
    directions = torch.randn(len(information), 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    expected = information @ directions                               # (P, 3)
    products = stability.information_products(model, batches, directions)
    assert torch.allclose(products, expected, rtol=0, atol=1e-6 * expected.abs().max())


@pytest.mark.parametrize("n_directions", [2, 8])
def test_estimate_matches_the_dense_pencil_on_the_same_directions(adapted, n_directions):
    # the k x k pencil on C's top-k eigenvectors, formed from dense J and C: the same numbers to 1e-6
    model, batches, information, gradients = adapted
    prior = positive_prior(information)
    moment = gradients.T @ gradients / len(gradients)                 # (P, P)
    top = torch.linalg.eigh(moment)[1][:, -n_directions:]             # (P, k)
    projected_information = top.T @ (information + prior * torch.eye(len(moment), dtype=DTYPE)) @ top
    projected_moment = top.T @ moment @ top
    expected = np.sort(np.linalg.eigvals(np.linalg.solve(projected_information, projected_moment)).real)[::-1]
    mean_pull = top.T @ gradients.mean(0)
    centred = critical_alpha(projected_information, projected_moment - torch.outer(mean_pull, mean_pull))
    result = stability.estimate_critical_alpha(model, batches, prior, n_directions)
    assert result['alpha_star'] == pytest.approx(1 / expected[0], rel=1e-6)
    assert result['eigenvalues'].numpy() == pytest.approx(expected.copy(), rel=1e-6, abs=1e-12)
    assert result['alpha_star_centred'] == pytest.approx(centred, rel=1e-6)
    direction = result['direction']                                   # C u = mu J u within the k directions
    full_information = information + prior * torch.eye(len(moment), dtype=DTYPE)
    assert (direction @ full_information @ direction).item() == pytest.approx(1.0, rel=1e-6)
    assert (direction @ moment @ direction).item() == pytest.approx(expected[0], rel=1e-6)
    assert torch.allclose(result['loadings'], gradients @ direction)


def test_estimate_bounds_the_exact_alpha_star_from_above():
    # Rayleigh-Ritz on nested subspaces: alpha* falls as k grows and stays above the exact
    # 1 / lambda_max(J^-1 C) of the full space. With c_attn alone P = 32 < N = 40, and k = 30 = rank C
    # holds every direction C has; the exact eigenvector still leaves that span (J couples it to C's
    # null space, the LoRA gauge A -> c A, B -> B / c among it): the gap measured here is 0.8 %.
    model, batches = tiny_adapter(('c_attn',))
    information, gradients = dense_matrices(model, batches)
    prior = positive_prior(information)
    moment = gradients.T @ gradients / len(gradients)
    exact = critical_alpha(information + prior * torch.eye(len(moment), dtype=DTYPE), moment)
    bounds = [stability.estimate_critical_alpha(model, batches, prior, k)['alpha_star'] for k in (4, 15, 30)]
    assert torch.linalg.matrix_rank(moment).item() == 30
    assert bounds[0] >= bounds[1] >= bounds[2] >= exact
    assert bounds[2] <= 1.02 * exact


# -----------------------------------------------------------------------------
# the command: python stability.py --sft_dir=...

def conflicting_rows():
    """SFT rows: 6 prompts that two annotator groups answer differently, 6 that have one answer."""
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]
    rows = []
    for a in range(6):
        prompt = f"Q: Add {a} and {a + 1}.\nA:"
        rows += [dict(prompt=prompt, response=f" {words[2 * a + 1]}, odd!", group="casual"),
                 dict(prompt=prompt, response=f" Sum: {2 * a + 1}.", group="formal")]
        rows.append(dict(prompt=f"Q: What is {a} plus {a}?\nA:", response=f" {2 * a}"))
    return rows


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory):
    """Checkpoints as train_sft.py writes them, on the tiny base, with random small adapters: 'single' (one
    adapter), 'ensemble' (two), 'other_base' (one, its config naming a base it was not trained on); the rows."""
    root = tmp_path_factory.mktemp("stability_runs")
    rows_path = str(root / "rows.jsonl")
    data.write_jsonl(conflicting_rows(), rows_path)
    other_base = torch.load(tiny_base, weights_only=True)
    other_base['model']['lm_head.weight'] = other_base['model']['lm_head.weight'] + 0.01
    torch.save(other_base, root / "other_base.pt")
    paths = dict(rows=rows_path)
    for name, n_members, base in [("single", 1, tiny_base), ("ensemble", 2, tiny_base),
                                  ("other_base", 1, str(root / "other_base.pt"))]:
        torch.manual_seed(0)
        model, _ = load_base(tiny_base)
        params = add_lora(model, n_members, 2, 4.0)
        with torch.no_grad():
            for param in params:
                param.add_(0.01 * torch.randn_like(param))
        config = dict(train_sft.defaults, base=base, data=rows_path, n_members=n_members, lora_rank=2,
                      lora_alpha=4.0, max_iters=1, out_dir=str(root / name))
        save_checkpoint(str(root / name / "ckpt.pt"), model, torch.optim.AdamW(params), 1, config, {})
        paths[name] = str(root / name)
    return paths


def test_command_prints_alpha_star_per_slice_and_a_recommendation(runs, capsys):
    stability.main([f"--sft_dir={runs['single']}", f"--data={runs['rows']}", "--n_directions=3"])
    out = capsys.readouterr().out
    for row in ("| all rows | 18 |", "| kind conflicting | 12 |", "| kind consistent | 6 |", "| group casual | 6 |",
                "| group formal | 6 |"):
        assert row in out
    assert "recommended alpha" in out and "examples loading most" in out


@pytest.mark.parametrize("run, extra, message", [
    ("ensemble", [], "holds 2 adapters"),
    ("other_base", [], "another base model"),
    ("single", ["--data=EMPTY"], "empty file"),
], ids=["ensemble", "other-base", "empty-data"])
def test_command_refuses_bad_input_in_one_line(runs, tmp_path, capsys, run, extra, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    argv = [f"--sft_dir={runs[run]}"] + [arg.replace("EMPTY", str(empty)) for arg in extra]
    with pytest.raises(SystemExit) as exit_info:
        run_script(stability.main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
