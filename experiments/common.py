"""
What the studies share: their command lines (a study's own keys mixed with those of the script it
runs), reading a finished run's report or training it first, and Markdown tables of reports.
"""
import json
import os

import train_sft
from config import UserError, parse_args


def parse_study_args(study_defaults, run_defaults, argv):
    """A study script's command line: (study, run config). Its own keys (study_defaults) and any key
    of the script it runs (run_defaults) mix freely, each as --key=value; --help prints the study's
    docstring and keys, and exits.
    """
    if '--help' in argv or '-h' in argv:
        parse_args(study_defaults, ['--help'])
    study_keys = [arg for arg in argv if arg.split('=')[0][2:] in study_defaults]
    return parse_args(study_defaults, study_keys), parse_args(run_defaults, [a for a in argv if a not in study_keys])


def parse_seeds(text, key='seeds'):
    """'1337,1,2' -> [1337, 1, 2]; a UserError naming --key for anything but comma-separated whole numbers."""
    try:
        return [int(seed) for seed in text.split(',')]
    except ValueError as error:
        raise UserError(f"--{key}: comma-separated whole numbers expected ({error})") from None


def finished_report(config, may_train=True, reevaluate=False, **hooks):
    """The report.json of the run in config['out_dir'], trained first unless it exists (None: absent, may_train false).

    A report written before today's read-outs (no auroc_conflict_token_mixture), or any report when
    reevaluate is true, is made again from the run's checkpoint: train resumes at its last step,
    trains no further and evaluates with today's code and held-out file. hooks go to train_sft.train
    (long_study.py's objective). The studies read their runs through this.
    """
    report_path = os.path.join(config['out_dir'], 'report.json')

    def read():
        with open(report_path) as f:
            return json.load(f)

    if not os.path.exists(report_path):
        if not may_train:
            return None
        print(f"== {config['out_dir']}", flush=True)
        train_sft.train(config, **hooks)
    elif may_train and (reevaluate or 'auroc_conflict_token_mixture' not in read()):
        print(f"== {config['out_dir']}: evaluated again from its checkpoint", flush=True)
        train_seconds = read()['train_seconds']
        _, _, report, _ = train_sft.train(config | dict(resume=True), **hooks)
        report['train_seconds'] = train_seconds          # the training's, not the re-evaluation's
        with open(report_path, 'w') as f:
            json.dump(report, f, indent=2)
    return read()


def markdown_table(rows, columns):
    """Markdown table of (label, report) rows; null metrics print as '–'."""
    lines = ['| run | ' + ' | '.join(columns) + ' |', '|---' * (len(columns) + 1) + '|']
    for label, report in rows:
        cells = ['–' if report[c] is None else f'{report[c]:.1f}' if c == 'train_seconds'
                 else f'{report[c]:.3f}' if isinstance(report[c], float) else str(report[c]) for c in columns]
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)
