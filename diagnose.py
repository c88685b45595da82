"""
Why did a finished train_sft.py run read as it did? Three looks at it, from its checkpoint and
the files it trained and was tested on:

    python diagnose.py --run=out/sft
    python diagnose.py --run=out/robustness/imbalanced_80_20/default_seed1 --kind=consistent --top=8

  sides     within each task, the soft specialisation of the held-out rows that annotator groups
            gave (the parts that per_task_specialisation averages) and each group's mean posterior
            responsibility per member: which members took which side, task by task
  sharing   the entropy of the training rows' responsibilities softmax_m(alpha log p_m(x)) at the
            run's final alpha, by kind of row: log M when every member trains on a row alike, 0
            when one member trains on it alone
  disagree  the held-out prompts of --kind that the members disagree about most (whole answers,
            verdict.disagreement), with every member's greedy answer, beside the conflicting
            prompts' range

Reads only; writes nothing. RESULTS.md §9 quotes its output.
"""
import math

import torch

import benchmark
import data
from checkpoint import load_ensemble
from config import UserError, parse_args, run_script
from evaluate import score_rows
from renyi_lora import responsibilities, responsibility_entropy
from routing import routing_matrix, soft_specialisation
from verdict import answers_by_kind

defaults = dict(
    run='out/sft',          # a train_sft.py out_dir (its ckpt.pt)
    kind='consistent',      # the kind of held-out prompt whose disagreements `disagree` lists
    top=10,                 # how many of them
    batch_size=32,
    max_new_tokens=32,
    device='cuda' if torch.cuda.is_available() else 'cpu',
)


def sides(logp, rows):
    """{task: (soft specialisation, {group: [mean responsibility of each member]})} over the rows a group gave.

    logp: (M, N) log-likelihoods of rows. The responsibilities are the alpha = 1 posterior softmax_m(log p_m(x)),
    as soft_specialisation uses. Tasks with a single group are left out.
    """
    grouped = [i for i, row in enumerate(rows) if row.get('group') not in (None, benchmark.ALL)]
    out = {}
    for task in sorted({rows[i].get('task', '') for i in grouped}):
        index = [i for i in grouped if rows[i].get('task', '') == task]
        groups = [rows[i]['group'] for i in index]
        if len(set(groups)) > 1:
            out[task] = (soft_specialisation(logp[:, index], groups), routing_matrix(logp[:, index], 1.0, groups))
    return out


def sharing(logp, rows, alpha):
    """{kind: mean entropy of the responsibilities softmax_m(alpha * log p_m(x))} over the rows of each kind."""
    entropy = responsibility_entropy(responsibilities(logp.double(), alpha))                     # (N,)
    kinds = [row.get('kind', 'consistent') for row in rows]
    return {kind: entropy[[i for i, k in enumerate(kinds) if k == kind]].mean().item() for kind in sorted(set(kinds))}


def main(argv):
    config = parse_args(defaults, argv)
    if not (isinstance(config['top'], int) and config['top'] >= 1):
        raise UserError(f"top must be a whole number >= 1, got {config['top']!r}")
    model, tokenizer_name, run = load_ensemble(f"{config['run']}/ckpt.pt", config['device'])
    train_rows, _, test_rows, _ = data.load_sft_rows(run['data'], run['val_data'], run.get('ood_data', ''),
                                                     run.get('val_fraction', 0.1), run['seed'], run.get('corrupt', 0.0))
    kinds = sorted({row.get('kind', 'consistent') for row in test_rows})
    if config['kind'] not in kinds:
        raise UserError(f"kind {config['kind']!r}: the held-out rows of {config['run']} have {', '.join(kinds)}")
    tokenizer = data.get_tokenizer(tokenizer_name)
    model.eval()
    n_members = model.lora_config['n_members']

    print(f"sides: soft specialisation within each task, and each group's mean responsibility per member")
    for task, (specialisation, routing) in sides(score_rows(model, tokenizer, test_rows, config['batch_size'])['logp'],
                                                 test_rows).items():
        print(f"  {task or '(no task)'}: {specialisation:.2f}  " +
              '; '.join(f"{group} " + ' '.join(f"{w:.2f}" for w in weights) for group, weights in routing.items()))

    print(f"sharing: entropy of the training rows' responsibilities at alpha = {run['alpha']} "
          f"(log M = {math.log(n_members):.3f})")
    train_logp = score_rows(model, tokenizer, train_rows, config['batch_size'])['logp']
    for kind, entropy in sharing(train_logp, train_rows, run['alpha']).items():
        print(f"  {kind}: {entropy:.3f} nats")

    answers = answers_by_kind(model, tokenizer, test_rows, config['max_new_tokens'], config['batch_size'])
    conflicting = [answer['disagreement'] for answer in answers.get('conflicting', [])]
    ranked = sorted(answers[config['kind']], key=lambda answer: -answer['disagreement'])
    reference = (f"; conflicting prompts {min(conflicting):.3f}–{max(conflicting):.3f}" if conflicting else '')
    print(f"disagree: the {min(config['top'], len(ranked))} of {len(ranked)} {config['kind']} prompts with the most "
          f"disagreement about whole answers (nats{reference})")
    for answer in ranked[:config['top']]:
        print(f"  {answer['disagreement']:.3f}  {answer['prompt']!r}  members: " +
              ' | '.join(member['answer'].strip() for member in answer['members']))


if __name__ == '__main__':
    run_script(main)
