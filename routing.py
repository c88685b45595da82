"""
Who explains what: the measures of how an ensemble's members share the examples
(METHOD.md §6). Each takes the members' log-likelihoods logp (M, N) of N examples and
their labels (annotator group, task, prompt) and returns numbers: the specialisation
measures, the routing matrix, each member's share of the responsibility and the starved
members, and how label noise is routed. The SFT report (evaluate.py) and train_sft.py read them.
"""
import math

import torch

from renyi_lora import responsibilities, responsibility_entropy


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


def soft_specialisation(logp, groups):
    """I(group; member) / H(group) under the posterior responsibilities w_m(x) = softmax_m(log p_m(x)).

        p(g, m) = (1/N) sum_{i: g_i = g} w_m(x_i)
        I       = sum_{g, m} p(g, m) log( p(g, m) / (p(g) p(m)) )

    logp: (M, N) log-likelihoods of N examples, groups: N labels -> float in [0, 1]:
    0 when the members explain every example equally well (identical members, or
    routing that ignores the group), 1 when each member explains one group alone.
    Unlike an argmax, members that barely differ score near 0. None with fewer than two groups.
    """
    names = sorted(set(groups))
    if len(names) < 2:
        return None
    weights = torch.softmax(logp.double(), dim=0)                            # (M, N)
    one_hot = torch.tensor([[g == name for g in groups] for name in names], dtype=torch.float64)  # (G, N)
    joint = one_hot @ weights.T / len(groups)                                # (G, M)
    group_marginal, member_marginal = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    ratio = joint / (group_marginal * member_marginal)
    mutual_information = (joint * ratio.clamp_min(1e-300).log()).sum().clamp_min(0.0)   # >= 0; float64 rounding can land a hair below
    group_entropy = -(group_marginal * group_marginal.log()).sum()
    return (mutual_information / group_entropy).item()


def specialisation_by(logp, groups, keys):
    """{key: soft_specialisation of the rows with that key}, for each value of keys that several groups share.

    logp: (M, N), groups and keys: N labels. Keys whose rows come from a single group are left out.
    """
    rows_of = {}
    for i, key in enumerate(keys):
        rows_of.setdefault(key, []).append(i)
    scores = {key: soft_specialisation(logp[:, rows], [groups[i] for i in rows]) for key, rows in rows_of.items()}
    return {key: score for key, score in scores.items() if score is not None}


def specialisation_within(logp, groups, keys):
    """specialisation_by averaged over the keys, each key counting once: a float in [0, 1], or None without such a key.

    With keys the rows' prompts (per_prompt_specialisation in the report) it is 1 when, on every
    conflicting prompt, each group's response is explained by its own members, even if which
    members side with which group changes from prompt to prompt; with keys their tasks
    (per_task_specialisation), when the sides stay fixed within a task but may pair up differently
    from one task to the next. soft_specialisation is 1 only when the sides stay the same everywhere.
    """
    scores = list(specialisation_by(logp, groups, keys).values())
    return sum(scores) / len(scores) if scores else None


def task_routing(logp, alpha, rows, n_tokens=None):
    """Do members specialise by task? On the rows every annotator agrees on (consistent and high-entropy):

        task_routing         {task: [mean responsibility of member m at alpha]}, routing_matrix by task
        task_specialisation  I(task; member) / H(task) = 1 - H(task | member) / H(task) under the posterior
                             w_m(x) = softmax_m(log p_m(x)): soft_specialisation with tasks for groups

    logp: (M, N) of the N rows -> a dict of both keys, each None without such rows (the second also with one task).
    n_tokens (N,): length-normalised routing, as in training.
    """
    agreed = [i for i, row in enumerate(rows) if row.get('kind') in ('consistent', 'high_entropy') and row.get('task')]
    tasks = [rows[i]['task'] for i in agreed]
    lengths = None if n_tokens is None else n_tokens[agreed]
    return dict(task_routing=routing_matrix(logp[:, agreed], alpha, tasks, lengths) if tasks else None,
                task_specialisation=soft_specialisation(logp[:, agreed], tasks))


def member_shares(logp, alpha, n_tokens=None):
    """Each member's share of the responsibility, mean_i softmax_m(alpha * log p_m(x_i)): (M,) summing to 1.

    This is how much of the training signal each member receives at that alpha; 1/M each
    when routing is uniform. n_tokens (N,): length-normalised routing, as in training.
    """
    return responsibilities(logp, alpha, n_tokens).mean(dim=1)


def starved_members(shares, fraction=0.25):
    """Members whose share of the responsibility is below fraction / M: [m, ...]. shares: (M,)."""
    n_members = len(shares)
    return [m for m, share in enumerate(shares.tolist()) if n_members > 1 and share < fraction / n_members]


def routing_matrix(logp, alpha, groups, n_tokens=None):
    """Mean responsibility of each member for each group: {group: [w_0, ..., w_{M-1}]}.

    logp: (M, N), groups: N labels; n_tokens (N,): length-normalised routing, as in training.
    """
    weights = responsibilities(logp, alpha, n_tokens)                         # (M, N)
    matrix = {}
    for group in sorted(set(groups)):
        columns = torch.tensor([g == group for g in groups])
        matrix[group] = weights[:, columns].mean(1).tolist()
    return matrix


def responsibility_spread(logp, alpha):
    """How the responsibilities w(x) = softmax_m(alpha * log p_m(x)) spread over the members, averaged over examples:

        entropy   = mean_i -sum_m w_m(x_i) log w_m(x_i)   (nats; 0 on one member, log M when even)
        top_share = mean_i max_m w_m(x_i)

    logp: (M, N), N >= 1 -> {'entropy': float, 'top_share': float}.
    """
    weights = responsibilities(logp.double(), alpha)                          # (M, N)
    return dict(entropy=responsibility_entropy(weights).mean().item(), top_share=weights.max(0).values.mean().item())


def noise_routing(logp, alpha, rows):
    """responsibility_spread of the corrupted training rows (`corrupted: True`) and of the clean consistent ones.

    logp: (M, N) of the N rows -> {'corrupted': ..., 'clean': ...}; None without corrupted rows.
    Shielding (the paper's claim) shows as corrupted rows on fewer members than clean ones.
    """
    corrupted = [i for i, row in enumerate(rows) if row.get('corrupted')]
    clean = [i for i, row in enumerate(rows) if row.get('kind') == 'consistent' and not row.get('corrupted')]
    if not corrupted or not clean:
        return None
    return dict(corrupted=responsibility_spread(logp[:, corrupted], alpha),
                clean=responsibility_spread(logp[:, clean], alpha))
