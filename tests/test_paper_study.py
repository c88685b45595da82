"""paper_study.py: its read-outs on hand-made reports, and its refusals."""
import json
import os

import pytest

from experiments import paper_study
from config import UserError


def report(correct, accuracy=0.5, members=(0.5, 0.75), routing=None):
    keys = ('soft_specialisation', 'per_prompt_specialisation', 'task_specialisation', 'nll', 'accuracy_high_entropy',
            'accuracy_conflicting', 'auroc_conflict', 'auroc_conflict_answers', 'auroc_ood',
            'auroc_conflict_vs_ambiguous', 'auroc_conflict_vs_ambiguous_answers', 'auroc_ambiguous_aleatoric')
    return dict.fromkeys(keys, 0.5) | dict(
        greedy_correct=correct, accuracy_consistent=accuracy, member_accuracy_consistent=list(members),
        noise_routing=routing, starved_members=[], epistemic_by_kind=dict(conflicting=0.3, high_entropy=0.4),
        aleatoric_by_kind=None, disagreement_by_kind=dict(conflicting=0.6))


def test_split_by_single_counts_the_prompts_each_side():
    single = report(dict(a=1, b=1, c=0, d=0, e=0))
    ensemble = report(dict(a=1, b=0, c=1, d=1, e=0))
    assert paper_study.split_by_single(ensemble, single) == dict(
        n_single_right=2, accuracy_single_right=0.5, n_single_wrong=3, accuracy_single_wrong=pytest.approx(2 / 3))
    assert paper_study.split_by_single(ensemble, report(dict(a=1)))['accuracy_single_wrong'] is None


def test_noise_row_measures_drops_from_the_clean_run_of_the_same_variant():
    routing = dict(corrupted=dict(entropy=0.2, top_share=0.9), clean=dict(entropy=1.0, top_share=0.4))
    row = paper_study.noise_row(report({}, accuracy=0.6, members=(0.7, 0.4), routing=routing),
                                report({}, accuracy=0.9, members=(0.8, 0.85)))
    assert row['drop'] == pytest.approx(0.3) and row['best_member'] == 0.7 and row['best_member_drop'] == pytest.approx(0.15)
    assert (row['entropy_corrupted'], row['top_share_clean']) == (0.2, 0.4)
    assert paper_study.noise_row(report({}), None)['drop'] is None


def test_tables_pair_each_run_with_the_single_adapter_of_its_seed():
    reports = {('single', 1, 0.0): report(dict(a=1, b=0)), ('paper', 1, 0.0): report(dict(a=0, b=1)),
               ('paper', 2, 0.0): report(dict(a=1, b=1)), ('paper', 1, 0.2): report(dict(a=1, b=1), accuracy=0.25)}
    text = paper_study.tables(reports)
    by_single = text.split('### by_single')[1].split('###')[0]
    assert '| paper / 1 | 1 | 0.000 | 1 | 1.000 |' in by_single and 'paper / 2' not in by_single
    assert '| paper / 1 / noise 0.2 | 0.250 | 0.250 |' in text.split('### noise')[1]
    assert '| single / 1 |' not in text.split('### ambiguity')[1]


@pytest.mark.parametrize('argv, message', [(['--variants=paper,nope'], "unknown variant 'nope'"),
                                           (['--noise=1.0'], r'must lie in \(0, 1\)'),
                                           (['--seeds=1,x'], 'comma-separated numbers')])
def test_bad_study_keys_are_refused_before_any_run(argv, message, tmp_path):
    with pytest.raises(UserError, match=message):
        paper_study.main(argv + [f'--study_dir={tmp_path}'])
    assert list(tmp_path.iterdir()) == []


def test_tiny_study_trains_its_runs_once_and_tabulates_them(tiny_base, tmp_path, monkeypatch):
    """Two tiny runs of the paper's variant, clean and with 20 % noise: the tables have them.

    Two members instead of eight keep the test fast; the variant's other keys are the preset's."""
    monkeypatch.setitem(paper_study.VARIANTS, 'paper', paper_study.VARIANTS['paper'] | dict(n_members=2))
    argv = [f"--base={tiny_base}", "--variants=paper", "--seeds=1", "--noise=0.2", "--noise_seeds=1",
            "--max_iters=2", "--eval_interval=2", "--lora_rank=2", "--batch_size=8",
            "--max_new_tokens=2", "--device=cpu", f"--study_dir={tmp_path}"]
    paper_study.main(argv)
    text = (tmp_path / 'tables.md').read_text()
    for section, label in (('setting', '| paper / 1 |'), ('noise', '| paper / 1 / noise 0.2 |'),
                           ('ambiguity', '| paper / 1 |')):
        assert label in text.split(f'### {section}')[1].split('###')[0]
    noisy = json.loads((tmp_path / 'noise0.2_paper_seed1' / 'report.json').read_text())
    assert noisy['n_members'] == 2 and noisy['alpha'] == 0.8 and noisy['noise_routing'] is not None and len(noisy['greedy_correct']) > 0
    written = os.path.getmtime(tmp_path / 'paper_seed1' / 'report.json')
    paper_study.main(argv + ['--train=false'])                    # tabulates again, trains nothing
    assert os.path.getmtime(tmp_path / 'paper_seed1' / 'report.json') == written
