"""
α-Rényi DPO of an ensemble of LoRA adapters, starting from a train_sft.py run.

    python train_dpo.py                              # the benchmark's preference pairs, from out/sft
    python train_dpo.py --sft_dir=out/sft_single --out_dir=out/dpo_single   # from an M=1 SFT run: one adapter
    python train_dpo.py --reference=base             # reference policy: the bare base model
    python train_dpo.py --reference=0.1              # log pi_ref: 0.9 x each member's SFT adapter's + 0.1 x the base's
    python train_dpo.py --data=pairs.jsonl --val_data=pairs_val.jsonl

The policy starts from the SFT run's M adapters. Each step runs chosen and rejected
responses through one forward pass of all members, forms each member's DPO
log-likelihood log p_m(x) = log sigmoid(beta * h_m(x)) (METHOD.md §1), shape (M, B),
and minimises renyi_loss(logp, alpha), the loss of SFT: each preference trains
the members that already agree with it, so where annotator groups disagree the
members take sides (for alpha > 1). With sft_weight, each member also learns the chosen
responses of the pairs routed to it, so that the margins do not grow by pushing the
answers down; with sft_replay, each step also takes the SFT run's own loss on a batch of
its training rows, so that pairs on new prompts do not overwrite what SFT taught. The
reference log-probs mix, in log space, a frozen copy of the SFT adapters (member m's
reference is SFT member m) and the bare base model (reference_logprobs); they never
change, so they are computed once, without gradients, and cached.

At every evaluation the log shows what DPO does to generations: each member's likelihood of
the chosen and rejected responses against the SFT start, and the greedy accuracy on the SFT
run's held-out prompts against the SFT run's, with a warning when it falls; the report keeps both.
"""
import copy
import json
import os

import torch

import data
from config import UserError, parse_args, run_script, to_device
from evaluate import device_of, safe_auroc
from lora import lora_parameters
from renyi_lora import alpha_at, check_alpha, dpo_logp, dpo_loss, renyi_loss, sequence_logprobs
from report import answer_accuracy, member_shares, routing_matrix, starved_members
from trainer import (check_settings, load_base, load_ensemble, read_resume, resume_from, run_base, set_precision,
                     train_loop)

defaults = dict(
    # data: '' means the benchmark's preference pairs; otherwise JSONL files of {"prompt", "chosen", "rejected"}
    data='',
    val_data='',            # held-out pairs; '' holds out a seeded 10 % of the training prompts
    sft_dir='out/sft',      # the train_sft.py run to start from (its ckpt.pt): `python train_sft.py --out_dir=...`
    reference='sft',        # 'sft': member m's reference is its own frozen SFT adapter; 'base': the bare base model;
                            # a number k in [0, 1]: log pi_ref = (1 - k) log pi_sft_m + k log pi_base
    out_dir='out/dpo',
    resume=False,           # continue from out_dir/ckpt.pt
    # the objective; n_members and the LoRA shape come from the SFT run
    alpha=3.0,              # only alpha > 1 splits a contested pair and its swap (flat in the members' spread at 1)
    alpha_ramp_iters=0,     # raise alpha linearly from 0 over these first iters (0: no ramp), see renyi_lora.alpha_at
    beta=0.3,               # inverse temperature of the implied reward beta * log(pi / pi_ref); larger: closer to pi_ref
    label_smoothing=0.0,    # conservative DPO: the share of preference labels assumed flipped
    sft_weight=1.0,         # gamma: each member also learns the chosen responses of the pairs routed to it (per-token
                            # NLL, renyi_lora.dpo_logp), so margins do not grow by pushing the answers down; 0: off
    sft_replay=1.0,         # rho: each step also takes rho x the SFT run's loss on batch_size of its training rows
                            # (replay_loss), so pairs on new prompts do not overwrite what SFT taught; 0: off
    # optimisation
    max_iters=150,
    batch_size=32,          # pairs per step; 2 * batch_size sequences per forward pass
    learning_rate=3e-3,
    min_lr=3e-4,            # linear warm-up over warmup_iters, then cosine decay to min_lr (trainer.learning_rate)
    warmup_iters=20,
    weight_decay=0.0,
    grad_clip=1.0,
    log_interval=20,
    eval_interval=75,
    max_new_tokens=32,      # the longest answer decoded when the log and report check the model still answers
    seed=1337,
    device='cuda' if torch.cuda.is_available() else 'cpu',
    dtype='auto',           # the frozen base and forward pass (float32|bfloat16|float16; auto: bf16 on CUDA that has it)
    compile=False,          # torch.compile the training step's forward; the first steps wait for the compiler
)


ANSWER_KINDS = ('consistent', 'conflicting', 'high_entropy')   # SFT prompts whose greedy answers the log checks
ANSWER_TOLERANCE = 0.05     # a fall of the ensemble's accuracy beyond this (and beyond one prompt) is warned about


def load_sft(config):
    """The base GPT carrying the SFT run's adapters: (model, tokenizer name, the SFT run's config); UserError
    when sft_dir holds no SFT run."""
    ckpt_path = os.path.join(config['sft_dir'], 'ckpt.pt')
    if not os.path.isfile(ckpt_path):
        raise UserError(f"--sft_dir={config['sft_dir']}: {ckpt_path} not found; train the SFT ensemble first, "
                        f"with `python train_sft.py --out_dir={config['sft_dir']}`")
    return load_ensemble(ckpt_path, config['device'])


def base_share(reference):
    """k in log pi_ref = (1 - k) log pi_sft_m + k log pi_base: 0 for 'sft', 1 for 'base', else the number given;
    UserError for anything else."""
    named = {'sft': 0.0, 'base': 1.0}
    try:
        share = named[reference] if reference in named else float(reference)
    except (TypeError, ValueError):
        share = float('nan')
    if not 0 <= share <= 1:                  # also refuses nan
        raise UserError(f"reference must be 'sft', 'base' or a number in [0, 1], got {reference!r}")
    return share


def load_reference(model, sft_config, config, kind):
    """A frozen reference policy: kind 'sft', a copy of the SFT ensemble (logits (M, B, T, V)); 'base', the bare
    base ((B, T, V))."""
    if kind == 'sft':
        reference = copy.deepcopy(model)                      # in the policy's dtype already
    else:
        reference, _ = load_base(run_base(sft_config), config['device'])
        set_precision(reference.requires_grad_(False), config)
    return reference.requires_grad_(False).eval().to(config['device'])


def reference_logprobs(model, sft_config, config, encoded, pad_id):
    """log pi_ref of every pair's chosen and rejected response, {split: (chosen, rejected)}, each (M, N) ((1, N)
    with the bare base alone): (1 - k) times the SFT members' own plus k times the base's, k = base_share.
    k = 0 starts every member's margin h_m at 0, so DPO splits the contested pairs afresh; k = 1 starts it at
    what SFT taught member m (METHOD.md A.3). Computed once, without gradients: the reference never changes."""
    share, logps = base_share(config['reference']), {}
    for kind, weight in (('sft', 1 - share), ('base', share)):
        if weight == 0:
            continue
        reference = load_reference(model, sft_config, config, kind)
        for name, pairs in encoded.items():
            chosen, rejected = score_pairs(reference, pairs, pad_id, config['batch_size'])
            # the sums start at 0.0; the base's (1, N) broadcasts against the SFT members' (M, N)
            before_chosen, before_rejected = logps.get(name, (0.0, 0.0))
            logps[name] = (before_chosen + weight * chosen, before_rejected + weight * rejected)
        del reference                        # one reference model in memory at a time
    return logps


def train(config):
    """DPO-train the SFT run's ensemble per config; returns (model, tokenizer, report dict)."""
    check_settings(config, positive=('beta',))
    check_alpha(config['alpha'])
    for key in ('sft_weight', 'sft_replay'):
        if not config[key] >= 0:          # NaN fails too
            raise UserError(f"--{key}={config[key]}: must be >= 0")
    base_share(config['reference'])
    torch.manual_seed(config['seed'])
    device = config['device']
    train_rows, val_rows, test_rows = data.load_pref_rows(config['data'], config['val_data'], seed=config['seed'])
    model, tokenizer_name, sft_config = load_sft(config)
    lora = model.lora_config
    resume = (read_resume(config['out_dir'], lora['n_members'], lora['rank'], lora['lora_alpha'])
              if config['resume'] else None)
    tokenizer = data.get_tokenizer(tokenizer_name)
    encoded = {name: data.encode_pref(rows, tokenizer, model.config.block_size)
               for name, rows in (('train', train_rows), ('val', val_rows), ('test', test_rows))}
    chosen_lengths = {name: torch.tensor([len(ids) - n_prompt for (ids, n_prompt), _ in pairs])   # |y_w|, (N,)
                      for name, pairs in encoded.items()}
    sft_rows = data.sft_rows_of(sft_config)
    answer_rows = [row for row in sft_rows[2] if row.get('kind') in ANSWER_KINDS]
    sft_set = data.encode_sft(sft_rows[0], tokenizer, model.config.block_size)
    set_precision(model, config).to(device)   # every input is checked: from here on the work is expensive
    reference_logps = reference_logprobs(model, sft_config, config, encoded, tokenizer.eot_token)
    os.makedirs(config['out_dir'], exist_ok=True)
    params = lora_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=config['learning_rate'], weight_decay=config['weight_decay'],
                                  fused=device.startswith('cuda'))    # CUDA: one kernel for all
    start, history = 0, dict(iter=[], loss=[], val_iter=[], val_loss=[], generations=[])
    ckpt_path = os.path.join(config['out_dir'], 'ckpt.pt')
    if resume is not None:
        start, history = resume_from(resume, ckpt_path, model, optimizer, config)
    else:   # what the SFT run answered, and how likely its members found the held-out pairs' responses
        history['sft_start'] = dict(val=pair_likelihoods(model, encoded['val'], tokenizer.eot_token, config),
                                    test=pair_likelihoods(model, encoded['test'], tokenizer.eot_token, config))
        history['sft_start']['answers'] = answer_accuracy(model, tokenizer, answer_rows, config['max_new_tokens'],
                                                          config['batch_size'])
    ref_chosen, ref_rejected = reference_logps['train']                       # (M or 1, N) each

    def batch_loss(forward, indices, it):
        """The members' DPO log-likelihoods logp (M, B) of a batch of pairs, renyi_loss of them, plus the replay."""
        batch = to_device(data.pref_batch(encoded['train'], indices, tokenizer.eot_token), device)
        policy_chosen, policy_rejected = pair_logprobs(forward, *batch)       # (M, B) each
        logp = dpo_logp(policy_chosen, policy_rejected, ref_chosen[:, indices], ref_rejected[:, indices],
                        config['beta'], config['label_smoothing'], config['sft_weight'],
                        chosen_lengths['train'][indices].to(device))           # (M, B)
        loss = renyi_loss(logp, alpha_at(it, config['alpha'], config['alpha_ramp_iters']))
        replay = replay_loss(forward, sft_set, tokenizer.eot_token, sft_config, config, it) if config['sft_replay'] else 0
        return loss + config['sft_replay'] * replay

    def validate_at(it):
        validate(model, encoded['val'], reference_logps['val'], chosen_lengths['val'], tokenizer.eot_token, config,
                 history, it)
        watch_generations(model, tokenizer, encoded['val'], answer_rows, config, history, it)

    batches = data.shuffled_batches(len(encoded['train']), config['batch_size'], config['seed'])
    train_seconds = train_loop(model, params, optimizer, batches, batch_loss, config, history, start,
                               validate=validate_at, ckpt_path=ckpt_path)

    report, margins_by_group = dpo_report(model, encoded['test'], test_rows, reference_logps['test'],
                                          chosen_lengths['test'], tokenizer.eot_token, config)
    report = dict(alpha=config['alpha'], beta=config['beta'], reference=config['reference']) | report
    print_report(report, margins_by_group)
    torch.save(margins_by_group, os.path.join(config['out_dir'], 'margins.pt'))  # the test pairs' margins: plots.py
    train_margins, train_logp = reward_margins(model, encoded['train'], reference_logps['train'],
                                               chosen_lengths['train'], tokenizer.eot_token, config)
    shares = member_shares(train_logp, config['alpha'])  # of the training pairs' responsibility, as in train_sft.py
    report['member_share'], report['starved_members'] = shares.tolist(), starved_members(shares)
    report['train_accuracy_by_group'] = {g: (train_margins[:, mask] > 0).float().mean(1).tolist()
                                         for g, mask in group_masks(train_rows).items()}  # learned, not generalised
    print("training pairs: " + ', '.join(f"{g} " + ' '.join(f"{a:.2f}" for a in accuracy)
                                         for g, accuracy in report['train_accuracy_by_group'].items()))
    start_test, start_answers = history['sft_start']['test'], history['sft_start']['answers']
    report |= pair_likelihoods(model, encoded['test'], tokenizer.eot_token, config) | {
        f'{key}_sft': value for key, value in start_test.items()}
    report |= answer_accuracy(model, tokenizer, answer_rows, config['max_new_tokens'], config['batch_size'])
    report |= {f'{key}_sft': value for key, value in start_answers.items()}
    report['train_seconds'] = round(train_seconds, 1)
    with open(os.path.join(config['out_dir'], 'report.json'), 'w') as f:
        json.dump(report, f, indent=2)
    return model, tokenizer, report


def replay_indices(n_rows, batch_size, seed, it):
    """The SFT rows replayed at step it: batch_size distinct indices below n_rows, drawn from (seed, it) alone, so a
    resumed run replays the rows an uninterrupted one would."""
    generator = torch.Generator().manual_seed(seed * 100_003 + it)
    return torch.randperm(n_rows, generator=generator)[:batch_size].tolist()


def replay_loss(forward, sft_set, pad_id, sft_config, config, it):
    """The SFT run's α-Rényi loss on the rows replay_indices draws: renyi_loss at the SFT run's alpha of the members'
    sequence log-likelihoods logp (M, B), without its prior (METHOD.md §1)."""
    indices = replay_indices(len(sft_set), config['batch_size'], config['seed'], it)
    idx, labels = to_device(data.sft_batch(sft_set, indices, pad_id), config['device'])
    return renyi_loss(sequence_logprobs(forward(idx), labels), sft_config['alpha'])


def validate(model, encoded, reference_logps, chosen_lengths, pad_id, config, history, it):
    """α-Rényi DPO loss and each member's preference accuracy on the validation pairs; printed and logged."""
    margins, logp = reward_margins(model, encoded, reference_logps, chosen_lengths, pad_id, config)
    loss = renyi_loss(logp, config['alpha']).item()
    history['val_iter'].append(it)
    history['val_loss'].append(loss)
    print(f"eval {it}: val loss {loss:.4f}, accuracy per member " +
          ' '.join(f"{a:.2f}" for a in (margins > 0).float().mean(1).tolist()))


def pair_likelihoods(model, encoded, pad_id, config):
    """Each member's mean log-likelihood of the pairs' chosen and of their rejected responses (nats per response):
    {'logp_chosen': [M floats], 'logp_rejected': [M floats]}. DPO pushed too far lowers both."""
    model.eval()
    chosen, rejected = score_pairs(model, encoded, pad_id, config['batch_size'])           # (M, N) each
    model.train()
    return dict(logp_chosen=chosen.mean(1).tolist(), logp_rejected=rejected.mean(1).tolist())


def watch_generations(model, tokenizer, encoded, answer_rows, config, history, it):
    """Log what DPO has done to the answers since the SFT start: the members' likelihood of the validation pairs'
    chosen and rejected responses, and the greedy accuracy on the SFT run's held-out prompts; warn when one has
    fallen more than ANSWER_TOLERANCE and more than one prompt (one of 12 is 0.08) below the SFT run's."""
    now = pair_likelihoods(model, encoded, tokenizer.eot_token, config)
    now |= answer_accuracy(model, tokenizer, answer_rows, config['max_new_tokens'], config['batch_size'])
    history['generations'].append(dict(iter=it) | now)
    start = history['sft_start']['val'] | history['sft_start']['answers']
    show = lambda values: ' '.join(f"{v:.1f}" for v in values)
    print(f"  log-likelihood per member, chosen {show(now['logp_chosen'])} (SFT {show(start['logp_chosen'])}), "
          f"rejected {show(now['logp_rejected'])} (SFT {show(start['logp_rejected'])})")
    print("  greedy accuracy on the SFT run's held-out prompts: " + ', '.join(
        f"{kind} {share:.2f} (SFT {start['answer_accuracy'][kind]:.2f}; best member {now['best_member_accuracy'][kind]:.2f})"
        for kind, share in now['answer_accuracy'].items()))
    prompts = {(row.get('kind', 'consistent'), row['prompt']) for row in answer_rows}   # as answers_by_kind counts
    allowed = {kind: max(ANSWER_TOLERANCE, 1 / sum(k == kind for k, _ in prompts)) for kind, _ in prompts}
    fallen = [kind for kind, share in now['answer_accuracy'].items()   # + 1e-9: a fall of one prompt, rounded,
              if start['answer_accuracy'][kind] - share > allowed.get(kind, ANSWER_TOLERANCE) + 1e-9]  # is one
    if fallen:
        print(f"warning: the ensemble's greedy accuracy on {', '.join(fallen)} prompts fell more than {ANSWER_TOLERANCE} "
              "and more than one prompt below the SFT run's: DPO is trading the answers for its margins (raise "
              "--sft_replay, --sft_weight or --beta, or lower --learning_rate)")


def print_report(report, margins_by_group):
    """One line per group: pairs, each member's accuracy, the ensemble's, and the routing; then preference_variance."""
    print(f"{'group':>18} {'pairs':>5}  accuracy per member (ensemble)  routing")
    for g, margins in margins_by_group.items():
        print(f"{g:>18} {margins.shape[1]:>5}  " + ' '.join(f"{a:.2f}" for a in report['accuracy_by_group'][g]) +
              f" ({report['ensemble_accuracy_by_group'][g]:.2f})  " + ' '.join(f"{w:.2f}" for w in report['routing'][g]))
    variance = {key: '–' if value is None else f"{value:.3g}" for key, value in report['preference_variance'].items()}
    print(f"variance across members of sigmoid(beta * h): contested {variance['contested']}, "
          f"consensus {variance['consensus']}, ratio {variance['ratio']}")


# -----------------------------------------------------------------------------
# the DPO report: the implied reward margins of held-out pairs, per member

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
def score_pairs(model, encoded, pad_id, batch_size):
    """pair_logprobs of every encoded pair, in order: (chosen, rejected), each (M, N) ((1, N) for a bare base)."""
    chosen, rejected = [], []
    for start in range(0, len(encoded), batch_size):
        batch = data.pref_batch(encoded, range(start, min(start + batch_size, len(encoded))), pad_id)
        chosen_logps, rejected_logps = pair_logprobs(model, *(t.to(device_of(model)) for t in batch))
        chosen.append(chosen_logps)
        rejected.append(rejected_logps)
    return torch.cat(chosen, dim=-1), torch.cat(rejected, dim=-1)


def reward_margins(model, encoded, reference_logps, chosen_lengths, pad_id, config):
    """Each member's implied reward margin beta * h_m(x) on every pair, (M, N), and its log p_m(x) as the loss
    sees it (dpo_logp with the run's beta, label_smoothing and sft_weight), (M, N)."""
    model.eval()  # no dropout while scoring
    chosen, rejected = score_pairs(model, encoded, pad_id, config['batch_size'])
    model.train()
    _, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, *reference_logps, config['beta'])
    logp = dpo_logp(chosen, rejected, *reference_logps, config['beta'], config['label_smoothing'], config['sft_weight'],
                    chosen_lengths)
    return chosen_rewards - rejected_rewards, logp


def pair_preference_variance(margins):
    """The members' disagreement about each pair: the variance across members of their preference probability.

    v(x) = (1/M) sum_m (p_m(x) - mean_k p_k(x))^2,   p_m(x) = sigmoid(beta * h_m(x))      (M, N) -> (N,)
    In [0, 0.25]. Computed in float64: where every member is sure, every p_m(x) is near 1 and v(x) is tiny.
    """
    preference = torch.sigmoid(margins.double())                                 # (M, N)
    return preference.var(dim=0, unbiased=False)                                 # (N,)


def preference_variance(margins, contested, consensus):
    """Mean v(x) (pair_preference_variance) over contested and over consensus pairs, and contested / consensus.

    margins (M, N) = beta * h_m(x); contested, consensus (N,) boolean masks. Returns {contested, consensus, ratio},
    each None where the data cannot tell: one member (v = 0 by construction), no pair of a kind, a zero consensus mean.
    """
    variance = pair_preference_variance(margins)                                 # (N,)
    means = {kind: variance[mask].mean().item() if margins.shape[0] > 1 and mask.any() else None
             for kind, mask in (('contested', contested), ('consensus', consensus))}
    ratio = means['contested'] / means['consensus'] if None not in means.values() and means['consensus'] > 0 else None
    return means | dict(ratio=ratio)


def best_member_by_task(margins, rows):
    """{group: {task: the best member's accuracy on the group's contested pairs of that task}}: the sides the
    members take within each task, where they may differ from task to task, as SFT's do (METHOD.md §3).
    margins (M, N) = beta * h_m(x) of the N rows."""
    best = {}
    for i, row in enumerate(rows):
        if row.get('kind') == 'contested':
            best.setdefault(report_group(row), {}).setdefault(row.get('task') or '', []).append(i)
    return {group: {task: (margins[:, columns] > 0).float().mean(1).max().item() for task, columns in sorted(tasks.items())}
            for group, tasks in sorted(best.items())}


def dpo_report(model, encoded, rows, reference_logps, chosen_lengths, pad_id, config):
    """(report dict, {group: margins (M, n) of its pairs}): each member's and the ensemble's (mean margin) accuracy
    per group, a pair being right when beta * h_m(x) > 0; margins; routing; auroc_contested, how well the members'
    disagreement (the std of their margins) separates contested from consensus pairs (null without both kinds);
    preference_variance; best_member_by_task."""
    margins, logp = reward_margins(model, encoded, reference_logps, chosen_lengths, pad_id, config)
    columns = group_masks(rows)
    disagreement = margins.std(dim=0, unbiased=False)                              # (N,); 0 when M = 1
    contested = torch.tensor([row.get('kind') == 'contested' for row in rows])  # (N,)
    consensus = torch.tensor([row.get('kind') == 'consensus' for row in rows])  # (N,)
    report = dict(
        n_members=margins.shape[0],
        accuracy_by_group={g: (margins[:, c] > 0).float().mean(1).tolist() for g, c in columns.items()},
        ensemble_accuracy_by_group={g: (margins[:, c].mean(0) > 0).float().mean().item() for g, c in columns.items()},
        mean_margin_by_group={g: margins[:, c].mean(1).tolist() for g, c in columns.items()},
        routing=routing_matrix(logp, config['alpha'], [report_group(row) for row in rows]),
        auroc_contested=safe_auroc(disagreement[contested], disagreement[consensus]),
        preference_variance=preference_variance(margins, contested, consensus),
        best_member_by_task=best_member_by_task(margins, rows))
    return report, {g: margins[:, c] for g, c in columns.items()}


def main(argv):
    config = parse_args(defaults, argv)
    _, _, report = train(config)
    print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (dict, list))}, indent=2))


if __name__ == '__main__':
    run_script(main)
