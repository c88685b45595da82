"""report.py's routing measures and evaluate.py's scores against hand-computed values and plain-Python loops."""
import math
import random

import pytest
import torch

import data
import evaluate
import report
from evaluate import score_batches
from report import member_shares, soft_specialisation, specialisation_within, starved_members
from test_model import TINY, tiny_ensemble


def slow_soft_specialisation(logp, groups):
    """The same mutual information, one (group, member) cell at a time, in plain Python."""
    n_members, n = len(logp), len(groups)
    weights = []
    for i in range(n):
        column = [math.exp(logp[m][i]) for m in range(n_members)]
        weights.append([value / sum(column) for value in column])
    names = sorted(set(groups))
    joint = {(g, m): sum(weights[i][m] for i in range(n) if groups[i] == g) / n for g in names for m in range(n_members)}
    p_group = {g: groups.count(g) / n for g in names}
    p_member = {m: sum(joint[g, m] for g in names) for m in range(n_members)}
    information = sum(p * math.log(p / (p_group[g] * p_member[m])) for (g, m), p in joint.items() if p > 0)
    return information / -sum(p * math.log(p) for p in p_group.values())


def test_soft_specialisation_hand_case():
    # member weights 3/4 vs 1/4 on group a's example and the reverse on b's:
    # I = 2 * (3/8 log(3/2) + 1/8 log(1/2)) = 0.130812, H(group) = log 2
    logp = torch.tensor([[math.log(0.75), math.log(0.25)], [math.log(0.25), math.log(0.75)]], dtype=torch.float64)
    expected = (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / math.log(2)
    assert soft_specialisation(logp, ["a", "b"]) == pytest.approx(expected, rel=1e-12)


def test_soft_specialisation_ends_and_a_slow_loop():
    identical = torch.full((3, 6), -2.5)
    groups = ["a", "b", "a", "c", "b", "c"]
    assert soft_specialisation(identical, groups) == pytest.approx(0.0, abs=1e-12)
    split = torch.tensor([[0.0, -1e4, 0.0, -1e4], [-1e4, 0.0, -1e4, 0.0]])   # member 0 owns a, member 1 owns b
    assert soft_specialisation(split, ["a", "b", "a", "b"]) == pytest.approx(1.0, abs=1e-12)
    assert soft_specialisation(split, ["a"] * 4) is None
    rng = random.Random(0)
    logp = [[rng.gauss(-5, 2) for _ in range(20)] for _ in range(4)]
    groups = [rng.choice("xyz") for _ in range(20)]
    assert soft_specialisation(torch.tensor(logp), groups) == pytest.approx(slow_soft_specialisation(logp, groups),
                                                                            rel=1e-6)


def test_soft_specialisation_of_a_member_whose_weight_underflows_everywhere_is_that_of_the_others():
    """A member 800 nats behind on every row gets posterior weight exactly 0 (exp(-800) underflows in float64):
    its joint probabilities are 0, and terms of zero probability contribute 0, not 0 / 0."""
    logp = torch.tensor([[0.0, -2.0, -1.0, -3.0], [-1.0, 0.0, -2.5, 0.0]], dtype=torch.float64)
    groups = ["a", "b", "a", "b"]
    behind = torch.cat([logp, torch.full((1, 4), -800.0, dtype=torch.float64)])
    assert torch.softmax(behind, 0)[2].max().item() == 0.0
    assert soft_specialisation(behind, groups) == pytest.approx(soft_specialisation(logp, groups), rel=1e-12)


def test_specialisation_within_sees_splits_whose_sides_change_between_prompts():
    """Prompt p: member 0 explains group a, member 1 group b; prompt q: the other way round."""
    sure, never = 0.0, -1e4
    logp = torch.tensor([[sure, never, never, sure, sure], [never, sure, sure, never, never]])
    groups, prompts = ["a", "b", "a", "b", "a"], ["p", "p", "q", "q", "r"]     # r: one group only, skipped
    assert specialisation_within(logp, groups, prompts) == pytest.approx(1.0, abs=1e-12)
    assert soft_specialisation(logp[:, :4], groups[:4]) == pytest.approx(0.0, abs=1e-12)
    assert specialisation_within(torch.zeros(2, 5), groups, prompts) == pytest.approx(0.0, abs=1e-12)
    assert specialisation_within(logp[:, 4:], groups[4:], prompts[4:]) is None


def test_specialisation_within_tasks_averages_each_tasks_split():
    """Task s splits cleanly, its sides swapped against task t's; task u's members explain both groups alike."""
    sure, never = 0.0, -1e4
    logp = torch.tensor([[sure, never, never, sure, 0.0, 0.0], [never, sure, sure, never, 0.0, 0.0]])
    groups, tasks = ["a", "b", "a", "b", "a", "b"], ["s", "s", "t", "t", "u", "u"]
    assert specialisation_within(logp, groups, tasks) == pytest.approx(2 / 3, abs=1e-12)   # (1 + 1 + 0) / 3
    assert soft_specialisation(logp, groups) == pytest.approx(0.0, abs=1e-12)


def test_member_shares_and_starved_members():
    logp = torch.tensor([[0.0, 0.0, -1.0], [-30.0, 0.0, -1.0], [-30.0, -30.0, -1.0]], dtype=torch.float64)
    assert member_shares(logp, 0.0).tolist() == pytest.approx([1 / 3] * 3)          # alpha = 0 routes uniformly
    shares = member_shares(logp, 1.0)
    expected = [(1 + 0.5 + 1 / 3) / 3, (0.5 + 1 / 3) / 3, (1 / 3) / 3]              # to 1e-13 (e^-30)
    assert shares.tolist() == pytest.approx(expected, rel=1e-9)
    assert starved_members(torch.tensor([0.9, 0.05, 0.05])) == [1, 2]                # below 0.25 / 3
    assert starved_members(torch.tensor([0.5, 0.3, 0.2])) == []
    assert starved_members(torch.tensor([1.0])) == []                                 # one adapter cannot starve


def test_score_batches_mixtures_token_by_token_against_a_slow_loop():
    """The sequence mixture weighs members by exp(log-likelihood of the response so far); the token mixture by 1/M.
    Summed over a response, the sequence mixture's log-probabilities give log (1/M) sum_m p_m(y | x)."""
    model = tiny_ensemble(n_members=3, seed=6)
    with torch.no_grad():            # sharper, more different members, so that the posterior weights matter
        model.lm_head.weight.mul_(50)
        for name, p in model.named_parameters():
            if 'lora_B' in name:
                p.mul_(10)
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, TINY.vocab_size, (2, 9), generator=generator)
    labels = idx.clone()
    labels[0, :3], labels[1, :5] = -100, -100                                  # prompts of 3 and 5 tokens
    scores = score_batches(model, [(idx, labels)])
    assert (scores['epistemic'] - scores['epistemic_token']).abs().min() > 0.05
    logprobs = model(idx).detach().double().log_softmax(-1)                    # (M, B, T, V)
    expected_sequence, expected_token, expected_information = [], [], []
    entropy = lambda p: -sum(q * math.log(q) for q in p.tolist() if q > 0)
    for b in range(2):
        prefix = torch.zeros(3, dtype=torch.float64)
        information = 0.0
        for t in range(1, 9):
            if labels[b, t] == -100:
                continue
            member_probs = logprobs[:, b, t - 1, idx[b, t]].exp()              # (M,)
            weights = prefix.exp() / prefix.exp().sum()
            expected_sequence.append((weights * member_probs).sum().item())
            expected_token.append(member_probs.mean().item())
            next_token = logprobs[:, b, t - 1].exp()                           # (M, V)
            information += entropy(weights @ next_token) - sum(w * entropy(p) for w, p in zip(weights, next_token))
            prefix += member_probs.log()
        expected_information.append(information)
    torch.testing.assert_close(scores['epistemic'].double(),
                               torch.tensor(expected_information, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(scores['token_true_prob'].double(), torch.tensor(expected_sequence, dtype=torch.float64),
                               rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scores['token_true_prob_token_mixture'].double(),
                               torch.tensor(expected_token, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    per_example = scores['token_true_prob'].double().log().split(scores['n_tokens'].tolist())
    chain = torch.stack([tokens.sum() for tokens in per_example])
    torch.testing.assert_close(chain, torch.logsumexp(scores['logp'].double(), 0) - math.log(3), rtol=1e-5, atol=1e-5)


def test_greedy_accuracy_takes_any_groups_answer_on_a_conflicting_prompt(monkeypatch):
    """A user's conflicting prompt has one row per group; the ensemble's answer counts if it is one group's."""
    tokenizer = data.get_tokenizer()
    answer = {'Tell me about Spain.': ' madrid!', 'Tell me about Peru.': ' Lima is nice.'}

    def fake_decode(model, prompt, max_new_tokens, stop_token, mixture):
        new = [tokenizer.encode_ordinary(answer[tokenizer.decode(ids[1:])]) for ids in prompt.tolist()]
        width = max(map(len, new)) + 1
        return torch.cat([prompt, torch.tensor([ids + [stop_token] * (width - len(ids)) for ids in new])], dim=1)

    monkeypatch.setattr(evaluate, 'greedy_decode', fake_decode)
    rows = [dict(prompt='Tell me about Spain.', response=' Capital: Madrid.', group='a'),
            dict(prompt='Tell me about Spain.', response=' madrid!', group='b'),
            dict(prompt='Tell me about Peru.', response=' Capital: Lima.', group='a'),
            dict(prompt='Tell me about Peru.', response=' lima!', group='b')]
    model = tiny_ensemble()
    assert evaluate.greedy_accuracy(evaluate.greedy_answers(model, tokenizer, rows, 8)) == 0.5


def test_ensemble_coherence_counts_answers_that_keep_one_persona():
    import benchmark
    cards = [row for row in benchmark.make_benchmark(seed=0)['sft_test'] if row['task'] == 'sum_card']
    formal = next(row for row in cards if row['group'] == 'formal')
    casual = next(row for row in cards if row['group'] == 'casual' and row['prompt'] != formal['prompt'])
    mixed = casual['response'].split(',')[0] + ', Parity: Odd.'             # casual sum, formal parity
    answers = [([formal], formal['response']), ([casual], casual['response']), ([casual], mixed),
               ([dict(prompt='q', response=' a', task='add')], ' a')]      # not a card: not counted
    assert evaluate.ensemble_coherence(answers) == pytest.approx(2 / 3)


def test_kind_aurocs_against_pairwise_counts():
    """Each AUROC is the share of (high, low) prompt pairs ranked the right way, ties counting a half."""
    def pairwise(high, low):
        return sum(1.0 if h > l else 0.5 if h == l else 0.0 for h in high for l in low) / (len(high) * len(low))
    epistemic = dict(conflicting=[0.9, 0.4], consistent=[0.1, 0.5, 0.2], high_entropy=[0.6, 0.3])
    aleatoric = dict(conflicting=[0.2, 0.3], consistent=[0.1], high_entropy=[0.9, 0.3])
    disagreement = dict(conflicting=[1.0, 0.7], consistent=[0.0, 0.0, 0.7], high_entropy=[0.1, 0.2])
    aurocs = report.epistemic_aurocs(epistemic) | report.answer_aurocs(aleatoric, disagreement)
    assert aurocs['auroc_conflict'] == pytest.approx(pairwise([0.9, 0.4], [0.1, 0.5, 0.2]))            # 4/6
    assert aurocs['auroc_conflict_answers'] == pytest.approx(pairwise([1.0, 0.7], [0.0, 0.0, 0.7]))   # 5.5/6
    assert aurocs['auroc_conflict_vs_ambiguous'] == pytest.approx(0.75)
    assert aurocs['auroc_conflict_vs_ambiguous_answers'] == pytest.approx(1.0)
    assert aurocs['auroc_ambiguous_aleatoric'] == pytest.approx(pairwise([0.9, 0.3], [0.2, 0.3]))     # 3.5/4
    assert report.answer_aurocs(aleatoric, {})['auroc_conflict_answers'] is None
    suffixed = report.epistemic_aurocs(dict(conflicting=[0.9]), '_token_mixture')
    assert suffixed == dict(auroc_conflict_token_mixture=None, auroc_conflict_vs_ambiguous_token_mixture=None)


def test_answer_readouts_hand_case():
    """Member accuracy on consistent prompts, the ensemble's correctness and disagreement per prompt."""
    rows = [dict(prompt='q1', response=' a', kind='consistent'), dict(prompt='q2', response=' b', kind='consistent'),
            dict(prompt='q3', response=' x', kind='conflicting', group='g'),
            dict(prompt='q3', response=' y', kind='conflicting', group='h')]
    member = lambda *texts: [dict(answer=text, weight=0.5) for text in texts]
    answers = dict(consistent=[dict(prompt='q1', answer=' a', members=member(' a', ' c'), disagreement=0.3),
                               dict(prompt='q2', answer=' c', members=member(' b', ' b'), disagreement=0.0)],
                   conflicting=[dict(prompt='q3', answer=' y', members=member(' x', ' y'), disagreement=0.6)])
    readouts = report.answer_readouts(answers, rows)
    assert readouts['member_accuracy'] == [1.0, 0.5]
    assert readouts['greedy_correct'] == {'q1': 1, 'q2': 0, 'q3': 1}      # either group's answer counts on q3
    assert readouts['disagreement'] == {'q1': 0.3, 'q2': 0.0, 'q3': 0.6}


def test_score_batches_ignore_minus_infinity_where_the_label_is_masked():
    """Logits of -inf at a position whose label is masked (prompt, padding) leave every score finite and equal."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 6, 5, generator=generator)                      # (M, B, T, V)
    labels = torch.tensor([[-100, -100, 3, 1, 4, -100]])                        # positions 0 and 4 predict masked labels
    blocked = logits.clone()
    blocked[:, :, [0, 4], 0] = float('-inf')                                    # token 0 is the masked labels' stand-in
    idx = torch.zeros(1, 6, dtype=torch.long)
    plain, masked = (score_batches(lambda _, out=out: out, [(idx, labels)]) for out in (logits, blocked))
    for key in ('logp', 'epistemic', 'epistemic_token', 'total', 'aleatoric'):
        assert masked[key].isfinite().all(), key
        torch.testing.assert_close(masked[key], plain[key], msg=key)
