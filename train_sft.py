"""
α-Rényi supervised fine-tuning of an ensemble of LoRA adapters on a frozen base GPT.

    python train_sft.py                         # the benchmark, M=4 members, default alpha
    python train_sft.py --alpha=0 --out_dir=out/sft_vb
    python train_sft.py --data=mine.jsonl --val_data=mine_val.jsonl
    python train_sft.py --n_members=1 --ual_source=data --out_dir=out/sft_ual   # UAL label smoothing
    torchrun --standalone --nproc_per_node=2 train_sft.py   # data-parallel, each process a shard of the batch

Each step: one forward pass of all M members on a batch, the per-member sequence
log-likelihoods logp (M, B), and the loss renyi_loss(logp, alpha) + prior_penalty.
At the end it evaluates the ensemble on held-out prompts and writes
out_dir/report.json and PNG plots.
"""
import gc
import hashlib
import json
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
from config import parse_args
from evaluate import rescaled_epistemic, routing_matrix, score_rows, sft_report
from lora import add_lora, load_adapters, lora_parameters, lora_state_dict
from model import GPT, GPTConfig
from pretrain import learning_rate, save_atomically
from renyi_lora import check_alpha, label_smoothed_nll, prior_penalty, renyi_loss, sequence_logprobs, ual_smoothing

defaults = dict(
    # data: '' means the built-in benchmark of data.py; otherwise JSONL files of {"prompt", "response"}
    data='',
    val_data='',            # held-out rows; '' holds out a seeded share of the training prompts
    ood_data='',            # out-of-distribution prompts for auroc_ood; '' means none (benchmark: its OOD set)
    val_fraction=0.1,       # share of prompts held out when --data is given without --val_data
    truncate=False,         # rows longer than the base's block_size: error (False) or cut the prompt's start
    base='out/base.pt',     # the pretrained base model; pretrain.py makes it when missing
    out_dir='out/sft',
    resume=False,           # continue from out_dir/ckpt.pt
    # the ensemble
    n_members=4,
    alpha=2.0,              # 0: variational Bayes (every member fits everything); 1: predictive mixture;
                            # > 1 leans to winner-takes-all. Why 2 is the default: README, "Reading the results"
    alpha_ramp_iters=250,   # raise alpha linearly from 0 over these first iters (0: no ramp), see alpha_at
    lora_rank=8,
    lora_alpha=16.0,        # LoRA scaling is lora_alpha / lora_rank
    sigma_p=1.0,            # prior N(0, sigma_p^2) on the LoRA parameters
    prior_weight=1.0,       # lambda; 1 is the exact Bayesian weight
    # UAL (METHOD.md §5): label smoothing eps_i = ual_eps_min + (ual_eps_max - ual_eps_min) * u_i per example
    ual_source='',          # '' off; 'data': u_i is each row's `uncertainty`; 'ensemble': ual_teacher's epistemic one
    ual_teacher='out/sft/ckpt.pt',  # a trained ensemble (train_sft.py's checkpoint), for ual_source=ensemble
    ual_eps_min=0.0,
    ual_eps_max=0.3,
    # optimisation
    max_iters=500,
    batch_size=32,
    learning_rate=3e-3,
    min_lr=3e-4,            # linear warm-up over warmup_iters, then cosine decay to min_lr (pretrain.learning_rate)
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


def load_base(config):
    """The frozen base GPT and its tokenizer name; runs pretrain.py first when the checkpoint is missing."""
    if not os.path.exists(config['base']):
        print(f"{config['base']} not found: pretraining the base model first")
        pretrain = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pretrain.py')  # from any directory
        subprocess.run([sys.executable, pretrain, f"--out_path={config['base']}",
                        f"--device={config['device']}"], check=True)
    checkpoint = torch.load(config['base'], map_location='cpu', weights_only=True)
    model = GPT(GPTConfig(**checkpoint['config']))
    model.load_state_dict(checkpoint['model'])
    return model, checkpoint['tokenizer']


def load_rows(config):
    """Train, validation, test and OOD rows (dicts with prompt, response, kind, group, ...)."""
    if not config['data']:
        bench = data.make_benchmark(seed=0)
        return bench['sft_train'], bench['sft_val'], bench['sft_test'], bench['ood']
    rows = data.load_sft_jsonl(config['data'])
    if config['val_data']:
        train_rows, held_out = rows, data.load_sft_jsonl(config['val_data'])
    else:
        train_rows, held_out = data.split_by_prompt(rows, config['val_fraction'], seed=config['seed'])
    data.mark_conflicts(train_rows + held_out)
    ood_rows = data.load_sft_jsonl(config['ood_data']) if config['ood_data'] else []
    return train_rows, held_out, held_out, ood_rows


def alpha_at(it, config):
    """The alpha of step `it`: a linear ramp from 0 to config['alpha'] over alpha_ramp_iters.

    At alpha = 0 every member learns every example, conflicting ones included;
    once alpha passes the critical alpha* (stability.py) the collapsed ensemble
    turns unstable and the members split. Without the ramp, members that lose
    the first race for a group never learn its responses at all.
    """
    if it >= config['alpha_ramp_iters']:
        return config['alpha']
    return config['alpha'] * it / config['alpha_ramp_iters']


def ual_label_smoothing(config, train_rows, tokenizer):
    """UAL's label smoothing eps_i of every training row, (N,), from its uncertainty u_i; None when UAL is off."""
    source = config['ual_source']
    if source == '':
        return None
    if source == 'data':
        missing = [i for i, row in enumerate(train_rows) if row.get('uncertainty') is None]
        if missing:
            raise ValueError(f"ual_source=data: {len(missing)} training rows have no 'uncertainty' "
                             f"(first: row {missing[0]})")
        uncertainty = torch.tensor([float(row['uncertainty']) for row in train_rows])
    else:  # 'ensemble' (train checks the name first): the ensemble plays the UAL paper's "more capable model"
        teacher, _ = load_base(config)
        load_adapters(teacher, config['ual_teacher'])
        uncertainty = rescaled_epistemic(teacher.to(config['device']), tokenizer, train_rows, config)
    return ual_smoothing(uncertainty, config['ual_eps_min'], config['ual_eps_max'])


def base_fingerprint(model):
    """A SHA-256 of the frozen base weights (every tensor but the adapters), in state_dict order.

    Adapters only make sense on the base they were trained on; checkpoints store this so a
    run that loads them can tell when out/base.pt has been replaced since.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if not name.endswith(('lora_A', 'lora_B')):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_base(ckpt, model, ckpt_path):
    """Raise when the adapters in ckpt were trained on another base than the one model carries."""
    stored = ckpt.get('base_fingerprint')    # None in checkpoints written before fingerprints existed
    if stored is not None and stored != base_fingerprint(model):
        raise ValueError(f"{ckpt_path} holds adapters trained on another base model than the one loaded now "
                         "(was the base pretrained again?): train them again, or pass --base=<the base they used>")


def save_checkpoint(path, model, optimizer, it, config, history):
    """Adapters, optimizer, step, config, RNG state and the base's fingerprint, written to a temp file and renamed."""
    state = dict(adapters=lora_state_dict(model), lora_config=model.lora_config, optimizer=optimizer.state_dict(),
                 iter=it, config=config, history=history, rng=torch.get_rng_state(),
                 base_fingerprint=base_fingerprint(model))
    save_atomically(state, path)


def resume_from(ckpt_path, model, optimizer, config):
    """Load a save_checkpoint file's adapters, optimizer and RNG state; returns (start iter, history)."""
    ckpt = torch.load(ckpt_path, map_location=config['device'], weights_only=False)
    check_base(ckpt, model, ckpt_path)
    unexpected = model.load_state_dict(ckpt['adapters'], strict=False).unexpected_keys  # the base is not in it
    if unexpected:
        raise ValueError(f"{ckpt_path}: adapter keys {unexpected[:3]} do not fit this model (another lora config?)")
    if ckpt['config']['max_iters'] != config['max_iters']:
        print(f"warning: max_iters {config['max_iters']} differs from the checkpoint's "
              f"{ckpt['config']['max_iters']}, so the learning-rate schedule changes from here on")
    optimizer.load_state_dict(ckpt['optimizer'])
    torch.set_rng_state(ckpt['rng'])
    print(f"resumed from {ckpt_path} at iter {ckpt['iter']}")
    return ckpt['iter'], ckpt['history']


def setup_distributed(config):
    """Join torchrun's process group when it launched us; returns (rank, world_size), (0, 1) without torchrun.

    gloo on CPU, nccl on CUDA with one GPU per process (the LOCAL_RANK-th).
    """
    if 'RANK' not in os.environ:
        return 0, 1
    if config['device'].startswith('cuda'):
        config['device'] = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(config['device'])
    dist.init_process_group('nccl' if config['device'].startswith('cuda') else 'gloo')
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if config['batch_size'] % world_size:
        raise ValueError(f"batch_size {config['batch_size']} does not split evenly over {world_size} processes")
    if rank == 0:
        print(f"data parallel ({dist.get_backend()}): {world_size} processes, "
              f"{config['batch_size'] // world_size} examples each of every batch of {config['batch_size']}")
    return rank, world_size


def train(config, lr_schedule=learning_rate, on_step=None, readouts=None):
    """Train the ensemble per config; returns (model, tokenizer, report dict), the report None on ranks > 0.

    lr_schedule(it, config) gives each step's learning rate; on_step(done, model), when
    given, runs after every optimizer step (swag.py collects its moments there);
    readouts is passed on to evaluate.sft_report.
    """
    check_alpha(config['alpha'])
    if config['ual_source'] not in ('', 'data', 'ensemble'):
        raise ValueError(f"ual_source must be '', 'data' or 'ensemble', got {config['ual_source']!r}")
    rank, world_size = setup_distributed(config)
    # the adapters' init comes from rank 0 (DDP broadcasts it); other ranks draw their own dropout masks
    torch.manual_seed(config['seed'] + rank)
    device = config['device']
    os.makedirs(config['out_dir'], exist_ok=True)
    if rank > 0:
        dist.barrier()  # wait while rank 0 pretrains the base, if it is missing
    model, tokenizer_name = load_base(config)
    if rank == 0 and world_size > 1:
        dist.barrier()  # the base exists: let the others load it
    tokenizer = data.get_tokenizer(tokenizer_name)
    train_rows, val_rows, test_rows, ood_rows = load_rows(config)
    block_size = model.config.block_size
    train_set = data.encode_sft(train_rows, tokenizer, block_size, truncate=config['truncate'])
    smoothing = ual_label_smoothing(config, train_rows, tokenizer)                    # (N,) or None
    params = add_lora(model, config['n_members'], config['lora_rank'], config['lora_alpha'])
    model.to(device)
    # DDP averages the adapters' gradients over the processes during backward
    forward = DistributedDataParallel(model) if world_size > 1 else model
    optimizer = torch.optim.AdamW(params, lr=config['learning_rate'], weight_decay=config['weight_decay'])
    start, history = 0, dict(iter=[], loss=[], val_iter=[], val_nll=[])
    ckpt_path = os.path.join(config['out_dir'], 'ckpt.pt')
    if config['resume']:
        start, history = resume_from(ckpt_path, model, optimizer, config)
    batches = data.shuffled_batches(len(train_set), config['batch_size'], config['seed'])
    for _ in range(start):
        next(batches)  # replay the order of a resumed run: the same batches as an uninterrupted one

    t_start = t_last = time.time()
    last_logged = start
    for it in range(start, config['max_iters']):
        for group in optimizer.param_groups:
            group['lr'] = lr_schedule(it, config)
        shard = next(batches)[rank::world_size]                            # this process's share of the batch
        idx, labels = (t.to(device) for t in data.sft_batch(train_set, shard, tokenizer.eot_token))
        if smoothing is None:
            logp = sequence_logprobs(forward(idx), labels)                 # (M, B / world_size)
        else:  # UAL: the smoothed NLL takes the place of -log p_m(x)
            logp = -label_smoothed_nll(forward(idx), labels, smoothing[shard].to(device))
        loss = renyi_loss(logp, alpha_at(it, config)) + prior_penalty(
            params, len(train_set), config['n_members'], config['sigma_p'], config['prior_weight'])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config['grad_clip'])
        optimizer.step()
        if on_step is not None:
            on_step(it + 1, model)
        loss = loss.detach()
        if world_size > 1:
            dist.all_reduce(loss)  # the loss of the whole batch, for the log
            loss /= world_size
        history['iter'].append(it)
        history['loss'].append(loss.item())
        done = it + 1
        if rank > 0:
            continue  # rank 0 alone logs, validates and checkpoints
        if done % config['log_interval'] == 0 or done == config['max_iters']:
            now = time.time()
            ms = (now - t_last) * 1000 / (done - last_logged)
            eta = (now - t_start) / (done - start) * (config['max_iters'] - done)
            print(f"iter {done}: loss {loss.item():.4f}, {ms:.1f}ms, eta {eta:.0f}s", flush=True)
            t_last, last_logged = now, done
        if done % config['eval_interval'] == 0 or done == config['max_iters']:
            validate(model, tokenizer, val_rows, config, history, done)
            save_checkpoint(ckpt_path, model, optimizer, done, config, history)
    train_seconds = time.time() - t_start
    if dist.is_available() and dist.is_initialized():
        # DDP keeps its own handle on the process group: free it first, or gloo's threads outlive
        # destroy_process_group and can abort the process as the interpreter shuts down
        del forward
        gc.collect()
        dist.barrier()  # leave together: a process that leaves while another still talks gets aborted
        dist.destroy_process_group()
    if rank > 0:
        return model, tokenizer, None

    report = sft_report(model, tokenizer, test_rows, ood_rows, config, history, readouts)
    report['train_seconds'] = round(train_seconds, 1)
    with open(os.path.join(config['out_dir'], 'report.json'), 'w') as f:
        json.dump(report, f, indent=2)
    return model, tokenizer, report


def validate(model, tokenizer, val_rows, config, history, it):
    """Validation NLL of the mixture and the member x group routing matrix; printed and logged."""
    model.eval()  # no dropout while scoring
    scores = score_rows(model, tokenizer, val_rows, config)
    model.train()
    nll = (-(torch.logsumexp(scores['logp'], 0) - torch.log(torch.tensor(float(config['n_members']))))
           / scores['n_tokens'].clamp(min=1)).mean().item()
    history['val_iter'].append(it)
    history['val_nll'].append(nll)
    print(f"eval {it}: val nll/token {nll:.4f}")
    conflicting = [i for i, row in enumerate(val_rows) if row.get('kind') == 'conflicting' and row.get('group')]
    if conflicting:
        matrix = routing_matrix(scores['logp'][:, conflicting], config['alpha'],
                                [val_rows[i]['group'] for i in conflicting])
        for group, weights in matrix.items():
            print(f"  routing {group:>12}: " + ' '.join(f"{w:.2f}" for w in weights))


def main(argv=None):
    config = parse_args(defaults, argv)
    _, _, report = train(config)
    if report is not None:
        print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (dict, list))}, indent=2))


if __name__ == '__main__':
    main()
