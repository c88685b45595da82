"""
When does conflicting data split an alpha-Rényi ensemble? The local stability criterion
(METHOD.md §3), and its check on toy problems where alpha* has a closed form or an exact
autograd value.

Put all M members at the collapsed optimum theta* and spread them a little,
theta_m = theta* + eps * v_m with sum_m v_m = 0. To second order in eps the
per-example objective F = (1/N) sum_i l_alpha(x_i) - prior changes by

    dF = (eps^2 / 2M) * sum_m v_m^T (alpha * C - J) v_m

    J = -(1/N) sum_i H_i + Lambda I     observed information plus prior precision
    C =  (1/N) sum_i g_i g_i^T          second moment of per-example gradients

with g_i, H_i the gradient and Hessian of log p(x_i | theta) at theta*. The collapsed
ensemble is unstable (spread pays) iff alpha * lambda_max(J^-1 C) > 1:

    alpha* = 1 / lambda_max(J^-1 C)

The toys: for a log-likelihood with a few parameters, `stability_matrices` finds theta* by
Newton's method and J, C from per-example autograd derivatives; `spread_growth` then trains M
members from a tiny symmetric spread around theta* with the real loss (renyi_loss) at a grid of
alpha, and the observed threshold is the smallest alpha whose spread grew.

    python stability.py                      # the table, and two figures in out/stability/

experiments/alpha_star.py estimates alpha* of a trained LoRA adapter on its own data.
"""
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.func import grad, hessian, vmap

from config import parse_args, run_script
from renyi_lora import prior_penalty, renyi_loss

defaults = dict(
    out_dir='out/stability',    # where the two figures go
)
DTYPE = torch.float64  # second-order effects of a 1e-4 spread are 1e-8: float32 cannot see them
ALPHAS = [round(0.025 * k, 3) for k in range(1, 51)]  # the simulation grid, 0.025 .. 1.25
N_STEPS = 100  # ascent steps per ensemble: enough to outgrow the decay of the stable directions
TOLERANCE = 0.05  # target: |observed threshold - predicted alpha*| <= 0.05


# -----------------------------------------------------------------------------
# the criterion

def generalized_eigen(gradient_moment, information):
    """Eigenpairs of C u = mu J u, largest mu first: mu (D,) and u (D, D), columns with u^T J u = 1.

    With J = L L^T the problem becomes the symmetric L^-1 C L^-T w = mu w, u = L^-T w.
    J: (D, D) must be positive definite (ValueError otherwise), C: (D, D) symmetric.
    """
    cholesky, info = torch.linalg.cholesky_ex(information)
    if info != 0:
        smallest = torch.linalg.eigvalsh(information).min().item()
        raise ValueError(f"J is not positive definite (smallest eigenvalue {smallest:.3g}): theta* is not "
                         "a strict maximum of the collapsed objective (optimiser not converged, or add a prior)")
    half_whitened = torch.linalg.solve_triangular(cholesky, gradient_moment, upper=False)  # L^-1 C
    whitened = torch.linalg.solve_triangular(cholesky, half_whitened.T, upper=False)  # L^-1 C L^-T
    eigenvalues, eigenvectors = torch.linalg.eigh((whitened + whitened.T) / 2)
    directions = torch.linalg.solve_triangular(cholesky.T, eigenvectors, upper=True)  # u = L^-T w
    return eigenvalues.flip(0), directions.flip(1)


def critical_alpha(information, gradient_moment):
    """alpha* = 1 / lambda_max(J^-1 C). J: (D, D) positive definite, C: (D, D) -> float (inf if C = 0)."""
    largest = generalized_eigen(gradient_moment, information)[0][0].item()
    return 1.0 / largest if largest > 0 else math.inf


def second_order_change(information, gradient_moment, alpha, offsets):
    """The predicted change of F for members theta* + offsets, sum_m offsets_m = 0.

        dF = (1/2M) sum_m o_m^T (alpha C - J) o_m,   offsets o: (M, D) -> scalar
    """
    curvature = alpha * gradient_moment - information  # (D, D)
    return torch.einsum("md,de,me->", offsets, curvature, offsets) / (2 * len(offsets))


# -----------------------------------------------------------------------------
# the toy problems' J and C

@dataclass
class Problem:
    """A log-likelihood log p(x | theta) and a data set, with a Gaussian prior.

    log_lik(theta, example) -> scalar, theta: (D,); data: a tuple of tensors
    whose leading axis (N) indexes examples, one example = one slice of each.
    prior_precision is Lambda = weight / (N sigma_p^2) of METHOD.md §2.
    """
    name: str
    log_lik: Callable
    data: tuple
    n_params: int
    prior_precision: float = 0.0
    closed_form_alpha: Optional[float] = None


def collapsed_objective(problem, theta):
    """(1/N) sum_i log p(x_i | theta) - (Lambda / 2) ||theta||^2: all members equal theta. (D,) -> scalar."""
    log_liks = vmap(problem.log_lik, in_dims=(None, 0))(theta, problem.data)  # (N,)
    return log_liks.mean() - 0.5 * problem.prior_precision * theta.pow(2).sum()


def collapsed_optimum(problem, max_steps=50, tolerance=1e-12):
    """theta* = argmax of `collapsed_objective`, by Newton's method from theta = 0. -> (D,)"""
    theta = torch.zeros(problem.n_params, dtype=DTYPE)
    for _ in range(max_steps):
        gradient = grad(collapsed_objective, argnums=1)(problem, theta)
        if gradient.norm() < tolerance:
            return theta
        theta = theta - torch.linalg.solve(hessian(collapsed_objective, argnums=1)(problem, theta), gradient)
    raise RuntimeError(f"{problem.name}: Newton did not converge, |gradient| = {gradient.norm():.2e}")


def stability_matrices(problem):
    """theta*, J and C of METHOD.md §3 from per-example autograd derivatives.

        J = -(1/N) sum_i H_i + Lambda I,   C = (1/N) sum_i g_i g_i^T

    Returns theta* (D,), J (D, D), C (D, D). With a prior the mean gradient at
    theta* is Lambda theta*, not zero, and C stays uncentred: the expansion
    needs the second moment of g_i, not its covariance.
    """
    theta_star = collapsed_optimum(problem)
    gradients = vmap(grad(problem.log_lik), in_dims=(None, 0))(theta_star, problem.data)  # (N, D)
    hessians = vmap(hessian(problem.log_lik), in_dims=(None, 0))(theta_star, problem.data)  # (N, D, D)
    identity = torch.eye(problem.n_params, dtype=DTYPE)
    information = -hessians.mean(0) + problem.prior_precision * identity
    gradient_moment = gradients.T @ gradients / len(gradients)
    return theta_star, information, gradient_moment



# -----------------------------------------------------------------------------
# the real objective, and gradient ascent on it

def member_log_liks(problem, thetas):
    """log p(x_i | theta_m) for every member and example. thetas: (M, D) -> logp: (M, N)."""
    per_example = vmap(problem.log_lik, in_dims=(None, 0))
    return vmap(per_example, in_dims=(0, None))(thetas, problem.data)


def renyi_objective(problem, thetas, alphas):
    """F = -(renyi_loss + prior_penalty), the per-example objective the members ascend.

    thetas: (A, M, D), one independent ensemble per entry of `alphas` -> the sum
    of their objectives (a scalar), so one backward pass trains them all.
    prior_penalty's weight and sigma_p only enter through
    Lambda = weight / (N sigma_p^2): weight = Lambda N, sigma_p = 1 give the
    problem's prior precision. It sums ||theta||^2 over all ensembles at once.
    """
    n_ensembles, n_members, _ = thetas.shape
    logp = member_log_liks(problem, thetas.flatten(0, 1)).unflatten(0, (n_ensembles, n_members))  # (A, M, N)
    n_train = logp.shape[-1]
    prior = prior_penalty([thetas], n_train, n_members, weight=problem.prior_precision * n_train)
    return -(sum(renyi_loss(logp[k], alpha) for k, alpha in enumerate(alphas)) + prior)


def ensemble_spread(thetas):
    """s = sqrt( (1/M) sum_m ||theta_m - mean_m theta_m||^2 ). thetas: (..., M, D) -> (...)."""
    return (thetas - thetas.mean(-2, keepdim=True)).pow(2).sum(-1).mean(-1).sqrt()


def symmetric_offsets(n_members, n_params, spread, seed):
    """Random offsets o_m with sum_m o_m = 0 and ensemble spread `spread`. -> (M, D)"""
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.randn(n_members, n_params, generator=generator, dtype=DTYPE)
    offsets = offsets - offsets.mean(0)
    return spread * offsets / ensemble_spread(offsets)


def spread_growth(problem, theta_star, information, alphas, n_members, n_steps=N_STEPS,
                  initial_spread=1e-4, seed=0):
    """Final / initial spread after preconditioned gradient ascent on F from theta* + tiny offsets.

        theta_m <- theta_m + M J^-1 dF/dtheta_m      linearised: o_m <- alpha J^-1 C o_m

    One independent ensemble per alpha, all from the same offsets. At collapse
    each member receives 1/M of every gradient (uniform responsibilities), hence
    the factor M. A fixed positive-definite preconditioner cannot move the
    threshold (Sylvester's law of inertia), but J^-1 makes each direction grow
    or decay by alpha * lambda_k(J^-1 C) per step, so one step count serves
    every problem however J is scaled. Returns (len(alphas),).
    """
    offsets = symmetric_offsets(n_members, problem.n_params, initial_spread, seed)  # (M, D)
    thetas = (theta_star + offsets).repeat(len(alphas), 1, 1).requires_grad_()  # (A, M, D)
    preconditioner = n_members * torch.linalg.inv(information)  # (D, D), symmetric
    for _ in range(n_steps):
        (gradient,) = torch.autograd.grad(renyi_objective(problem, thetas, alphas), thetas)  # (A, M, D)
        with torch.no_grad():
            thetas += gradient @ preconditioner
    return ensemble_spread(thetas.detach()) / initial_spread


def observed_threshold(alphas, growth):
    """The smallest alpha whose spread grew (final > initial); nan if none did.

    It lies at or above alpha*: up to one grid step, plus the few alphas just
    above alpha* whose slow growth has not yet made up for the initial decay of
    the offsets' stable components.
    """
    grown = [alpha for alpha, factor in zip(alphas, growth.tolist()) if factor > 1]
    return min(grown) if grown else math.nan


# -----------------------------------------------------------------------------
# toy problems

def gaussian_log_lik(theta, example):
    """log N(x; mu, 1) with theta = (mu,)."""
    (x,) = example
    return -0.5 * (x - theta[0]) ** 2 - 0.5 * math.log(2 * math.pi)


def logistic_log_lik(theta, example):
    """log p(y | features) = y log sigmoid(z) + (1 - y) log sigmoid(-z) = y z - softplus(z), z = features . theta."""
    features, label = example
    logit = features @ theta
    return label * logit - torch.nn.functional.softplus(logit)


def gaussian_clusters(separation, prior_precision=0.0, n_per_cluster=100):
    """N(mu, 1) fitted to x = +-a + z: alpha* = (1 + Lambda) / (1 + a^2) in closed form.

    z are standard-normal quantiles rescaled to mean 0 and mean square exactly 1,
    the same z in both clusters, so the sample has mean 0 and mean square 1 + a^2
    exactly (no sampling noise): then mu* = 0, J = 1 + Lambda, C = 1 + a^2.
    """
    levels = (torch.arange(n_per_cluster, dtype=DTYPE) + 0.5) / n_per_cluster
    noise = torch.special.ndtri(levels)
    noise = (noise - noise.mean()) / noise.pow(2).mean().sqrt()
    x = torch.cat([separation + noise, -separation + noise])  # (N,)
    name = f"gaussian a={separation:g}"
    closed_form = (1 + prior_precision) / (1 + separation ** 2)
    return Problem(name, gaussian_log_lik, (x,), 1, prior_precision, closed_form)


def with_bias(inputs):
    """Append a constant feature: (N, d) -> (N, d + 1)."""
    return torch.cat([inputs, torch.ones(len(inputs), 1, dtype=DTYPE)], dim=1)


def contradicting_logistic(n_train=500, prior_precision=0.0, seed=0):
    """Logistic regression where annotators disagree on half of the input square.

    x ~ U[-2, 2]^2. Labels follow y ~ Bernoulli(sigmoid(4 x_2)), except that for
    x_1 > 0 each label is flipped with probability 1/2: there the labels
    contradict each other. A linear logit cannot turn x_2 off on the right half,
    so it keeps predicting from x_2 where the labels are a coin flip: there the
    gradients vary more than the curvature accounts for, and C exceeds J.
    """
    generator = torch.Generator().manual_seed(seed)
    inputs = 4 * torch.rand(n_train, 2, generator=generator, dtype=DTYPE) - 2
    labels = (torch.rand(n_train, generator=generator, dtype=DTYPE) < torch.sigmoid(4 * inputs[:, 1])).to(DTYPE)
    flipped = (inputs[:, 0] > 0) & (torch.rand(n_train, generator=generator, dtype=DTYPE) < 0.5)
    labels = torch.where(flipped, 1 - labels, labels)
    return Problem("contradicting logistic", logistic_log_lik, (with_bias(inputs), labels), 3, prior_precision)


def well_specified_logistic(n_train=2000, seed=0):
    """The control: labels drawn from the model itself, so C ~= J and alpha* ~= 1.

    x ~ N(0, I_2), y ~ Bernoulli(sigmoid(x_1 - x_2 + 0.5)). Sampling noise in C
    puts alpha* slightly below 1, by O(sqrt(D / N)).
    """
    generator = torch.Generator().manual_seed(seed)
    features = with_bias(torch.randn(n_train, 2, generator=generator, dtype=DTYPE))
    true_theta = torch.tensor([1.0, -1.0, 0.5], dtype=DTYPE)
    labels = (torch.rand(n_train, generator=generator, dtype=DTYPE) < torch.sigmoid(features @ true_theta)).to(DTYPE)
    return Problem("well-specified logistic", logistic_log_lik, (features, labels), 3)


# -----------------------------------------------------------------------------
# the experiment: table, spread plot, phase diagram

def table_problems():
    """The table's rows: closed-form Gaussians (a = 1, 2, then a = 2 with two priors), logistic regressions."""
    return [gaussian_clusters(1.0), gaussian_clusters(2.0), gaussian_clusters(2.0, prior_precision=0.5),
            gaussian_clusters(2.0, prior_precision=2.0), contradicting_logistic(),
            contradicting_logistic(prior_precision=0.02), well_specified_logistic()]


def run_problem(problem, members=(2, 4)):
    """Predicted alpha* and, per ensemble size, the spread growth over ALPHAS and the observed threshold."""
    theta_star, information, gradient_moment = stability_matrices(problem)
    growth = {m: spread_growth(problem, theta_star, information, ALPHAS, m) for m in members}
    observed = {m: observed_threshold(ALPHAS, growth[m]) for m in members}
    return dict(problem=problem, predicted=critical_alpha(information, gradient_moment), growth=growth, observed=observed)


def table_row(result):
    """One markdown row: problem, Lambda, closed form, autograd alpha*, observed thresholds, agreement.

    The agreement column also shows the largest observed - predicted difference.
    """
    problem, predicted, observed = result["problem"], result["predicted"], result["observed"]
    closed_form = "-" if problem.closed_form_alpha is None else f"{problem.closed_form_alpha:.4f}"
    differences = [threshold - predicted for threshold in observed.values()]
    if any(math.isnan(difference) for difference in differences):
        agreement = "no (no alpha grew)"
    else:
        worst = max(differences, key=abs)
        agreement = f"{'yes' if abs(worst) <= TOLERANCE else 'no'} ({worst:+.3f})"
    thresholds = " | ".join(f"{threshold:.3f}" for threshold in observed.values())
    return f"| {problem.name} | {problem.prior_precision:g} | {closed_form} | {predicted:.4f} | {thresholds} | {agreement} |"


def plot_spread(results, path, clip=1e6):
    """Final / initial spread against alpha, one panel per problem, a dashed line at the predicted alpha*.

    Spreads are clipped to [1/clip, clip]: below that the decay reaches float64
    round-off, above it the members have settled into their split.
    """
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(2, 4, figsize=(16, 7))
    for axis, result in zip(axes.flat, results):
        for (n_members, growth), style in zip(result["growth"].items(), ["o-", ".-"]):  # hollow M=2 shows under M=4
            axis.semilogy(ALPHAS, growth.clamp(1 / clip, clip), style, markerfacecolor="none", label=f"M = {n_members}")
        axis.axhline(1.0, color="gray", lw=0.8)
        axis.axvline(result["predicted"], color="k", ls="--")
        axis.set(xlabel="alpha", ylabel="final / initial spread", ylim=(0.5 / clip, 2 * clip))
        problem = result["problem"]
        axis.set_title(f"{problem.name}, Lambda = {problem.prior_precision:g}\n"
                       f"predicted alpha* = {result['predicted']:.3f} (dashed)", fontsize=10)
        axis.legend(fontsize=8, loc="lower right")
    axes.flat[-1].axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def gaussian_phase_diagram(separations, n_steps=30):
    """log10(final / initial spread) over (a, alpha) for two members, and autograd alpha* per a.

    The Gaussian problem has one parameter, so the spread moves along the
    unstable direction from the first step and a few steps show the sign.
    Returns (len(separations), len(ALPHAS)) and a list of alpha*.
    """
    rows, predicted = [], []
    for separation in separations:
        problem = gaussian_clusters(separation)
        theta_star, information, gradient_moment = stability_matrices(problem)
        rows.append(spread_growth(problem, theta_star, information, ALPHAS, 2, n_steps).log10())
        predicted.append(critical_alpha(information, gradient_moment))
    return torch.stack(rows), predicted


def plot_phase(separations, log_growth, predicted, path, limit=4):
    """The phase diagram with the curve alpha = 1 / (1 + a^2) and the autograd alpha* on top.

    The colour scale stops at +-limit decades, about where split members settle
    (spread ~ a / 1e-4), so growth and decay get equally strong colours.
    """
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 5))
    image = axis.pcolormesh(ALPHAS, separations, log_growth, cmap="RdBu_r", vmin=-limit, vmax=limit, shading="nearest")
    figure.colorbar(image, label="log10(final spread / initial spread), M = 2", extend="both")
    fine = torch.linspace(min(separations), max(separations), 200)
    axis.plot(1 / (1 + fine ** 2), fine, "k-", label="alpha = 1 / (1 + a^2)")
    axis.plot(predicted, separations, "ko", markerfacecolor="none", label="autograd alpha*")
    axis.set(xlabel="alpha", ylabel="cluster separation a", xlim=(0, max(ALPHAS)),
             title="N(mu, 1) fitted to x = +-a + noise: red = members split")
    axis.legend(loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv):
    config = parse_args(defaults, argv)
    torch.set_num_threads(1)  # tiny tensors: a second thread only adds overhead
    start = time.time()
    results = [run_problem(problem) for problem in table_problems()]
    print("| problem | Lambda | closed form alpha* | autograd alpha* | observed M=2 | observed M=4 | within 0.05 |")
    print("|---|---|---|---|---|---|---|")
    for result in results:
        print(table_row(result))
    separations = [0.25 * k for k in range(13)]
    log_growth, predicted = gaussian_phase_diagram(separations)
    closed_form_error = max(abs(alpha - 1 / (1 + a ** 2)) for alpha, a in zip(predicted, separations))
    print(f"gaussian, {len(separations)} separations a in [0, 3]: max |autograd alpha* - 1/(1+a^2)| = {closed_form_error:.1e}")
    os.makedirs(config["out_dir"], exist_ok=True)
    paths = [os.path.join(config["out_dir"], name) for name in ("spread.png", "phase.png")]
    plot_spread(results, paths[0])
    plot_phase(separations, log_growth, predicted, paths[1])
    print(f"saved {paths[0]}, {paths[1]}; {len(ALPHAS)} alphas, {N_STEPS} steps per ensemble; "
          f"{time.time() - start:.1f} s")


if __name__ == "__main__":
    run_script(main)
