"""Label noise on the benchmark (benchmark.corrupt_responses), the files `python benchmark.py --corrupt`
writes, and the report keys that trace it (report.noise_routing, report.task_routing), each against a
slow plain-Python reference."""
import json
import math

import pytest
import torch

import benchmark
import data
import report
from config import UserError


@pytest.fixture(scope="module")
def clean_and_noisy():
    return benchmark.make_benchmark(seed=0), benchmark.make_benchmark(seed=0, corrupt=0.2)


def test_corrupt_replaces_the_exact_share_of_consistent_training_rows_with_tagged_wrong_answers(clean_and_noisy):
    clean, noisy = clean_and_noisy
    assert len(clean["sft_train"]) == len(noisy["sft_train"])
    n_consistent = sum(row["kind"] == "consistent" for row in clean["sft_train"])
    changed = 0
    for before, after in zip(clean["sft_train"], noisy["sft_train"]):
        if after.get("corrupted"):
            changed += 1
            assert before["kind"] == "consistent" and before["prompt"] == after["prompt"]
            assert not benchmark.is_correct(after, after["response"])
            task_answers = {r for item in benchmark.world_items() if item.task == after["task"]
                            for _, r in item.answers}
            assert after["response"] in task_answers            # another prompt's answer to the same task
            assert {k: v for k, v in after.items() if k != "corrupted"} == before | dict(response=after["response"])
        else:
            assert after == before and "corrupted" not in after
    assert changed == round(0.2 * n_consistent) > 0


def test_held_out_splits_stay_byte_identical_and_corruption_is_seeded(clean_and_noisy):
    clean, noisy = clean_and_noisy
    for name in clean:
        if name != "sft_train":
            assert json.dumps(noisy[name]) == json.dumps(clean[name])
    assert json.dumps(benchmark.make_benchmark(seed=0, corrupt=0.2)) == json.dumps(noisy)
    assert json.dumps(benchmark.make_benchmark(seed=0, corrupt=0.0)) == json.dumps(clean)
    other = benchmark.corrupt_responses(clean["sft_train"], 0.2, seed=1)
    assert [r.get("corrupted") for r in other] != [r.get("corrupted") for r in noisy["sft_train"]]


@pytest.mark.parametrize("share", [1.0, -0.1, 1.5])
def test_corrupt_outside_zero_one_is_refused(share):
    with pytest.raises(UserError, match=r"corrupt must be in \[0, 1\)"):
        benchmark.make_benchmark(seed=0, corrupt=share)


def test_written_noisy_benchmark_loads_back_as_the_rows_it_was_made_of(tmp_path, clean_and_noisy):
    """`python benchmark.py --corrupt=0.2` then train_sft.py on its files trains on the rows that
    make_benchmark(corrupt=0.2) makes in memory: kinds and corrupted flags included."""
    benchmark.main([f"--out_dir={tmp_path}", "--corrupt=0.2"])
    train, val, test, ood = data.load_sft_rows(str(tmp_path / "sft_train.jsonl"), str(tmp_path / "sft_held_out.jsonl"))
    _, noisy = clean_and_noisy
    for loaded, made in ((train, noisy["sft_train"]), (test, noisy["sft_test"]), (ood, noisy["ood"])):
        assert len(loaded) == len(made)
        for row, original in zip(loaded, made):
            expected = original | dict(corrupted=original.get("corrupted", False))
            assert {key: row[key] for key in expected} == expected
    assert val is test
    assert sum(row["corrupted"] for row in train) == sum(row.get("corrupted", False) for row in noisy["sft_train"]) > 0
    assert {row["kind"] for row in train} == {"consistent", "conflicting", "high_entropy"}   # as written, not re-read


def slow_spread(logp, alpha, columns):
    """Mean entropy and mean top share of softmax_m(alpha * logp[m][i]) over the given columns, in plain Python."""
    entropies, tops = [], []
    for i in columns:
        scores = [alpha * logp[m][i] for m in range(len(logp))]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        weights = [w / sum(weights) for w in weights]
        entropies.append(-sum(w * math.log(w) for w in weights if w > 0))
        tops.append(max(weights))
    return dict(entropy=sum(entropies) / len(entropies), top_share=sum(tops) / len(tops))


def test_noise_routing_against_a_plain_python_loop():
    logp = [[-1.0, -9.0, -2.0, -0.5, -3.0], [-4.0, -1.0, -2.5, -7.0, -3.0], [-2.0, -2.0, -2.0, -1.0, -8.0]]
    rows = [dict(kind="consistent", corrupted=True), dict(kind="consistent"), dict(kind="conflicting"),
            dict(kind="consistent", corrupted=True), dict(kind="consistent")]
    for alpha in (0.0, 0.8, 2.0):
        result = report.noise_routing(torch.tensor(logp, dtype=torch.float64), alpha, rows)
        for name, columns in (("corrupted", [0, 3]), ("clean", [1, 4])):
            expected = slow_spread(logp, alpha, columns)
            assert result[name] == pytest.approx(expected, abs=1e-9)
    assert report.noise_routing(torch.tensor(logp, dtype=torch.float64), 1.0, [dict(kind="consistent")] * 5) is None


def test_task_routing_and_specialisation_against_a_plain_python_loop():
    logp = [[-1.0, -6.0, -2.0, -0.5, -3.0, -1.0], [-4.0, -1.0, -2.5, -7.0, -0.2, -5.0]]
    rows = [dict(kind="consistent", task="add"), dict(kind="high_entropy", task="name"),
            dict(kind="conflicting", task="sum_card"), dict(kind="consistent", task="add"),
            dict(kind="high_entropy", task="name"), dict(kind="ood", task="legs")]
    agreed, tasks = [0, 1, 3, 4], ["add", "name", "add", "name"]
    result = report.task_routing(torch.tensor(logp, dtype=torch.float64), 2.0, rows)
    for task in ("add", "name"):
        columns = [i for i, t in zip(agreed, tasks) if t == task]
        for m in range(2):
            expected = sum(math.exp(2 * logp[m][i]) / sum(math.exp(2 * logp[k][i]) for k in range(2))
                       for i in columns) / len(columns)
            assert result["task_routing"][task][m] == pytest.approx(expected, abs=1e-9)
    # 1 - H(task | member) / H(task), the joint p(task, m) = (1/N) sum_{i of the task} softmax_m(log p_m(x_i))
    posterior = {i: [math.exp(logp[m][i]) / sum(math.exp(logp[k][i]) for k in range(2)) for m in range(2)]
                 for i in agreed}
    joint = {(t, m): sum(posterior[i][m] for i, ti in zip(agreed, tasks) if ti == t) / 4
             for t in ("add", "name") for m in range(2)}
    p_task = {t: joint[t, 0] + joint[t, 1] for t in ("add", "name")}
    p_member = {m: joint["add", m] + joint["name", m] for m in range(2)}
    h_task = -sum(p * math.log(p) for p in p_task.values())
    h_task_given_member = -sum(p * math.log(p / p_member[m]) for (_, m), p in joint.items())
    assert result["task_specialisation"] == pytest.approx(1 - h_task_given_member / h_task, abs=1e-9)
    assert report.task_routing(torch.tensor(logp, dtype=torch.float64), 2.0, [dict(kind="conflicting")] * 6) == dict(
        task_routing=None, task_specialisation=None)
