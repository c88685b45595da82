"""dpo_disagreement.py on hand-made finished runs: the per-pair variances it plots, the table, and one-line errors."""
import json
import math

import pytest
import torch

from experiments import dpo_disagreement
from config import run_script

# Two members. Contested pairs at margins (log 3, -log 3): p = 3/4 and 1/4, v = 1/16, margin variance (log 3)^2.
# Consensus at (log 3, log 7): p = 3/4 and 7/8, v = 1/256, margin variance (log(7/3) / 2)^2.
MARGIN_RATIO = (2 * math.log(3) / math.log(7 / 3)) ** 2
MARGINS = {'consensus': torch.tensor([[math.log(3)], [math.log(7)]]),
           'contested/a': torch.tensor([[math.log(3)], [-math.log(3)]]),
           'contested/b': torch.tensor([[-math.log(3)], [math.log(3)]])}
REPORT = dict(preference_variance=dict(contested=1 / 16, consensus=1 / 256, ratio=16.0), auroc_contested=1.0,
              accuracy_by_group={'consensus': [0.5, 1.0], 'contested/a': [1.0, 0.0], 'contested/b': [0.0, 1.0]})


@pytest.fixture
def study(tmp_path):
    """A study dir with the finished run (alpha 3, seed 1), and an SFT dir for seeds 1 and 2."""
    run_dir = tmp_path / 'study' / 'a3_seed1'
    run_dir.mkdir(parents=True)
    (run_dir / 'report.json').write_text(json.dumps(REPORT))
    torch.save(MARGINS, run_dir / 'margins.pt')
    for seed in (1, 2):
        (tmp_path / f'sft{seed}').mkdir()
        (tmp_path / f'sft{seed}' / 'ckpt.pt').write_bytes(b'')
    return tmp_path


def test_variance_by_kind_pools_the_contested_groups():
    variances = dpo_disagreement.variance_by_kind(MARGINS)
    assert variances['contested'] == pytest.approx([1 / 16, 1 / 16])
    assert variances['consensus'] == pytest.approx([1 / 256])
    assert dpo_disagreement.margin_variance_ratio(MARGINS) == pytest.approx(MARGIN_RATIO, rel=1e-6)


def test_train_false_tabulates_and_plots_the_finished_runs(study):
    dpo_disagreement.main(['--alphas=3,0', '--seeds=1,2', f'--sft_dirs={study}/sft{{seed}}',
                           f'--study_dir={study / "study"}', f'--plot={study / "fig.png"}', '--train=false'])
    lines = (study / 'study' / 'table.md').read_text().splitlines()
    assert len(lines) == 4                                             # header, rule, the run, the mean of alpha 3
    assert lines[2] == f'| 3 | 1 | 0.0625 | 0.00391 | 16 | {MARGIN_RATIO:.3g} | 1.00 | 1.00 | 1.00 | 1.00 |'
    assert lines[3].startswith('| 3 | mean of 1 | 0.0625 | 0.00391 | 16 |')
    assert (study / 'fig.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('arg, message', [
    ('--alphas=0.8,-1', '--alphas=0.8,-1: expected comma-separated values (alpha must be a finite number >= 0'),
    ('--seeds=1,x', '--seeds=1,x: expected comma-separated values'),
    ('--seeds=3', 'sft3/ckpt.pt not found; train it with `python train_sft.py --seed=3'),
    ('--alpha=2', '--alpha: the study sets it for every run; use --alphas'),
])
def test_bad_input_is_one_line_and_exit_status_2(study, capsys, arg, message):
    with pytest.raises(SystemExit) as exit_info:
        run_script(dpo_disagreement.main, [f'--sft_dirs={study}/sft{{seed}}', f'--study_dir={study / "study"}',
                                           '--seeds=1', arg])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and stderr.count('\n') == 1 and stderr.startswith('error: ') and message in stderr
