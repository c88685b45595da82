"""
α-Rényi supervised fine-tuning of an ensemble of LoRA adapters on a frozen base GPT.

    python train_sft.py                         # the benchmark, M=4 members, default alpha
    python train_sft.py --alpha=0 --out_dir=out/sft_vb
    python train_sft.py --data=mine.jsonl --val_data=mine_val.jsonl
    torchrun --standalone --nproc_per_node=2 train_sft.py   # data-parallel, each process a shard of the batch

Each step: one forward pass of all M members on a batch, the per-member sequence
log-likelihoods logp (M, B), and the loss renyi_loss(logp, alpha) + prior_penalty.
At the end it evaluates the ensemble on held-out prompts and writes out_dir/report.json
(`python plots.py --out_dir=...` draws its figures, `python sample.py --out_dir=...` talks to it).
"""
import json
import math
import os

import torch
import torch.distributed as dist

import data
from config import UserError, parse_args, run_script, to_device
from evaluate import score_rows
from lora import add_lora
from renyi_lora import (alpha_at, check_alpha, prior_penalty, renyi_loss, responsibilities, responsibility_entropy,
                        sequence_logprobs)
from report import routing_matrix, sft_report, starved_members, training_routing
from trainer import (base_config, check_settings, learning_rate, load_base, read_resume, resume_from,
                     set_precision, setup_distributed, train_loop)

defaults = dict(
    # data: '' means the built-in benchmark (benchmark.py); otherwise JSONL files of {"prompt", "response"}
    data='',
    val_data='',            # held-out rows, those of "kind": "ood" out-of-distribution prompts for auroc_ood;
                            # '' holds out a seeded 10 % of the training prompts
    base='out/base.pt',     # a pretrain.py checkpoint (made by pretrain.py when this default is missing) or a local
                            # Hugging Face GPT-2 directory (config.json plus weights); its tokenizer comes with it
    out_dir='out/sft',
    resume=False,           # continue from out_dir/ckpt.pt
    # the ensemble
    n_members=4,
    alpha=2.0,              # 0: variational Bayes (every member fits everything); 1: predictive mixture; above 1
                            # splitting the members pays wherever they can explain different answers (METHOD.md §2)
    alpha_hold_iters=125,   # alpha stays 0 for these first iters, so every member first learns every example ...
    alpha_ramp_iters=250,   # ... then rises linearly to alpha at this iter (renyi_lora.alpha_at), so no member wins
                            # every example before the others have learned them
    lora_rank=8,
    lora_alpha=16.0,        # LoRA scaling is lora_alpha / lora_rank
    sigma_p=1.0,            # prior N(0, sigma_p^2) on the LoRA parameters, at its exact Bayesian weight
    # optimisation
    max_iters=500,
    batch_size=32,
    learning_rate=3e-3,
    min_lr=3e-4,            # linear warm-up over warmup_iters, then cosine decay to min_lr (trainer.learning_rate)
    warmup_iters=20,
    grad_clip=1.0,          # a member that suddenly takes over an example gets a large gradient
    log_interval=20,
    eval_interval=250,
    max_new_tokens=32,      # the longest answer decoded for the report
    seed=1337,
    device='cuda' if torch.cuda.is_available() else 'cpu',
    dtype='auto',           # of the frozen base and the forward pass: float32, bfloat16 or float16; 'auto' is bfloat16
                            # on a CUDA device that has it, else float32. Adapters, losses and read-outs stay float32
    compile=False,          # torch.compile the training step's forward; the first steps wait for the compiler
)


def read_inputs(config):
    """Every input checked before any expensive work (pretraining the base, training), each mistake a UserError:
    returns (train, validation, test and OOD rows, the encoded training set, the tokenizer, the checkpoint to
    resume or None)."""
    check_settings(config, positive=('n_members', 'lora_rank'))
    check_alpha(config['alpha'])
    check_schedule(config)
    rows = data.load_sft_rows(config['data'], config['val_data'], seed=config['seed'])
    base, tokenizer_name = base_config(config['base'])
    tokenizer = data.get_tokenizer(tokenizer_name)
    train_set = data.encode_sft(rows[0], tokenizer, base.block_size)
    resume = None
    if config['resume']:
        resume = read_resume(config['out_dir'], config['n_members'], config['lora_rank'], config['lora_alpha'])
        if not os.path.exists(config['base']):
            raise UserError(f"--base={config['base']} does not exist (yet), so the adapters of {config['out_dir']}/"
                            "ckpt.pt were not trained on it: pass the base they were trained on")
    return (*rows, train_set, tokenizer, resume)


def check_schedule(config):
    """UserError for a hold and ramp of alpha that cannot work; a warning when the run never reaches alpha."""
    hold, ramp = config['alpha_hold_iters'], config['alpha_ramp_iters']
    if not 0 <= hold <= ramp:
        raise UserError(f"--alpha_hold_iters={hold} --alpha_ramp_iters={ramp}: need 0 <= hold <= ramp "
                        "(alpha is 0 until the hold ends, then rises to reach alpha at the ramp's end)")
    if config['alpha'] > 0 and ramp > config['max_iters']:
        print(f"warning: --max_iters={config['max_iters']} ends before the ramp reaches alpha = {config['alpha']} "
              f"at iter {ramp} (alpha is 0 until iter {hold}): lower --alpha_hold_iters and --alpha_ramp_iters too")


def train(config, objective=None, lr_schedule=learning_rate, on_step=None):
    """Train the ensemble per config; returns (model, tokenizer, report dict, readouts), the last two None on ranks > 0.

    objective(logits, labels, indices, alpha) -> (loss, responsibilities (M, B)), when given, takes the place of
    sequence_logprobs and renyi_loss (baselines/ual.py smooths the labels, experiments/long_study.py routes per
    token); indices are the batch's rows of the training set. lr_schedule(it, config) gives each step's learning
    rate; on_step(done, model), when given, runs after every optimizer step (baselines/swag.py collects there).
    readouts are report.sft_report's tensors behind the report's figures.
    """
    train_rows, val_rows, test_rows, ood_rows, train_set, tokenizer, resume = read_inputs(config)
    rank, world_size = setup_distributed(config)
    # the adapters' init comes from rank 0 (DDP broadcasts it); other ranks draw their own dropout masks
    torch.manual_seed(config['seed'] + rank)
    device = config['device']
    os.makedirs(config['out_dir'], exist_ok=True)
    if rank > 0:
        dist.barrier()  # wait while rank 0 pretrains the base, if it is missing
    model, _ = load_base(config['base'], device)
    if rank == 0 and world_size > 1:
        dist.barrier()  # the base exists: let the others load it
    params = add_lora(model, config['n_members'], config['lora_rank'], config['lora_alpha'])
    set_precision(model, config).to(device)
    optimizer = torch.optim.AdamW(params, lr=config['learning_rate'], weight_decay=0.0,  # the prior regularises
                                  fused=device.startswith('cuda'))    # CUDA: one kernel for all
    # the responsibilities summed over the batches since the last eval, and their entropies: checkpointed
    routed = dict(routed=torch.zeros(config['n_members']), routed_entropy=torch.zeros(()))
    start, history = 0, dict(iter=[], loss=[], val_iter=[], val_nll=[], member_share=[], routing_entropy=[])
    ckpt_path = os.path.join(config['out_dir'], 'ckpt.pt')
    if resume is not None:
        start, history = resume_from(resume, ckpt_path, model, optimizer, config, routed)

    def batch_loss(forward, indices, it):
        """The α-Rényi loss of one batch: the members' sequence log-likelihoods logp (M, B), then renyi_loss."""
        idx, labels = to_device(data.sft_batch(train_set, indices, tokenizer.eot_token), device)
        alpha = alpha_at(it, config['alpha'], config['alpha_ramp_iters'], config['alpha_hold_iters'])
        if objective is None:
            logp = sequence_logprobs(forward(idx), labels)                                 # (M, B)
            loss, weights = renyi_loss(logp, alpha), responsibilities(logp.detach(), alpha)
        else:
            loss, weights = objective(forward(idx), labels, indices, alpha)
        routed['routed'].add_(weights.sum(1).cpu())
        routed['routed_entropy'].add_(responsibility_entropy(weights).sum().cpu())
        return loss + prior_penalty(params, len(train_set), config['n_members'], config['sigma_p'])

    def validate(it):
        validate_and_log(model, tokenizer, val_rows, config, history, it)
        watch_routing(routed['routed'], routed['routed_entropy'], history)
        for total in routed.values():
            total.zero_()

    batches = (indices[rank::world_size]                                   # this process's share of each batch
               for indices in data.shuffled_batches(len(train_set), config['batch_size'], config['seed']))
    train_seconds = train_loop(model, params, optimizer, batches, batch_loss, config, history, start,
                               validate=validate, ckpt_path=ckpt_path, lr_schedule=lr_schedule, on_step=on_step,
                               state=routed)
    if rank > 0:
        return model, tokenizer, None, None
    report, readouts = sft_report(model, tokenizer, test_rows, ood_rows, config['alpha'], config['batch_size'],
                                  config['max_new_tokens'], config['seed'])
    report |= training_routing(model, tokenizer, train_rows, config['alpha'], config['batch_size'])
    report['train_seconds'] = round(train_seconds, 1)
    with open(os.path.join(config['out_dir'], 'report.json'), 'w') as f:
        json.dump(report, f, indent=2)
    torch.save(readouts, os.path.join(config['out_dir'], 'readouts.pt'))     # for plots.py
    return model, tokenizer, report, readouts


def validate_and_log(model, tokenizer, val_rows, config, history, it):
    """Validation NLL of the mixture and the member x group routing matrix; printed and logged."""
    model.eval()  # no dropout while scoring
    scores = score_rows(model, tokenizer, val_rows, config['batch_size'])
    model.train()
    nll = (-(torch.logsumexp(scores['logp'], 0) - math.log(config['n_members']))
           / scores['n_tokens'].clamp(min=1)).mean().item()
    history['val_iter'].append(it)
    history['val_nll'].append(nll)
    print(f"eval {it}: val nll/token {nll:.4f}")
    conflicting = [i for i, row in enumerate(val_rows) if row.get('kind') == 'conflicting' and row.get('group')]
    if conflicting:
        matrix = routing_matrix(scores['logp'][:, conflicting], config['alpha'], [val_rows[i]['group'] for i in conflicting])
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
    history['member_share'].append(shares.tolist())
    history['routing_entropy'].append(entropy)
    print("  member share " + ' '.join(f"{share:.2f}" for share in shares.tolist())
          + f", routing entropy {entropy:.3f} nats (log M = {math.log(len(shares)):.3f})")
    starved = starved_members(shares)
    if starved:
        print(f"warning: member(s) {', '.join(map(str, starved))} starved: below {0.25 / len(shares):.3f} of the "
              "training responsibility since the last eval")


def main(argv):
    config = parse_args(defaults, argv)
    _, _, report, _ = train(config)
    if report is not None:
        print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (dict, list))}, indent=2))
        print(f"figures: python plots.py --out_dir={config['out_dir']}; "
              f"talk to it: python sample.py --out_dir={config['out_dir']} --prompt=...")


if __name__ == '__main__':
    run_script(main)
