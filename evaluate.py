"""
Evaluating an ensemble of adapters: teacher-forced scores, decoding, the report.

Shared by train_sft.py, train_dpo.py and compare.py. Everything here takes a model
whose logits carry a member axis, (M, B, T, V); a single adapter is M = 1.
"""
import math

import torch

from renyi_lora import (auroc, ece, expected_entropy, mutual_information, predictive_entropy, responsibilities,
                        sequence_logprobs)


@torch.no_grad()
def score_batches(model, batches):
    """Teacher-forced read-outs of held-out (idx, labels) batches.

    Returns a dict of tensors over the N examples:
      logp (M, N)        summed log-likelihood of each response under each member
      n_tokens (N,)      response tokens (labels != -100, after the shift)
      epistemic (N,)     sum over response tokens of the members' mutual information
      total, aleatoric (N,)  the same sums for H(p_bar) and mean_m H(p_m)
    and, over all response tokens of the mixture p_bar = mean_m p_m:
      token_confidence, token_correct, token_true_prob  (K,)
    """
    parts = []
    for idx, labels in batches:
        logits = model(idx)                                    # (M, B, T, V)
        probs = logits[..., :-1, :].float().softmax(-1)        # (M, B, T-1, V)
        targets = labels[:, 1:]                                # (B, T-1)
        mask = targets != -100
        mixture = probs.mean(0)                                # (B, T-1, V)
        confidence, prediction = mixture.max(-1)               # (B, T-1)
        true_prob = mixture.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        parts.append(dict(
            logp=sequence_logprobs(logits, labels), n_tokens=mask.sum(-1),
            epistemic=(mutual_information(probs) * mask).sum(-1),
            total=(predictive_entropy(probs) * mask).sum(-1),
            aleatoric=(expected_entropy(probs) * mask).sum(-1),
            token_confidence=confidence[mask], token_correct=(prediction == targets)[mask],
            token_true_prob=true_prob[mask]))
    return {key: torch.cat([p[key] for p in parts], dim=-1).cpu() for key in parts[0]}


@torch.no_grad()
def greedy_decode(model, prompt, max_new_tokens, stop_token):
    """Greedy decoding of the ensemble's predictive mixture p_bar = mean_m p_m.

    prompt: (B, T) prompts of equal length -> (B, T + new). Every member sees the
    same continuation, so the shared trunk applies at every step.
    """
    idx, finished = prompt, torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.config.block_size:])[..., -1, :]          # (M, B, V) or (B, V)
        probs = logits.softmax(-1)
        mixture = probs.mean(0) if logits.dim() == 3 else probs               # (B, V)
        next_token = mixture.argmax(-1).masked_fill(finished, stop_token)     # (B,)
        finished |= next_token == stop_token
        idx = torch.cat([idx, next_token[:, None]], dim=1)
        if finished.all():
            break
    return idx


def specialisation(member_of_example, group_of_example):
    """1 - H(group | member) / H(group): how much knowing the member tells the group.

    1 when every member serves a single group, 0 when routing ignores the group.
    Both arguments are equal-length sequences of labels. None with fewer than two groups.
    """
    groups = sorted(set(group_of_example))
    if len(groups) < 2:
        return None
    n = len(group_of_example)
    joint = {}
    for member, group in zip(member_of_example, group_of_example):
        joint[member, group] = joint.get((member, group), 0) + 1
    group_counts = [group_of_example.count(g) for g in groups]
    h_group = -sum(c / n * math.log(c / n) for c in group_counts)
    h_group_given_member = 0.0
    for member in set(member_of_example):
        n_member = sum(c for (m, _), c in joint.items() if m == member)
        h_group_given_member -= sum(c / n * math.log(c / n_member) for (m, _), c in joint.items() if m == member)
    return 1.0 - h_group_given_member / h_group


def routing_matrix(logp, alpha, groups):
    """Mean responsibility of each member for each group: {group: [w_0, ..., w_{M-1}]}.

    logp: (M, N), groups: N labels.
    """
    weights = responsibilities(logp, alpha)                                   # (M, N)
    matrix = {}
    for group in sorted(set(groups)):
        columns = torch.tensor([g == group for g in groups])
        matrix[group] = weights[:, columns].mean(1).tolist()
    return matrix


def safe_auroc(pos_scores, neg_scores):
    """auroc, or None when either side is empty (a metric the data cannot support)."""
    if len(pos_scores) == 0 or len(neg_scores) == 0:
        return None
    return auroc(pos_scores, neg_scores)


def calibration(scores, n_bins=10):
    """Token-level calibration of the mixture: NLL, ECE (n_bins equal-width bins) and Brier.

    Brier here is the binary one on the top-1 prediction: mean (confidence - correct)^2.
    """
    confidence, correct = scores['token_confidence'], scores['token_correct'].double()
    return dict(nll=-scores['token_true_prob'].clamp_min(1e-30).log().mean().item(),
                ece=ece(confidence, correct, n_bins),
                brier=((confidence.double() - correct) ** 2).mean().item())
