"""The edges a user meets: every mistake of theirs ends in one line `error: ...` with exit
status 2 before any expensive work, --help prints the commented defaults, a non-finite loss never reaches a
checkpoint, a run killed with SIGKILL leaves a loadable one, and a Hugging Face GPT-2 directory is a base."""
import importlib
import os
import pathlib
import random
import re
import subprocess
import sys
import time

import pytest
import torch

import data
import sample
import train_dpo
import train_sft
from baselines import ual
from config import UserError, run_script
from lora import add_lora
from test_model import write_hf_checkpoint
from trainer import base_config, base_fingerprint, load_base, load_ensemble, read_checkpoint, save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = [dict(prompt=f"Q: What is {a} plus {b}?\nA:", response=f" {a + b}") for a in range(4) for b in range(3)]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_base):
    """A user's rows (good and bad), and checkpoints of every kind a user can get wrong; nothing trained."""
    root = tmp_path_factory.mktemp("edges")
    data.write_jsonl(ROWS, root / "sft.jsonl")
    (root / "bad.jsonl").write_text('{"prompt": "Q: a", "response": " b"}\n\n{"prompt": "Q: x", "response": 3}\n')
    (root / "latin1.jsonl").write_bytes('{"prompt": "Q: café\\nA:", "response": " b"}\n'.encode("latin-1"))
    base = pathlib.Path(tiny_base).read_bytes()
    (root / "base_truncated.pt").write_bytes(base[:len(base) // 2])
    model, _ = load_base(tiny_base)
    optimizer = torch.optim.AdamW(add_lora(model, 2, 4, 8.0))
    run_config = train_sft.defaults | dict(base=tiny_base, n_members=2, lora_rank=4, lora_alpha=8.0, device="cpu")
    save_checkpoint(str(root / "run" / "ckpt.pt"), model, optimizer, 3, run_config, dict(iter=[], loss=[]))
    os.makedirs(root / "truncated")
    (root / "truncated" / "ckpt.pt").write_bytes((root / "run" / "ckpt.pt").read_bytes()[:5000])  # torch: OSError
    with torch.no_grad():
        model.transformer.ln_f.weight += 1e-3                  # another base under the same adapters
    save_checkpoint(str(root / "other_base" / "ckpt.pt"), model, optimizer, 3, run_config, dict(iter=[], loss=[]))
    return dict(root=root, base=tiny_base)


def refused(main, argv):
    """Run main as the command line does; returns (stderr, seconds) of the exit with status 2 it must end in."""
    start = time.time()
    with pytest.raises(SystemExit) as exit_info:
        run_script(main, argv)
    assert exit_info.value.code == 2
    return time.time() - start


def expect_one_error_line(capsys, message):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("args, message", [
    (["--data={root}/bad.jsonl"], "{root}/bad.jsonl:3: field 'response' must be a string, got int"),
    (["--val_data={root}/none.jsonl"], "{root}/none.jsonl not found"),
    (["--val_data={root}/latin1.jsonl"], "{root}/latin1.jsonl:1: not UTF-8 text"),
    (["--alpha=-1"], "alpha must be a finite number >= 0, got -1.0"),
    (["--lora_rank=0"], "--lora_rank=0: must be > 0"),
    (["--device=gpu"], "--device=gpu: not a torch device"),
    (["--device=cuda"], "--device=cuda: CUDA is not available"),
    (["--base={root}/none.pt"], "--base={root}/none.pt not found: expected a checkpoint of pretrain.py"),
    (["--base={root}/base_truncated.pt"], "{root}/base_truncated.pt is not a checkpoint torch can read"),
    (["--resume=true", "--out_dir={root}/empty"], "{root}/empty/ckpt.pt not found, so there is nothing to resume"),
    (["--resume=true", "--out_dir={root}/truncated"], "{root}/truncated/ckpt.pt is not a checkpoint torch can read"),
    (["--resume=true", "--out_dir={root}/run", "--n_members=2", "--lora_rank=8"],
     "{root}/run/ckpt.pt holds adapters with lora_rank=4, this run's lora_rank is 8"),
    (["--resume=true", "--out_dir={root}/other_base", "--n_members=2", "--lora_rank=4", "--lora_alpha=8"],
     "{root}/other_base/ckpt.pt holds adapters trained on another base model"),
    (["--learning_rate=1e9", "--max_iters=5"], "training stopped and no checkpoint was written yet"),
])
def test_each_mistake_ends_in_one_error_line_and_status_2(files, capsys, args, message):
    if "--device=cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    root = files["root"]
    argv = [f"--data={root}/sft.jsonl", f"--base={files['base']}", f"--out_dir={root}/never", "--device=cpu",
            "--batch_size=4"] + [a.format(root=root, base=files["base"]) for a in args]
    refused(train_sft.main, argv)
    expect_one_error_line(capsys, message.format(root=root, base=files["base"]))


@pytest.mark.parametrize("args, message", [
    (["--ual_source=ensemble", "--ual_teacher={base}"],
     "{base} is not a checkpoint of train_sft.py or train_dpo.py (it has no 'adapters')"),
    (["--ual_source=llm"], "ual_source must be 'data' or 'ensemble', got 'llm'"),
    (["--ual_source=data", "--data={root}/sft.jsonl"], "--ual_source=data: "),
])
def test_ual_mistakes_end_in_one_error_line(files, capsys, args, message):
    root = files["root"]
    argv = [f"--base={files['base']}", f"--out_dir={root}/never", "--device=cpu"]
    refused(ual.main, argv + [a.format(root=root, base=files["base"]) for a in args])
    expect_one_error_line(capsys, message.format(root=root, base=files["base"]))


@pytest.mark.parametrize("args, message", [
    (["--sft_dir={root}/sfft"], "{root}/sfft/ckpt.pt not found; train the SFT ensemble first, with "
                                "`python train_sft.py --out_dir={root}/sfft`"),
    (["--sft_dir={root}/run", "--resume=true", "--out_dir={root}/empty"], "nothing to resume"),
    (["--sft_dir={root}/other_base"], "{root}/other_base/ckpt.pt holds adapters trained on another base model"),
])
def test_dpo_mistakes_end_in_one_error_line(files, capsys, args, message):
    root = files["root"]
    refused(train_dpo.main, [f"--out_dir={root}/never", "--device=cpu"] + [a.format(root=root) for a in args])
    expect_one_error_line(capsys, message.format(root=root))
    assert not (root / "sfft").exists()


@pytest.mark.parametrize("args, message", [
    (["--data=bad.jsonl"], "bad.jsonl:3: field 'response'"),
    (["--data=none.jsonl"], "none.jsonl not found"),
    (["--val_data=bad.jsonl"], "--val_data needs --data: the benchmark brings its own"),
    (["--device=gpu"], "not a torch device"),
    (["--resume=true"], "out/sft/ckpt.pt not found, so there is nothing to resume"),
    (["--resume=true", "--out_dir=run", "--n_members=2", "--lora_rank=4", "--lora_alpha=8"],
     "--base=out/base.pt does not exist (yet), so the adapters of run/ckpt.pt"),
])
def test_without_a_base_every_input_is_refused_in_seconds_before_pretraining(files, capsys, monkeypatch, tmp_path,
                                                                            args, message):
    """No out/base.pt yet: train_sft.py would pretrain one (minutes), but only after every input has passed."""
    def pretrain(*args, **kwargs):
        raise AssertionError("pretraining started before the inputs were checked")
    monkeypatch.setattr(subprocess, "run", pretrain)
    monkeypatch.chdir(tmp_path)
    for name in ("bad.jsonl", "run/ckpt.pt"):
        os.makedirs(os.path.dirname(name) or ".", exist_ok=True)
        (tmp_path / name).write_bytes((files["root"] / name).read_bytes())
    assert refused(train_sft.main, ["--device=cpu", *args]) < 5
    expect_one_error_line(capsys, message)
    assert not os.path.exists("out/base.pt")


SCRIPTS = ["train_sft", "train_dpo", "pretrain", "sample", "plots", "stability", "benchmark", "baselines.compare",
           "baselines.ual"] + [f"experiments.{name}" for name in (
               "alpha_star", "alpha_sweep", "conflict_sets", "diagnose", "dpo_disagreement", "dpo_robustness",
               "long_study", "new_prompts", "paper_study", "robustness", "stability_observed", "throughput")]


@pytest.mark.parametrize("module", SCRIPTS)
def test_help_prints_the_docstring_and_the_commented_defaults(capsys, module):
    """What `python [-m] <module> --help` prints: the script's docstring, then its own keys with their comments."""
    script = importlib.import_module(module)
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--out_dir=x", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    defaults = next(getattr(script, name) for name in ("STUDY", "defaults", "DEFAULTS") if hasattr(script, name))
    assert out.startswith(script.__doc__.strip().splitlines()[0])
    inherited = set(train_sft.defaults) | set(ual.defaults) if module.startswith(("baselines", "experiments.alpha")) else ()
    assert all(re.search(rf"\b{key}=", out) for key in defaults if key not in inherited)
    assert out.count("  # ") >= 1                                               # with their comments


def test_a_study_answers_help_by_its_documented_command():
    result = subprocess.run([sys.executable, "-m", "experiments.robustness", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.startswith("Does a default survive data it was not tuned on?")


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(files, tmp_path):
    config = train_sft.defaults | dict(base=files["base"], data=str(files["root"] / "sft.jsonl"), out_dir=str(tmp_path),
                                       n_members=2, lora_rank=4, max_iters=30, batch_size=4, eval_interval=2,
                                       log_interval=100, device="cpu")
    with pytest.raises(UserError) as error:
        train_sft.train(config, lr_schedule=lambda it, config: 1e-3 if it < 4 else 1e9)
    ckpt_path = re.escape(str(tmp_path / "ckpt.pt"))
    match = re.fullmatch(r"iter (\d+): (the loss is \S+, the gradient norm \S+|an adapter is not finite): training "
                         rf"stopped and the last good checkpoint, {ckpt_path} at iter (\d+), is kept; "
                         r"lower --learning_rate \(or raise --warmup_iters\)", str(error.value))
    assert match, str(error.value)
    saved = read_checkpoint(str(tmp_path / "ckpt.pt"))
    assert 4 <= saved["iter"] == int(match[3]) < int(match[1])
    assert all(tensor.isfinite().all() for tensor in saved["adapters"].values())


def test_a_run_killed_with_sigkill_leaves_a_loadable_checkpoint(files, tmp_path):
    """Checkpoints are written to a temporary file and renamed: a kill at any moment leaves the last whole one.
    Here every step writes one, so the kill most likely lands in a write."""
    root = files["root"]
    args = [f"--base={files['base']}", f"--data={root}/sft.jsonl", f"--out_dir={tmp_path}", "--n_members=2",
            "--lora_rank=4", "--batch_size=4", "--max_iters=100000", "--eval_interval=1", "--log_interval=1000",
            "--device=cpu"]
    process = subprocess.Popen([sys.executable, "train_sft.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    while not (tmp_path / "ckpt.pt").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(18).uniform(0.2, 0.6))
    process.kill()
    assert process.wait() == -9, process.stderr.read().decode()[-2000:]
    model, _, config = load_ensemble(str(tmp_path / "ckpt.pt"))
    assert read_checkpoint(str(tmp_path / "ckpt.pt"))["iter"] >= 1 and config["out_dir"] == str(tmp_path)
    assert model.n_members == 2


def test_a_hugging_face_gpt2_directory_is_a_base(files, tmp_path, capsys):
    """The tiny base written in Hugging Face's layout is the same base (same fingerprint, same tokenizer: its
    vocabulary is this project's), and SFT, DPO and sample.py run on it."""
    base, tokenizer_name = load_base(files["base"])
    write_hf_checkpoint(base, tmp_path / "hf")
    hf_base, hf_tokenizer_name = load_base(str(tmp_path / "hf"))
    assert (hf_tokenizer_name, base_fingerprint(hf_base)) == (tokenizer_name, base_fingerprint(base))
    train_sft.train(train_sft.defaults | dict(
        base=str(tmp_path / "hf"), data=str(files["root"] / "sft.jsonl"), out_dir=str(tmp_path / "sft"), n_members=2,
        lora_rank=4, max_iters=2, batch_size=4, eval_interval=2, max_new_tokens=2, device="cpu"))
    capsys.readouterr()
    sample.main([f"--out_dir={tmp_path / 'sft'}", "--prompt=Q: What is 1 plus 1?\\nA:", "--json=true",
                 "--max_new_tokens=2", "--device=cpu"])
    assert len(capsys.readouterr().out.splitlines()) == 1
    model, _, sft_config = train_dpo.load_sft(train_dpo.defaults | dict(sft_dir=str(tmp_path / "sft"), device="cpu"))
    assert sft_config["base"] == str(tmp_path / "hf") and base_fingerprint(model) == base_fingerprint(base)


def test_a_gpt2_sized_directory_takes_the_gpt2_tokenizer(tmp_path):
    try:
        data.get_tokenizer("gpt2")
    except UserError:
        pytest.skip("tiktoken's GPT-2 files are not cached here (no network): the error is tested above")
    from model import GPT, GPTConfig
    write_hf_checkpoint(GPT(GPTConfig(block_size=8, vocab_size=50257, n_layer=1, n_head=1, n_embd=8)), tmp_path)
    assert base_config(str(tmp_path))[1] == "gpt2"
