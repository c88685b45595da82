"""
α-Rényi supervised fine-tuning of an ensemble of LoRA adapters on a frozen base GPT.

    python train_sft.py                         # the benchmark, M=4 members, default alpha
    python train_sft.py --alpha=0 --out_dir=out/sft_vb
    python train_sft.py --data=mine.jsonl --val_data=mine_val.jsonl
    python train_sft.py --n_members=1 --ual_source=data --out_dir=out/sft_ual   # UAL label smoothing
    torchrun --standalone --nproc_per_node=2 train_sft.py   # data-parallel, each process a shard of the batch

Each step: one forward pass of all M members on a batch, the per-member sequence
log-likelihoods logp (M, B), and the loss renyi_loss(logp, alpha) + prior_penalty
(floored_renyi_loss when routing_floor > 0).
At the end it evaluates the ensemble on held-out prompts and writes
out_dir/report.json and PNG plots, and sample.py's verdict thresholds to out_dir/verdict.json.
"""
import json
import math
import os

import torch
import torch.distributed as dist

import data
import plots
from checkpoint import base_config, load_base, load_ensemble, read_checkpoint, read_resume, resume_from
from config import UserError, parse_args, run_script
from evaluate import rescaled_epistemic, score_rows, sft_report
from lora import add_lora, clone_member, lora_parameters
from renyi_lora import (alpha_at, check_alpha, floored_renyi_loss, label_smoothed_nll, prior_penalty,
                        response_lengths, responsibilities, responsibility_entropy, sequence_logprobs, ual_smoothing)
from routing import member_shares, noise_routing, routing_matrix, starved_members
from trainer import check_settings, learning_rate, setup_distributed, train_loop
from verdict import answers_by_kind, held_out_thresholds

defaults = dict(
    # data: '' means the built-in benchmark (benchmark.py); otherwise JSONL files of {"prompt", "response"}
    data='',
    val_data='',            # held-out rows; '' holds out a seeded share of the training prompts
    ood_data='',            # out-of-distribution prompts for auroc_ood; '' means none (benchmark: its OOD set)
    val_fraction=0.1,       # share of prompts held out when --data is given without --val_data
    truncate=False,         # rows longer than the base's block_size: error (False) or cut the prompt's start
    corrupt=0.0,            # benchmark only: share of its consistent training responses made wrong (label noise)
    base='out/base.pt',     # a pretrain.py checkpoint (made by pretrain.py when this default is missing) or a local
                            # Hugging Face GPT-2 directory (config.json plus weights)
    tokenizer='',           # '' the base's own (checkpoint.base_config); gpt2: tiktoken's GPT-2 encoding
    out_dir='out/sft',
    resume=False,           # continue from out_dir/ckpt.pt
    # the ensemble
    n_members=4,
    alpha=2.0,              # 0: variational Bayes (every member fits everything); 1: predictive mixture;
                            # > 1 leans to winner-takes-all. why 2: RESULTS.md §3.3
    alpha_ramp_iters=250,   # reach alpha at this iter (0: from the first step), renyi_lora.alpha_at ...
    alpha_hold_iters=125,   # ... rising linearly from 0 after holding it at 0 for these first iters, so that every
                            # member fits every example before routing sharpens. why: RESULTS.md §9
    length_normalise=False,  # route by the per-token log p_m(x) / |y|, so each example's order is alpha / |y|
                             # (renyi_loss with n_tokens; METHOD.md §2, "Length-normalised routing")
    lora_rank=8,
    lora_alpha=16.0,        # LoRA scaling is lora_alpha / lora_rank
    sigma_p=1.0,            # prior N(0, sigma_p^2) on the LoRA parameters
    prior_weight=1.0,       # lambda; 1 is the exact Bayesian weight
    # keeping every member trained (METHOD.md §2)
    routing_floor=0.0,      # share of every example's gradient spread evenly over the members (floored_renyi_loss)
    revive_interval=0,      # every this many steps a starved member becomes a perturbed copy of the busiest; 0: off
    revive_spread=0.01,     # the copy's symmetric perturbation, relative to each adapter tensor's std
    # UAL (METHOD.md §5): label smoothing eps_i = ual_eps_min + (ual_eps_max - ual_eps_min) * u_i per example
    ual_source='',          # '' off; 'data': u_i is each row's `uncertainty`; 'ensemble': ual_teacher's epistemic one
    ual_teacher='out/sft/ckpt.pt',  # a trained ensemble (train_sft.py's checkpoint), for ual_source=ensemble
    ual_eps_min=0.0,
    ual_eps_max=0.3,
    # optimisation
    max_iters=500,
    batch_size=32,
    learning_rate=3e-3,
    min_lr=3e-4,            # linear warm-up over warmup_iters, then cosine decay to min_lr (trainer.learning_rate)
    warmup_iters=20,
    weight_decay=0.0,       # the prior already regularises
    grad_clip=1.0,          # a member that suddenly takes over an example gets a large gradient
    log_interval=20,
    eval_interval=250,
    # report
    n_samples=4,            # sampled responses per member and conflicting prompt, for coherence
    max_new_tokens=32,
    seed=1337,
    device='cuda' if torch.cuda.is_available() else 'cpu',
)


def read_inputs(config):
    """Every input checked before any expensive work (pretraining the base, training), each mistake a UserError:
    returns (train, validation, test and OOD rows, the encoded training set, the tokenizer, the checkpoint to
    resume or None)."""
    check_settings(config, positive=('n_members', 'lora_rank'))
    check_alpha(config['alpha'])
    if not isinstance(config['length_normalise'], bool):
        raise UserError(f"length_normalise must be true or false, got {config['length_normalise']!r}")
    if config['ual_source'] not in ('', 'data', 'ensemble'):
        raise UserError(f"ual_source must be '', 'data' or 'ensemble', got {config['ual_source']!r}")
    rows = data.load_sft_rows(config['data'], config['val_data'], config['ood_data'], config['val_fraction'],
                              config['seed'], config['corrupt'])
    if config['ual_source'] == 'data':
        missing = [row for row in rows[0] if row.get('uncertainty') is None]
        if missing:
            raise UserError(f"--ual_source=data: {len(missing)} training rows have no 'uncertainty' "
                            f"(first: {missing[0].get('source', 'a benchmark row')})")
    base, tokenizer_name = base_config(config['base'], config['tokenizer'])
    tokenizer = data.get_tokenizer(tokenizer_name)
    train_set = data.encode_sft(rows[0], tokenizer, base.block_size, truncate=config['truncate'])
    resume = (read_resume(config['out_dir'], config['n_members'], config['lora_rank'], config['lora_alpha'])
              if config['resume'] else None)
    trained_on_base = [os.path.join(config['out_dir'], 'ckpt.pt')] if config['resume'] else []
    if config['ual_source'] == 'ensemble':
        read_checkpoint(config['ual_teacher'])
        trained_on_base.append(config['ual_teacher'])
    if trained_on_base and not os.path.exists(config['base']):
        raise UserError(f"--base={config['base']} does not exist (yet), so the adapters of {trained_on_base[0]} "
                        "were not trained on it: pass the base they were trained on")
    return (*rows, train_set, tokenizer, resume)


def ual_label_smoothing(config, train_rows, tokenizer):
    """UAL's label smoothing eps_i of every training row, (N,), from its uncertainty u_i; None when UAL is off."""
    source = config['ual_source']
    if source == '':
        return None
    if source == 'data':                # read_inputs checked that every row has one
        uncertainty = torch.tensor([float(row['uncertainty']) for row in train_rows])
    else:  # 'ensemble': the ensemble plays the UAL paper's "more capable model"
        teacher, _, _ = load_ensemble(config['ual_teacher'], config['device'], base=config['base'])
        uncertainty = rescaled_epistemic(teacher.to(config['device']), tokenizer, train_rows, config['batch_size'])
    return ual_smoothing(uncertainty, config['ual_eps_min'], config['ual_eps_max'])


def train(config, lr_schedule=learning_rate, on_step=None):
    """Train the ensemble per config; returns (model, tokenizer, report dict, readouts), the last two None on ranks > 0.

    lr_schedule(it, config) gives each step's learning rate; on_step(done, model), when
    given, runs after every optimizer step (swag.py collects its moments there).
    readouts are evaluate.sft_report's tensors behind the report and its plots.
    """
    train_rows, val_rows, test_rows, ood_rows, train_set, tokenizer, resume = read_inputs(config)
    rank, world_size = setup_distributed(config)
    # the adapters' init comes from rank 0 (DDP broadcasts it); other ranks draw their own dropout masks
    torch.manual_seed(config['seed'] + rank)
    device = config['device']
    os.makedirs(config['out_dir'], exist_ok=True)
    if rank > 0:
        dist.barrier()  # wait while rank 0 pretrains the base, if it is missing
    model, _ = load_base(config['base'], device, config['tokenizer'])
    if rank == 0 and world_size > 1:
        dist.barrier()  # the base exists: let the others load it
    smoothing = ual_label_smoothing(config, train_rows, tokenizer)                    # (N,) or None
    params = add_lora(model, config['n_members'], config['lora_rank'], config['lora_alpha'])
    model.to(device)
    optimizer = torch.optim.AdamW(params, lr=config['learning_rate'], weight_decay=config['weight_decay'])
    routed = torch.zeros(config['n_members'])   # responsibilities summed over the batches since the last eval
    since_check = torch.zeros(config['n_members'])  # ... and since the last revive check
    routed_entropy = torch.zeros(())            # the entropies of the routed examples' w(x), summed since the last eval
    # checkpointed, so that a resumed run continues them
    running = dict(routed=routed, since_check=since_check, routed_entropy=routed_entropy)
    start, history = 0, dict(iter=[], loss=[], val_iter=[], val_nll=[], member_share=[], routing_entropy=[])
    ckpt_path = os.path.join(config['out_dir'], 'ckpt.pt')
    if resume is not None:
        start, history = resume_from(resume, ckpt_path, model, optimizer, config, running)

    def batch_loss(forward, indices, it):
        """The α-Rényi loss of one batch: the members' sequence log-likelihoods logp (M, B), then renyi_loss."""
        idx, labels = (t.to(device) for t in data.sft_batch(train_set, indices, tokenizer.eot_token))
        if smoothing is None:
            logp = sequence_logprobs(forward(idx), labels)                 # (M, B)
        else:  # UAL: the smoothed NLL takes the place of -log p_m(x)
            logp = -label_smoothed_nll(forward(idx), labels, smoothing[indices].to(device))
        alpha = alpha_at(it, config['alpha'], config['alpha_ramp_iters'], config['alpha_hold_iters'])
        n_tokens = response_lengths(labels) if config['length_normalise'] else None      # (B,) or None
        weights = responsibilities(logp.detach(), alpha, n_tokens)                        # (M, B)
        routing = weights.sum(1).cpu()
        routed.add_(routing)
        since_check.add_(routing)
        routed_entropy.add_(responsibility_entropy(weights).sum().cpu())
        return floored_renyi_loss(logp, alpha, config['routing_floor'], n_tokens) + prior_penalty(
            params, len(train_set), config['n_members'], config['sigma_p'], config['prior_weight'])

    def after_step(done, model):
        if on_step is not None:
            on_step(done, model)
        if config['revive_interval'] and done % config['revive_interval'] == 0 and done < config['max_iters']:
            if world_size > 1:
                dist.all_reduce(since_check)  # every process decides alike from the whole batch
            revive_starved(model, optimizer, since_check, config['revive_spread'],
                           torch.Generator().manual_seed(config['seed'] * 1_000_003 + done))  # the same on resume
            since_check.zero_()

    def validate_and_watch_routing(it):
        validate(model, tokenizer, val_rows, config, history, it)
        watch_routing(routed, routed_entropy, history)
        routed.zero_()
        routed_entropy.zero_()

    batches = (indices[rank::world_size]                                   # this process's share of each batch
               for indices in data.shuffled_batches(len(train_set), config['batch_size'], config['seed']))
    train_seconds = train_loop(model, params, optimizer, batches, batch_loss, config, history, start,
                               validate=validate_and_watch_routing,
                               ckpt_path=ckpt_path, lr_schedule=lr_schedule, on_step=after_step, state=running)
    if rank > 0:
        return model, tokenizer, None, None

    answers = answers_by_kind(model, tokenizer, test_rows, config['max_new_tokens'], config['batch_size'])
    report, readouts = sft_report(model, tokenizer, test_rows, ood_rows, config['alpha'], config['batch_size'],
                                  config['max_new_tokens'], config['n_samples'], config['seed'], answers,
                                  config['length_normalise'])
    model.eval()
    train_scores = score_rows(model, tokenizer, train_rows, config['batch_size'])
    model.train()
    train_logp = train_scores['logp']                                                          # (M, N)
    shares = member_shares(train_logp, config['alpha'],
                           train_scores['n_tokens'].clamp(min=1) if config['length_normalise'] else None)
    report['member_share'] = shares.tolist()           # of the training rows' responsibility, at the final alpha
    report['noise_routing'] = noise_routing(train_logp, config['alpha'], train_rows)
    report['starved_members'] = starved_members(shares)
    plots.sft_plots(config['out_dir'], history, report, readouts['by_kind'], readouts['scores'])
    report['train_seconds'] = round(train_seconds, 1)
    with open(os.path.join(config['out_dir'], 'report.json'), 'w') as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(config['out_dir'], 'verdict.json'), 'w') as f:   # sample.py's thresholds
        json.dump(held_out_thresholds(model, tokenizer, val_rows, config['max_new_tokens'], config['batch_size']), f,
                  indent=2)
    return model, tokenizer, report, readouts


def finished_report(config, may_train=True, reevaluate=False):
    """The report.json of the run in config['out_dir'], trained first unless it exists (None: absent, may_train false).

    A report written before today's read-outs (no auroc_conflict_token_mixture), or any report when
    reevaluate is true, is made again from the run's checkpoint: train resumes at its last step,
    trains no further and evaluates with today's code and held-out file. The study scripts
    (robustness.py, paper_study.py, long_study.py) read their runs through this.
    """
    report_path = os.path.join(config['out_dir'], 'report.json')

    def read():
        with open(report_path) as f:
            return json.load(f)

    if not os.path.exists(report_path):
        if not may_train:
            return None
        print(f"== {config['out_dir']}", flush=True)
        train(config)
    elif may_train and (reevaluate or 'auroc_conflict_token_mixture' not in read()):
        print(f"== {config['out_dir']}: evaluated again from its checkpoint", flush=True)
        train_seconds = read()['train_seconds']
        _, _, report, _ = train(config | dict(resume=True))
        report['train_seconds'] = train_seconds          # the training's, not the re-evaluation's
        with open(report_path, 'w') as f:
            json.dump(report, f, indent=2)
    return read()


def validate(model, tokenizer, val_rows, config, history, it):
    """Validation NLL of the mixture and the member x group routing matrix; printed and logged."""
    model.eval()  # no dropout while scoring
    scores = score_rows(model, tokenizer, val_rows, config['batch_size'])
    model.train()
    nll = (-(torch.logsumexp(scores['logp'], 0) - torch.log(torch.tensor(float(config['n_members']))))
           / scores['n_tokens'].clamp(min=1)).mean().item()
    history['val_iter'].append(it)
    history['val_nll'].append(nll)
    print(f"eval {it}: val nll/token {nll:.4f}")
    conflicting = [i for i, row in enumerate(val_rows) if row.get('kind') == 'conflicting' and row.get('group')]
    if conflicting:
        lengths = scores['n_tokens'][conflicting].clamp(min=1) if config['length_normalise'] else None
        matrix = routing_matrix(scores['logp'][:, conflicting], config['alpha'],
                                [val_rows[i]['group'] for i in conflicting], lengths)
        for group, weights in matrix.items():
            print(f"  routing {group:>12}: " + ' '.join(f"{w:.2f}" for w in weights))


def watch_routing(routed, routed_entropy, history):
    """Log each member's share of the responsibility since the last eval, and how sharp the routing was; warn when a
    member starves.

    routed (M,) sums the responsibilities w(x) over the examples since the eval, routed_entropy the entropy of each
    w(x) (responsibility_entropy). Their mean entropy is log M when every example trained every member alike, 0 when
    each trained one member alone. A starved member (share < 1/(4M)) receives almost no gradient: it stops
    learning, and the ensemble's uncertainty then partly measures its neglect, not the data.
    """
    shares = routed / routed.sum().clamp_min(1e-12)
    entropy = (routed_entropy / routed.sum().clamp_min(1e-12)).item()  # each w(x) sums to 1: routed.sum() counts x
    history.setdefault('member_share', []).append(shares.tolist())   # both absent in older checkpoints
    history.setdefault('routing_entropy', []).append(entropy)
    print("  member share " + ' '.join(f"{share:.2f}" for share in shares.tolist())
          + f", routing entropy {entropy:.3f} nats (log M = {math.log(len(shares)):.3f})")
    starved = starved_members(shares)
    if starved:
        print(f"warning: member(s) {', '.join(map(str, starved))} starved: below {0.25 / len(shares):.3f} of the "
              "training responsibility since the last eval (METHOD.md §2, 'Keeping every member trained')")


def revive_starved(model, optimizer, routed, spread, generator):
    """Replace each starved member (its share of the summed responsibilities `routed` (M,) below 1/(4M))
    by a perturbed copy of the busiest member, optimizer moments included; returns the revived members.

    A starved member gets almost no gradient, so it never recovers by itself. Its copy of the
    busiest member starts at that member's point: if the examples routed there conflict
    (alpha above their alpha*, METHOD.md §3) the pair splits them; if not, it drifts back together.
    """
    shares = routed / routed.sum().clamp_min(1e-12)
    busiest = int(shares.argmax())
    starved = starved_members(shares)
    for member in starved:
        clone_member(model, busiest, member, spread, generator)
        for p in lora_parameters(model):
            for moment in optimizer.state[p].values():
                if moment.dim() > 0:                         # exp_avg, exp_avg_sq: (M, ...); not the step count
                    moment[member] = moment[busiest]
        print(f"revived member {member} (share {shares[member]:.3f}) as a copy of member {busiest} "
              f"(share {shares[busiest]:.3f})")
    return starved


def main(argv):
    config = parse_args(defaults, argv)
    _, _, report, _ = train(config)
    if report is not None:
        print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (dict, list))}, indent=2))


if __name__ == '__main__':
    run_script(main)
