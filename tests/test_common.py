"""experiments/common.py: a study's command line, and a finished run's report read, trained or evaluated again."""
import json

import pytest
import torch

import data
from config import UserError
from experiments import common
from experiments.common import parse_study_args
from test_train_sft import files, tiny_config, user_rows  # noqa: F401 (files is a fixture)


def test_study_args_split_the_studys_keys_from_the_runs():
    study, run = parse_study_args(dict(seeds='1', train=True), dict(alpha=2.0, n_members=4),
                                  ['--alpha=0.5', '--seeds=1,2', '--train=false'])
    assert study == dict(seeds='1,2', train=False) and run == dict(alpha=0.5, n_members=4)
    with pytest.raises(UserError, match='nope'):
        parse_study_args(dict(seeds='1'), dict(alpha=2.0), ['--nope=3'])


def test_finished_report_trains_once_and_reevaluates_on_a_new_held_out_file(files, tmp_path):
    held_out = tmp_path / "held_out.jsonl"
    data.write_jsonl(user_rows(with_groups=True)[::2], held_out)       # 4 consistent prompts, 6 conflicting rows
    config = tiny_config(files, tmp_path / "run", val_data=str(held_out))
    first = common.finished_report(config)
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert common.finished_report(config) == first                 # finished: read, not trained again
    assert common.finished_report(config, may_train=False) == first
    assert common.finished_report(tiny_config(files, tmp_path / "absent"), may_train=False) is None
    data.write_jsonl(user_rows(with_groups=True)[:16], held_out)         # a new held-out file: consistent prompts only
    assert common.finished_report(config) == first                  # ... not read unless asked
    again = common.finished_report(config, reevaluate=True)
    after = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert after["iter"] == ckpt["iter"] == 20                           # evaluated, not trained further
    assert all(torch.equal(after["adapters"][key], value) for key, value in ckpt["adapters"].items())
    assert again["train_seconds"] == first["train_seconds"]              # the training's time is kept
    assert first["auroc_conflict"] is not None and again["auroc_conflict"] is None   # no conflicting rows now
    with open(tmp_path / "run" / "report.json") as f:
        assert json.load(f) == again
