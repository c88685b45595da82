"""
What alpha does on long responses when nothing holds it back: train_sft.py on a conflict set
with long responses (conflict_sets' `long`: every record response is 60 tokens) with the full
alpha from the first step (no hold, no ramp), over alpha x routing (by the summed log p_m(x),
or by the per-token log p_m(x) / |y|: per_token_objective), and one table and one figure of
how sharp the routing gets:

    entropy @ iter       the mean entropy of the responsibilities w(x) over the training examples
                         routed in the eval window ending at that iter (log M: every example trains
                         every member alike; 0: each trains one member alone)
    soft_specialisation  I(group; member) / H(group) on the held-out conflicting rows, after training
    starved, shares      each member's share of the training responsibility in the last window
                         (the routing the run trained with), and the members below 1/(4M) of it
    nll                  the held-out NLL per token of the sequence mixture

    python -m experiments.long_study                         # alpha 0.5,0.8,1,2 x normalise false,true; M = 4
    python -m experiments.long_study --members=8 --alphas=0.8 --normalise=false
    python -m experiments.long_study --max_iters=100 --eval_interval=10   # any train_sft.py key applies to every run
    python -m experiments.long_study --members=4,8 --train=false   # the table and figure of the finished runs
    python -m experiments.long_study --help                  # these keys; train_sft.py --help lists the others

A run whose report.json exists is not trained again. Writes study_dir/table.md, results.json and entropy.png.
"""
import itertools
import json
import os

import torch

import matplotlib
import numpy as np

import train_sft
from config import UserError, parse_args, run_script
from experiments import conflict_sets
from experiments.common import finished_report, parse_study_args
from experiments.robustness import write_set
from renyi_lora import check_alpha, renyi_loss, responsibilities, sequence_logprobs
from report import starved_members

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)

STUDY = dict(
    set='long',                 # a set of conflict_sets.FAMILY
    members='4',                # n_members of the runs (in place of train_sft.py's n_members)
    alphas='0.5,0.8,1,2',       # each trained with alpha_ramp_iters=0 and alpha_hold_iters=0: the full alpha at once
    normalise='false,true',     # route by the summed log p_m(x) (false), or by log p_m(x) / |y| (true)
    table_iters='10,20,50',     # the eval iters whose routing entropy the table shows, beside the last one
    study_dir='out/long_study',
    train=True,                 # false: only tabulate and draw the runs that have finished
)
NO_RAMP = dict(alpha_ramp_iters=0, alpha_hold_iters=0)


def per_token_renyi_loss(logp, alpha, n_tokens):
    """The alpha-Rényi loss routed by the per-token log-likelihood, each example at its whole-response scale
    (METHOD.md, appendix):

        loss   = -(1/B) sum_i |y_i| * l_alpha(log p_m(x_i) / |y_i|)  =  -(1/B) sum_i l_{alpha / |y_i|}(x_i)
        w_m(x) = softmax_m(alpha * log p_m(x) / |y|)                  (each example's order is alpha / |y|)

    logp (M, B), n_tokens (B,) the response lengths |y| -> (loss, responsibilities (M, B)).
    """
    per_token = logp / n_tokens                                               # (M, B)
    losses = torch.stack([renyi_loss(per_token[:, [i]], alpha) for i in range(per_token.shape[1])])   # (B,)
    return (n_tokens * losses).mean(), responsibilities(per_token.detach(), alpha)


def per_token_objective(logits, labels, indices, alpha):
    """train_sft.train's objective with per_token_renyi_loss. logits (M, B, T, V), labels (B, T)."""
    n_tokens = (labels[:, 1:] != -100).sum(-1).clamp(min=1)                  # (B,): |y|, at least 1
    return per_token_renyi_loss(sequence_logprobs(logits, labels), alpha, n_tokens)


def read_study(argv):
    """(study keys, train_sft config, [(n_members, length_normalise, alpha)] of the runs, table iters), every mistake
    a UserError."""
    study, config = parse_study_args(STUDY, train_sft.defaults, argv)
    if any(a.startswith('--n_members=') for a in argv):
        raise UserError("--n_members: this study takes --members=4,8")
    if study['set'] not in conflict_sets.FAMILY:
        raise UserError(f"--set={study['set']}: must be one of {', '.join(conflict_sets.FAMILY)}")
    alphas = [check_alpha(parse_number(text, 'alphas', float)) for text in study['alphas'].split(',')]
    normalise = [parse_args(dict(normalise=False), [f'--normalise={text}'])['normalise']
                 for text in study['normalise'].split(',')]
    members = [parse_number(text, 'members', int) for text in study['members'].split(',')]
    table_iters = [parse_number(text, 'table_iters', int) for text in study['table_iters'].split(',')]
    return study, config, list(itertools.product(members, normalise, alphas)), table_iters


def parse_number(text, key, kind):
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"--{key}: {text!r} is not a{'n int' if kind is int else ' number'}") from None


def run_dir(study_dir, n_members, alpha, length_normalise):
    return os.path.join(study_dir, 'runs', f"M{n_members}_alpha{alpha:g}_{'per_token' if length_normalise else 'sum'}")


def run(config, set_name, n_members, length_normalise, alpha, study_dir, train=True):
    """(report, history) of one run (common.finished_report); None when not run and not trained."""
    train_path, test_path = write_set(set_name, study_dir)
    out_dir = run_dir(study_dir, n_members, alpha, length_normalise)
    report = finished_report(config | NO_RAMP | dict(
        data=train_path, val_data=test_path, out_dir=out_dir, alpha=alpha, n_members=n_members), train,
        objective=per_token_objective if length_normalise else None)
    if report is None:
        return None
    return report, torch.load(os.path.join(out_dir, 'ckpt.pt'), weights_only=False)['history']


def row(n_members, alpha, length_normalise, report, history, table_iters):
    """The table's measures of one run; the routing entropy at each of table_iters (None where not evaluated)."""
    entropy_at = dict(zip(history['val_iter'], history['routing_entropy']))
    shares = history['member_share'][-1]                     # the last eval window's training routing
    return dict(n_members=n_members, alpha=alpha, length_normalise=length_normalise,
                entropy_at={it: entropy_at.get(it) for it in table_iters},
                final_iter=history['val_iter'][-1], final_entropy=history['routing_entropy'][-1],
                soft_specialisation=report['soft_specialisation'], member_share=shares,
                starved=starved_members(torch.tensor(shares)), nll=report['nll'])


def table(rows, table_iters):
    """Markdown: one line per run."""
    entropy_columns = [f'entropy @ {it}' for it in table_iters] + ['entropy @ last']
    lines = ['| M | alpha | log p routed | ' + ' | '.join(entropy_columns) +
             ' | soft_spec | starved | member shares (last window) | nll |',
             '|---' * (len(entropy_columns) + 7) + '|']
    for r in rows:
        entropies = ['–' if r['entropy_at'][it] is None else f"{r['entropy_at'][it]:.3f}" for it in table_iters]
        entropies.append(f"{r['final_entropy']:.3f} ({r['final_iter']})")
        soft = '–' if r['soft_specialisation'] is None else f"{r['soft_specialisation']:.2f}"
        lines.append(f"| {r['n_members']} | {r['alpha']:g} | {'per token' if r['length_normalise'] else 'sum'} | "
                     + ' | '.join(entropies) + f" | {soft} | {len(r['starved'])} | "
                     + ' '.join(f'{s:.2f}' for s in r['member_share']) + f" | {r['nll']:.3f} |")
    return '\n'.join(lines)


def routing_entropy_curves(path, panels):
    """Write one figure to path: a panel per routing, in it the mean routing entropy of each run against the iter.

    panels: {title: [(label, iters, entropies in nats, n_members)]}. A dotted line marks log M, the entropy of
    routing that trains every member alike; 0 means every example trains one member alone.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, (title, runs) in zip(axes[0], panels.items()):
        for label, iters, entropies, _ in runs:
            ax.plot(iters, entropies, 'o-', ms=3, label=label)
        for n_members in sorted({run[3] for run in runs}):
            ax.axhline(np.log(n_members), color='k', ls=':', lw=0.8)
            ax.text(ax.get_xlim()[0], np.log(n_members), f' log {n_members}', va='bottom', fontsize=8)
        ax.set_xlabel('iter (end of the eval window)')
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel('mean entropy of w(x) (nats)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv):
    study, config, runs, table_iters = read_study(argv)
    rows, curves = [], {'routing by log p': [], 'routing by log p / |y|': []}
    for n_members, length_normalise, alpha in runs:
        result = run(config, study['set'], n_members, length_normalise, alpha, study['study_dir'], study['train'])
        if result is None:
            continue
        report, history = result
        rows.append(row(n_members, alpha, length_normalise, report, history, table_iters))
        curves['routing by log p / |y|' if length_normalise else 'routing by log p'].append(
            (f"M {n_members}, alpha {alpha:g}", history['val_iter'], history['routing_entropy'], n_members))
    text = table(rows, table_iters)
    os.makedirs(study['study_dir'], exist_ok=True)
    with open(os.path.join(study['study_dir'], 'results.json'), 'w') as f:
        json.dump(rows, f, indent=2)
    with open(os.path.join(study['study_dir'], 'table.md'), 'w') as f:
        f.write(text + '\n')
    if rows:
        routing_entropy_curves(os.path.join(study['study_dir'], 'entropy.png'),
                                     {title: panel for title, panel in curves.items() if panel})
    print(text)


if __name__ == '__main__':
    run_script(main)
