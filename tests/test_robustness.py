"""robustness.py: the targets each run is held to, on hand-made reports."""
import json

import pytest

from experiments import robustness


def report(soft, starved, nll, accuracy, auroc, auroc_answers=None):
    return dict(soft_specialisation=soft, starved_members=starved, nll=nll, nll_token_mixture=nll + 0.5,
                accuracy_consistent=accuracy, accuracy_consistent_token_mixture=accuracy - 0.1, auroc_conflict=auroc,
                auroc_conflict_answers=auroc if auroc_answers is None else auroc_answers,
                auroc_conflict_token_mixture=None if auroc is None else auroc - 0.2)


SINGLE = report(None, [], 0.40, 0.90, 0.5)


def test_a_run_that_meets_every_target_misses_nothing():
    r = robustness.row('user_160', 1337, 'default', report(0.8, [], 0.44, 0.86, 0.95), SINGLE)
    assert r['misses'] == [] and r['d_nll'] == pytest.approx(0.04) and r['d_acc'] == pytest.approx(-0.04)


def test_each_target_is_checked():
    r = robustness.row('user_160', 1, 'default', report(0.3, [2, 3], 0.50, 0.80, 0.7), SINGLE)
    assert r['misses'] == ['starved', 'soft', 'nll', 'acc', 'auroc', 'auroc_answers'] and r['starved'] == 2
    # the answer-level read-out is judged on its own: it may hold where the epistemic one misses
    r = robustness.row('user_160', 1, 'default', report(0.8, [], 0.44, 0.86, 0.7, auroc_answers=0.95), SINGLE)
    assert r['misses'] == ['auroc']


def test_a_difference_of_exactly_the_margin_meets_the_target():
    r = robustness.row('user_160', 1, 'default', report(0.8, [], 0.45, 0.6625, 0.95), report(None, [], 0.40, 0.7125, 0.5))
    assert r['d_acc'] < -0.05 and r['misses'] == []           # -0.05000000000000004 in floating point


def test_without_conflict_specialisation_must_stay_low_and_auroc_is_not_required():
    assert robustness.row('no_conflict', 1, 'default', report(0.05, [], 0.4, 0.9, 0.5), SINGLE)['misses'] == []
    assert robustness.row('no_conflict', 1, 'default', report(0.5, [], 0.4, 0.9, 0.5), SINGLE)['misses'] == ['soft']


def test_table_has_a_line_per_run():
    rows = [robustness.row('long', 2, 'alpha_1', report(None, [], 0.4, 0.9, None), SINGLE)]
    lines = robustness.table(rows).splitlines()
    assert len(lines) == 3
    assert lines[2].startswith('| long | alpha_1 | 2 | – | – | 0 | 0.400 (+0.000) | 0.900 (+0.000) | 0.90 (+0.00) | 0.80 | – | – | – |')


def test_bad_seeds_are_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="--seeds: comma-separated whole numbers"):
        robustness.main(['--seeds=1,x', '--train=false', f'--study_dir={tmp_path}'])


def test_unknown_set_or_variant_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown set 'nope'"):
        robustness.main(['--sets=nope', f'--study_dir={tmp_path}'])
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        robustness.main(['--variants=nope', f'--study_dir={tmp_path}'])


def test_train_false_tabulates_only_finished_runs(tmp_path, capsys):
    finished = tmp_path / 'user_160' / 'default_seed1337'
    single = tmp_path / 'user_160' / 'single_seed1337'
    for path, values in ((finished, report(0.9, [], 0.30, 0.90, 0.95)), (single, SINGLE)):
        path.mkdir(parents=True)
        (path / 'report.json').write_text(json.dumps(values))
    robustness.main(['--sets=user_160,long', '--seeds=1337', '--train=false', f'--study_dir={tmp_path}'])
    lines = (tmp_path / 'table.md').read_text().splitlines()
    assert len(lines) == 3 and lines[2].startswith('| user_160 | default | 1337 | 0.90 | – | 0 |')


def test_help_lists_the_study_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        robustness.main(['--help'])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert 'STUDY = dict(' in out and "sets='all'" in out and 'Does a default survive' in out


def test_over_seeds_averages_each_set_and_variant_and_spreads_the_single_adapter():
    single_a, single_b = report(None, [], 0.40, 0.60, 0.5), report(None, [], 0.50, 0.75, 0.5)
    rows = [robustness.row('user_160', 1, 'default', report(0.9, [], 0.42, 0.70, 0.95), single_a),
            robustness.row('user_160', 2, 'default', report(0.9, [], 0.46, 0.70, 0.95), single_b),
            robustness.row('long', 1, 'default', report(0.9, [], 0.40, 0.50, 0.95), single_a)]
    lines = robustness.over_seeds(rows).splitlines()
    # d_nll +0.02 and -0.04, d_acc +0.10 and -0.05: means -0.010 and +0.025
    assert lines[2] == '| user_160 | default | 2 | -0.010 | +0.025 | 0.70–0.70 | 0.60–0.75 |'
    assert lines[3] == '| long | default | 1 | +0.000 | -0.100 | 0.50–0.50 | 0.60–0.60 |'
