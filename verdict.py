"""
What an ensemble's members say about a prompt, and a verdict a person can act on
(METHOD.md §6, "The verdict").

answer_prompts decodes the ensemble's answer and every member's own and scores them
teacher-forced; fit_thresholds learns the verdict's two thresholds from held-out prompts at
the end of training; verdict applies them. sample.py is the command line.
"""
import torch

from evaluate import MIXTURES, decode_response, device_of, epistemic_scores, prompt_batches, score_batches
from renyi_lora import mutual_information, posterior_weights

# a preference pair's kind (data.mark_contested) names its prompt's kind as an SFT row would
PROMPT_KIND = {'contested': 'conflicting', 'consensus': 'consistent'}


def answer_labels(out, n_prompt, stop_token):
    """Labels that score generated answers, out (N, n_prompt + new) -> (N, n_prompt + new).

    -100 on the prompt and after the first stop token. The stop token itself is scored, as in
    training (data.encode_pair): ending the answer there is part of it.
    """
    new = out[:, n_prompt:]                                          # (N, new)
    stops = (new == stop_token).long()
    after_stop = stops.cumsum(-1) - stops > 0                        # a stop token came earlier
    labels = out.clone()
    labels[:, :n_prompt] = -100
    labels[:, n_prompt:] = new.masked_fill(after_stop, -100)
    return labels


def scored(model, out, n_prompt, stop_token, batch_size):
    """evaluate.score_batches of generated answers out (N, n_prompt + new), batch_size sequences at a time."""
    labels = answer_labels(out, n_prompt, stop_token)
    return score_batches(model, ((out[i:i + batch_size], labels[i:i + batch_size])
                                 for i in range(0, len(out), batch_size)))


def first_members(texts):
    """{distinct answer: the first member that gave it}, in the members' order. texts: M answers."""
    first = {}
    for member, text in enumerate(texts):
        first.setdefault(text, member)
    return first


def distinct_answers(texts, answer_logp):
    """The distinct member answers to one prompt, each with its share of the sequence mixture.

        weight(a) = sum_k p_k(a | x) / sum_{a' in A} sum_k p_k(a' | x)      A: the distinct answers

    texts: M member answers; answer_logp (M, M): [k, m] = log p_k(member m's answer | x).
    Returns [{"answer", "weight", "members"}], heaviest first, the weights summing to 1.
    """
    first = first_members(texts)
    weights = torch.softmax(torch.logsumexp(answer_logp[:, list(first.values())].double(), dim=0), dim=0)  # (A,)
    answers = [dict(answer=text, weight=weight, members=[m for m, t in enumerate(texts) if t == text])
               for text, weight in zip(first, weights.tolist())]
    return sorted(answers, key=lambda answer: -answer['weight'])


def disagreement(texts, answer_logp):
    """How much the members disagree about whole answers: the mutual information between member and answer.

        q_k(a)       = p_k(a | x) / sum_{a' in A} p_k(a' | x)      member k's belief over the distinct answers A
        disagreement = H(mean_k q_k) - mean_k H(q_k)               (renyi_lora.mutual_information)

    texts, answer_logp (M, M) as in distinct_answers -> a float in [0, log M], in nats. 0 when the
    members give one answer, or when each finds the others' answers as likely as its own; high
    when each member is sure of its own answer and rules out the others' (METHOD.md §6).
    """
    columns = list(first_members(texts).values())
    return mutual_information(torch.softmax(answer_logp[:, columns].double(), dim=-1)).item()


@torch.no_grad()
def answer_batch(model, tokenizer, idx, max_new_tokens, temperature, top_k, generator, batch_size):
    """The ensemble's and every member's answer to B prompts of equal length, idx (B, T), with their statistics.

    An answer ends at the end-of-text token, after max_new_tokens, or at the block size.
      weights (M, B)     posterior_weights of log p_m(ensemble's answer | x): the members that back it
      epistemic (B,)     u along the ensemble's answer: the sequence mixture's mutual information, summed (evaluate.epistemic_scores)
      confidence (B,)    mean_m of log p_m(member m's own answer | x) per token
    and, per prompt, the distinct member answers (distinct_answers) and their disagreement.
    """
    stop, (B, T) = tokenizer.eot_token, idx.shape
    new = min(max_new_tokens, model.config.block_size - T)
    ensemble = model.generate(idx, new, temperature, top_k, stop, generator, mixture='sequence')  # (B, T + new)
    members = model.generate(idx, new, temperature, top_k, stop, generator, mixture=None)         # (M, B, T + new)
    M = members.shape[0]
    ensemble_scores = scored(model, ensemble, T, stop, batch_size)
    member_scores = scored(model, members.reshape(M * B, -1), T, stop, batch_size)
    answer_logp = member_scores['logp'].view(M, M, B)         # [k, m, b] = log p_k(member m's answer | prompt b)
    own_logp = answer_logp.diagonal(dim1=0, dim2=1).T          # (M, B): log p_m(member m's answer)
    confidence = (own_logp / member_scores['n_tokens'].view(M, B).clamp(min=1)).mean(0)   # (B,)
    weights = posterior_weights(ensemble_scores['logp'].double())                         # (M, B)
    epistemic = epistemic_scores(ensemble_scores)[MIXTURES['sequence']]                   # (B,): u, in nats
    text = lambda ids: decode_response(tokenizer, ids[T:], stop)
    answers = []
    for b in range(B):
        texts = [text(members[m, b].tolist()) for m in range(M)]
        answers.append(dict(answer=text(ensemble[b].tolist()),
                            members=[dict(answer=t, weight=w) for t, w in zip(texts, weights[:, b].tolist())],
                            distinct=distinct_answers(texts, answer_logp[:, :, b]),
                            epistemic=epistemic[b].item(), disagreement=disagreement(texts, answer_logp[:, :, b]),
                            confidence=confidence[b].item()))
    return answers


def answer_prompts(model, tokenizer, prompts, max_new_tokens, temperature=0.0, top_k=None, generator=None,
                   batch_size=32):
    """answer_batch for every prompt, laid out as [eot] + prompt like training rows; in prompts' order.

    Returns one dict per prompt: prompt; answer (the ensemble's, from the sequence mixture);
    members [{"answer", "weight"}] (each member's own answer, and the member's posterior weight
    given the ensemble's answer; the weights sum to 1); distinct [{"answer", "weight", "members"}]
    (distinct_answers); epistemic, disagreement and confidence.
    """
    was_training = model.training
    model.eval()
    done = {}
    for group, idx in prompt_batches(tokenizer, prompts, device_of(model)):
        for start in range(0, len(group), batch_size):
            answers = answer_batch(model, tokenizer, idx[start:start + batch_size], max_new_tokens, temperature,
                                   top_k, generator, batch_size)
            for prompt, answer in zip(group[start:start + batch_size], answers):
                done.setdefault(prompt, []).append(dict(prompt=prompt) | answer)
    model.train(was_training)
    return [done[prompt].pop(0) for prompt in prompts]


def best_split(negatives, positives):
    """The threshold t with the best balanced accuracy, (P(positive > t) + P(negative <= t)) / 2.

    The candidates are the midpoints between consecutive distinct values; the lowest wins a tie.
    negatives, positives: lists of numbers -> (t, its balanced accuracy).
    """
    values = sorted(set(negatives) | set(positives))
    candidates = [(low + high) / 2 for low, high in zip(values, values[1:])] or values
    accuracy = lambda t: (sum(p > t for p in positives) / len(positives)
                          + sum(n <= t for n in negatives) / len(negatives)) / 2
    best = max(candidates, key=lambda t: (accuracy(t), -t))
    return best, accuracy(best)


def quantile(values, q):
    """The q-quantile of a list of numbers, interpolated linearly (torch.quantile's default)."""
    return torch.quantile(torch.tensor(values, dtype=torch.float64), q).item()


def fit_thresholds(stats_by_kind, contested_quantile=0.95, unfamiliar_quantile=0.05):
    """The verdict's thresholds from held-out prompts: {kind: [{"disagreement", "confidence", ...}, ...]}.

      contested   the disagreement that best separates 'conflicting' from 'consistent' prompts
                  (best_split); without both kinds, the contested_quantile of every prompt's disagreement
      unfamiliar  the unfamiliar_quantile of every prompt's confidence: held-out prompts are all
                  in-distribution, so about that share of familiar prompts falls below it
    Returns both thresholds, how each was fitted and the number of prompts of each kind.
    """
    disagreements = lambda kind: [s['disagreement'] for s in stats_by_kind.get(kind, [])]
    every = [s for stats in stats_by_kind.values() for s in stats]
    if disagreements('conflicting') and disagreements('consistent'):
        contested, accuracy = best_split(disagreements('consistent'), disagreements('conflicting'))
        contested_fit = f"best split of conflicting from consistent prompts, balanced accuracy {accuracy:.3f}"
    else:
        contested = quantile([s['disagreement'] for s in every], contested_quantile)
        contested_fit = f"quantile {contested_quantile} of the disagreement (no conflicting and consistent prompts)"
    return dict(contested=contested, unfamiliar=quantile([s['confidence'] for s in every], unfamiliar_quantile),
                contested_fit=contested_fit, unfamiliar_fit=f"quantile {unfamiliar_quantile} of the confidence",
                n_prompts={kind: len(stats) for kind, stats in sorted(stats_by_kind.items())})


def verdict(stats, thresholds):
    """'unfamiliar' when the members are unsure of their own answers (confidence below its threshold);
    otherwise 'contested' when they disagree (disagreement above its threshold); otherwise 'agree'.

    Unfamiliarity comes first: off the training data the members disagree too, but what a
    person needs to know then is that no member knows the answer, not that they take sides.
    """
    if stats['confidence'] < thresholds['unfamiliar']:
        return 'unfamiliar'
    if stats['disagreement'] > thresholds['contested']:
        return 'contested'
    return 'agree'


def answers_by_kind(model, tokenizer, rows, max_new_tokens, batch_size=32):
    """Greedy answer_prompts of the distinct prompts of rows (dicts with prompt and kind): {kind: [answer]}.

    A preference pair's kind counts as its prompt's (PROMPT_KIND); rows without one are consistent.
    """
    kind_of = {row['prompt']: PROMPT_KIND.get(row.get('kind'), row.get('kind', 'consistent')) for row in rows}
    by_kind = {}
    for answer in answer_prompts(model, tokenizer, list(kind_of), max_new_tokens, batch_size=batch_size):
        by_kind.setdefault(kind_of[answer['prompt']], []).append(answer)
    return by_kind


def held_out_thresholds(model, tokenizer, rows, max_new_tokens, batch_size=32):
    """fit_thresholds on the greedy answers to held-out rows' prompts: what train_sft.py writes to verdict.json."""
    return fit_thresholds(answers_by_kind(model, tokenizer, rows, max_new_tokens, batch_size))


def verdict_shares(by_kind, thresholds):
    """{kind: {verdict: share of the kind's prompts}} for answers_by_kind's answers."""
    shares = {}
    for kind, answers in by_kind.items():
        verdicts = [verdict(answer, thresholds) for answer in answers]
        shares[kind] = {name: verdicts.count(name) / len(verdicts) for name in ('agree', 'contested', 'unfamiliar')}
    return shares
