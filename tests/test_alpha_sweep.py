"""alpha_sweep: the run list and the Markdown table of reports."""
from experiments import alpha_sweep
from experiments.common import markdown_table


def report(value, seconds):
    return dict(argmax_specialisation=None, auroc_conflict=value, auroc_ood=value, accuracy_consistent=value,
                coherence=value, nll=value, ece=value, train_seconds=seconds)


def test_runs_cover_every_alpha_and_one_single_adapter():
    runs = list(alpha_sweep.runs([0.0, 0.5], 4))
    assert runs == [('alpha_0', dict(alpha=0.0, n_members=4)), ('alpha_0.5', dict(alpha=0.5, n_members=4)),
                    ('single', dict(alpha=1.0, n_members=1))]


def test_table_formats_metrics_nulls_and_seconds():
    lines = markdown_table([('M=4, α=1', report(0.96181, 66.94))], alpha_sweep.COLUMNS).splitlines()
    assert lines[0] == '| run | ' + ' | '.join(alpha_sweep.COLUMNS) + ' |'
    assert lines[1] == '|---' * 9 + '|'
    assert lines[2] == '| M=4, α=1 | – | 0.962 | 0.962 | 0.962 | 0.962 | 0.962 | 0.962 | 66.9 |'
