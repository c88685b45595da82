"""Tests for benchmark.py: its splits are deterministic across processes, and its conflicts, personas,
high-entropy answers, OOD tasks and preference pairs have the structure its docstring states."""
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest

import benchmark
import data


WRITE_SPLITS = """
import sys, benchmark, data
splits = benchmark.make_benchmark(seed=0)
splits["held_out"] = data.split_by_prompt(splits["sft_train"], 0.2, seed=0)[1]
for name, rows in splits.items():
    data.write_jsonl(rows, f"{sys.argv[1]}/{name}.jsonl")
"""


def test_splits_are_byte_identical_across_processes(tmp_path):
    # a second process hashes strings differently, so any dependence on set order would change the bytes
    other_hash_seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", WRITE_SPLITS, str(tmp_path / "other")], cwd=root, check=True,
                   env=os.environ | dict(PYTHONHASHSEED=other_hash_seed))
    splits = benchmark.make_benchmark(seed=0)  # the same splits, made in this process
    splits["held_out"] = data.split_by_prompt(splits["sft_train"], 0.2, seed=0)[1]
    assert len(os.listdir(tmp_path / "other")) == len(splits)
    for name, rows in splits.items():
        data.write_jsonl(rows, str(tmp_path / "this" / f"{name}.jsonl"))
        written = (tmp_path / "this" / f"{name}.jsonl").read_bytes()
        assert written and written == (tmp_path / "other" / f"{name}.jsonl").read_bytes()


def test_different_seed_gives_different_splits(bench):
    other = benchmark.make_benchmark(seed=1)
    prompts = lambda rows: {row["prompt"] for row in rows}
    assert prompts(bench["sft_train"]) != prompts(other["sft_train"])
    assert prompts(bench["sft_test"]) != prompts(other["sft_test"])
    # a different split of the same world: together the splits cover the same prompts
    union = lambda b: prompts(b["sft_train"]) | prompts(b["sft_val"]) | prompts(b["sft_test"])
    assert union(bench) == union(other)


def test_conflicting_prompts_have_one_response_per_persona(bench):
    by_prompt = {}
    for row in bench["sft_train"]:
        by_prompt.setdefault(row["prompt"], []).append(row)
    conflicting = {p: rows for p, rows in by_prompt.items() if rows[0]["kind"] == "conflicting"}
    assert {rows[0]["task"] for rows in conflicting.values()} == set(benchmark.CARD_FIELDS)
    for rows in conflicting.values():
        assert sorted(row["group"] for row in rows) == sorted(benchmark.PERSONAS)
        assert len({row["response"] for row in rows}) == 2
        for row in rows:
            assert benchmark.persona_of(row, row["response"]) == row["group"]
            assert row["uncertainty"] == round(math.log(2) / math.log(benchmark.MAX_ANSWERS), 4)
    consistent = [rows for rows in by_prompt.values() if rows[0]["kind"] == "consistent"]
    assert consistent and all(len(rows) == 1 and rows[0]["group"] == benchmark.ALL for rows in consistent)
    assert all(rows[0]["uncertainty"] == 0 for rows in consistent)


def test_persona_of_a_hand_written_card():
    assert benchmark.persona_of("country_card", " Capital: Paris. Continent: Europe.") == "formal"
    assert benchmark.persona_of("country_card", " paris, in europe!") == "casual"
    assert benchmark.persona_of("country_card", " Capital: Paris. in europe!") is None  # mixed
    assert benchmark.field_personas("country_card", " Capital: Paris. in europe!") == ("formal", "casual")
    assert benchmark.persona_of("animal_card", " Sound: Moo. Legs: 4.") == "formal"
    assert benchmark.persona_of("animal_card", " moo, four legs!") == "casual"


def test_high_entropy_rows_carry_their_answer_entropy(bench):
    high = [row for row in bench["sft_train"] if row["kind"] == "high_entropy"]
    assert high
    for row in high:
        n_answers = len(benchmark.acceptable_answers(row))
        assert n_answers >= 2 and row["uncertainty"] > 0
        assert row["uncertainty"] == round(min(1.0, math.log(n_answers) / math.log(benchmark.MAX_ANSWERS)), 4)
    days = [row for row in high if row["prompt"] == benchmark.qa("Name a day of the week.")]
    assert all(row["uncertainty"] == 0.4679 for row in days)  # log 7 / log 64


def test_ood_tasks_never_occur_in_training(bench):
    ood_tasks = {row["task"] for row in bench["ood"]}
    assert ood_tasks == {"country_of", "legs", "bigger", "first_letter", "next_day"}
    assert all(row["kind"] == "ood" for row in bench["ood"])
    for name in ("sft_train", "sft_val", "sft_test", "dpo_train", "dpo_val", "dpo_test"):
        assert not ood_tasks & {row["task"] for row in bench[name]}
    train_prompts = {row["prompt"] for row in bench["sft_train"] + bench["dpo_train"]}
    assert not train_prompts & {row["prompt"] for row in bench["ood"]}


def test_train_val_test_prompts_are_disjoint_across_sft_and_dpo(bench):
    prompts = {split: {row["prompt"] for row in bench[f"sft_{split}"] + bench[f"dpo_{split}"]}
               for split in ("train", "val", "test")}
    assert all(prompts.values())
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]


def test_contested_pairs_occur_in_both_directions(bench):
    pairs = bench["dpo_train"]
    contested = {(row["prompt"], row["chosen"], row["rejected"]): row for row in pairs if row["kind"] == "contested"}
    assert contested
    for (prompt, chosen, rejected), row in contested.items():
        reverse = contested[(prompt, rejected, chosen)]
        assert {row["group"], reverse["group"]} == set(benchmark.PERSONAS)
        assert benchmark.persona_of(row, chosen) == row["group"]  # each persona prefers its own style
    for row in pairs:
        if row["kind"] == "consensus":
            assert benchmark.is_correct(row, row["chosen"]) and not benchmark.is_correct(row, row["rejected"])


def test_consensus_rejected_parrots_the_question_and_is_never_correct(bench):
    consensus = [row for name in ("dpo_train", "dpo_val", "dpo_test") for row in bench[name]
                 if row["kind"] == "consensus"]
    assert consensus
    for row in consensus:
        assert row["rejected"].strip() in row["prompt"]  # a piece of the question itself
    parrots = {item.prompt: item.parrot for item in benchmark.world_items()}
    assert parrots["Q: What is 3 plus 4?\nA:"] == " 3 plus 4"
    assert parrots["Q: What is the capital of France?\nA:"] == " France"
    assert parrots["Q: Name a word that rhymes with cat.\nA:"] == " a word that rhymes with cat"
    for item in benchmark.world_items():  # every prompt, whichever split it fell in
        if item.kind in ("consistent", "high_entropy"):
            assert item.parrot.strip() and not benchmark.is_correct(dict(prompt=item.prompt), item.parrot)
            assert not item.parrot.strip().isdigit()  # not even numerically an answer (" 05" would be 0 plus 5)


# make_benchmark(seed=0) before the parrot negatives, serialised with json.dumps(sort_keys=True)
WRONG_ANSWER_BENCHMARK_SHA256 = "70c9b9302afb8579e9d500338ebc03be6f9fde19b17cf64f94de838b34b331b2"


def test_wrong_answer_negatives_are_the_earlier_benchmark_and_differ_only_in_consensus_rejected(bench):
    other = benchmark.make_benchmark(seed=0, consensus_rejected="wrong_answer")
    serialised = json.dumps(other, sort_keys=True).encode()
    assert hashlib.sha256(serialised).hexdigest() == WRONG_ANSWER_BENCHMARK_SHA256  # the README's wrong-answer rows
    task_answers = {}
    for item in benchmark.world_items():
        task_answers.setdefault(item.task, set()).update(response for _, response in item.answers)
    for name, rows in bench.items():
        assert len(other[name]) == len(rows)
        for row, row2 in zip(rows, other[name]):
            assert {k: v for k, v in row.items() if k != "rejected"} == {k: v for k, v in row2.items() if k != "rejected"}
            if row.get("kind") == "consensus":  # another prompt's answer to the same task
                assert row2["rejected"] in task_answers[row["task"]] and not benchmark.is_correct(row2, row2["rejected"])
            else:
                assert row2 == row
    with pytest.raises(ValueError, match="consensus_rejected"):
        benchmark.make_benchmark(seed=0, consensus_rejected="random")
