"""
Why did a finished train_sft.py run read as it did? Four looks at it, from its checkpoint and
the files it trained and was tested on:

    python -m experiments.diagnose --run=out/sft
    python -m experiments.diagnose --run=out/robustness/imbalanced_80_20/default_seed1 --kind=consistent --top=8

  sides     within each task, the soft specialisation of the held-out rows that annotator groups
            gave (the parts that per_task_specialisation averages) and each group's mean posterior
            responsibility per member: which members took which side, task by task
  sharing   the entropy of the training rows' responsibilities softmax_m(alpha log p_m(x)) at the
            run's final alpha, by kind of row: log M when every member trains on a row alike, 0
            when one member trains on it alone
  tokens    where along a held-out response the members disagree: the mutual information between
            member and next token at the first response token, and its mean over the others, by
            kind; and the AUROC of conflicting against consistent prompts ranked by the first
            token's disagreement (auroc_conflict_token_mixture ranks them by the mean over all tokens)
  disagree  the held-out prompts of --kind that the members disagree about most (whole answers,
            evaluate.disagreement), with every member's greedy answer, beside the conflicting
            prompts' range

Reads only; writes nothing. experiments/RESULTS.md quotes its output.
"""
import math

import torch

import benchmark
import data
from config import UserError, parse_args, run_script
from evaluate import answers_by_kind, auroc, held_out_batches, score_rows
from renyi_lora import mutual_information, responsibilities, responsibility_entropy
from report import by_kind_of, per_prompt_mean, routing_matrix, specialisation_by
from trainer import load_ensemble

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
    as soft_specialisation uses. Tasks with a single group are left out (report.specialisation_by).
    """
    grouped = [i for i, row in enumerate(rows) if row.get('group') not in (None, benchmark.ALL)]
    groups, tasks = [rows[i]['group'] for i in grouped], [rows[i].get('task', '') for i in grouped]
    out = {}
    for task, specialisation in sorted(specialisation_by(logp[:, grouped], groups, tasks).items()):
        index = [j for j, t in enumerate(tasks) if t == task]
        out[task] = (specialisation, routing_matrix(logp[:, grouped][:, index], 1.0, [groups[j] for j in index]))
    return out


def sharing(logp, rows, alpha):
    """{kind: mean entropy of the responsibilities softmax_m(alpha * log p_m(x))} over the rows of each kind."""
    entropy = responsibility_entropy(responsibilities(logp.double(), alpha))                     # (N,)
    kinds = [row.get('kind', 'consistent') for row in rows]
    return {kind: entropy[[i for i, k in enumerate(kinds) if k == kind]].mean().item() for kind in sorted(set(kinds))}


@torch.no_grad()
def first_and_rest(model, tokenizer, rows, batch_size):
    """Per row, teacher-forced on its own response: the members' mutual information (nats) at the first response
    token, and its mean over the other response tokens, the closing end-of-text token included (nan where there is
    none: a response truncated to one token or to none). Two lists of N floats."""
    first, rest = [], []
    for idx, labels in held_out_batches(model, tokenizer, rows, batch_size):
        information = mutual_information(model(idx)[..., :-1, :].float().softmax(-1))      # (B, T-1)
        for row_information, mask in zip(information, labels[:, 1:] != -100):
            values = row_information[mask]                                                # the response's tokens
            first.append(values[0].item() if len(values) else float('nan'))
            rest.append(values[1:].mean().item() if len(values) > 1 else float('nan'))
    return first, rest


def token_disagreement(first, rest, rows):
    """{kind: (mean of first, mean of rest)} over the kind's rows, each mean leaving out the rows where it is nan."""
    def mean(values):
        values = [value for value in values if not math.isnan(value)]
        return sum(values) / len(values) if values else float('nan')

    out = {}
    for kind in sorted({row.get('kind', 'consistent') for row in rows}):
        index = [i for i, row in enumerate(rows) if row.get('kind', 'consistent') == kind]
        out[kind] = (mean([first[i] for i in index]), mean([rest[i] for i in index]))
    return out


def main(argv):
    config = parse_args(defaults, argv)
    if not (isinstance(config['top'], int) and config['top'] >= 1):
        raise UserError(f"top must be a whole number >= 1, got {config['top']!r}")
    model, tokenizer_name, run = load_ensemble(f"{config['run']}/ckpt.pt", config['device'])
    if 'sft_dir' in run:                     # only train_dpo.py's runs start from another run
        raise UserError(f"{config['run']} is a train_dpo.py run; diagnose.py reads train_sft.py runs")
    train_rows, _, test_rows, _ = data.sft_rows_of(run)
    kinds = sorted({row.get('kind', 'consistent') for row in test_rows})
    if config['kind'] not in kinds:
        raise UserError(f"kind {config['kind']!r}: the held-out rows of {config['run']} have {', '.join(kinds)}")
    tokenizer = data.get_tokenizer(tokenizer_name)
    model.eval()
    n_members = model.lora_config['n_members']

    print("sides: soft specialisation within each task, and each group's mean responsibility per member")
    for task, (specialisation, routing) in sides(score_rows(model, tokenizer, test_rows, config['batch_size'])['logp'],
                                                 test_rows).items():
        print(f"  {task or '(no task)'}: {specialisation:.2f}  " +
              '; '.join(f"{group} " + ' '.join(f"{w:.2f}" for w in weights) for group, weights in routing.items()))

    print(f"sharing: entropy of the training rows' responsibilities at alpha = {run['alpha']} "
          f"(log M = {math.log(n_members):.3f})")
    train_logp = score_rows(model, tokenizer, train_rows, config['batch_size'])['logp']
    for kind, entropy in sharing(train_logp, train_rows, run['alpha']).items():
        print(f"  {kind}: {entropy:.3f} nats")

    print("tokens: the members' disagreement (nats) at the first response token, and per token after it")
    first, rest = first_and_rest(model, tokenizer, test_rows, config['batch_size'])
    for kind, (at_first, after) in token_disagreement(first, rest, test_rows).items():
        print(f"  {kind}: {at_first:.3f}, {after:.3f}")
    by_kind = by_kind_of(per_prompt_mean(torch.tensor(first), test_rows),
                         {row['prompt']: row.get('kind', 'consistent') for row in test_rows})
    if by_kind.get('conflicting') and by_kind.get('consistent'):
        print(f"  AUROC of conflicting against consistent prompts by the first token's disagreement: "
              f"{auroc(torch.tensor(by_kind['conflicting']), torch.tensor(by_kind['consistent'])):.3f}")

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
