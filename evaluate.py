"""
Evaluating an ensemble of adapters: teacher-forced scores, decoding, and the SFT
report (METHOD.md §6); routing.py holds the measures of who explains what, evaluate_dpo.py the
DPO report.

Shared by train_sft.py, train_dpo.py and compare.py. Everything here takes a model
whose logits carry a member axis, (M, B, T, V) (a single adapter is M = 1), and
explicit arguments; it returns numbers and tensors and draws nothing (plots.py does).
"""
import torch

import benchmark
import data
from renyi_lora import (auroc, ece, expected_entropy, mixture_next_token_logprobs, mutual_information, posterior_weights,
                        predictive_entropy)
from routing import routing_matrix, soft_specialisation, specialisation, specialisation_within, task_routing


def device_of(model):
    return model.lm_head.weight.device


# The two predictives a report reads (METHOD.md §6), and the suffix of their keys: the sequence
# mixture (1/M) sum_m p_m(y | x) that the alpha > 0 objective trains, and the equal-weight
# token mixture mean_m p_m(y_t | x, y_<t), kept beside it for comparison.
MIXTURES = {'sequence': '', 'token': '_token_mixture'}


@torch.no_grad()
def score_batches(model, batches):
    """Teacher-forced read-outs of held-out (idx, labels) batches.

    Returns a dict of tensors over the N examples:
      logp (M, N)        summed log-likelihood of each response under each member
      n_tokens (N,)      response tokens (labels != -100, after the shift)
      epistemic (N,)     sum over response tokens of the members' mutual information (equal weights)
      epistemic_sequence (N,)  the same sum with the sequence mixture's posterior weights at each token
      total, aleatoric (N,)  the same sums for H(p_bar) and mean_m H(p_m)
    and, over all K response tokens, for each mixture of MIXTURES (keys suffixed by its suffix):
      token_confidence, token_correct, token_true_prob  (K,)
    The sequence mixture weighs member m at token t by posterior_weights of its log-likelihood
    of the response's tokens before t; the token mixture weighs every member 1/M.
    """
    parts = []
    for idx, labels in batches:
        logits = model(idx)                                    # (M, B, T, V)
        logprobs = logits[..., :-1, :].float().log_softmax(-1)  # (M, B, T-1, V)
        probs = logprobs.exp()
        targets = labels[:, 1:]                                # (B, T-1)
        mask = targets != -100
        token_logp = logprobs.gather(-1, targets.clamp(min=0).expand(logprobs.shape[:-1]).unsqueeze(-1)).squeeze(-1)
        token_logp = token_logp * mask                         # (M, B, T-1), 0 off the response
        prefix_logp = token_logp.cumsum(-1) - token_logp       # (M, B, T-1): log p_m(y_<t | x)
        posterior = posterior_weights(prefix_logp)             # (M, B, T-1): the sequence mixture's weights
        part = dict(logp=token_logp.sum(-1), n_tokens=mask.sum(-1),
                    epistemic=(mutual_information(probs) * mask).sum(-1),
                    epistemic_sequence=(mutual_information(probs, posterior) * mask).sum(-1),
                    total=(predictive_entropy(probs) * mask).sum(-1),
                    aleatoric=(expected_entropy(probs) * mask).sum(-1))
        for name, suffix in MIXTURES.items():
            weights = posterior if name == 'sequence' else torch.full_like(prefix_logp, 1 / len(probs))
            mixture = mixture_next_token_logprobs(logprobs, weights).exp()      # (B, T-1, V)
            confidence, prediction = mixture.max(-1)                            # (B, T-1)
            part |= {f'token_confidence{suffix}': confidence[mask], f'token_correct{suffix}': (prediction == targets)[mask],
                     f'token_true_prob{suffix}': mixture.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]}
        parts.append(part)
    return {key: torch.cat([p[key] for p in parts], dim=-1).cpu() for key in parts[0]}


def greedy_decode(model, prompt, max_new_tokens, stop_token, mixture='sequence'):
    """Greedy decoding of one of the ensemble's mixtures (MIXTURES): (B, T) prompts of equal length -> (B, T + new)."""
    return model.generate(prompt, max_new_tokens, temperature=0, stop_token=stop_token,
                          mixture=mixture if model.n_members else None)


def safe_auroc(pos_scores, neg_scores):
    """auroc, or None when either side is empty (a metric the data cannot support)."""
    if len(pos_scores) == 0 or len(neg_scores) == 0:
        return None
    return auroc(pos_scores, neg_scores)


def calibration(scores, suffix='', n_bins=10):
    """Token-level calibration of a mixture (suffix: MIXTURES' key suffix): NLL, ECE and Brier.

    ECE uses n_bins equal-width bins; Brier here is the binary one on the top-1 prediction:
    mean (confidence - correct)^2. For the sequence mixture the per-token NLL summed over a
    response is exactly -log (1/M) sum_m p_m(y | x), the quantity the objective trains.
    """
    confidence, correct = scores[f'token_confidence{suffix}'], scores[f'token_correct{suffix}'].double()
    return {f'nll{suffix}': -scores[f'token_true_prob{suffix}'].clamp_min(1e-30).log().mean().item(),
            f'ece{suffix}': ece(confidence, correct, n_bins),
            f'brier{suffix}': ((confidence.double() - correct) ** 2).mean().item()}


def held_out_batches(model, tokenizer, rows, batch_size):
    """(idx, labels) batches over rows in order, on the model's device."""
    device = device_of(model)
    encoded = data.encode_sft(rows, tokenizer, model.config.block_size, truncate=True)
    for start in range(0, len(encoded), batch_size):
        idx, labels = data.sft_batch(encoded, range(start, min(start + batch_size, len(encoded))), tokenizer.eot_token)
        yield idx.to(device), labels.to(device)


def score_rows(model, tokenizer, rows, batch_size):
    """score_batches over SFT rows (dicts with prompt and response)."""
    return score_batches(model, held_out_batches(model, tokenizer, rows, batch_size))


def prompt_batches(tokenizer, prompts, device):
    """Group prompts by token length so each group decodes as one (B, T) batch: yields (prompts, idx)."""
    by_length = {}
    for prompt in prompts:
        ids = [tokenizer.eot_token] + tokenizer.encode_ordinary(prompt)   # the layout of data.encode_pair
        by_length.setdefault(len(ids), []).append((prompt, ids))
    for group in by_length.values():
        yield [p for p, _ in group], torch.tensor([ids for _, ids in group], device=device)


def decode_response(tokenizer, ids, stop_token):
    """Text of generated ids up to (not including) the first stop token."""
    ids = list(ids)
    return tokenizer.decode(ids[:ids.index(stop_token)] if stop_token in ids else ids)


def greedy_answers(model, tokenizer, rows, max_new_tokens, mixture='sequence'):
    """The ensemble's greedy answer to each distinct prompt of rows: [(the prompt's rows, response text)]."""
    rows_of = {}
    for row in rows:
        rows_of.setdefault(row['prompt'], []).append(row)
    answers = []
    for prompts, idx in prompt_batches(tokenizer, list(rows_of), device_of(model)):
        out = greedy_decode(model, idx, max_new_tokens, tokenizer.eot_token, mixture)       # (B, T + new)
        for prompt, ids in zip(prompts, out[:, idx.shape[1]:].tolist()):
            answers.append((rows_of[prompt], decode_response(tokenizer, ids, tokenizer.eot_token)))
    return answers


def greedy_accuracy(answers):
    """Share of greedy_answers' answers that are acceptable (benchmark.is_correct) for one of their prompt's
    rows: on a conflicting prompt, any group's response counts. None without answers."""
    correct = [any(benchmark.is_correct(row, text) for row in prompt_rows) for prompt_rows, text in answers]
    return sum(correct) / len(correct) if correct else None


def ensemble_coherence(answers):
    """Share of greedy_answers' answers to conflicting card prompts that follow one persona in every field.

    A mixture that lets the members vote token by token can start one persona's card and
    finish with the other's; the sequence mixture follows the members that explain the
    answer so far. None without card prompts.
    """
    verdicts = [benchmark.persona_of(prompt_rows[0]['task'], text) is not None
                for prompt_rows, text in answers if prompt_rows[0].get('task') in benchmark.CARD_FIELDS]
    return sum(verdicts) / len(verdicts) if verdicts else None


def coherence(model, tokenizer, rows, n_samples, max_new_tokens, seed, max_prompts=40):
    """Share of sampled member responses (temperature 1) that follow one persona in every field.

    rows: conflicting benchmark rows; each prompt is sampled n_samples times by every member.
    """
    prompts = sorted({row['prompt'] for row in rows})[:max_prompts]
    task_of = {row['prompt']: row['task'] for row in rows}
    generator = torch.Generator(device=device_of(model)).manual_seed(seed)
    verdicts = []
    for batch_prompts, idx in prompt_batches(tokenizer, prompts, device_of(model)):
        repeated = idx.repeat_interleave(n_samples, dim=0)                          # (B * S, T)
        out = model.generate(repeated, max_new_tokens, temperature=1.0,
                             stop_token=tokenizer.eot_token, generator=generator)   # (M, B * S, T + new)
        out = out.reshape(-1, out.shape[-2], out.shape[-1])                          # (M or 1, B * S, T + new)
        for member_out in out:
            for j, ids in enumerate(member_out[:, idx.shape[1]:].tolist()):
                prompt = batch_prompts[j // n_samples]
                text = decode_response(tokenizer, ids, tokenizer.eot_token)
                verdicts.append(benchmark.persona_of(task_of[prompt], text) is not None)
    return sum(verdicts) / len(verdicts) if verdicts else None


def epistemic_per_token(scores):
    """Each example's epistemic uncertainty per response token under the equal-weight token mixture, (N,).

    Dividing the summed mutual information by the length keeps long responses
    (the two-field cards) from looking uncertain merely for being long.
    """
    return scores['epistemic'] / scores['n_tokens'].clamp(min=1)


def epistemic_scores(scores):
    """Each example's epistemic uncertainty under each predictive of MIXTURES, {suffix: (N,)}: what the AUROCs rank by.

      sequence mixture ('')   sum over the response of the mutual information between member and next token,
                              each member weighted by how well it explains the response so far (posterior_weights).
                              Averaged over responses drawn from the sequence mixture this is I(member; y | x)
                              <= log M (the chain rule); along one response it can exceed log M. Once the first
                              tokens have told whose response it is, the other members no longer weigh in, so a
                              long response does not add up disagreement the way an equal-weight sum does
      token mixture           epistemic_per_token: every member weighted 1/M at every token, averaged over tokens
    """
    return {MIXTURES['sequence']: scores['epistemic_sequence'], MIXTURES['token']: epistemic_per_token(scores)}


def rescaled_epistemic(model, tokenizer, rows, batch_size):
    """epistemic_per_token of every row under the ensemble, min-max rescaled to [0, 1], (N,): UAL's u_i."""
    score = epistemic_per_token(score_rows(model, tokenizer, rows, batch_size))
    return (score - score.min()) / (score.max() - score.min()).clamp_min(1e-12)


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
    """What the members' own greedy answers tell, from verdict.answers_by_kind's {kind: [answer]} on rows:

      disagreement         {prompt: mutual information between member and whole answer} (verdict.disagreement)
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


def sft_report(model, tokenizer, test_rows, ood_rows, alpha, batch_size=32, max_new_tokens=32, n_samples=4,
               seed=0, answers=None, length_normalise=False):
    """The SFT report (METHOD.md §6) as (report dict, readouts); null where the data can't tell.

    answers: verdict.answers_by_kind of test_rows (every member's own greedy answer), for the
    read-outs of answer_readouts; without them those keys are null.
    length_normalise: the routing read-outs route by log p_m(x) / |y|, as the run trained.
    readouts holds what the plots are drawn from: the test rows' score_rows dict under
    'scores' and the per-prompt epistemic scores (the sequence mixture's) by kind under 'by_kind'.
    The epistemic read-outs (auroc_conflict, auroc_ood, epistemic_by_kind, ...) follow the sequence
    mixture; the token mixture's carry the suffix _token_mixture (epistemic_scores).
    """
    model.eval()
    scores = score_rows(model, tokenizer, test_rows, batch_size)
    kinds = [row.get('kind', 'consistent') for row in test_rows]
    epistemic = {suffix: per_prompt_mean(score, test_rows) for suffix, score in epistemic_scores(scores).items()}
    aleatoric = per_prompt_mean(scores['aleatoric'] / scores['n_tokens'].clamp(min=1), test_rows)
    kind_of = {row['prompt']: row.get('kind', 'consistent') for row in test_rows}
    by_kind = {suffix: by_kind_of(score, kind_of) for suffix, score in epistemic.items()}
    aleatoric_by_kind = by_kind_of(aleatoric, kind_of)
    from_answers = answer_readouts(answers, test_rows) if answers else dict(
        disagreement={}, member_accuracy=None, greedy_correct=None)
    disagreement_by_kind = by_kind_of(from_answers['disagreement'], kind_of)   # empty lists without answers
    conflicting = [i for i, kind in enumerate(kinds) if kind == 'conflicting' and test_rows[i].get('group')]
    groups = [test_rows[i]['group'] for i in conflicting]
    # rows an annotator group answered: the conflicting ones, and any agreed rows that still carry a group
    grouped = [i for i, row in enumerate(test_rows) if row.get('group') not in (None, benchmark.ALL)]
    members = scores['logp'][:, conflicting].argmax(0).tolist()      # argmax responsibility, for any alpha > 0
    lengths = scores['n_tokens'].clamp(min=1) if length_normalise else None                          # (N,) or None
    grouped_logp, grouped_groups = scores['logp'][:, grouped], [test_rows[i]['group'] for i in grouped]

    def within(key):            # the split inside each task, or each prompt, of the grouped rows
        return specialisation_within(grouped_logp, grouped_groups, [test_rows[i].get(key) for i in grouped])

    report = dict(alpha=alpha, n_members=scores['logp'].shape[0],
                  soft_specialisation=soft_specialisation(grouped_logp, grouped_groups),
                  per_task_specialisation=within('task'),
                  per_prompt_specialisation=within('prompt'),
                  argmax_specialisation=specialisation(members, groups),
                  routing=routing_matrix(scores['logp'][:, conflicting], alpha, groups,
                                         None if lengths is None else lengths[conflicting]) if groups else None)
    if ood_rows:
        for suffix, score in epistemic_scores(score_rows(model, tokenizer, ood_rows, batch_size)).items():
            by_kind[suffix]['ood'] = list(per_prompt_mean(score, ood_rows).values())
    for suffix in MIXTURES.values():            # each mixture's epistemic AUROCs; the auroc_ood null without ood rows
        ood = by_kind[suffix].get('ood', [])
        report |= epistemic_aurocs(by_kind[suffix], suffix)
        report[f'auroc_ood{suffix}'] = safe_auroc(ood, list(epistemic[suffix].values()))
        report[f'auroc_ood_vs_consistent{suffix}'] = safe_auroc(ood, by_kind[suffix].get('consistent', []))
    report |= answer_aurocs(aleatoric_by_kind, disagreement_by_kind)
    report |= task_routing(scores['logp'], alpha, test_rows, lengths)
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


def markdown_table(rows, columns):
    """Markdown table of (label, report) rows; null metrics print as '–'."""
    lines = ['| run | ' + ' | '.join(columns) + ' |', '|---' * (len(columns) + 1) + '|']
    for label, report in rows:
        cells = ['–' if report[c] is None else f'{report[c]:.1f}' if c == 'train_seconds'
                 else f'{report[c]:.3f}' if isinstance(report[c], float) else str(report[c]) for c in columns]
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)
