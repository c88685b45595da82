"""
The SFT report (METHOD.md §6): the numbers train_sft.py writes to report.json, and the measures
of who explains what behind them. Each routing measure takes the members' log-likelihoods
logp (M, N) of N examples and their labels (annotator group, task, prompt) and returns numbers:
the specialisation measures, the routing matrix, each member's share of the responsibility, the
starved members, and how label noise is routed.
"""
import math

import torch

import benchmark
from evaluate import (MIXTURES, answers_by_kind, calibration, coherence, ensemble_coherence, epistemic_scores,
                      greedy_accuracy, greedy_answers, safe_auroc, score_rows)
from renyi_lora import responsibilities, responsibility_entropy

COHERENCE_SAMPLES = 16     # sampled responses per conflicting prompt, split over the members


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
    ratio = joint / (group_marginal * member_marginal)        # 0 / 0 = nan where a member's weight underflowed to 0
    terms = torch.where(joint > 0, joint * ratio.clamp_min(1e-300).log(), 0.0)   # a term of zero probability is 0
    mutual_information = terms.sum().clamp_min(0.0)      # >= 0; float64 rounding can land a hair below
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


def task_routing(logp, alpha, rows):
    """Do members specialise by task? On the rows every annotator agrees on (consistent and high-entropy):

        task_routing         {task: [mean responsibility of member m at alpha]}, routing_matrix by task
        task_specialisation  I(task; member) / H(task) = 1 - H(task | member) / H(task) under the posterior
                             w_m(x) = softmax_m(log p_m(x)): soft_specialisation with tasks for groups

    logp: (M, N) of the N rows -> a dict of both keys, each None without such rows (the second also with one task).
    """
    agreed = [i for i, row in enumerate(rows) if row.get('kind') in ('consistent', 'high_entropy') and row.get('task')]
    tasks = [rows[i]['task'] for i in agreed]
    return dict(task_routing=routing_matrix(logp[:, agreed], alpha, tasks) if tasks else None,
                task_specialisation=soft_specialisation(logp[:, agreed], tasks))


def member_shares(logp, alpha):
    """Each member's share of the responsibility, mean_i softmax_m(alpha * log p_m(x_i)): (M,) summing to 1.

    This is how much of the training signal each member receives at that alpha; 1/M each
    when routing is uniform.
    """
    return responsibilities(logp, alpha).mean(dim=1)


def starved_members(shares, fraction=0.25):
    """Members whose share of the responsibility is below fraction / M: [m, ...]. shares: (M,)."""
    n_members = len(shares)
    return [m for m, share in enumerate(shares.tolist()) if n_members > 1 and share < fraction / n_members]


def routing_matrix(logp, alpha, groups):
    """Mean responsibility of each member for each group: {group: [w_0, ..., w_{M-1}]}.

    logp: (M, N), groups: N labels.
    """
    weights = responsibilities(logp, alpha)                         # (M, N)
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


# -----------------------------------------------------------------------------
# the report

def per_prompt_mean(scores, rows):
    """Average a per-row score over rows that share a prompt: {prompt: mean score}."""
    sums = {}
    for score, row in zip(scores.tolist(), rows):
        total, count = sums.get(row['prompt'], (0.0, 0))
        sums[row['prompt']] = (total + score, count + 1)
    return {prompt: total / count for prompt, (total, count) in sums.items()}


def by_kind_of(score_of_prompt, kind_of):
    """Per-prompt scores {prompt: score} grouped by the prompts' kinds: {kind: [score, ...]}, kinds sorted."""
    return {kind: [score for prompt, score in score_of_prompt.items() if kind_of[prompt] == kind]
            for kind in sorted(set(kind_of.values()))}


def epistemic_aurocs(epistemic, suffix=''):
    """The AUROCs of an epistemic score {kind: [per-prompt score]} (METHOD.md §6), keys suffixed by its mixture's suffix:

      auroc_conflict               conflicting above consistent
      auroc_conflict_vs_ambiguous  conflicting above high-entropy
    Conflict should read as epistemic, ambiguity (many acceptable answers) should not. Null where a kind is missing.
    """
    pair = lambda high, low: safe_auroc(epistemic.get(high, []), epistemic.get(low, []))
    return {f'auroc_conflict{suffix}': pair('conflicting', 'consistent'),
            f'auroc_conflict_vs_ambiguous{suffix}': pair('conflicting', 'high_entropy')}


def answer_aurocs(aleatoric, disagreement):
    """The AUROCs of the other scores, each a {kind: [per-prompt score]} (METHOD.md §6):

      auroc_conflict_answers               disagreement about whole answers: conflicting above consistent
      auroc_conflict_vs_ambiguous_answers  disagreement: conflicting above high-entropy
      auroc_ambiguous_aleatoric            aleatoric per token: high-entropy above conflicting
    """
    pair = lambda scores, high, low: safe_auroc(scores.get(high, []), scores.get(low, []))
    return dict(auroc_conflict_answers=pair(disagreement, 'conflicting', 'consistent'),
                auroc_conflict_vs_ambiguous_answers=pair(disagreement, 'conflicting', 'high_entropy'),
                auroc_ambiguous_aleatoric=pair(aleatoric, 'high_entropy', 'conflicting'))


def answer_readouts(answers, rows):
    """What the members' own greedy answers tell, from evaluate.answers_by_kind's {kind: [answer]} on rows:

      disagreement         {prompt: mutual information between member and whole answer} (evaluate.disagreement)
      member_accuracy      [share of consistent prompts member m answers acceptably], one per member
      greedy_correct       {prompt: 1 or 0}: is the ensemble's answer (sequence mixture) acceptable
    """
    rows_of = {}
    for row in rows:
        rows_of.setdefault(row['prompt'], []).append(row)
    correct = lambda prompt, text: int(any(benchmark.is_correct(row, text) for row in rows_of[prompt]))
    every = [answer for kind_answers in answers.values() for answer in kind_answers]
    consistent = answers.get('consistent', [])
    member_accuracy = [sum(correct(a['prompt'], a['members'][m]['answer']) for a in consistent) / len(consistent)
                       for m in range(len(consistent[0]['members']))] if consistent else None
    return dict(disagreement={a['prompt']: a['disagreement'] for a in every}, member_accuracy=member_accuracy,
                greedy_correct={a['prompt']: correct(a['prompt'], a['answer']) for a in every})


def sft_report(model, tokenizer, test_rows, ood_rows, alpha, batch_size=32, max_new_tokens=32, seed=0, n_samples=None):
    """The SFT report (METHOD.md §6) as (report dict, readouts); null where the data can't tell.

    coherence samples n_samples responses per member and conflicting prompt: by default 16 per prompt in all,
    split over the members.

    readouts holds what the figures are drawn from: the test rows' score_rows dict under 'scores'
    and the per-prompt epistemic scores (the sequence mixture's) by kind under 'by_kind'.
    The epistemic read-outs (auroc_conflict, auroc_ood, epistemic_by_kind, ...) follow the sequence
    mixture; the token mixture's carry the suffix _token_mixture (evaluate.epistemic_scores).
    """
    answers = answers_by_kind(model, tokenizer, test_rows, max_new_tokens, batch_size)   # every member's own
    model.eval()
    scores = score_rows(model, tokenizer, test_rows, batch_size)
    kinds = [row.get('kind', 'consistent') for row in test_rows]
    epistemic = {suffix: per_prompt_mean(score, test_rows) for suffix, score in epistemic_scores(scores).items()}
    aleatoric = per_prompt_mean(scores['aleatoric'] / scores['n_tokens'].clamp(min=1), test_rows)
    kind_of = {row['prompt']: row.get('kind', 'consistent') for row in test_rows}
    by_kind = {suffix: by_kind_of(score, kind_of) for suffix, score in epistemic.items()}
    aleatoric_by_kind = by_kind_of(aleatoric, kind_of)
    from_answers = answer_readouts(answers, test_rows)
    disagreement_by_kind = by_kind_of(from_answers['disagreement'], kind_of)
    conflicting = [i for i, kind in enumerate(kinds) if kind == 'conflicting' and test_rows[i].get('group')]
    groups = [test_rows[i]['group'] for i in conflicting]
    # rows an annotator group answered: the conflicting ones, and any agreed rows that still carry a group
    grouped = [i for i, row in enumerate(test_rows) if row.get('group') not in (None, benchmark.ALL)]
    argmax_members = scores['logp'][:, conflicting].argmax(0).tolist()   # the top responsibility, any alpha > 0
    grouped_logp, grouped_groups = scores['logp'][:, grouped], [test_rows[i]['group'] for i in grouped]

    def within(key):            # the split inside each task, or each prompt, of the grouped rows
        return specialisation_within(grouped_logp, grouped_groups, [test_rows[i].get(key) for i in grouped])

    report = dict(alpha=alpha, n_members=scores['logp'].shape[0],
                  soft_specialisation=soft_specialisation(grouped_logp, grouped_groups),
                  per_task_specialisation=within('task'),
                  per_prompt_specialisation=within('prompt'),
                  argmax_specialisation=specialisation(argmax_members, groups),
                  routing=routing_matrix(scores['logp'][:, conflicting], alpha, groups) if groups else None)
    if ood_rows:
        for suffix, score in epistemic_scores(score_rows(model, tokenizer, ood_rows, batch_size)).items():
            by_kind[suffix]['ood'] = list(per_prompt_mean(score, ood_rows).values())
    for suffix in MIXTURES.values():            # each mixture's epistemic AUROCs; the auroc_ood null without ood rows
        ood = by_kind[suffix].get('ood', [])
        report |= epistemic_aurocs(by_kind[suffix], suffix)
        report[f'auroc_ood{suffix}'] = safe_auroc(ood, list(epistemic[suffix].values()))
        report[f'auroc_ood_vs_consistent{suffix}'] = safe_auroc(ood, by_kind[suffix].get('consistent', []))
    report |= answer_aurocs(aleatoric_by_kind, disagreement_by_kind)
    report |= task_routing(scores['logp'], alpha, test_rows)
    report['coherence'] = None
    for name, suffix in MIXTURES.items():          # greedy answers of each mixture to the prompts of each kind
        for kind in ('consistent', 'high_entropy', 'conflicting'):
            rows = [row for row in test_rows if row.get('kind', 'consistent') == kind]
            decoded = greedy_answers(model, tokenizer, rows, max_new_tokens, name)
            report[f'accuracy_{kind}{suffix}'] = greedy_accuracy(decoded)
            if kind == 'conflicting':
                report[f'ensemble_coherence{suffix}'] = ensemble_coherence(decoded)
    conflict_rows = [row for row in test_rows
                     if row.get('kind') == 'conflicting' and row.get('task') in benchmark.CARD_FIELDS]
    if conflict_rows:
        n_samples = n_samples or max(1, COHERENCE_SAMPLES // scores['logp'].shape[0])
        report['coherence'] = coherence(model, tokenizer, conflict_rows, n_samples, max_new_tokens, seed)
    for suffix in MIXTURES.values():
        report |= calibration(scores, suffix)
    mean_by_kind = lambda scores: {kind: sum(v) / len(v) for kind, v in scores.items() if v}
    report |= dict(epistemic_by_kind=mean_by_kind(by_kind['']),
                   epistemic_by_kind_token_mixture=mean_by_kind(by_kind['_token_mixture']),
                   aleatoric_by_kind=mean_by_kind(aleatoric_by_kind),
                   disagreement_by_kind=mean_by_kind(disagreement_by_kind),
                   member_accuracy_consistent=from_answers['member_accuracy'],
                   greedy_correct=from_answers['greedy_correct'])
    model.train()
    return report, dict(scores=scores, by_kind=by_kind[''])


def answer_accuracy(model, tokenizer, rows, max_new_tokens, batch_size=32):
    """Greedy accuracy on SFT rows, by kind of prompt, of the ensemble (its sequence mixture) and of its best member:
    {'answer_accuracy': {kind: share}, 'best_member_accuracy': {kind: share}}. On a conflicting prompt any group's
    response counts (benchmark.is_correct). What DPO does to the answers shows here, not in its margins."""
    rows_of = {}
    for row in rows:
        rows_of.setdefault(row['prompt'], []).append(row)
    right = lambda answer, text: any(benchmark.is_correct(row, text) for row in rows_of[answer['prompt']])
    ensemble, best = {}, {}
    for kind, answers in sorted(answers_by_kind(model, tokenizer, rows, max_new_tokens, batch_size).items()):
        ensemble[kind] = sum(right(a, a['answer']) for a in answers) / len(answers)
        best[kind] = max(sum(right(a, a['members'][m]['answer']) for a in answers) / len(answers)
                         for m in range(len(answers[0]['members'])))
    return dict(answer_accuracy=ensemble, best_member_accuracy=best)


def training_routing(model, tokenizer, train_rows, alpha, batch_size=32):
    """How the training rows' responsibility is shared at the final alpha: member_share (each member's share),
    noise_routing (where label noise went, null without corrupted rows) and starved_members."""
    model.eval()
    logp = score_rows(model, tokenizer, train_rows, batch_size)['logp']                      # (M, N)
    model.train()
    shares = member_shares(logp, alpha)
    return dict(member_share=shares.tolist(), noise_routing=noise_routing(logp, alpha, train_rows),
                starved_members=starved_members(shares))
