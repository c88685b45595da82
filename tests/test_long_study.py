"""long_study.py: the table read from hand-made histories, one-line errors with status 2, and a tiny end-to-end study
whose table and figure come from the runs' own checkpoints."""
import json
import math
import os

import pytest
import torch

from experiments import long_study
from config import run_script


def test_row_and_table_read_the_history_by_hand():
    history = dict(val_iter=[10, 20, 30], routing_entropy=[1.2, 0.5, 0.25],
                   member_share=[[0.25] * 4, [0.5, 0.45, 0.04, 0.01]])
    report = dict(soft_specialisation=0.125, nll=0.75)
    row = long_study.row(4, 0.8, True, report, history, [10, 40])
    assert row['entropy_at'] == {10: 1.2, 40: None}                 # iter 40 was never evaluated
    assert (row['final_iter'], row['final_entropy']) == (30, 0.25)
    assert row['starved'] == [2, 3]                                  # below 1/(4M) = 0.0625 of the last window
    lines = long_study.table([row], [10, 40]).splitlines()
    assert lines[2] == "| 4 | 0.8 | per token | 1.200 | – | 0.250 (30) | 0.12 | 2 | 0.50 0.45 0.04 0.01 | 0.750 |"
    assert len({line.count('|') for line in lines}) == 1              # every line has the header's columns


@pytest.mark.parametrize("arg, message", [
    ("--alphas=0.5,x", "error: --alphas: 'x' is not a number"),
    ("--alphas=-1", "error: alpha must be a finite number >= 0, got -1.0"),
    ("--members=two", "error: --members: 'two' is not an int"),
    ("--normalise=maybe", "error: --normalise=maybe: expected true/false/1/0"),
    ("--n_members=8", "error: --n_members: this study takes --members=4,8"),
    ("--set=huge", "error: --set=huge: must be one of user_160, long,"),
    ("--max_iter=5", "error: unknown config key 'max_iter'"),
])
def test_bad_keys_end_with_one_line_and_status_2(tmp_path, capsys, arg, message):
    with pytest.raises(SystemExit) as stop:
        run_script(long_study.main, [arg, f"--study_dir={tmp_path / 'never'}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "never").exists()


def test_tiny_study_tabulates_its_runs_from_their_histories(tiny_base, tmp_path):
    argv = [f"--base={tiny_base}", "--set=user_160", "--members=2", "--alphas=2", "--normalise=false,true",
            "--max_iters=4", "--eval_interval=2", "--table_iters=2", "--lora_rank=4", "--batch_size=8",
            "--learning_rate=0.03", "--n_samples=1", "--max_new_tokens=4", "--device=cpu", f"--study_dir={tmp_path}"]
    long_study.main(argv)
    with open(tmp_path / "results.json") as f:
        rows = json.load(f)
    histories = [torch.load(os.path.join(long_study.run_dir(str(tmp_path), 2, 2.0, normalise), "ckpt.pt"),
                            weights_only=False)["history"] for normalise in (False, True)]
    for row, history in zip(rows, histories):
        assert row['entropy_at'] == {'2': history['routing_entropy'][0]}
        assert (row['final_iter'], row['final_entropy']) == (4, history['routing_entropy'][1])
    summed, per_token = (history['routing_entropy'][0] for history in histories)
    # both runs take the same first step (identical members route evenly), then route the same second batch:
    # for two members, dividing the gap by |y| >= 1 can only flatten the weights
    assert summed < per_token - 1e-3 and per_token <= math.log(2) + 1e-6
    with open(tmp_path / "entropy.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = os.path.join(long_study.run_dir(str(tmp_path), 2, 2.0, False), "report.json")
    written = os.path.getmtime(report)
    long_study.main(argv + ["--train=false", "--alphas=2,3"])        # alpha 3 never ran: left out, nothing trained
    assert os.path.getmtime(report) == written
    with open(tmp_path / "results.json") as f:
        assert json.load(f) == rows
