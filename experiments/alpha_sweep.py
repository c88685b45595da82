"""
The α sweep: train_sft.py for each α, plus a single adapter (M=1),
then one Markdown table of their reports.

    python -m experiments.alpha_sweep                                  # α in {0, 0.25, 0.5, 1, 2} and M=1
    python -m experiments.alpha_sweep --alpha_hold_iters=0 --alpha_ramp_iters=0   # α from the first step
    python -m experiments.alpha_sweep --alphas=0,1 --max_iters=100     # any train_sft.py key passes through

Each run writes its own out_dir (out/sweep/alpha_<α>, out/sweep/single) with
report.json and plots; the table goes to out/sweep/table.md.
"""
import os

import train_sft
from config import UserError, parse_args, run_script
from experiments.common import markdown_table

COLUMNS = ('argmax_specialisation', 'auroc_conflict', 'auroc_ood', 'accuracy_consistent', 'coherence', 'nll', 'ece',
           'train_seconds')


defaults = train_sft.defaults | dict(
    alphas='0,0.25,0.5,1,2',    # one run per alpha, and one single adapter (M=1)
    sweep_dir='out/sweep',      # each run in sweep_dir/<name>, the table in sweep_dir/table.md
)


def runs(alphas, n_members):
    """(name, config overrides) of every run in the sweep."""
    for alpha in alphas:
        yield f'alpha_{alpha:g}', dict(alpha=alpha, n_members=n_members)
    yield 'single', dict(alpha=1.0, n_members=1)  # with one member every α gives the same loss


def main(argv):
    config = parse_args(defaults, argv)
    try:
        alphas = [float(alpha) for alpha in config['alphas'].split(',')]
    except ValueError:
        raise UserError(f"--alphas={config['alphas']}: expected numbers separated by commas") from None
    rows = []
    for name, overrides in runs(alphas, config['n_members']):
        run_config = config | overrides | dict(out_dir=os.path.join(config['sweep_dir'], name))
        print(f"== {name}: alpha={run_config['alpha']}, n_members={run_config['n_members']}")
        _, _, report, _ = train_sft.train(run_config)
        label = f"M={run_config['n_members']}, α={run_config['alpha']:g}" if name != 'single' else 'M=1 (one adapter)'
        rows.append((label, report))
    text = markdown_table(rows, COLUMNS)
    with open(os.path.join(config['sweep_dir'], 'table.md'), 'w') as f:
        f.write(text + '\n')
    print(text)


if __name__ == '__main__':
    run_script(main)
