"""
The one training loop, shared by pretrain.py, train_sft.py and train_dpo.py.

The scripts differ only in `batch_loss(forward, batch, it)`: how a batch becomes
a scalar loss. For SFT and DPO that is renyi_loss of the members' log-likelihoods
logp (M, B); for pretraining, next-token cross-entropy. Everything else lives
here once: the learning-rate schedule, gradient clipping, the optimizer step,
one log line per log_interval steps, validation and a checkpoint every
eval_interval steps, the replay of a resumed run's batches, and data-parallel
training under torchrun.
"""
import gc
import math
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from checkpoint import save_checkpoint


def learning_rate(it, config):
    """Linear warm-up over warmup_iters, then cosine decay from learning_rate to min_lr at max_iters."""
    if it < config['warmup_iters']:
        return config['learning_rate'] * (it + 1) / config['warmup_iters']
    progress = (it - config['warmup_iters']) / max(1, config['max_iters'] - config['warmup_iters'])
    return config['min_lr'] + 0.5 * (1 + math.cos(math.pi * progress)) * (config['learning_rate'] - config['min_lr'])


def format_seconds(seconds):
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


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


def distributed():
    """(rank, world_size) of this process: (0, 1) unless setup_distributed joined a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train_loop(model, params, optimizer, batches, batch_loss, config, history, start=0, validate=None,
               ckpt_path=None, lr_schedule=learning_rate, on_step=None):
    """Optimise `params` from step `start` to config['max_iters']; returns the loop's wall time in seconds.

    batches: an iterator of batches (for SFT and DPO, lists of example indices);
      the first `start` are skipped, so a resumed run sees the same batches as an uninterrupted one.
    batch_loss(forward, batch, it): the scalar loss of one batch at step it; forward is the
      model, or its DistributedDataParallel wrapper under torchrun (which averages the gradients).
    history: {'iter': [...], 'loss': [...], ...}, appended to every step.
    validate(done): called every eval_interval steps and at the end, on rank 0 only; then
      the adapters are checkpointed to ckpt_path (when given).
    lr_schedule(it, config): each step's learning rate. on_step(done, model): after every optimizer step.
    """
    rank, world_size = distributed()
    forward = DistributedDataParallel(model) if world_size > 1 else model
    for _ in range(start):
        next(batches)
    t_start = t_last = time.time()
    last_logged = start
    for it in range(start, config['max_iters']):
        for group in optimizer.param_groups:
            group['lr'] = lr_schedule(it, config)
        loss = batch_loss(forward, next(batches), it)
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
            print(f"iter {done}: loss {loss.item():.4f}, {ms:.1f}ms, eta {format_seconds(eta)}", flush=True)
            t_last, last_logged = now, done
        if validate is not None and (done % config['eval_interval'] == 0 or done == config['max_iters']):
            validate(done)
            if ckpt_path is not None:
                save_checkpoint(ckpt_path, model, optimizer, done, config, history)
    seconds = time.time() - t_start
    if world_size > 1:
        # DDP keeps its own handle on the process group: free it first, or gloo's threads outlive
        # destroy_process_group and can abort the process as the interpreter shuts down
        del forward
        gc.collect()
        dist.barrier()  # leave together: a process that leaves while another still talks gets aborted
        dist.destroy_process_group()
    return seconds
