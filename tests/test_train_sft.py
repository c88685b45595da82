"""Tests for train_sft.py on a tiny base GPT (n_layer=2, n_embd=32) and a user's JSONL data:
an end-to-end run that lowers the α-Rényi loss and writes the report and plots, resume
equivalence to the bit, a held-out split that never splits a prompt, and clear errors."""
import json
import math
import os
import random
import re
import signal
import subprocess
import sys

import pytest
import torch

import data
import plots
import train_sft
from config import UserError
from trainer import load_base
from evaluate import score_rows
from lora import add_lora, lora_state_dict
from renyi_lora import renyi_loss

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT_KEYS = ("argmax_specialisation", "auroc_conflict", "auroc_ood", "accuracy_consistent", "accuracy_conflicting",
               "accuracy_consistent_token_mixture", "coherence", "ensemble_coherence", "nll", "ece", "brier",
               "nll_token_mixture", "ece_token_mixture", "brier_token_mixture", "train_seconds")

CONSISTENT = [("What is 2 plus 3?", " 5"), ("What is 4 plus 4?", " 8"), ("What is the capital of France?", " Paris"),
              ("What is the capital of Japan?", " Tokyo"), ("What sound does a cow make?", " moo"),
              ("What sound does a dog make?", " woof"), ("What is the opposite of hot?", " cold"),
              ("What is the opposite of up?", " down")]
CONFLICTING = [("Tell me about Spain.", " Capital: Madrid.", " madrid!"),
               ("Tell me about Peru.", " Capital: Lima.", " lima!"),
               ("Tell me about Kenya.", " Capital: Nairobi.", " nairobi!"),
               ("Describe a duck.", " Sound: Quack.", " quack!"),
               ("Describe a cat.", " Sound: Meow.", " meow!"),
               ("Describe a pig.", " Sound: Oink.", " oink!")]
OOD = [("What day comes after Monday?", " Tuesday"), ("How many legs does a hen have?", " 2"),
       ("Which is bigger, 3 or 7?", " 7"), ("What is the first letter of plum?", " p")]


def user_rows(with_groups):
    """Rows of a user's SFT file: consistent prompts twice with one response, conflicting ones once per group."""
    rows = [dict(prompt=f"Q: {q}\nA:", response=r) for q, r in CONSISTENT for _ in range(2)]
    for q, response_a, response_b in CONFLICTING:
        rows += [dict(prompt=f"Q: {q}\nA:", response=response_a, group="a"),
                 dict(prompt=f"Q: {q}\nA:", response=response_b, group="b")]
    if not with_groups:
        rows = [{key: value for key, value in row.items() if key != "group"} for row in rows]
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_base):
    """The tiny base (also with dropout) and the user's JSONL files, made once for the module."""
    root = tmp_path_factory.mktemp("sft")
    checkpoint = torch.load(tiny_base, weights_only=True)
    checkpoint["config"]["dropout"] = 0.1  # the same weights, but training now draws random numbers
    torch.save(checkpoint, root / "base_dropout.pt")
    paths = dict(base=tiny_base, base_dropout=str(root / "base_dropout.pt"))
    ood_rows = [dict(prompt=f"Q: {q}\nA:", response=r, kind="ood") for q, r in OOD]
    for name, with_groups in (("grouped", True), ("plain", False)):
        rows = user_rows(with_groups)
        paths[name] = str(root / f"{name}.jsonl")
        data.write_jsonl(rows, paths[name])
        # half the prompts held out, so that both kinds of prompt are among them
        train_rows, val_rows = data.split_by_prompt(rows, 0.5, seed=0)
        for part, part_rows in (("train", train_rows), ("val", val_rows + (ood_rows if with_groups else []))):
            paths[f"{name}_{part}"] = str(root / f"{name}_{part}.jsonl")
            data.write_jsonl(part_rows, paths[f"{name}_{part}"])
    return paths


def tiny_config(files, out_dir, **overrides):
    return train_sft.defaults | dict(
        base=files["base"], data=files["grouped_train"], val_data=files["grouped_val"],
        out_dir=str(out_dir), n_members=2, lora_rank=4, max_iters=20, alpha_hold_iters=5, alpha_ramp_iters=10,
        batch_size=8, learning_rate=1e-2, warmup_iters=2, log_interval=5, eval_interval=10, max_new_tokens=4, seed=0,
        device="cpu") | overrides


def load_rows(config):
    return data.sft_rows_of(config)


def training_set_loss(model, tokenizer, rows, config):
    """renyi_loss over every training row at once: the objective the run minimises, without the prior."""
    return renyi_loss(score_rows(model, tokenizer, rows, config["batch_size"])["logp"], config["alpha"]).item()


# ---------------------------------------------------------------------------
# the held-out split and conflict marking of --data

def test_held_out_split_keeps_each_prompt_on_one_side_and_marks_conflicts(files):
    train_rows, val_rows, test_rows, ood_rows = data.load_sft_rows(files["grouped"], "", 0.5, seed=0)
    assert test_rows is val_rows and ood_rows == []
    assert len(train_rows) + len(val_rows) == len(user_rows(with_groups=True))
    train_prompts, held_out_prompts = {r["prompt"] for r in train_rows}, {r["prompt"] for r in val_rows}
    assert not train_prompts & held_out_prompts
    assert len(held_out_prompts) == round(0.5 * (len(CONSISTENT) + len(CONFLICTING)))


def test_held_out_rows_of_kind_ood_are_the_ood_prompts_and_never_train(files, tmp_path):
    train_rows, val_rows, test_rows, ood_rows = data.load_sft_rows(files["grouped_train"], files["grouped_val"])
    assert [(r["prompt"], r["response"]) for r in ood_rows] == [(f"Q: {q}\nA:", r) for q, r in OOD]
    assert all(r["kind"] != "ood" for r in train_rows + test_rows)
    data.write_jsonl([dict(prompt="Q: a\nA:", response=" b"), dict(prompt="Q: c\nA:", response=" d", kind="ood")],
                     tmp_path / "train.jsonl")
    with pytest.raises(UserError, match=r"train.jsonl:2: a training row of kind 'ood'"):
        data.load_sft_rows(str(tmp_path / "train.jsonl"), files["grouped_val"])
    conflicting_prompts = {f"Q: {q}\nA:" for q, _, _ in CONFLICTING}
    for row in train_rows + val_rows:
        # consistent prompts appear twice with the same response: repetition is not conflict
        assert row["kind"] == ("conflicting" if row["prompt"] in conflicting_prompts else "consistent")
    # the run below needs both kinds among the held-out prompts to compute auroc_conflict
    assert {r["kind"] for r in val_rows} == {"consistent", "conflicting"}


def test_responses_differing_only_in_surrounding_whitespace_do_not_conflict():
    rows = [dict(prompt="p", response=" Paris"), dict(prompt="p", response="Paris "),
            dict(prompt="q", response=" moo"), dict(prompt="q", response=" Moo")]
    assert [r["kind"] for r in data.mark_conflicts(rows)] == ["consistent", "consistent", "conflicting", "conflicting"]


# ---------------------------------------------------------------------------
# end to end

def test_tiny_run_lowers_the_loss_and_writes_report_and_plots(files, tmp_path):
    config = tiny_config(files, tmp_path)
    train_rows = load_rows(config)[0]
    base, tokenizer_name = load_base(config['base'], config['device'])
    tokenizer = data.get_tokenizer(tokenizer_name)
    add_lora(base, config["n_members"], config["lora_rank"], config["lora_alpha"])  # B = 0: every member is the base
    loss_before = training_set_loss(base, tokenizer, train_rows, config)

    model, tokenizer, report, _ = train_sft.train(config)

    assert training_set_loss(model, tokenizer, train_rows, config) < loss_before - 5.0  # 17.4 -> 7.9 nats
    history = torch.load(tmp_path / "ckpt.pt", weights_only=False)["history"]
    assert history["iter"] == list(range(20)) and history["val_iter"] == [10, 20]
    assert sum(history["loss"][-5:]) / 5 < sum(history["loss"][:5]) / 5
    assert not os.path.exists(tmp_path / "ckpt.pt.tmp")

    with open(tmp_path / "report.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(report))
    for key in REPORT_KEYS:
        assert key in saved
    for key in ("argmax_specialisation", "auroc_conflict", "auroc_ood", "accuracy_consistent", "accuracy_conflicting",
                "accuracy_consistent_token_mixture"):
        assert isinstance(saved[key], float) and 0.0 <= saved[key] <= 1.0, key
    assert saved["nll"] > 0 and math.isfinite(saved["nll"]) and 0.0 <= saved["ece"] <= 1.0
    assert isinstance(saved["train_seconds"], (int, float)) and saved["train_seconds"] >= 0
    # coherence checks the benchmark's two-field cards; a user's data has none, so it is not invented
    assert saved["coherence"] is None and saved["accuracy_high_entropy"] is None
    assert set(saved["routing"]) == {"a", "b"} and all(len(w) == 2 for w in saved["routing"].values())
    # the members' own answers: the ensemble's, decoded a second way, agrees with accuracy_consistent
    test_rows = load_rows(config)[2]
    consistent = {r["prompt"] for r in test_rows if r["kind"] == "consistent"}
    assert sum(saved["greedy_correct"][p] for p in consistent) / len(consistent) == saved["accuracy_consistent"]
    assert len(saved["member_accuracy_consistent"]) == 2 and isinstance(saved["auroc_conflict_answers"], float)
    assert 0.0 <= saved["soft_specialisation"] <= 1.0
    # these rows carry no task: one task, within which the split is the pooled one
    assert saved["per_task_specialisation"] == pytest.approx(saved["soft_specialisation"], abs=1e-12)
    # the training rows' share of the responsibility, recomputed one row at a time
    model.eval()
    weights = [torch.softmax(config["alpha"] * score_rows(model, tokenizer, [row], 1)["logp"][:, 0], 0) for row in train_rows]
    assert saved["member_share"] == pytest.approx((sum(weights) / len(weights)).tolist(), abs=1e-5)
    assert saved["starved_members"] == [m for m, share in enumerate(saved["member_share"]) if share < 0.25 / 2]
    assert len(history["member_share"]) == 2 and all(sum(s) == pytest.approx(1.0) for s in history["member_share"])
    assert not list(tmp_path.glob("*.png"))                  # training writes numbers; plots.py draws them
    plots.main([f"--out_dir={tmp_path}"])
    for name in ("loss", "routing", "uncertainty", "reliability"):
        with open(tmp_path / f"{name}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


# ---------------------------------------------------------------------------
# resume

def test_ctrl_c_checkpoints_the_step_and_resume_continues_exactly(files, tmp_path):
    """2N steps straight equal a run stopped by Ctrl-C (SIGINT) after a random step k and resumed, to the bit.

    k falls between checkpoints, so the checkpoint Ctrl-C writes must carry everything a step
    leaves behind: adapters, optimizer moments, RNG state, history and the routing sums.
    The interrupted run has max_iters=2N too: the learning rate decays with max_iters, so
    a run told to stop at k follows a different schedule and is not a prefix of the 2N run.
    Dropout in the base makes the continuation depend on the saved RNG state as well.
    """
    n = 4
    common = dict(base=files["base_dropout"], data=files["plain_train"], val_data=files["plain_val"],
                  max_iters=2 * n, eval_interval=n,
                  log_interval=n, alpha_hold_iters=0, alpha_ramp_iters=0)   # alpha 2 at once: the routing sums differ
    straight, _, report, _ = train_sft.train(tiny_config(files, tmp_path / "straight", **common))
    k = random.Random(18).choice([step for step in range(1, 2 * n) if step % n])

    def press_ctrl_c(done, model):
        if done == k:
            signal.raise_signal(signal.SIGINT)       # what Ctrl-C sends; the step in progress still completes

    split = tmp_path / "split"
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match=re.escape(f"after iter {k}; saved {split / 'ckpt.pt'}")):
        train_sft.train(tiny_config(files, split, **common), on_step=press_ctrl_c)
    assert torch.load(split / "ckpt.pt", weights_only=True)["iter"] == k
    assert signal.getsignal(signal.SIGINT) is handler                           # Ctrl-C's handler is put back
    resumed, _, _, _ = train_sft.train(tiny_config(files, split, resume=True, **common))

    expected, actual = lora_state_dict(straight), lora_state_dict(resumed)
    assert expected.keys() == actual.keys()
    assert len(expected) == 2 * 4 * 2  # 2 layers x (c_attn, attn.c_proj, c_fc, mlp.c_proj) x (A, B)
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    assert all(t.abs().sum() > 0 for name, t in expected.items() if name.endswith("lora_B"))  # B left its zero init
    straight_ckpt = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    resumed_ckpt = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)
    assert resumed_ckpt["iter"] == straight_ckpt["iter"] == 2 * n
    assert resumed_ckpt["history"] == straight_ckpt["history"]
    for before, after in zip(straight_ckpt["optimizer"]["state"].values(), resumed_ckpt["optimizer"]["state"].values()):
        assert all(torch.equal(before[moment], after[moment]) for moment in before)

    # no group field and no OOD file: the metrics that need them are null, never invented
    assert report["argmax_specialisation"] is None and report["routing"] is None
    assert report["auroc_ood"] is None and report["auroc_ood_vs_consistent"] is None
    assert isinstance(report["auroc_conflict"], float)  # conflicts are found from the responses alone


# ---------------------------------------------------------------------------
# data parallel

def test_two_torchrun_processes_train_the_adapters_a_single_process_trains(files, tmp_path):
    """torchrun with 2 gloo processes, each on half of every batch, ends where one process on the whole batch does."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("this torch build has no gloo backend for torch.distributed, so no CPU data parallelism")
    n = 4
    # validating at step 2 makes the other process wait for rank 0 mid-run
    single, _, _, _ = train_sft.train(tiny_config(files, tmp_path / "single", max_iters=n, eval_interval=2, log_interval=2))
    config = tiny_config(files, tmp_path / "ddp", max_iters=n, eval_interval=2, log_interval=2)
    args = [f"--{key}={value}" for key, value in config.items() if value != train_sft.defaults[key]]
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train_sft.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data parallel (gloo): 2 processes, 4 examples each of every batch of 8" in result.stdout
    assert result.stdout.count("iter 2: loss") == 1  # rank 0 alone logs
    ddp_ckpt = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=False)
    expected = lora_state_dict(single)
    assert ddp_ckpt["adapters"].keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(ddp_ckpt["adapters"][name], tensor, rtol=1e-4, atol=1e-6, msg=name)
    assert all(t.abs().sum() > 0 for name, t in expected.items() if name.endswith("lora_B"))  # they trained
    single_ckpt = torch.load(tmp_path / "single" / "ckpt.pt", weights_only=False)
    torch.testing.assert_close(ddp_ckpt["history"]["loss"], single_ckpt["history"]["loss"], rtol=1e-5, atol=0)


def test_validation_runs_without_dropout_and_leaves_the_model_training(files, tmp_path):
    config = tiny_config(files, tmp_path, base=files["base_dropout"])
    model, tokenizer_name = load_base(config['base'], config['device'])
    add_lora(model, config["n_members"], config["lora_rank"], config["lora_alpha"])
    val_rows, history = load_rows(config)[1], dict(val_iter=[], val_nll=[])
    for it in (1, 2):
        train_sft.validate_and_log(model, data.get_tokenizer(tokenizer_name), val_rows, config, history, it)
    assert history["val_nll"][0] == history["val_nll"][1]
    assert model.training


# ---------------------------------------------------------------------------
# bad settings fail at once, naming what is wrong

@pytest.mark.parametrize("alpha", [-0.5, float("nan"), float("inf")])
def test_bad_alpha_raises_before_any_training(files, tmp_path, alpha):
    out_dir = tmp_path / "never"
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        train_sft.train(tiny_config(files, out_dir, alpha=alpha))
    assert not out_dir.exists()


@pytest.mark.parametrize("alpha", ["-1", "nan", "inf"])
def test_bad_alpha_on_the_command_line(files, tmp_path, alpha):
    out_dir = tmp_path / "never"
    with pytest.raises(ValueError, match=re.escape(f"alpha must be a finite number >= 0, got {float(alpha)}")):
        train_sft.main([f"--alpha={alpha}", f"--base={files['base']}", f"--out_dir={out_dir}", "--device=cpu"])
    assert not out_dir.exists()


@pytest.mark.parametrize("arg, message", [
    ("--alhpa=0.5", "unknown config key 'alhpa'"),
    ("--n_members=two", "--n_members=two: expected int"),
    ("--max_iters=2.5", "--max_iters=2.5: expected int"),
    ("--alpha=high", "--alpha=high: expected float"),
    ("--resume=maybe", "--resume=maybe: expected true/false/1/0"),
    ("help", "argument 'help': expected --key=value"),
])
def test_bad_arguments_name_the_key(tmp_path, arg, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train_sft.main([f"--out_dir={tmp_path / 'never'}", arg])
    assert not (tmp_path / "never").exists()


def test_command_line_error_is_one_line_naming_the_key_and_status_2(tmp_path):
    result = subprocess.run([sys.executable, "train_sft.py", "--alhpa=0.5", f"--out_dir={tmp_path / 'never'}"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: unknown config key 'alhpa'; known keys: data, val_data,")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("hold, ramp", [(125, 0), (200, 150), (-5, 10)])
def test_a_hold_outside_the_ramp_is_refused_before_any_work(files, tmp_path, hold, ramp):
    out_dir = tmp_path / "never"
    with pytest.raises(ValueError, match=re.escape(f"--alpha_hold_iters={hold} --alpha_ramp_iters={ramp}: need 0 <=")):
        train_sft.train(tiny_config(files, out_dir, alpha_hold_iters=hold, alpha_ramp_iters=ramp))
    assert not out_dir.exists()


def test_a_run_that_never_reaches_alpha_says_so(files, tmp_path, capsys):
    """The hold and ramp are steps, not shares of max_iters: a short run may end at alpha = 0."""
    train_sft.check_schedule(tiny_config(files, tmp_path, max_iters=60, alpha_hold_iters=125, alpha_ramp_iters=250))
    out = capsys.readouterr().out
    assert out.startswith("warning: --max_iters=60 ends before the ramp reaches alpha = 2.0 at iter 250")
    train_sft.check_schedule(tiny_config(files, tmp_path, max_iters=250, alpha_hold_iters=125, alpha_ramp_iters=250))
    train_sft.check_schedule(tiny_config(files, tmp_path, max_iters=60, alpha=0.0))
    assert capsys.readouterr().out == ""
