"""evaluate.py's routing measures against hand-computed values and a plain-Python loop."""
import math
import random

import pytest
import torch

from evaluate import member_shares, soft_specialisation, starved_members


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


def test_member_shares_and_starved_members():
    logp = torch.tensor([[0.0, 0.0, -1.0], [-30.0, 0.0, -1.0], [-30.0, -30.0, -1.0]], dtype=torch.float64)
    assert member_shares(logp, 0.0).tolist() == pytest.approx([1 / 3] * 3)          # alpha = 0 routes uniformly
    shares = member_shares(logp, 1.0)
    expected = [(1 + 0.5 + 1 / 3) / 3, (0.5 + 1 / 3) / 3, (1 / 3) / 3]              # to 1e-13 (e^-30)
    assert shares.tolist() == pytest.approx(expected, rel=1e-9)
    assert starved_members(torch.tensor([0.9, 0.05, 0.05])) == [1, 2]                # below 0.25 / 3
    assert starved_members(torch.tensor([0.5, 0.3, 0.2])) == []
    assert starved_members(torch.tensor([1.0])) == []                                 # one adapter cannot starve
