"""
Do DPO members disagree more where annotators disagree? train_dpo.py from the SFT run of each seed at
each alpha, and for every run the variance across members of the preference probability
sigmoid(beta * h_m(x)) on the held-out pairs (METHOD.md §6, train_dpo.preference_variance): its
mean over contested pairs, over consensus pairs, and the ratio of the two; the same ratio for the
variance of the margins beta * h_m(x) themselves (margin_variance_ratio); and the report's
auroc_contested and each group's best member accuracy.

    python -m experiments.dpo_disagreement                               # alpha 0.8, 0, 3 x seeds 1337, 1, 2
    python -m experiments.dpo_disagreement --alphas=3 --seeds=1337 --sft_dirs=out/sft
    python -m experiments.dpo_disagreement --max_iters=100               # any train_dpo.py key applies to every run
    python -m experiments.dpo_disagreement --train=false                 # the table and figure of the runs that have finished
    python -m experiments.dpo_disagreement --help                        # these keys; train_dpo.py --help lists the others

The SFT run of seed S is sft_dirs with {seed} replaced by S; the default ones are
`python train_sft.py --seed=S --out_dir=out/seq/hold_seedS`. The DPO run of (alpha, S) is
study_dir/a<alpha>_seed<S>, trained with --seed=S; one whose report.json and margins.pt exist
is not trained again. Writes study_dir/results.json, study_dir/table.md and the figure `plot`.
"""
import json
import os

import matplotlib
import numpy as np
import torch

import train_dpo
from config import UserError, run_script
from experiments.common import parse_study_args
from renyi_lora import check_alpha
from train_dpo import pair_preference_variance

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

STUDY = dict(
    alphas='0.8,0,3',       # the DPO runs' alphas, comma-separated
    seeds='1337,1,2',
    sft_dirs='out/seq/hold_seed{seed}',     # the SFT run each seed's DPO runs start from
    study_dir='out/dpo_var',
    plot='out/dpo_var/disagreement.png',
    train=True,             # false: only tabulate the runs that have finished
)

# the train_dpo.py keys the study sets for every run, and the study's key to use instead
PER_RUN = dict(alpha='--alphas', seed='--seeds', sft_dir='--sft_dirs', out_dir='--study_dir')


def parse_list(key, text, kind):
    """The comma-separated values of --key as `kind` (int or check_alpha), or UserError naming the key."""
    try:
        values = [kind(item) for item in text.split(',')]
    except ValueError as error:   # check_alpha's UserError is a ValueError too
        raise UserError(f"--{key}={text}: expected comma-separated values ({error})") from None
    if len(set(values)) < len(values):
        raise UserError(f"--{key}={text}: a value appears twice")
    return values


def sft_dir_of(pattern, seed):
    """The SFT run of one seed, which must hold a ckpt.pt; UserError otherwise."""
    try:
        sft_dir = pattern.format(seed=seed)
    except (KeyError, IndexError, ValueError):
        raise UserError(f"--sft_dirs={pattern}: expected a directory, with {{seed}} where the seed goes") from None
    if not os.path.isfile(os.path.join(sft_dir, 'ckpt.pt')):
        raise UserError(f"--sft_dirs: {sft_dir}/ckpt.pt not found; train it with "
                        f"`python train_sft.py --seed={seed} --out_dir={sft_dir}`")
    return sft_dir


def run(config, alpha, seed, sft_dir, study_dir, train=True):
    """(report, {group: test margins (M, n)}) of one DPO run, trained unless it exists; None when not run."""
    out_dir = os.path.join(study_dir, f'a{alpha:g}_seed{seed}')
    paths = [os.path.join(out_dir, name) for name in ('report.json', 'margins.pt')]
    if not all(os.path.exists(path) for path in paths):
        if not train:
            return None
        print(f"== alpha {alpha:g} / seed {seed}", flush=True)
        train_dpo.train(config | dict(alpha=alpha, seed=seed, sft_dir=sft_dir, out_dir=out_dir))
    with open(paths[0]) as f:
        report = json.load(f)
    return report, torch.load(paths[1])


def by_kind(margins_by_group):
    """{'contested': margins (M, n) of every contested group, 'consensus': (M, n')} from {group: margins}."""
    kinds = {'contested': [m for g, m in margins_by_group.items() if g.startswith('contested')],
             'consensus': [m for g, m in margins_by_group.items() if g == 'consensus']}
    return {kind: torch.cat(margins, dim=1) for kind, margins in kinds.items() if margins}


def variance_by_kind(margins_by_group, of_probability=True):
    """{'contested': [variance per pair], 'consensus': [...]} on the held-out pairs: v(x) = Var_m sigmoid(beta * h_m(x))
    (pair_preference_variance), or with of_probability=False Var_m(beta * h_m(x)) of the margins themselves."""
    margins = by_kind(margins_by_group)
    variance = pair_preference_variance if of_probability else lambda m: m.var(dim=0, unbiased=False)  # (M, n) -> (n,)
    return {kind: variance(margins[kind]).tolist() if kind in margins else [] for kind in ('contested', 'consensus')}


def margin_variance_ratio(margins_by_group):
    """mean_contested Var_m(beta * h_m(x)) / mean_consensus Var_m(beta * h_m(x)): the same comparison before the
    sigmoid, whose slope p (1 - p) is largest near p = 1/2 and so favours contested pairs by itself. None without both."""
    variances = variance_by_kind(margins_by_group, of_probability=False)
    if not (variances['contested'] and variances['consensus']) or sum(variances['consensus']) == 0:
        return None
    contested, consensus = (sum(values) / len(values) for values in (variances['contested'], variances['consensus']))
    return contested / consensus


def row(alpha, seed, report, margins_by_group):
    """The table's numbers of one run: preference_variance, margin_variance_ratio, auroc_contested and each group's
    best member accuracy."""
    return dict(alpha=alpha, seed=seed, **report['preference_variance'],
                margin_ratio=margin_variance_ratio(margins_by_group), auroc_contested=report['auroc_contested'],
                best_member_accuracy={g: max(a) for g, a in report['accuracy_by_group'].items()})


def table(rows):
    """Markdown: a line per run, then per alpha the mean over its seeds (ratio: of the two means)."""
    groups = sorted({g for r in rows for g in r['best_member_accuracy']})
    show = lambda value, spec: '–' if value is None else format(value, spec)  # noqa: E731
    lines = ['| alpha | seed | Var contested | Var consensus | ratio | margin Var ratio | auroc_contested | ' +
             ' | '.join(f'best member acc {g}' for g in groups) + ' |', '|---' * (7 + len(groups)) + '|']
    for alpha in dict.fromkeys(r['alpha'] for r in rows):
        runs = [r for r in rows if r['alpha'] == alpha]
        for r in runs:
            lines.append(f"| {alpha:g} | {r['seed']} | {show(r['contested'], '.3g')} | {show(r['consensus'], '.3g')} | "
                         f"{show(r['ratio'], '.3g')} | {show(r['margin_ratio'], '.3g')} | "
                         f"{show(r['auroc_contested'], '.2f')} | " +
                         ' | '.join(show(r['best_member_accuracy'].get(g), '.2f') for g in groups) + ' |')
        means = {kind: sum(r[kind] for r in runs) / len(runs) if all(r[kind] is not None for r in runs) else None
                 for kind in ('contested', 'consensus')}
        ratio = means['contested'] / means['consensus'] if None not in means.values() and means['consensus'] else None
        lines.append(f"| {alpha:g} | mean of {len(runs)} | {show(means['contested'], '.3g')} | "
                     f"{show(means['consensus'], '.3g')} | {show(ratio, '.3g')} | | |" + ' |' * len(groups))
    return '\n'.join(lines)


def variance_boxes(ax, runs, ylabel):
    """A box per run and kind of pair (contested beside consensus) of per-pair variances, on a log scale.

    runs: [(label, {'contested': [variance per pair], 'consensus': [...]})]. A variance of 0 (members that agree
    exactly) cannot sit on a log scale; it is drawn at 1e-12.
    """
    for offset, kind, colour in ((-0.18, 'contested', 'C3'), (0.18, 'consensus', 'C0')):
        values = [np.maximum(variances[kind], 1e-12) for _, variances in runs]
        positions = np.arange(len(runs)) + offset
        boxes = ax.boxplot(values, positions=positions, widths=0.3, whis=(5, 95), showfliers=False, patch_artist=True)
        plt.setp(boxes['boxes'], facecolor=colour, alpha=0.4)
        for position, run_values in zip(positions, values):
            ax.plot(np.full(len(run_values), position), run_values, '.', color=colour, ms=2, alpha=0.5)
        means = [np.mean(v) if len(v) else np.nan for v in values]                # a run without such pairs: no mean
        ax.plot(positions, means, 'D', color=colour, ms=5, label=f'{kind} (diamond: mean)')
    ax.set_yscale('log')
    ax.set_xticks(range(len(runs)), [label for label, _ in runs], fontsize=8)
    ax.set_ylabel(ylabel)


def disagreement_plot(path, panels):
    """Write to path one variance_boxes panel per (ylabel, runs) of panels, stacked: the members' disagreement per
    held-out pair. Boxes: quartiles; whiskers: 5th to 95th percentile; dots: the pairs."""
    n_runs = len(panels[0][1])
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 1.1 * n_runs), 3.4 * len(panels)), squeeze=False)
    for ax, (ylabel, runs) in zip(axes[:, 0], panels):
        variance_boxes(ax, runs, ylabel)
    axes[0, 0].set_title("members' disagreement per held-out pair (box: quartiles, whiskers: 5-95%)", fontsize=10)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv):
    study, config = parse_study_args(STUDY, train_dpo.defaults, argv)
    for key, instead in PER_RUN.items():
        if any(a.startswith(f'--{key}=') for a in argv):
            raise UserError(f"--{key}: the study sets it for every run; use {instead}")
    alphas = parse_list('alphas', study['alphas'], check_alpha)
    seeds = parse_list('seeds', study['seeds'], int)
    sft_dirs = {seed: sft_dir_of(study['sft_dirs'], seed) for seed in seeds}   # every input checked before training
    rows, probability_runs, margin_runs = [], [], []
    for alpha in alphas:
        for seed in seeds:
            result = run(config, alpha, seed, sft_dirs[seed], study['study_dir'], study['train'])
            if result is not None:
                rows.append(row(alpha, seed, *result))
                label = f'α={alpha:g}\nseed {seed}'
                probability_runs.append((label, variance_by_kind(result[1])))
                margin_runs.append((label, variance_by_kind(result[1], of_probability=False)))
    if not rows:
        raise UserError(f"--train=false: no finished run in {study['study_dir']}; drop --train=false to train them")
    text = table(rows)
    with open(os.path.join(study['study_dir'], 'results.json'), 'w') as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(study['study_dir'], 'table.md'), 'w') as f:
        f.write(text + '\n')
    disagreement_plot(study['plot'], [('Var over members of sigmoid(beta * h)', probability_runs),
                                            ('Var over members of beta * h', margin_runs)])
    print(text + f"\nwrote {study['study_dir']}/table.md, {study['study_dir']}/results.json and {study['plot']}")


if __name__ == '__main__':
    run_script(main)
