"""
Evaluating an ensemble after DPO: the implied reward margins of preference pairs, per member,
and the DPO report (METHOD.md §6). Split from evaluate.py, whose SFT read-outs it shares.
"""
import torch

import data
from evaluate import device_of, safe_auroc
from renyi_lora import dpo_logp, dpo_loss, sequence_logprobs
from routing import routing_matrix


def report_group(row):
    """The group a pair is reported under: "contested/<group>" (contested pairs by who annotated them)
    or "consensus" (every annotator agrees, so their groups need no split)."""
    if row.get('kind') == 'contested':
        return f"contested/{row['group']}" if row.get('group') else 'contested'
    return 'consensus'


def group_masks(rows):
    """{report group: (N,) boolean mask of its rows}, groups sorted."""
    groups = [report_group(row) for row in rows]
    return {group: torch.tensor([g == group for g in groups]) for group in sorted(set(groups))}


def pair_logprobs(model, chosen_idx, chosen_labels, rejected_idx, rejected_labels):
    """log pi(y_w|x) and log pi(y_l|x) from one concatenated forward pass: two (M, B) tensors ((1, B) for a bare base)."""
    logits = model(torch.cat([chosen_idx, rejected_idx]))                     # (M, 2B, T, V) or (2B, T, V)
    logps = sequence_logprobs(logits, torch.cat([chosen_labels, rejected_labels]))  # (M, 2B) or (2B,)
    return logps.view(-1, logps.shape[-1]).chunk(2, dim=-1)                    # 2 x (M or 1, B)


@torch.no_grad()
def score_pairs(model, encoded, pad_id, batch_size):
    """pair_logprobs of every encoded pair, in order: (chosen, rejected), each (M, N) ((1, N) for a bare base)."""
    chosen, rejected = [], []
    for start in range(0, len(encoded), batch_size):
        batch = data.pref_batch(encoded, range(start, min(start + batch_size, len(encoded))), pad_id)
        chosen_logps, rejected_logps = pair_logprobs(model, *(t.to(device_of(model)) for t in batch))
        chosen.append(chosen_logps)
        rejected.append(rejected_logps)
    return torch.cat(chosen, dim=-1), torch.cat(rejected, dim=-1)


def reward_margins(model, encoded, reference_logps, pad_id, beta, label_smoothing=0.0, batch_size=32):
    """Each member's implied reward margin beta * h_m(x) on every pair, (M, N), and its DPO log-likelihood, (M, N)."""
    model.eval()  # no dropout while scoring
    chosen, rejected = score_pairs(model, encoded, pad_id, batch_size)
    model.train()
    _, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, *reference_logps, beta)
    logp = dpo_logp(chosen, rejected, *reference_logps, beta, label_smoothing)
    return chosen_rewards - rejected_rewards, logp


def pair_preference_variance(margins):
    """The members' disagreement about each pair: the variance across members of their preference probability.

    v(x) = (1/M) sum_m (p_m(x) - mean_k p_k(x))^2,   p_m(x) = sigmoid(beta * h_m(x))      (M, N) -> (N,)
    In [0, 0.25]. Computed in float64: where every member is sure, every p_m(x) is near 1 and v(x) is tiny.
    """
    preference = torch.sigmoid(margins.double())                                 # (M, N)
    return preference.var(dim=0, unbiased=False)                                 # (N,)


def preference_variance(margins, contested, consensus):
    """Mean v(x) (pair_preference_variance) over contested and over consensus pairs, and contested / consensus.

    margins (M, N) = beta * h_m(x); contested, consensus (N,) boolean masks. Returns {contested, consensus, ratio},
    each None where the data cannot tell: one member (v = 0 by construction), no pair of a kind, a zero consensus mean.
    """
    variance = pair_preference_variance(margins)                                 # (N,)
    means = {kind: variance[mask].mean().item() if margins.shape[0] > 1 and mask.any() else None
             for kind, mask in (('contested', contested), ('consensus', consensus))}
    ratio = means['contested'] / means['consensus'] if None not in means.values() and means['consensus'] > 0 else None
    return means | dict(ratio=ratio)


def dpo_report(model, encoded, rows, reference_logps, pad_id, alpha, beta, label_smoothing=0.0, batch_size=32):
    """Per-group preference accuracy of each member and of the ensemble, margins, routing, auroc_contested and
    preference_variance.

    Returns (report dict, {group: margins (M, n) of its pairs}). A pair counts as correct when
    its implied reward margin beta * h_m(x) is > 0. The ensemble's margin is the mean of the
    members' margins. Member disagreement on a pair is the standard deviation of the members'
    margins; auroc_contested asks how well it separates contested from consensus pairs (null
    without both kinds). preference_variance compares the members' disagreement about the preference
    probability sigmoid(beta * h_m(x)) on contested and on consensus pairs.
    """
    margins, logp = reward_margins(model, encoded, reference_logps, pad_id, beta, label_smoothing, batch_size)
    columns = group_masks(rows)
    disagreement = margins.std(dim=0, unbiased=False)                              # (N,); 0 when M = 1
    contested = torch.tensor([row.get('kind') == 'contested' for row in rows])  # (N,)
    consensus = torch.tensor([row.get('kind') == 'consensus' for row in rows])  # (N,)
    report = dict(
        n_members=margins.shape[0],
        accuracy_by_group={g: (margins[:, c] > 0).float().mean(1).tolist() for g, c in columns.items()},
        ensemble_accuracy_by_group={g: (margins[:, c].mean(0) > 0).float().mean().item() for g, c in columns.items()},
        mean_margin_by_group={g: margins[:, c].mean(1).tolist() for g, c in columns.items()},
        routing=routing_matrix(logp, alpha, [report_group(row) for row in rows]),
        auroc_contested=safe_auroc(disagreement[contested], disagreement[consensus]),
        preference_variance=preference_variance(margins, contested, consensus))
    return report, {g: margins[:, c] for g, c in columns.items()}
