"""
Does the DPO default survive preference data it was not tuned on? train_dpo.py on the pair sets
of conflict_sets.make_pair_set (the SFT family's sets, row for row made into pairs), starting from
robustness.py's SFT runs of the same set and seed, beside plain DPO from the single adapter (M = 1):

    starved      members below 1/(4M) of the training pairs' responsibility (target 0)
    sides        for each annotator group, its best member's accuracy on the group's held-out
                 contested pairs (target >= 0.9 for every group: some member takes each side)
    consensus    the ensemble's accuracy on held-out consensus pairs, against plain DPO's
                 (target: at most 0.05 lower); beside it the worst member's on the training
                 consensus pairs, and plain DPO's (learned, not generalised)
    auroc        auroc_contested: the members' disagreement about the margin separating contested
                 from consensus pairs (target >= 0.9)
    answers      the ensemble's greedy accuracy by kind on the SFT run's held-out prompts, before and after
                 DPO (target: no kind more than 0.05 lower)
    every pair   for each ordered pair of groups (g, h), the best member's accuracy on the held-out
                 pairs of g's response over h's; the worst such pair (shown, not judged: with two
                 groups it is `sides`, with more it is what the pairwise loss asks)

    python -m experiments.dpo_robustness                                     # the sets with conflict, seed 1337
    python -m experiments.dpo_robustness --sets=user_160 --seeds=1337,1 --alpha=1.0 --prefix=dpo_a1   # any train_dpo.py key
    python -m experiments.dpo_robustness --train=false                       # the table of the runs that have finished

The SFT runs are trained first if missing (robustness.run), the DPO runs unless their report.json
exists. Runs go to study_dir/<set>/<prefix>_<variant>_seed<S>; writes study_dir/<prefix>_table.md.
"""
import json
import os

import torch

import data
import train_dpo
import train_sft
from config import UserError, run_script
from experiments import conflict_sets, robustness
from experiments.common import parse_seeds, parse_study_args

SETS = [name for name, knobs in conflict_sets.FAMILY.items() if knobs['convention'] != 'shared']
STUDY = dict(
    sets=','.join(name for name in SETS if name != 'large_2000'),   # sets with contested pairs, comma-separated
    seeds='1337',
    variants='default',     # robustness.py's SFT variants the DPO runs start from
    study_dir='out/robustness',
    prefix='dpo',           # runs go to <set>/<prefix>_<variant>_seed<S>: a new prefix for other train_dpo.py keys
    train=True,             # false: only tabulate the runs that have finished
)


def write_pairs(name, study_dir):
    """Write the pair set of `name` (seed 0) as JSONL; returns (train path, test path)."""
    paths = [os.path.join(study_dir, 'data', name, f'pairs_{split}.jsonl') for split in ('train', 'test')]
    splits = conflict_sets.make_pair_set(**conflict_sets.FAMILY[name], seed=0)
    for path, split in zip(paths, ('train', 'test')):
        data.write_jsonl(splits[split], path)
    return paths


def dpo_run(config, name, seed, variant, study_dir, prefix='dpo', train=True):
    """The DPO report of one (set, seed, SFT variant) run, its SFT run made first; None: not run, not trained."""
    if robustness.run(train_sft.defaults | dict(device=config['device']), name, seed, variant, study_dir, train) is None:
        return None
    train_path, test_path = write_pairs(name, study_dir)
    out_dir = os.path.join(study_dir, name, f'{prefix}_{variant}_seed{seed}')
    report_path = os.path.join(out_dir, 'report.json')
    if not os.path.exists(report_path):
        if not train:
            return None
        print(f"== {out_dir}", flush=True)
        train_dpo.train(config | dict(data=train_path, val_data=test_path, seed=seed, out_dir=out_dir,
                                      sft_dir=os.path.join(study_dir, name, f'{variant}_seed{seed}')))
    with open(report_path) as f:
        return json.load(f)


def pair_coverage(margins_by_group, pairs):
    """The worst over ordered pairs of groups (g, h) of the best member's accuracy on the pairs that prefer g's
    response to h's: 1 when every such preference has a member that holds it, whichever member that is.

    A member that ranks g above h serves (g over h) whether or not it ranks g above every other group; the
    α-Rényi loss of a pair asks no more, so with three or more groups the members can hold every pair without
    a member that takes each group's side against all others (sides). margins_by_group: train_dpo.py's
    margins.pt, {report group: (M, n) margins of its pairs in file order}; pairs: the same held-out pair rows,
    in file order. h is the group whose own pair on the same prompt chose the rejected response.
    """
    records = [pair for pair in pairs if pair['task'] == 'record']
    group_of = {(pair['prompt'], pair['chosen']): pair['group'] for pair in records}
    best = []
    for g in sorted({pair['group'] for pair in records}):
        rows = [pair for pair in records if pair['group'] == g]
        right = (margins_by_group[f'contested/{g}'] > 0).float()                 # (M, n)
        rejected = [group_of[(pair['prompt'], pair['rejected'])] for pair in rows]
        for h in sorted(set(rejected)):
            columns = [i for i, other in enumerate(rejected) if other == h]
            best.append(right[:, columns].mean(1).max().item())
    return min(best)


def coverage_of(name, seed, variant, study_dir, prefix):
    """pair_coverage of a finished DPO run; None when its margins.pt is missing."""
    path = os.path.join(study_dir, name, f'{prefix}_{variant}_seed{seed}', 'margins.pt')
    if not os.path.exists(path):
        return None
    return pair_coverage(torch.load(path), data.load_pref_jsonl(write_pairs(name, study_dir)[1]))


def row(name, seed, variant, report, single, coverage=None):
    """The table's measures of one DPO run against plain DPO on the same set and seed; coverage: pair_coverage."""
    accuracy = report['accuracy_by_group']
    sides = {group.split('/', 1)[1]: max(accuracy[group]) for group in accuracy if group.startswith('contested/')}
    consensus = report['ensemble_accuracy_by_group']['consensus']
    d_consensus = consensus - single['ensemble_accuracy_by_group']['consensus']
    starved = report.get('starved_members', [])
    answers, before = report.get('answer_accuracy', {}), report.get('answer_accuracy_sft', {})  # absent in old reports
    fallen = [kind for kind in answers if round(answers[kind] - before[kind], 6) < -0.05]
    misses = [what for what, ok in (
        ('starved', not starved), ('sides', min(sides.values()) >= 0.9), ('consensus', round(d_consensus, 6) >= -0.05),
        ('auroc', (report['auroc_contested'] or 0) >= 0.9), ('answers', not fallen)) if not ok]
    return dict(set=name, seed=seed, variant=variant, starved=len(starved), sides=sides, consensus=consensus,
                d_consensus=d_consensus, worst_member_training_consensus=min(report['train_accuracy_by_group']['consensus']),
                single_training_consensus=single['train_accuracy_by_group']['consensus'][0],
                single_sides=max(single['accuracy_by_group'][f'contested/{g}'][0] for g in sides),
                auroc_contested=report['auroc_contested'], pair_coverage=coverage,
                answers={kind: (before[kind], answers[kind]) for kind in sorted(answers)}, misses=misses)


def table(rows):
    """Markdown: one line per run, and the targets it misses."""
    lines = ['| set | variant | seed | starved | best member per group | every pair of groups: worst | '
             'plain DPO: best group | consensus (Δ plain) | training consensus: worst member (plain) | '
             'auroc_contested | answers: SFT → DPO | misses |', '|---' * 12 + '|']
    for r in rows:
        sides = ' / '.join(f"{accuracy:.2f}" for _, accuracy in sorted(r['sides'].items()))
        auroc, coverage = ('–' if r[key] is None else f"{r[key]:.2f}" for key in ('auroc_contested', 'pair_coverage'))
        answers = ', '.join(f"{kind} {sft:.2f} → {dpo:.2f}" for kind, (sft, dpo) in r.get('answers', {}).items()) or '–'
        lines.append(f"| {r['set']} | {r['variant']} | {r['seed']} | {r['starved']} | {sides} | {coverage} | "
                     f"{r['single_sides']:.2f} | {r['consensus']:.2f} ({r['d_consensus']:+.2f}) | "
                     f"{r['worst_member_training_consensus']:.2f} ({r['single_training_consensus']:.2f}) | {auroc} | "
                     f"{answers} | {', '.join(r['misses']) or 'none'} |")
    return '\n'.join(lines)


def main(argv):
    study, config = parse_study_args(STUDY, train_dpo.defaults, argv)
    names, variants = study['sets'].split(','), study['variants'].split(',')
    for name in names:
        if name not in SETS:
            raise UserError(f"--sets: unknown set {name!r}; sets with contested pairs: {', '.join(SETS)}")
    for variant in variants:
        if variant not in robustness.VARIANTS or variant == 'single':
            raise UserError(f"--variants: unknown variant {variant!r}; known: "
                            f"{', '.join(v for v in robustness.VARIANTS if v != 'single')}")
    seeds = parse_seeds(study['seeds'])
    rows = []
    for name in names:
        for seed in seeds:
            single = dpo_run(config, name, seed, 'single', study['study_dir'], study['prefix'], study['train'])
            for variant in variants:
                report = dpo_run(config, name, seed, variant, study['study_dir'], study['prefix'], study['train'])
                if single is not None and report is not None:
                    coverage = coverage_of(name, seed, variant, study['study_dir'], study['prefix'])
                    rows.append(row(name, seed, variant, report, single, coverage))
    text = table(rows)
    with open(os.path.join(study['study_dir'], f"{study['prefix']}_table.md"), 'w') as f:
        f.write(text + '\n')
    print(text)


if __name__ == '__main__':
    run_script(main)
