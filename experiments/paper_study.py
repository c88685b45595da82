"""
Where the seed paper runs the method, M = 8 members at alpha = 0.8, beside this repository's
default, alpha = 0 and a single adapter, on the benchmark over seeds; the paper's claims
read from the runs' reports (experiments/RESULTS.md, "The paper's operating point"):

    setting   soft and per-prompt specialisation by annotator, task_specialisation (claim a:
              members split the tasks), starved members, NLL, accuracy, AUROCs
    by_single accuracy on the held-out prompts the single adapter (same seed) got right and on
              those it got wrong (claim b: the gains sit on the prompts it got wrong)
    noise     with a share of the consistent training responses made wrong (benchmark.py --corrupt): the
              clean held-out accuracy of the ensemble and of its best member, and how the
              corrupted rows' responsibility spreads over the members against the clean rows'
              (claim c: the responsibilities keep wrong labels on few members)
    ambiguity conflict should read as epistemic and many acceptable answers as aleatoric:
              the AUROCs of evaluate.epistemic_aurocs and answer_aurocs, and the scores' means by kind

    python -m experiments.paper_study                                  # every variant, seeds 1337, 1, 2; noise 0.2 at 1337
    python -m experiments.paper_study --variants=paper,single --seeds=1337 --noise=0.1,0.2
    python -m experiments.paper_study --train=false                    # the tables of the runs that have finished

Runs live in study_dir/<variant>_seed<seed> and study_dir/noise<share>_<variant>_seed<seed>; a
run whose report.json exists is not trained again, and an older report is evaluated again
from its checkpoint (common.finished_report). Writes study_dir/tables.md.
"""
import os

import benchmark
import data
import train_sft
from config import UserError, run_script
from experiments.common import finished_report, markdown_table, parse_study_args

# train_sft.py overrides of each variant
VARIANTS = {
    'single': dict(n_members=1),
    'default': {},                                                    # M = 4, alpha 2, held at 0, then ramped
    'alpha_0': dict(n_members=8, alpha=0.0, alpha_ramp_iters=0, alpha_hold_iters=0),
    'paper': dict(n_members=8, alpha=0.8, alpha_ramp_iters=0, alpha_hold_iters=0),
    'paper_ramp': dict(n_members=8, alpha=0.8),                        # the default's hold and ramp, to 0.8
}
STUDY = dict(
    variants=','.join(VARIANTS),    # keys of VARIANTS, comma-separated
    seeds='1337,1,2',
    noise='0.2',            # shares of label noise (benchmark.corrupt_responses), each a run per variant and noise seed
    noise_seeds='1337',
    study_dir='out/paper',
    train=True,             # false: only tabulate the runs that have finished
)


def run_dir(study_dir, variant, seed, noise=0.0):
    """study_dir/<variant>_seed<seed>, or noise<share>_<variant>_seed<seed> with label noise."""
    return os.path.join(study_dir, (f'noise{noise}_' if noise else '') + f'{variant}_seed{seed}')


def noise_files(study_dir, share):
    """The benchmark with a share of its consistent training responses made wrong, written as JSONL (as
    `python benchmark.py --corrupt=share` does): the train_sft.py keys that train on it and test on its test split."""
    splits, paths = benchmark.make_benchmark(seed=0, corrupt=share), {}
    for key, name, rows in (('data', 'sft_train', splits['sft_train']),
                            ('val_data', 'sft_held_out', splits['sft_test'] + splits['ood'])):   # OOD: kind "ood"
        paths[key] = os.path.join(study_dir, 'data', f'noise{share}', f'{name}.jsonl')
        data.write_jsonl(rows, paths[key])
    return paths


def setting_row(report):
    """The measures of one run on the clean benchmark (claim a and the report's headline numbers)."""
    keys = ('soft_specialisation', 'per_prompt_specialisation', 'task_specialisation', 'nll', 'accuracy_consistent',
            'accuracy_high_entropy', 'accuracy_conflicting', 'auroc_conflict', 'auroc_conflict_answers', 'auroc_ood')
    return {key: report.get(key) for key in keys} | dict(starved=len(report['starved_members']))


def split_by_single(report, single):
    """Accuracy (sequence mixture, greedy) on the prompts the single adapter answered right and on those it missed.

    report, single: reports with greedy_correct {prompt: 1 or 0} over the same held-out prompts.
    """
    if not report.get('greedy_correct') or not single.get('greedy_correct'):   # a report older than the key
        return dict(n_single_right=None, accuracy_single_right=None, n_single_wrong=None, accuracy_single_wrong=None)
    right = [p for p, ok in single['greedy_correct'].items() if ok]
    wrong = [p for p, ok in single['greedy_correct'].items() if not ok]
    share = lambda prompts: sum(report['greedy_correct'][p] for p in prompts) / len(prompts) if prompts else None
    return dict(n_single_right=len(right), accuracy_single_right=share(right),
                n_single_wrong=len(wrong), accuracy_single_wrong=share(wrong))


def noise_row(report, clean):
    """Clean held-out accuracy under label noise, its drop from the clean run, and where the noisy rows went."""
    best_of = lambda r: max(r['member_accuracy_consistent']) if r and r.get('member_accuracy_consistent') else None
    best, best_clean = best_of(report), best_of(clean)
    routing = report['noise_routing'] or {}
    spread = lambda rows, key: routing[rows][key] if routing else None
    return dict(accuracy_consistent=report['accuracy_consistent'],
                drop=clean['accuracy_consistent'] - report['accuracy_consistent'] if clean else None,
                best_member=best, best_member_drop=None if None in (best, best_clean) else best_clean - best,
                entropy_corrupted=spread('corrupted', 'entropy'), entropy_clean=spread('clean', 'entropy'),
                top_share_corrupted=spread('corrupted', 'top_share'), top_share_clean=spread('clean', 'top_share'))


def ambiguity_row(report):
    """Does conflict read as epistemic and ambiguity as aleatoric? AUROCs and means by kind."""
    by_kind = lambda key, kind: (report.get(key) or {}).get(kind)
    return dict(auroc_conflict_vs_ambiguous=report.get('auroc_conflict_vs_ambiguous'),
                auroc_conflict_vs_ambiguous_answers=report.get('auroc_conflict_vs_ambiguous_answers'),
                auroc_ambiguous_aleatoric=report.get('auroc_ambiguous_aleatoric'),
                epistemic_conflicting=by_kind('epistemic_by_kind', 'conflicting'),
                epistemic_high_entropy=by_kind('epistemic_by_kind', 'high_entropy'),
                aleatoric_conflicting=by_kind('aleatoric_by_kind', 'conflicting'),
                aleatoric_high_entropy=by_kind('aleatoric_by_kind', 'high_entropy'),
                disagreement_conflicting=by_kind('disagreement_by_kind', 'conflicting'),
                disagreement_high_entropy=by_kind('disagreement_by_kind', 'high_entropy'))


def tables(reports):
    """The study's four markdown tables from {(variant, seed, noise): report}, in that order of keys."""
    label = lambda variant, seed, noise: f'{variant} / {seed}' + (f' / noise {noise}' if noise else '')
    clean = {(variant, seed): report for (variant, seed, noise), report in reports.items() if not noise}
    sections = dict(
        setting=[(label(v, s, 0), setting_row(r)) for (v, s), r in clean.items()],
        by_single=[(label(v, s, 0), split_by_single(r, clean['single', s])) for (v, s), r in clean.items()
                   if v != 'single' and ('single', s) in clean],
        noise=[(label(v, s, n), noise_row(r, clean.get((v, s)))) for (v, s, n), r in reports.items() if n],
        ambiguity=[(label(v, s, 0), ambiguity_row(r)) for (v, s), r in clean.items() if v != 'single'])
    return '\n\n'.join(f'### {name}\n\n' + markdown_table(rows, list(rows[0][1]))
                       for name, rows in sections.items() if rows)


def main(argv):
    study, config = parse_study_args(STUDY, train_sft.defaults, argv)
    variants = study['variants'].split(',')
    for variant in variants:
        if variant not in VARIANTS:
            raise UserError(f"--variants: unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    try:
        seeds, noise_seeds = ([int(s) for s in study[key].split(',')] for key in ('seeds', 'noise_seeds'))
        noise_shares = [float(share) for share in study['noise'].split(',') if share]
    except ValueError as error:
        raise UserError(f"--seeds, --noise_seeds, --noise: comma-separated numbers expected ({error})")
    if any(not 0 < share < 1 for share in noise_shares):
        raise UserError(f"--noise: every share must lie in (0, 1), got {study['noise']}")
    runs = [(v, s, 0.0) for v in variants for s in seeds] + [
        (v, s, n) for n in noise_shares for v in variants for s in noise_seeds]
    reports = {}
    for variant, seed, noise in runs:
        out_dir = run_dir(study['study_dir'], variant, seed, noise)
        run_config = config | VARIANTS[variant] | dict(seed=seed, out_dir=out_dir)
        if noise:
            run_config |= noise_files(study['study_dir'], noise)
        report = finished_report(run_config, study['train'])
        if report is not None:
            reports[variant, seed, noise] = report
    text = tables(reports)
    with open(os.path.join(study['study_dir'], 'tables.md'), 'w') as f:
        f.write(text + '\n')
    print(text)


if __name__ == '__main__':
    run_script(main)
