"""
Does a default survive data it was not tuned on? train_sft.py over the conflict
sets of conflict_sets.FAMILY x seeds x variants, each beside a single adapter
(M = 1) trained on the same files, and one table of the measures that matter:

    soft_specialisation  I(group; member) / H(group) on held-out conflicting rows (target >= 0.5
                         where groups conflict, <= 0.1 where they do not); beside it the same within
                         each prompt, averaged (per_prompt_specialisation: members may change sides)
    starved              members below 1/(4M) of the training responsibility (target 0)
    d_nll, d_acc         NLL per token and consistent accuracy minus the single adapter's (targets:
                         d_nll <= 0.05 for the sequence mixture the objective trains, d_acc >= -0.05);
                         the equal-weight token mixture's NLL is shown beside it
    auroc_conflict       the sequence mixture's epistemic uncertainty, I(member; next token) summed along
                         the response (evaluate.epistemic_scores), separating conflicting from consistent
                         prompts (>= 0.9); beside it the token mixture's per-token average, which long
                         responses dilute (shown, not judged), and auroc_answers: the members'
                         disagreement about whole answers

    python -m experiments.robustness                                   # every set, seeds 1337, 1, 2, variant 'default'
    python -m experiments.robustness --sets=user_160,long --seeds=1337 --variants=default,ramp,alpha_1
    python -m experiments.robustness --max_iters=200                   # any train_sft.py key applies to every run
    python -m experiments.robustness --train=false                     # the table of the runs that have finished
    python -m experiments.robustness --reevaluate=true                 # finished runs evaluated again (a new held-out file)
    python -m experiments.robustness --help                            # these keys; train_sft.py --help lists the others

A run whose report.json exists is not trained again, so an interrupted study
continues where it stopped. Writes study_dir/results.json, study_dir/table.md and
study_dir/over_seeds.md (each set and variant averaged over its seeds).
"""
import json
import os

import data
import train_sft
from config import UserError, run_script
from experiments import conflict_sets
from experiments.common import finished_report, parse_seeds, parse_study_args

# Each variant is a set of train_sft.py overrides; 'single' is the reference every variant is compared with.
VARIANTS = {
    'default': {},                            # train_sft.py's defaults: alpha 2, held at 0 for 125 iters, then ramped
    'ramp': dict(alpha_hold_iters=0),         # the default before this study: ramped from the first iter
    'single': dict(n_members=1),
    'alpha_1': dict(alpha=1.0),
    'alpha_0': dict(alpha=0.0),
}
STUDY = dict(
    sets='all',             # sets of conflict_sets.FAMILY, comma-separated
    seeds='1337,1,2',
    variants='default',     # keys of VARIANTS, comma-separated; 'single' runs beside every one of them
    study_dir='out/robustness',
    train=True,             # false: only tabulate the runs that have finished
    reevaluate=False,       # true: evaluate finished runs again from their checkpoints
)


def write_set(name, study_dir):
    """Write the conflict set `name` (seed 0) as JSONL, anew each time (it is deterministic and takes
    milliseconds, so the files always follow today's conflict_sets.py); returns (train path, test path)."""
    paths = [os.path.join(study_dir, 'data', name, f'{split}.jsonl') for split in ('train', 'test')]
    splits = conflict_sets.make_conflict_set(**conflict_sets.FAMILY[name], seed=0)
    for path, split in zip(paths, ('train', 'test')):
        data.write_jsonl(splits[split], path)
    return paths


def run(config, name, seed, variant, study_dir, train=True, reevaluate=False):
    """The report of one (set, seed, variant) run (common.finished_report; None: not run, not trained)."""
    train_path, test_path = write_set(name, study_dir)
    out_dir = os.path.join(study_dir, name, f'{variant}_seed{seed}')
    run_config = config | VARIANTS[variant] | dict(data=train_path, val_data=test_path, out_dir=out_dir, seed=seed)
    return finished_report(run_config, train, reevaluate)


def row(name, seed, variant, report, single):
    """The table's measures of one run against the single adapter of the same set and seed.

    nll and accuracy_consistent read the sequence mixture; the token mixture's NLL is shown beside.
    """
    has_conflict = conflict_sets.FAMILY[name].get('convention', 'global') != 'shared'
    d_nll = report['nll'] - single['nll']
    d_nll_token = report['nll_token_mixture'] - single['nll_token_mixture']
    d_acc = report['accuracy_consistent'] - single['accuracy_consistent']
    soft = report['soft_specialisation']
    answers = report['auroc_conflict_answers']
    misses = [what for what, ok in (
        ('starved', not report['starved_members']),
        ('soft', soft is None or (soft >= 0.5 if has_conflict else soft <= 0.1)),
        ('nll', round(d_nll, 6) <= 0.05), ('acc', round(d_acc, 6) >= -0.05),   # round: 0.6625 - 0.7125 is -0.0500...04
        ('auroc', not has_conflict or (report['auroc_conflict'] or 0) >= 0.9),
        ('auroc_answers', not has_conflict or (answers or 0) >= 0.9)) if not ok]
    return dict(set=name, seed=seed, variant=variant, soft_specialisation=soft,
                per_prompt_specialisation=report.get('per_prompt_specialisation'),
                starved=len(report['starved_members']), nll=report['nll'], d_nll=d_nll,
                nll_token_mixture=report['nll_token_mixture'], d_nll_token_mixture=d_nll_token,
                accuracy_consistent=report['accuracy_consistent'], d_acc=d_acc,
                accuracy_consistent_token_mixture=report['accuracy_consistent_token_mixture'],
                auroc_conflict=report['auroc_conflict'], auroc_conflict_answers=answers,
                auroc_conflict_token_mixture=report['auroc_conflict_token_mixture'],
                misses=misses)


def table(rows):
    """Markdown: one line per run, and the targets it misses."""
    lines = ['| set | variant | seed | soft_spec | per-prompt spec | starved | nll (Δ single) | '
             'nll token mixture (Δ single) | acc_consistent (Δ single) | acc token mixture | auroc_conflict | '
             'auroc token mixture | auroc answers | misses |',
             '|---' * 14 + '|']
    for r in rows:
        soft, per_prompt, auroc, auroc_token, answers = ('–' if r[key] is None else f"{r[key]:.2f}" for key in (
            'soft_specialisation', 'per_prompt_specialisation', 'auroc_conflict', 'auroc_conflict_token_mixture',
            'auroc_conflict_answers'))
        lines.append(f"| {r['set']} | {r['variant']} | {r['seed']} | {soft} | {per_prompt} | {r['starved']} | "
                     f"{r['nll']:.3f} ({r['d_nll']:+.3f}) | {r['nll_token_mixture']:.3f} ({r['d_nll_token_mixture']:+.3f}) | "
                     f"{r['accuracy_consistent']:.2f} ({r['d_acc']:+.2f}) | {r['accuracy_consistent_token_mixture']:.2f} | "
                     f"{auroc} | {auroc_token} | {answers} | {', '.join(r['misses']) or 'none'} |")
    return '\n'.join(lines)


def over_seeds(rows):
    """Markdown: each (set, variant) averaged over its seeds, beside the single adapter's spread from seed to seed.

    Consistent accuracy on 40 held-out prompts moves from one adapter to the next by about as much as its 0.05
    target: single adapters trained on the same files with other seeds differ by up to 0.2 (experiments/RESULTS.md). The
    mean over seeds averages part of that noise away; a mean of three seeds still moves by about 0.04.
    """
    runs = {}
    for r in rows:
        runs.setdefault((r['set'], r['variant']), []).append(r)
    lines = ['| set | variant | seeds | mean Δ nll | mean Δ acc_consistent | acc_consistent: ensemble | single adapter |',
             '|---' * 7 + '|']
    for (name, variant), group in runs.items():
        mean = lambda key: sum(r[key] for r in group) / len(group)
        spread = lambda values: f"{min(values):.2f}–{max(values):.2f}"
        single = [r['accuracy_consistent'] - r['d_acc'] for r in group]
        lines.append(f"| {name} | {variant} | {len(group)} | {mean('d_nll'):+.3f} | {mean('d_acc'):+.3f} | "
                     f"{spread([r['accuracy_consistent'] for r in group])} | {spread(single)} |")
    return '\n'.join(lines)


def main(argv):
    study, config = parse_study_args(STUDY, train_sft.defaults, argv)
    names = list(conflict_sets.FAMILY) if study['sets'] == 'all' else study['sets'].split(',')
    variants = study['variants'].split(',')
    for name in names:
        if name not in conflict_sets.FAMILY:
            raise UserError(f"--sets: unknown set {name!r}; known: {', '.join(conflict_sets.FAMILY)}")
    for variant in variants:
        if variant not in VARIANTS:
            raise UserError(f"--variants: unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    seeds = parse_seeds(study['seeds'])
    rows = []
    for name in names:
        for seed in seeds:
            runs = {variant: run(config, name, seed, variant, study['study_dir'], study['train'], study['reevaluate'])
                    for variant in ['single'] + variants}
            single = runs.pop('single')
            for variant, report in runs.items():
                if single is not None and report is not None:
                    rows.append(row(name, seed, variant, report, single))
    text, seeds_text = table(rows), over_seeds(rows)
    with open(os.path.join(study['study_dir'], 'results.json'), 'w') as f:
        json.dump(rows, f, indent=2)
    for file_name, markdown in (('table.md', text), ('over_seeds.md', seeds_text)):
        with open(os.path.join(study['study_dir'], file_name), 'w') as f:
            f.write(markdown + '\n')
    print(text + '\n\n' + seeds_text)


if __name__ == '__main__':
    run_script(main)
