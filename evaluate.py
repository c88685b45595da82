"""
How an ensemble answers and how sure it is (METHOD.md §6): teacher-forced scores of held-out
responses under every member and under the two mixtures, greedy and sampled decoding, accuracy,
coherence, calibration, the epistemic scores, and every member's own answer to a prompt.

Everything here takes a model whose logits carry a member axis, (M, B, T, V) (a single adapter
is M = 1), and explicit arguments; it returns numbers and tensors. report.py assembles the SFT
report from them, sample.py the verdict.
"""
import math

import torch

import benchmark
import data
from renyi_lora import (expected_entropy, mixture_next_token_logprobs, mutual_information, posterior_weights,
                        predictive_entropy)


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
      epistemic_token (N,)  sum over response tokens of the members' mutual information, equal weights
      epistemic (N,)     the same sum with the sequence mixture's posterior weights at each token: u
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
        token_logp = torch.where(mask, token_logp, 0.0)        # (M, B, T-1), 0 off the response
        prefix_logp = token_logp.cumsum(-1) - token_logp       # (M, B, T-1): log p_m(y_<t | x)
        posterior = posterior_weights(prefix_logp)             # (M, B, T-1): the sequence mixture's weights
        part = dict(logp=token_logp.sum(-1), n_tokens=mask.sum(-1),
                    epistemic_token=(mutual_information(probs) * mask).sum(-1),
                    epistemic=(mutual_information(probs, posterior) * mask).sum(-1),
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


def greedy_decode(model, prompt, max_new_tokens, stop_token, mixture='sequence'):
    """Greedy decoding of one of the ensemble's mixtures (MIXTURES): (B, T) prompts of equal length -> (B, T + new)."""
    return model.generate(prompt, max_new_tokens, temperature=0, stop_token=stop_token,
                          mixture=mixture if model.n_members else None)


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
    return scores['epistemic_token'] / scores['n_tokens'].clamp(min=1)


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
    return {MIXTURES['sequence']: scores['epistemic'], MIXTURES['token']: epistemic_per_token(scores)}


def auroc(pos_scores, neg_scores):
    """Area under the ROC curve by the rank (Mann-Whitney) formula, ties counted half.

        AUROC = P(s_pos > s_neg) + 0.5 * P(s_pos == s_neg)

    pos_scores: (P,), neg_scores: (N,) -> float in [0, 1]; 1 means every positive
    (e.g. conflicting prompt) scores above every negative.
    """
    pos = torch.as_tensor(pos_scores, dtype=torch.float64).reshape(-1, 1)
    neg = torch.as_tensor(neg_scores, dtype=torch.float64).reshape(1, -1)
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("auroc needs at least one positive and one negative score")
    return ((pos > neg).double().mean() + 0.5 * (pos == neg).double().mean()).item()


def safe_auroc(pos_scores, neg_scores):
    """auroc, or None when either side is empty (a metric the data cannot support)."""
    if len(pos_scores) == 0 or len(neg_scores) == 0:
        return None
    return auroc(pos_scores, neg_scores)


def ece(confidence, correct, n_bins=10):
    """Expected calibration error with n_bins equal-width confidence bins.

        ECE = sum_b (|b| / n) * |accuracy(b) - mean confidence(b)|

    confidence: (n,) in [0, 1]; correct: (n,) booleans -> float. A confidence of
    exactly 1 falls in the last bin.
    """
    confidence = torch.as_tensor(confidence, dtype=torch.float64)
    correct = torch.as_tensor(correct, dtype=torch.float64)
    bins = (confidence * n_bins).long().clamp(max=n_bins - 1)  # (n,)
    total = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            total += in_bin.double().mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
    return float(total)


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


# -----------------------------------------------------------------------------
# every member's own answer, and how much the members disagree about whole answers

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
    """The distinct member answers to one prompt, each with its probability under the sequence mixture and its
    share of what the mixture gives all of them:

        probability(a) = (1/M) sum_k p_k(a | x)           weight(a) = probability(a) / sum_{a' in A} probability(a')

    texts: M member answers (A: the distinct ones); answer_logp (M, M): [k, m] = log p_k(member m's answer | x).
    Returns [{"answer", "weight", "probability", "members"}], heaviest first, the weights summing to 1.
    """
    first = first_members(texts)
    log_mixture = torch.logsumexp(answer_logp[:, list(first.values())].double(), dim=0) - math.log(len(texts))  # (A,)
    weights = torch.softmax(log_mixture, dim=0)
    answers = [dict(answer=text, weight=weight, probability=probability,
                    members=[m for m, t in enumerate(texts) if t == text])
               for text, weight, probability in zip(first, weights.tolist(), log_mixture.exp().tolist())]
    return sorted(answers, key=lambda answer: -answer['weight'])


def disagreement(texts, answer_logp):
    """How much the members disagree about whole answers: the mutual information between member and answer.

        b_k(a)       = p_k(a | x) / sum_{a' in A} p_k(a' | x)      member k's belief over the distinct answers A
        disagreement = H(mean_k b_k) - mean_k H(b_k)               (renyi_lora.mutual_information)

    texts, answer_logp (M, M) as in distinct_answers -> a float in [0, log M], in nats. 0 when the
    members give one answer, or when each finds the others' answers as likely as its own; high
    when each member is sure of its own answer and rules out the others' (METHOD.md §6).
    """
    columns = list(first_members(texts).values())
    mi = mutual_information(torch.softmax(answer_logp[:, columns].double(), dim=-1)).item()
    return mi + 0.0     # one shared answer gives -0.0 (entropy -1 * log 1), printed '-0.000'; + 0.0 makes it 0.0


@torch.no_grad()
def answer_batch(model, tokenizer, idx, max_new_tokens, temperature, top_k, generator, batch_size):
    """The ensemble's and every member's answer to B prompts of equal length, idx (B, T), with their statistics.

    An answer ends at the end-of-text token, after max_new_tokens, or at the block size.
      weights (M, B)     posterior_weights of log p_m(ensemble's answer | x): the members that back it
      probability (B,)   the sequence mixture's probability of the ensemble's answer, (1/M) sum_m p_m(answer | x)
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
    probability = (torch.logsumexp(ensemble_scores['logp'].double(), 0) - math.log(M)).exp()  # (B,)
    epistemic = epistemic_scores(ensemble_scores)[MIXTURES['sequence']]                   # (B,): u, in nats
    text = lambda ids: decode_response(tokenizer, ids[T:], stop)
    answers = []
    for b in range(B):
        texts = [text(members[m, b].tolist()) for m in range(M)]
        answers.append(dict(answer=text(ensemble[b].tolist()), probability=probability[b].item(),
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


def answers_by_kind(model, tokenizer, rows, max_new_tokens, batch_size=32):
    """Greedy answer_prompts of the distinct prompts of SFT rows (dicts with prompt and kind): {kind: [answer]}.
    Rows without a kind count as consistent."""
    kind_of = {row['prompt']: row.get('kind', 'consistent') for row in rows}
    by_kind = {}
    for answer in answer_prompts(model, tokenizer, list(kind_of), max_new_tokens, batch_size=batch_size):
        by_kind.setdefault(kind_of[answer['prompt']], []).append(answer)
    return by_kind
