"""conflict_sets.py: determinism, the held-out split, each knob's share against its target, the conflict structure
against data.mark_conflicts, the facts against benchmark.py's tables, token lengths with the shipped tokenizer, bad
knobs and the CLI round trip through data.load_sft_rows."""
import copy
import functools
import math
import os
import re
import statistics

import pytest

import benchmark
from experiments import conflict_sets
import data
from experiments.conflict_sets import FAMILY, make_conflict_set

BLOCK_SIZE = 128  # the base's context
TOLERANCE = 0.03  # |measured - target| for imbalance and conflict_share: whole prompts and rows round the shares


@functools.lru_cache(maxsize=None)
def family_set(name, seed=0):
    return make_conflict_set(**FAMILY[name], seed=seed)


def prompts(rows):
    return {row["prompt"] for row in rows}


def response_tokens(rows):
    tokenizer = data.get_tokenizer()
    return statistics.mean(len(tokenizer.encode_ordinary(row["response"])) for row in rows)


def facts_of(prompt):
    """The three facts a record prompt is about, read from benchmark.py's tables (not from conflict_sets)."""
    subject = re.fullmatch(r"Question: Write the record for (?:the )?(.+)\.\nAnswer:", prompt).group(1)
    if re.fullmatch(r"\d and \d", subject):
        total = int(subject[0]) + int(subject[-1])
        return {str(total), benchmark.parity(total), benchmark.NUMBER_WORDS[total]}
    for row in benchmark.COUNTRIES + benchmark.ANIMALS:
        if row[0] == subject:
            return {str(fact) for fact in row}
    raise AssertionError(f"unknown subject {subject!r}")


def test_same_seed_same_rows_other_seed_other_split():
    assert make_conflict_set(seed=0) == make_conflict_set(seed=0)
    for task in ("fact", "record"):  # each task's held-out prompts are drawn anew
        held_out = [prompts(row for row in make_conflict_set(seed=seed)["test"] if row["task"] == task)
                    for seed in (0, 1)]
        assert held_out[0] != held_out[1]


def world_answers():
    """{fact question: answer}, written out here from benchmark.py's tables as an independent reference."""
    answers = {}
    for country, capital, continent in benchmark.COUNTRIES:
        answers[f"What is the capital city of {country}?"] = capital
        answers[f"On which continent is {country}?"] = continent
    for animal, sound, legs in benchmark.ANIMALS:
        answers[f"Which sound does the {animal} make?"] = sound
        answers[f"How many legs does the {animal} have?"] = str(legs)
    for a in range(10):
        for b in range(10):
            answers[f"What do {a} and {b} add up to?"] = str(a + b)
    return answers


def test_user_160_by_hand():
    rows = family_set("user_160")
    train, test = rows["train"], rows["test"]
    assert len(train) == 160
    for group in ("g0", "g1"):  # global: one fixed response per group, in training and held out
        assert len({row["response"] for row in train + test if row["group"] == group}) == 1
    answers = world_answers()
    for row in train + test:
        if row["task"] == "record":
            assert row["uncertainty"] == round(1 / 6, 4)  # log 2 / log 64
        else:
            assert row["uncertainty"] == 0 and row["group"] == "all"
            question = re.fullmatch(r"Question: (.+)\nAnswer:", row["prompt"]).group(1)
            assert row["response"] == " " + answers[question]


def test_imbalanced_80_20_320_is_user_160_with_g0_repeated():
    """The one-knob variant of the 80/20 set: user_160's held-out file and training prompts exactly, g0's record
    rows four times each (the 160-row 80/20 set trains on fewer prompts instead)."""
    user, imbalanced = family_set("user_160"), family_set("imbalanced_80_20_320")
    key = lambda row: (row["prompt"], row["group"], row["response"])
    assert sorted(user["test"], key=key) == sorted(imbalanced["test"], key=key)
    assert prompts(user["train"]) == prompts(imbalanced["train"])
    records = [row for row in imbalanced["train"] if row["task"] == "record"]
    assert len({row["prompt"] for row in records}) == 53 and len(imbalanced["train"]) == 320
    assert sum(row["group"] == "g0" for row in records) / len(records) == pytest.approx(0.8, abs=0.01)
    assert len(prompts(family_set("imbalanced_80_20")["train"])) < len(prompts(user["train"])) // 2 + 1


@pytest.mark.parametrize("name", FAMILY)
def test_held_out_prompts_are_new_and_cover_every_task_and_group(name):
    train, test = family_set(name)["train"], family_set(name)["test"]
    assert not prompts(train) & prompts(test)
    assert len(prompts(test)) / len(prompts(train + test)) >= 0.2
    world = dict(fact=len(conflict_sets.fact_items()), record=len(conflict_sets.record_items()))
    for task in ("fact", "record"):
        n_test = len(prompts(row for row in test if row["task"] == task))
        n_train = len(prompts(row for row in train if row["task"] == task))
        assert n_test >= conflict_sets.MIN_TEST_PROMPTS
        # topped up to TEST_PROMPTS, or to every prompt of the world that no training row uses
        assert n_test == max(min(conflict_sets.TEST_PROMPTS, world[task] - n_train), round(n_train * 0.22 / 0.78))
    assert {row["group"] for row in test} == {"all"} | {f"g{g}" for g in range(FAMILY[name]["n_groups"])}


@pytest.mark.parametrize("name", FAMILY)
def test_rows_and_shares_meet_the_knobs(name):
    knobs, train, test = FAMILY[name], family_set(name)["train"], family_set(name)["test"]
    assert len(train) == knobs["n_rows"]
    records = [row for row in train if row["task"] == "record"]
    assert abs(sum(row["group"] == "g0" for row in records) / len(records) - knobs["imbalance"]) <= TOLERANCE
    record_prompts = prompts(row for row in train if row["task"] == "record")   # the held-out file is topped up
    assert abs(len(record_prompts) / len(prompts(train)) - knobs["conflict_share"]) <= TOLERANCE


@pytest.mark.parametrize("name", FAMILY)
def test_every_group_answers_every_record_prompt(name):
    rows = family_set(name)["train"] + family_set(name)["test"]
    n_groups, shared = FAMILY[name]["n_groups"], FAMILY[name]["convention"] == "shared"
    task_of = {row["prompt"]: row["task"] for row in rows}
    for prompt, task in task_of.items():
        answers = {(row["group"], row["response"]) for row in rows if row["prompt"] == prompt}
        if task == "fact":
            assert {group for group, _ in answers} == {"all"} and len(answers) == 1
            continue
        assert sorted(group for group, _ in answers) == [f"g{g}" for g in range(n_groups)]
        first_words = {response.split()[0] for _, response in answers}
        assert len({response for _, response in answers}) == len(first_words) == (1 if shared else n_groups)


@pytest.mark.parametrize("name", FAMILY)
def test_kinds_and_uncertainty_agree_with_mark_conflicts(name):
    rows = family_set(name)["train"] + family_set(name)["test"]
    marked = data.mark_conflicts(copy.deepcopy(rows))
    assert [row["kind"] for row in marked] == [row["kind"] for row in rows]
    conflicting = round(math.log(FAMILY[name]["n_groups"]) / math.log(64), 4)
    assert all(row["uncertainty"] == (conflicting if row["kind"] == "conflicting" else 0.0) for row in rows)
    assert ("conflicting" in {row["kind"] for row in rows}) == (FAMILY[name]["convention"] != "shared")


def test_per_prompt_groups_write_the_prompts_facts_with_their_own_keys():
    rows = family_set("per_prompt")["train"] + family_set("per_prompt")["test"]
    records = [row for row in rows if row["task"] == "record"]
    for group in ("g0", "g1"):
        fields = [re.findall(r" (\w+): ([^.]+)\.", row["response"]) for row in records if row["group"] == group]
        assert len({tuple(key for key, _ in row_fields) for row_fields in fields}) == 1  # the same keys everywhere
    for row in records:
        values = {value for _, value in re.findall(r" (\w+): ([^.]+)\.", row["response"])}
        assert values <= facts_of(row["prompt"]), row
    # the control writes g0's per_prompt response for every group (same seed and knobs, so the same conventions)
    g0 = {row["prompt"]: row["response"] for row in records if row["group"] == "g0"}
    shared = family_set("no_conflict")["train"] + family_set("no_conflict")["test"]
    shared_records = [row for row in shared if row["task"] == "record"]
    assert prompts(shared_records) == set(g0) and all(row["response"] == g0[row["prompt"]] for row in shared_records)


def test_every_row_fits_the_block_size():
    tokenizer = data.get_tokenizer()
    extremes = [make_conflict_set(n_rows=200, response_words=conflict_sets.MAX_RESPONSE_WORDS,
                                  n_groups=conflict_sets.MAX_GROUPS, imbalance=0.5, convention=convention, seed=seed)
                for convention in conflict_sets.CONVENTIONS for seed in (0, 1)]
    for rows in [family_set(name) for name in FAMILY] + extremes:
        encoded = data.encode_sft(rows["train"] + rows["test"], tokenizer, BLOCK_SIZE)  # raises when too long
        assert max(len(ids) for ids, _ in encoded) <= BLOCK_SIZE


def test_response_tokens_grow_with_response_words():
    for convention in ("global", "per_prompt"):
        means = [response_tokens([row for row in make_conflict_set(response_words=n, convention=convention)["train"]
                                  if row["task"] == "record"]) for n in (1, 2, 4, 8, 16)]
        assert means == sorted(means) and len(set(means)) == 5, means
    assert 50 <= response_tokens([row for row in family_set("long")["train"] if row["task"] == "record"]) <= 70


@pytest.mark.parametrize("knobs, key", [
    (dict(n_groups=1), "n_groups"), (dict(n_groups=9), "n_groups"), (dict(imbalance=0.4), "imbalance"),
    (dict(imbalance=1.0), "imbalance"), (dict(n_groups=4, imbalance=0.2), "imbalance"),
    (dict(conflict_share=0.0), "conflict_share"), (dict(conflict_share=1.0), "conflict_share"),
    (dict(n_rows=40, conflict_share=0.02), "conflict_share"), (dict(response_words=0), "response_words"),
    (dict(response_words=17), "response_words"), (dict(convention="mixed"), "convention"), (dict(n_rows=10), "n_rows"),
])
def test_bad_knobs_raise_one_line_naming_the_key(knobs, key):
    with pytest.raises(ValueError) as error:
        make_conflict_set(**knobs)
    assert str(error.value).startswith(f"{key}=") and "\n" not in str(error.value)


def test_cli_writes_files_that_load_sft_rows_reads_back(tmp_path):
    conflict_sets.main(["--name=per_prompt", "--seed=3", f"--out_dir={tmp_path}"])
    path = os.path.join(tmp_path, "per_prompt")
    train, val, test, ood = data.load_sft_rows(os.path.join(path, "train.jsonl"), os.path.join(path, "test.jsonl"))
    expected = make_conflict_set(**FAMILY["per_prompt"], seed=3)
    keys = ("prompt", "response", "task", "group", "uncertainty", "kind")
    for loaded, rows in ((train, expected["train"]), (test, expected["test"])):
        assert [tuple(row[k] for k in keys) for row in loaded] == [tuple(row[k] for k in keys) for row in rows]
    assert val == test and ood == []
    with pytest.raises(ValueError, match="^name="):
        conflict_sets.main(["--name=user_161"])


# ---------------------------------------------------------------------------
# the pair sets for DPO

def right_answers(kind_word):
    """Every right answer of one question kind, from benchmark.py's tables (not from conflict_sets)."""
    return {"capital": {f" {c[1]}" for c in benchmark.COUNTRIES}, "continent": {f" {c[2]}" for c in benchmark.COUNTRIES},
            "sound": {f" {a[1]}" for a in benchmark.ANIMALS}, "legs": {f" {a[2]}" for a in benchmark.ANIMALS},
            "add": {f" {n}" for n in range(19)}}[kind_word]


@pytest.mark.parametrize("name", ["user_160", "four_groups", "imbalanced_80_20", "per_prompt", "no_conflict"])
def test_pair_sets_follow_the_conflict_set_row_for_row(name):
    rows, pairs = family_set(name), conflict_sets.make_pair_set(**FAMILY[name])
    assert pairs == conflict_sets.make_pair_set(**FAMILY[name])                        # deterministic
    n_groups = FAMILY[name]["n_groups"]
    for split in ("train", "test"):
        sft, pref = rows[split], data.mark_contested(copy.deepcopy(pairs[split]))
        facts = [row for row in sft if row["task"] == "fact"]
        records = [row for row in sft if row["task"] == "record"]
        assert prompts(pref) == prompts(facts if FAMILY[name]["convention"] == "shared" else sft)
        own = {(row["prompt"], row["group"]): row["response"] for row in records}
        fact_pairs = [p for p in pref if p["task"] == "fact"]
        record_pairs = [p for p in pref if p["task"] == "record"]
        assert [(p["prompt"], p["chosen"]) for p in fact_pairs] == [(r["prompt"], r["response"]) for r in facts]
        for pair in fact_pairs:   # a wrong answer of the same kind: another capital, another sum, ...
            kind = next(word for word in ("capital", "continent", "sound", "legs", "add") if word in pair["prompt"])
            assert pair["rejected"] != pair["chosen"] and pair["rejected"] in right_answers(kind)
            assert pair["kind"] == "consensus" and pair["group"] == benchmark.ALL
        if FAMILY[name]["convention"] == "shared":                 # the groups agree: nothing to prefer
            assert not record_pairs
            continue
        # every record row of group g: g's response over each other group's, and annotators disagree on each
        assert len(record_pairs) == len(records) * (n_groups - 1)
        for pair in record_pairs:
            assert pair["chosen"] == own[pair["prompt"], pair["group"]] and pair["kind"] == "contested"
            assert pair["rejected"] in {own[pair["prompt"], f"g{g}"] for g in range(n_groups)} - {pair["chosen"]}
    train_records = [p for p in pairs["train"] if p["task"] == "record"]
    if train_records:                                            # the imbalance carries over to the pairs
        share = sum(p["group"] == "g0" for p in train_records) / len(train_records)
        assert abs(share - FAMILY[name]["imbalance"]) <= TOLERANCE
    assert not prompts(pairs["train"]) & prompts(pairs["test"])
