"""
α-Rényi DPO of an ensemble of LoRA adapters, starting from a train_sft.py run.

    python train_dpo.py                              # the benchmark's preference pairs, from out/sft
    python train_dpo.py --sft_dir=out/sft_single --out_dir=out/dpo_single   # an M=1 SFT run: plain DPO
    python train_dpo.py --reference=base             # reference policy: the bare base model
    python train_dpo.py --data=pairs.jsonl --val_data=pairs_val.jsonl

The policy starts from the SFT run's M adapters. Each step runs chosen and rejected
responses through one forward pass of all members, forms each member's DPO
log-likelihood log p_m(x) = log sigmoid(beta * h_m(x)) (METHOD.md §1), shape (M, B),
and minimises renyi_loss(logp, alpha), the same loss as SFT: each preference trains
the members that already agree with it, so where annotator groups disagree the
members take sides (for alpha > 1; README, "Why the default α is above 1"). The reference log-probs come from a frozen copy of the
SFT adapters (member m's reference is SFT member m) or from the bare base model;
they never change, so they are computed once, without gradients, and cached.

No Gaussian prior here: DPO's reference term already keeps each member near its start.
"""
import copy
import json
import os
import time

import torch

import data
import plots
import train_sft
from config import parse_args
from evaluate import routing_matrix, safe_auroc
from lora import add_lora, lora_parameters
from pretrain import learning_rate
from renyi_lora import check_alpha, dpo_logp, dpo_loss, renyi_loss, sequence_logprobs

defaults = dict(
    # data: '' means the benchmark's preference pairs; otherwise JSONL files of {"prompt", "chosen", "rejected"}
    data='',
    val_data='',            # held-out pairs; '' holds out a seeded share of the training prompts
    val_fraction=0.1,       # share of prompts held out when --data is given without --val_data
    truncate=False,         # pairs longer than the base's block_size: error (False) or cut the prompt's start
    sft_dir='out/sft',      # the train_sft.py run to start from (its ckpt.pt); trained with its defaults when missing
    reference='sft',        # 'sft': member m's reference is its own frozen SFT adapter; 'base': the bare base model
    out_dir='out/dpo',
    resume=False,           # continue from out_dir/ckpt.pt
    # the objective; n_members and the LoRA shape come from the SFT run
    alpha=3.0,              # contested pairs split the members only for alpha > 1; why 3: see the README
    alpha_ramp_iters=0,     # raise alpha linearly from 0 over these first iters (0: no ramp), see train_sft.alpha_at
    beta=0.1,               # inverse temperature of the implied reward beta * log(pi / pi_ref)
    label_smoothing=0.0,    # conservative DPO: the share of preference labels assumed flipped
    # optimisation
    max_iters=150,
    batch_size=32,          # pairs per step; 2 * batch_size sequences per forward pass
    learning_rate=3e-3,
    min_lr=3e-4,            # linear warm-up over warmup_iters, then cosine decay to min_lr (pretrain.learning_rate)
    warmup_iters=20,
    weight_decay=0.0,
    grad_clip=1.0,
    log_interval=20,
    eval_interval=75,
    seed=1337,
    device='cuda' if torch.cuda.is_available() else 'cpu',
)


def load_sft(config):
    """The base GPT carrying the SFT run's adapters; trains the SFT run first when its ckpt.pt is missing."""
    ckpt_path = os.path.join(config['sft_dir'], 'ckpt.pt')
    if not os.path.exists(ckpt_path):
        print(f"{ckpt_path} not found: training the SFT ensemble first")
        train_sft.train(train_sft.defaults | dict(out_dir=config['sft_dir'], device=config['device']))
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=False)
    if ckpt['iter'] < ckpt['config']['max_iters']:
        print(f"warning: {ckpt_path} stopped at iter {ckpt['iter']} of {ckpt['config']['max_iters']}")
    model, tokenizer_name = train_sft.load_base(ckpt['config'] | dict(device=config['device']))
    lora = ckpt['lora_config']
    add_lora(model, lora['n_members'], lora['rank'], lora['lora_alpha'], lora['targets'], lora['layers'])
    model.load_state_dict(ckpt['adapters'], strict=False)  # the adapters alone; the base came from load_base
    train_sft.check_base(ckpt, model, ckpt_path)
    return model, tokenizer_name, ckpt['config']


def load_reference(model, sft_config, config):
    """The frozen reference policy: a copy of the SFT ensemble (logits (M, B, T, V)) or the bare base ((B, T, V))."""
    if config['reference'] == 'sft':
        reference = copy.deepcopy(model)
    else:
        reference, _ = train_sft.load_base(sft_config | dict(device=config['device']))
    return reference.requires_grad_(False).eval()


def mark_contested(rows):
    """Set each pair's "kind" from the data alone: "contested" when the same prompt also occurs with
    chosen and rejected swapped (annotators disagree), else "consensus". In place; returns rows."""
    pairs = {(row['prompt'], row['chosen'].strip(), row['rejected'].strip()) for row in rows}
    for row in rows:
        swapped = (row['prompt'], row['rejected'].strip(), row['chosen'].strip())
        row['kind'] = 'contested' if swapped in pairs else 'consensus'
    return rows


def load_rows(config):
    """Train, validation and test preference rows (dicts with prompt, chosen, rejected, group, kind, ...)."""
    if not config['data']:
        bench = data.make_benchmark(seed=0)
        return bench['dpo_train'], bench['dpo_val'], bench['dpo_test']
    rows = data.load_pref_jsonl(config['data'])
    if config['val_data']:
        train_rows, held_out = rows, data.load_pref_jsonl(config['val_data'])
    else:
        train_rows, held_out = data.split_by_prompt(rows, config['val_fraction'], seed=config['seed'])
    mark_contested(train_rows + held_out)
    return train_rows, held_out, held_out


def report_group(row):
    """The group a pair is reported under: "contested/<group>" (contested pairs by who annotated them)
    or "consensus" (every annotator agrees, so their groups need no split)."""
    if row.get('kind') == 'contested':
        return f"contested/{row['group']}" if row.get('group') else 'contested'
    return 'consensus'


def group_masks(rows):
    """{report group: (N,) boolean mask of its rows}, groups sorted."""
    groups = [report_group(row) for row in rows]
    return {group: torch.tensor([g == group for g in groups]) for group in sorted(set(groups))}


def pair_logprobs(model, chosen_idx, chosen_labels, rejected_idx, rejected_labels):
    """log pi(y_w|x) and log pi(y_l|x) from one concatenated forward pass: two (M, B) tensors ((1, B) for a bare base)."""
    logits = model(torch.cat([chosen_idx, rejected_idx]))                     # (M, 2B, T, V) or (2B, T, V)
    logps = sequence_logprobs(logits, torch.cat([chosen_labels, rejected_labels]))  # (M, 2B) or (2B,)
    return logps.view(-1, logps.shape[-1]).chunk(2, dim=-1)                    # 2 x (M or 1, B)


@torch.no_grad()
def score_pairs(model, encoded, pad_id, config):
    """pair_logprobs of every encoded pair, in order: (chosen, rejected), each (M, N) ((1, N) for a bare base)."""
    chosen, rejected = [], []
    for start in range(0, len(encoded), config['batch_size']):
        batch = data.pref_batch(encoded, range(start, min(start + config['batch_size'], len(encoded))), pad_id)
        chosen_logps, rejected_logps = pair_logprobs(model, *(t.to(config['device']) for t in batch))
        chosen.append(chosen_logps)
        rejected.append(rejected_logps)
    return torch.cat(chosen, dim=-1), torch.cat(rejected, dim=-1)


def train(config):
    """DPO-train the SFT run's ensemble per config; returns (model, tokenizer, report dict)."""
    check_alpha(config['alpha'])
    if config['reference'] not in ('sft', 'base'):
        raise ValueError(f"reference must be 'sft' or 'base', got {config['reference']!r}")
    torch.manual_seed(config['seed'])
    device = config['device']
    train_rows, val_rows, test_rows = load_rows(config)
    model, tokenizer_name, sft_config = load_sft(config)
    tokenizer = data.get_tokenizer(tokenizer_name)
    encoded = {name: data.encode_pref(rows, tokenizer, model.config.block_size, truncate=config['truncate'])
               for name, rows in (('train', train_rows), ('val', val_rows), ('test', test_rows))}
    model.to(device)
    reference = load_reference(model, sft_config, config).to(device)
    reference_logps = {name: score_pairs(reference, pairs, tokenizer.eot_token, config)
                       for name, pairs in encoded.items()}                     # {split: (chosen, rejected)}
    del reference
    os.makedirs(config['out_dir'], exist_ok=True)
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=config['learning_rate'], weight_decay=config['weight_decay'])
    start, history = 0, dict(iter=[], loss=[], val_iter=[], val_loss=[])
    ckpt_path = os.path.join(config['out_dir'], 'ckpt.pt')
    if config['resume']:
        start, history = train_sft.resume_from(ckpt_path, model, optimizer, config)
    batches = data.shuffled_batches(len(encoded['train']), config['batch_size'], config['seed'])
    for _ in range(start):
        next(batches)  # replay the order of a resumed run: the same batches as an uninterrupted one

    ref_chosen, ref_rejected = reference_logps['train']                       # (M or 1, N) each
    t_start = t_last = time.time()
    last_logged = start
    for it in range(start, config['max_iters']):
        for group in optimizer.param_groups:
            group['lr'] = learning_rate(it, config)
        indices = next(batches)
        batch = (t.to(device) for t in data.pref_batch(encoded['train'], indices, tokenizer.eot_token))
        policy_chosen, policy_rejected = pair_logprobs(model, *batch)         # (M, B) each
        logp = dpo_logp(policy_chosen, policy_rejected, ref_chosen[:, indices], ref_rejected[:, indices],
                        config['beta'], config['label_smoothing'])             # (M, B)
        loss = renyi_loss(logp, train_sft.alpha_at(it, config))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config['grad_clip'])
        optimizer.step()
        history['iter'].append(it)
        history['loss'].append(loss.item())
        done = it + 1
        if done % config['log_interval'] == 0 or done == config['max_iters']:
            now = time.time()
            ms = (now - t_last) * 1000 / (done - last_logged)
            eta = (now - t_start) / (done - start) * (config['max_iters'] - done)
            print(f"iter {done}: loss {loss.item():.4f}, {ms:.1f}ms, eta {eta:.0f}s", flush=True)
            t_last, last_logged = now, done
        if done % config['eval_interval'] == 0 or done == config['max_iters']:
            validate(model, encoded['val'], reference_logps['val'], tokenizer.eot_token, config, history, done)
            train_sft.save_checkpoint(ckpt_path, model, optimizer, done, config, history)
    train_seconds = time.time() - t_start

    report = dpo_report(model, encoded['test'], test_rows, reference_logps['test'], tokenizer.eot_token, config)
    train_margins, _ = reward_margins(model, encoded['train'], reference_logps['train'], tokenizer.eot_token, config)
    report['train_accuracy_by_group'] = {g: (train_margins[:, mask] > 0).float().mean(1).tolist()
                                         for g, mask in group_masks(train_rows).items()}  # learned, not generalised
    print("training pairs: " + ', '.join(f"{g} " + ' '.join(f"{a:.2f}" for a in accuracy)
                                         for g, accuracy in report['train_accuracy_by_group'].items()))
    report['train_seconds'] = round(train_seconds, 1)
    with open(os.path.join(config['out_dir'], 'report.json'), 'w') as f:
        json.dump(report, f, indent=2)
    return model, tokenizer, report


def reward_margins(model, encoded, reference_logps, pad_id, config):
    """Each member's implied reward margin beta * h_m(x) on every pair, (M, N), and its DPO log-likelihood, (M, N)."""
    model.eval()  # no dropout while scoring
    chosen, rejected = score_pairs(model, encoded, pad_id, config)
    model.train()
    _, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, *reference_logps, config['beta'])
    logp = dpo_logp(chosen, rejected, *reference_logps, config['beta'], config['label_smoothing'])
    return chosen_rewards - rejected_rewards, logp


def validate(model, encoded, reference_logps, pad_id, config, history, it):
    """α-Rényi DPO loss and each member's preference accuracy on the validation pairs; printed and logged."""
    margins, logp = reward_margins(model, encoded, reference_logps, pad_id, config)
    loss = renyi_loss(logp, config['alpha']).item()
    history['val_iter'].append(it)
    history['val_loss'].append(loss)
    print(f"eval {it}: val loss {loss:.4f}, accuracy per member " +
          ' '.join(f"{a:.2f}" for a in (margins > 0).float().mean(1).tolist()))


def dpo_report(model, encoded, rows, reference_logps, pad_id, config):
    """Per-group preference accuracy of each member and of the ensemble, margins, routing and auroc_contested.

    A pair counts as correct when its implied reward margin beta * h_m(x) is > 0. The
    ensemble's margin is the mean of the members' margins. Member disagreement on a
    pair is the standard deviation of the members' margins; auroc_contested asks how
    well it separates contested from consensus pairs (null without both kinds).
    """
    margins, logp = reward_margins(model, encoded, reference_logps, pad_id, config)  # (M, N) each
    columns = group_masks(rows)
    disagreement = margins.std(dim=0, unbiased=False)                              # (N,); 0 when M = 1
    kinds = [row.get('kind') for row in rows]
    report = dict(
        alpha=config['alpha'], beta=config['beta'], reference=config['reference'], n_members=margins.shape[0],
        accuracy_by_group={g: (margins[:, c] > 0).float().mean(1).tolist() for g, c in columns.items()},
        ensemble_accuracy_by_group={g: (margins[:, c].mean(0) > 0).float().mean().item() for g, c in columns.items()},
        mean_margin_by_group={g: margins[:, c].mean(1).tolist() for g, c in columns.items()},
        routing=routing_matrix(logp, config['alpha'], [report_group(row) for row in rows]),
        auroc_contested=safe_auroc(disagreement[torch.tensor([k == 'contested' for k in kinds])],
                                   disagreement[torch.tensor([k == 'consensus' for k in kinds])]))
    print(f"{'group':>18} {'pairs':>5}  accuracy per member (ensemble)  routing")
    for g, c in columns.items():
        print(f"{g:>18} {int(c.sum()):>5}  " + ' '.join(f"{a:.2f}" for a in report['accuracy_by_group'][g]) +
              f" ({report['ensemble_accuracy_by_group'][g]:.2f})  " + ' '.join(f"{w:.2f}" for w in report['routing'][g]))
    plots.dpo_plots(config['out_dir'], {g: margins[:, c] for g, c in columns.items()}, report['routing'])
    return report


def main(argv=None):
    config = parse_args(defaults, argv)
    _, _, report = train(config)
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (dict, list))}, indent=2))


if __name__ == '__main__':
    main()
