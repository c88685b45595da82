"""
The one training loop, shared by pretrain.py, train_sft.py and train_dpo.py.

The scripts differ only in `batch_loss(forward, batch, it)`: how a batch becomes
a scalar loss. For SFT and DPO that is renyi_loss of the members' log-likelihoods
logp (M, B); for pretraining, next-token cross-entropy. Everything else lives
here once: the learning-rate schedule, gradient clipping, the optimizer step,
one log line per log_interval steps, validation and a checkpoint every
eval_interval steps, the replay of a resumed run's batches, a stop before any
non-finite update, a checkpoint on Ctrl-C, and data-parallel training under torchrun.
"""
import contextlib
import gc
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from checkpoint import save_checkpoint
from config import UserError, check_device


def check_settings(config, positive=()):
    """UserError for a setting of the loop, or one of `positive`, that cannot work; and for an unavailable device."""
    check_device(config['device'])
    for key in ('batch_size', 'learning_rate', 'grad_clip', 'log_interval', 'eval_interval', *positive):
        if key in config and not config[key] > 0:     # NaN fails too
            raise UserError(f"--{key}={config[key]}: must be > 0")
    for key in ('max_iters', 'warmup_iters', 'min_lr'):
        if not config[key] >= 0:
            raise UserError(f"--{key}={config[key]}: must be >= 0")


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
        raise UserError(f"--batch_size={config['batch_size']} does not split evenly over {world_size} processes")
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
               ckpt_path=None, lr_schedule=learning_rate, on_step=None, state=None):
    """Optimise `params` from step `start` to config['max_iters']; returns the loop's wall time in seconds.

    batches: an iterator of batches (for SFT and DPO, lists of example indices);
      the first `start` are skipped, so a resumed run sees the same batches as an uninterrupted one.
    batch_loss(forward, batch, it): the scalar loss of one batch at step it; forward is the
      model, or its DistributedDataParallel wrapper under torchrun (which averages the gradients).
    history: {'iter': [...], 'loss': [...], ...}, appended to every step.
    validate(done): called every eval_interval steps and at the end, on rank 0 only; then
      the adapters are checkpointed to ckpt_path (when given), with the running sums `state`
      ({name: tensor} the caller accumulates across steps) so that a resumed run continues them.
    lr_schedule(it, config): each step's learning rate. on_step(done, model): after every optimizer step.

    A non-finite loss or gradient norm stops training before the optimizer step (UserError naming
    the step and the last checkpoint, which is never overwritten with non-finite adapters). Ctrl-C
    lets the step in progress finish, checkpoints it and raises KeyboardInterrupt (one process only).
    """
    rank, world_size = distributed()
    forward = DistributedDataParallel(model) if world_size > 1 else model
    for _ in range(start):
        next(batches)
    t_start = t_last = time.time()
    last_logged = start
    last_saved = start if ckpt_path is not None and start > 0 else None

    def checkpoint(done):
        nonlocal last_saved
        if not all(p.isfinite().all() for p in params):
            raise UserError(stopped(done, "an adapter is not finite", ckpt_path, last_saved))
        save_checkpoint(ckpt_path, model, optimizer, done, config, history, state)
        last_saved = done

    with finish_step_on_ctrl_c(world_size == 1) as ctrl_c:
        for it in range(start, config['max_iters']):
            for group in optimizer.param_groups:
                group['lr'] = lr_schedule(it, config)
            loss = batch_loss(forward, next(batches), it)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config['grad_clip'])
            if not (loss.isfinite() and grad_norm.isfinite()):
                what = f"the loss is {loss.item():.4g}, the gradient norm {grad_norm.item():.4g}"
                raise UserError(stopped(it + 1, what, ckpt_path, last_saved))
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
                    checkpoint(done)
            if ctrl_c['pressed']:
                if ckpt_path is None:
                    raise KeyboardInterrupt(f"after iter {done}; nothing saved")
                if last_saved != done:
                    checkpoint(done)
                raise KeyboardInterrupt(f"after iter {done}; saved {ckpt_path}: continue with --resume=true")
    seconds = time.time() - t_start
    if world_size > 1:
        # DDP keeps its own handle on the process group: free it first, or gloo's threads outlive
        # destroy_process_group and can abort the process as the interpreter shuts down
        del forward
        gc.collect()
        dist.barrier()  # leave together: a process that leaves while another still talks gets aborted
        dist.destroy_process_group()
    return seconds


def stopped(done, what, ckpt_path, last_saved):
    """The message that stops training at step `done` because `what`."""
    kept = ("nothing was saved" if ckpt_path is None else "no checkpoint was written yet" if last_saved is None
            else f"the last good checkpoint, {ckpt_path} at iter {last_saved}, is kept")
    return f"iter {done}: {what}: training stopped and {kept}; lower --learning_rate (or raise --warmup_iters)"


@contextlib.contextmanager
def finish_step_on_ctrl_c(enabled):
    """Within it, Ctrl-C (SIGINT) sets pressed['pressed'] instead of raising at once, so that train_loop finishes
    the step in progress and checkpoints a whole step; a second Ctrl-C raises KeyboardInterrupt at once.

    Off under torchrun (enabled False): processes that stop at different steps would wait on each other forever.
    """
    pressed = dict(pressed=False)

    def handle(signum, frame):
        if pressed['pressed']:
            raise KeyboardInterrupt
        pressed['pressed'] = True
        print("Ctrl-C: stopping after this step to save it (press again to stop at once)", file=sys.stderr, flush=True)

    previous = signal.signal(signal.SIGINT, handle) if enabled else None
    try:
        yield pressed
    finally:
        if enabled:
            signal.signal(signal.SIGINT, previous)
