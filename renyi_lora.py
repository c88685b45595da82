"""
The losses of alpha-Rényi ensemble post-training, side by side.

Every loss here sees the per-member, per-example log-likelihood `logp` of shape
(M, B): M ensemble members (LoRA adapters), B examples. For SFT that is the
summed log-probability of the response tokens (`sequence_logprobs`); for DPO it
is the Bradley-Terry log-likelihood of the preference. Nothing below knows
which one it gets. The one exception is UAL's label_smoothed_nll, which needs
the whole token distributions. See METHOD.md §1-2 and §5-6 for the equations.
"""
import math

import torch
import torch.nn.functional as F

from config import UserError


def sequence_logprobs(logits, labels):
    """Summed log p(response | prompt) per member and example.

        log p_m(x) = sum_t log p(y_t | x, y_<t, theta_m)   over tokens whose label != -100

    logits: (M, B, T, V) or (B, T, V); labels: (B, T), aligned with the input
    tokens (position t holds token t); the shift happens here: logits at t
    predict labels at t+1. Returns (M, B) (or (B,) without a member axis), in
    float32 whatever the dtype of logits.
    """
    logits = logits[..., :-1, :].float()                       # (..., B, T-1, V)
    targets = labels[..., 1:]                                  # (B, T-1)
    mask = targets != -100
    safe_targets = targets.masked_fill(~mask, 0).expand(logits.shape[:-1])
    token_logp = torch.gather(logits.log_softmax(-1), -1, safe_targets.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, token_logp, 0.0).sum(-1)          # (..., B); where, not * mask: -inf * 0 is nan


def dpo_logp(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0, sft_weight=0.0, chosen_lengths=None):
    """The DPO log-likelihood of each preference under each member (METHOD.md §1): what renyi_loss consumes.

        h_m(x)     = [log pi_m(y_w|x) - log pi_ref(y_w|x)] - [log pi_m(y_l|x) - log pi_ref(y_l|x)]
        log p_m(x) = log sigmoid(beta * h_m(x))

    the Bradley-Terry likelihood of "y_w beats y_l" under member m's implied
    reward; minus the summand of Rafailov et al. (2023), eq. 7. Policy inputs
    (M, B) -> (M, B); the reference may be (M, B) or (B,) (one reference for all).
    label_smoothing eps treats a share eps of the labels as flipped (conservative DPO):
        log p_m(x) = (1 - eps) log sigmoid(beta h_m) + eps log sigmoid(-beta h_m)
    sft_weight gamma holds each member to the chosen responses of the pairs it is responsible for. With
    a_m(x) = log pi_m(y_w|x) / |y_w| (chosen_lengths (B,) = |y_w|) it adds
        gamma * [a_m(x) - stopgrad(a_m(x))]
    which is 0 in value, so the routing w_m(x) and the loss still read the preference alone, while the
    gradient of renyi_loss gains w_m(x) * gamma * d a_m(x): the chosen responses' per-token NLL, routed
    (TRL's rpo_alpha, by responsibility). Without it DPO widens the margins by pushing chosen and rejected
    responses down alike, until the model no longer answers.
    """
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)   # h_m(x)
    logp = (1 - label_smoothing) * F.logsigmoid(beta * margin) + label_smoothing * F.logsigmoid(-beta * margin)
    if sft_weight:
        anchor = policy_chosen_logps / chosen_lengths                          # a_m(x), (M, B)
        logp = logp + sft_weight * (anchor - anchor.detach())                  # gradient, not value
    return logp


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             label_smoothing=0.0):
    """DPO for a single model, Rafailov et al. (2023), eq. 7, per example:

        loss = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

    (with label_smoothing eps: -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)).
    All inputs (B,) -> (losses, chosen_rewards, rejected_rewards), each (B,); the
    implied rewards beta * (log pi - log pi_ref) are detached, for logging.
    """
    losses = -dpo_logp(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                       label_smoothing)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def vb_loss(logp):
    """The variational-Bayes / deep-ensemble end, alpha -> 0.

        loss = -(1/B) sum_i (1/M) sum_m log p_m(x_i)

    logp: (M, B) -> scalar. Every member fits every example.
    """
    return -logp.mean()


def predictive_loss(logp):
    """The predictive-mixture end, alpha = 1.

        loss = -(1/B) sum_i log (1/M) sum_m p_m(x_i)

    logp: (M, B) -> scalar. The negative log-likelihood of the mixture.
    """
    n_members = logp.shape[0]
    return -(torch.logsumexp(logp, dim=0) - math.log(n_members)).mean()


def renyi_loss(logp, alpha):
    """The alpha-Rényi ensemble loss (METHOD.md §2).

        l_alpha(x) = (1/alpha) * ( logsumexp_m(alpha * log p_m(x)) - log M )
        loss       = -(1/B) sum_i l_alpha(x_i)

    logp: (M, B) -> scalar. alpha = 0 is `vb_loss` exactly, alpha = 1 is
    `predictive_loss`, alpha -> inf is winner-takes-all. This is Li & Turner's
    (2016) variational Rényi bound per example with their order
    alpha_LT = 1 - alpha and no entropy term (point-mass members have none).

    Written as the mean plus a centred logsumexp so it is exact at alpha = 0,
    O(alpha) close to it, and stable for log-likelihoods of -1e4 and below:
        l_alpha = mean_m logp + (1/alpha) * log mean_m exp(alpha * (logp - mean_m logp))
    The second term is O(alpha^2) / alpha: it is computed in float64, because in
    float32 its rounding error, divided by a small alpha, would swamp it.
    """
    alpha = check_alpha(alpha)
    if alpha == 0:
        return vb_loss(logp)
    logp64 = logp.double()                                      # (M, B)
    mean_logp = logp64.mean(dim=0)                              # (B,)
    centred = alpha * (logp64 - mean_logp)                      # (M, B)
    spread = (torch.logsumexp(centred, dim=0) - math.log(logp.shape[0])) / alpha
    return -(mean_logp + spread).mean().to(logp.dtype)


def responsibilities(logp, alpha):
    """Soft routing weights w_m(x) = softmax_m(alpha * log p_m(x)).

    logp: (M, B) -> (M, B), each column sums to one. The gradient of
    l_alpha(x) w.r.t. member m is w_m(x) times member m's own gradient, so these
    weights say which members each example trains. alpha = 0 routes uniformly.
    """
    alpha = check_alpha(alpha)
    return torch.softmax(alpha * logp, dim=0)


def responsibility_entropy(weights):
    """How many members share each example, as the entropy of its responsibilities:

        H(w(x)) = -sum_m w_m(x) log w_m(x)

    weights: (M, B) columns summing to one -> (B,), in nats: log M when the example
    trains every member alike, 0 when it trains one member alone.
    """
    return -(weights * weights.clamp_min(1e-30).log()).sum(0)


def posterior_weights(prefix_logp):
    """How much each member is trusted after the response so far (METHOD.md §6).

        w_m(x, y_<t) = p_m(y_<t | x) / sum_k p_k(y_<t | x)   = softmax_m(log p_m(y_<t | x))

    prefix_logp: (M, ...) summed log-likelihood of the tokens so far -> (M, ...), summing
    to one over members; 1/M each before the first token (prefix_logp all 0).
    """
    return torch.softmax(prefix_logp, dim=0)


def mixture_next_token_logprobs(member_logprobs, weights):
    """The next-token log-distribution of a weighted mixture of the members.

        log p(y_t | x, y_<t) = log sum_m w_m * p_m(y_t | x, y_<t)

    member_logprobs: (M, ..., V) log-softmaxed; weights: (M, ...) -> (..., V). With
    posterior_weights this is the sequence mixture (1/M) sum_m p_m(y | x) that the
    alpha > 0 objective trains, token by token; with w_m = 1/M it is the equal-weight
    token mixture, in which members that do not explain the response so far still vote.
    """
    return torch.logsumexp(member_logprobs + weights.clamp_min(1e-30).log().unsqueeze(-1), dim=0)


def alpha_at(it, alpha, ramp_iters, hold_iters=0):
    """The alpha of training step `it`: 0 for the first hold_iters steps, then a linear ramp to `alpha`
    at step ramp_iters (0 <= hold_iters <= ramp_iters).

        alpha_t = alpha * clamp((it - hold_iters) / (ramp_iters - hold_iters), 0, 1)

    At alpha = 0 every member learns every example, conflicting ones included;
    once alpha passes the critical alpha* (METHOD.md §3) the collapsed ensemble
    turns unstable and the members split. Without the ramp, members that lose
    the first race for a group never learn its responses at all. The hold keeps
    alpha at 0 until the members fit the data: routing is softmax(alpha log p_m), and
    while the members still differ by tens of nats on long responses, even a small
    alpha hands every example to one of them.
    """
    if not 0 <= hold_iters <= ramp_iters:
        raise ValueError(f"the hold ({hold_iters} iters) must lie within the ramp ({ramp_iters} iters)")
    if it >= ramp_iters:
        return alpha
    if it < hold_iters:
        return 0.0
    return alpha * (it - hold_iters) / (ramp_iters - hold_iters)


def label_smoothed_nll(logits, labels, eps):
    """Uncertainty-aware label smoothing, UAL (METHOD.md §5): each example's smoothed response NLL.

        loss_i = sum_t [ (1 - eps_i) * (-log p(y_t)) + eps_i * mean_v (-log p(v)) ]   over response tokens

    The target of every token is (1 - eps_i) on the true token plus eps_i spread
    evenly over the vocabulary, so an uncertain example (large eps_i) pulls the
    model less firmly towards its one response. logits: (M, B, T, V) or (B, T, V);
    labels: (B, T) as in sequence_logprobs; eps: (B,) -> (M, B) or (B,).
    eps = 0 gives -sequence_logprobs; eps = 1, the cross-entropy to the uniform distribution.
    """
    mask = labels[..., 1:] != -100                                                     # (B, T-1)
    uniform = -(logits[..., :-1, :].float().log_softmax(-1).mean(-1) * mask).sum(-1)   # (..., B)
    return (1 - eps) * -sequence_logprobs(logits, labels) + eps * uniform


def ual_smoothing(uncertainty, eps_min, eps_max):
    """UAL's map from an example's uncertainty u_i in [0, 1] to its label smoothing (linear; the paper's is not public).

        eps_i = eps_min + (eps_max - eps_min) * u_i          (N,) -> (N,)
    """
    return eps_min + (eps_max - eps_min) * uncertainty


def prior_penalty(lora_params, n_train, n_members, sigma_p=1.0, weight=1.0):
    """Gaussian prior N(0, sigma_p^2 I) on the LoRA parameters, per example.

        prior_term = (weight / (N * M)) * sum_m ||theta_m||^2 / (2 sigma_p^2)

    lora_params: tensors holding all members' adapters (their squared norms
    summed over everything is sum_m ||theta_m||^2). weight = 1 is the exact
    Bayesian weight for a training set of n_train examples.
    """
    squared_norm = sum(p.pow(2).sum() for p in lora_params)
    return weight * squared_norm / (2 * sigma_p ** 2 * n_train * n_members)


def check_alpha(alpha):
    """alpha as a float; UserError unless it is finite and >= 0."""
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise UserError(f"alpha must be a finite number >= 0, got {alpha}")
    return alpha


# ---------------------------------------------------------------------------
# Uncertainty read-outs and evaluation (METHOD.md §6)

def predictive_entropy(probs, weights=None):
    """Total uncertainty H(p_bar), p_bar = sum_m w_m p_m (w_m = 1/M without weights).

    probs: (M, ..., V) member distributions; weights: (M, ...) summing to one over members,
    e.g. posterior_weights for the sequence mixture -> (...). In nats.
    """
    mixture = probs.mean(dim=0) if weights is None else (weights.unsqueeze(-1) * probs).sum(dim=0)
    return -(mixture * torch.log(mixture.clamp_min(1e-30))).sum(-1)


def expected_entropy(probs, weights=None):
    """Aleatoric uncertainty sum_m w_m H(p_m) (mean_m without weights). probs: (M, ..., V) -> (...)."""
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)                 # (M, ...)
    return entropy.mean(dim=0) if weights is None else (weights * entropy).sum(dim=0)


def mutual_information(probs, weights=None):
    """Epistemic uncertainty: H(p_bar) - sum_m w_m H(p_m) >= 0, the members' disagreement.

    probs: (M, ..., V) -> (...). With the sequence mixture's posterior_weights at each token
    it is the information the next token carries about which member is speaking, given the
    response so far; summed over a response and averaged over responses drawn from the
    sequence mixture it is I(member; y | x) <= log M (chain rule; one response can exceed it).
    """
    return (predictive_entropy(probs, weights) - expected_entropy(probs, weights)).clamp_min(0.0)
