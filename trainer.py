"""
The one training loop, shared by pretrain.py, train_sft.py and train_dpo.py, and the files it
reads and writes.

The scripts differ only in `batch_loss(forward, batch, it)`: how a batch becomes
a scalar loss. For SFT and DPO that is renyi_loss of the members' log-likelihoods
logp (M, B); for pretraining, next-token cross-entropy. Everything else lives
here once: the learning-rate schedule, gradient clipping, the optimizer step,
one log line per log_interval steps, validation and a checkpoint every
eval_interval steps, the replay of a resumed run's batches, a stop before any
non-finite update, a checkpoint on Ctrl-C, and data-parallel training under torchrun.

The files: a base is a pretrain.py checkpoint (model config, weights, tokenizer name) or a
local Hugging Face GPT-2 directory (config.json plus pytorch_model.bin or model.safetensors; its vocab.json and
merges.txt, when present, give its tokenizer).
A training checkpoint (ckpt.pt of train_sft.py or train_dpo.py) holds the adapters alone,
with the optimizer, the step, the run's config, the loss history, the RNG state, the loop's
running sums and a fingerprint of the base. Every file is written aside and then renamed, so a
crash never leaves a half-written one; a file the user names that is missing, unreadable or
of the wrong kind raises UserError, naming it.
"""
import contextlib
import gc
import hashlib
import math
import os
import pickle
import signal
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import data
from config import UserError, check_device, torch_dtype
from lora import add_lora, lora_state_dict
from model import GPT, GPTConfig, hf_config

DEFAULT_BASE = 'out/base.pt'   # pretrain.py's out_path: the one base that is pretrained when it is missing
RUN_KEYS = ('adapters', 'lora_config', 'config', 'iter')
A_RUN = "a checkpoint of train_sft.py or train_dpo.py"


def check_settings(config, positive=()):
    """UserError for a setting of the loop, or one of `positive`, that cannot work; and for an unavailable device."""
    check_device(config['device'])
    torch_dtype(config.get('dtype', 'float32'), config['device'])
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


def set_precision(model, config):
    """model.set_dtype(config's --dtype), returning model; its base's fingerprint is taken before the frozen
    weights are rounded. On CUDA, float32 matmuls use TF32 (process-wide)."""
    dtype = torch_dtype(config.get('dtype', 'float32'), config['device'])
    if torch.device(config['device']).type == 'cuda':
        torch.set_float32_matmul_precision('high')
    if dtype != torch.float32 and not all(p.requires_grad for p in model.parameters()):
        model.fingerprint = base_fingerprint(model)
    return model.set_dtype(dtype)


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
    batch_loss(forward, batch, it): the scalar loss of one batch at step it; forward is the model, compiled
      when config['compile'] (validation and generation run eager), in a DistributedDataParallel wrapper
      under torchrun (which averages the gradients).
    history: {'iter': [...], 'loss': [...], ...}, appended to every step.
    validate(done): called every eval_interval steps and at the end, on rank 0 only; then
      the adapters are checkpointed to ckpt_path (when given), with the running sums `state`
      ({name: tensor} the caller accumulates across steps) so that a resumed run continues them.
    lr_schedule(it, config): each step's learning rate. on_step(done, model): after every optimizer step.

    A non-finite loss or gradient norm stops training before the optimizer step (UserError naming the step and
    the last checkpoint, which is never overwritten with non-finite adapters); but a float16 model (set_precision)
    scales its loss by a GradScaler, which skips a step whose gradients overflow and lowers the scale. Ctrl-C
    lets the step in progress finish, checkpoints it and raises KeyboardInterrupt (one process only).
    """
    rank, world_size = distributed()
    forward = torch.compile(model) if config.get('compile') else model
    forward = DistributedDataParallel(forward) if world_size > 1 else forward
    scaler = torch.amp.GradScaler(torch.device(config['device']).type, enabled=model.autocast_dtype == torch.float16)
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
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config['grad_clip'])
            if not (loss.isfinite() and (grad_norm.isfinite() or scaler.is_enabled())):
                what = f"the loss is {loss.item():.4g}, the gradient norm {grad_norm.item():.4g}"
                raise UserError(stopped(it + 1, what, ckpt_path, last_saved))
            scaler.step(optimizer)   # skipped when a float16 gradient overflowed; then the scale is lowered
            scaler.update()
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


# -----------------------------------------------------------------------------
# the files: bases, checkpoints, the ensemble a run leaves behind


def save_atomically(obj, path):
    """torch.save to a temporary file, then rename, so a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(obj, path + '.tmp')
    os.replace(path + '.tmp', path)


def read_checkpoint(path, keys=RUN_KEYS, what=A_RUN):
    """The dict torch.save wrote at path, holding every one of `keys`; UserError naming the file when it is
    missing, unreadable (truncated, corrupt, not torch's) or of another kind than `what`."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found: expected {what}")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:   # OSError: some truncations
        raise UserError(f"{path} is not a checkpoint torch can read ({type(error).__name__}: truncated or "
                        f"corrupt?): expected {what}") from None
    missing = [key for key in keys if not (isinstance(ckpt, dict) and key in ckpt)]
    if missing:
        raise UserError(f"{path} is not {what} (it has no {missing[0]!r})")
    return ckpt


def read_base_checkpoint(path):
    """A pretrain.py checkpoint: {'config', 'model', 'tokenizer', ...}."""
    return read_checkpoint(path, ('config', 'model', 'tokenizer'), "a base model written by pretrain.py")


def base_config(path):
    """(GPTConfig, tokenizer name) of the base at path, checked without building the model: every mistake a UserError.

    path: a pretrain.py checkpoint (its tokenizer is the one stored), a Hugging Face GPT-2 directory (the
    tokenizer of its vocab.json and merges.txt, named by the directory's absolute path; without them 'gpt2',
    unless its vocabulary is exactly this project's tokenizer's, as in the tests' tiny random checkpoints), or
    DEFAULT_BASE before pretrain.py has made it (then pretrain.py's defaults).
    """
    if os.path.isdir(path):
        try:
            config = hf_config(path)
        except (OSError, KeyError, ValueError) as error:
            raise UserError(f"--base={path}: {error}") from None
        if all(os.path.isfile(os.path.join(path, file)) for file in data.GPT2_FILES):
            name = os.path.abspath(path)  # never the name 'gpt2', even for a clone of Hugging Face's gpt2 directory
        else:
            name = data.DEFAULT_TOKENIZER if config.vocab_size == data.VOCAB_SIZE else 'gpt2'
    elif os.path.isfile(path):
        checkpoint = read_base_checkpoint(path)
        config, name = GPTConfig(**checkpoint['config']), checkpoint['tokenizer']
    elif os.path.normpath(path) == DEFAULT_BASE:          # pretrain.py's defaults are GPTConfig's
        config, name = GPTConfig(vocab_size=data.VOCAB_SIZE), data.DEFAULT_TOKENIZER
    else:
        raise UserError(f"--base={path} not found: expected a checkpoint of pretrain.py (make one with "
                        f"`python pretrain.py --out_path={path}`) or a Hugging Face GPT-2 directory")
    if data.get_tokenizer(name).n_vocab > config.vocab_size:
        raise UserError(f"tokenizer {name} has {data.get_tokenizer(name).n_vocab} tokens, more than the "
                        f"vocabulary of {config.vocab_size} of the base {path}")
    return config, name


def load_base(path, device='cpu'):
    """The frozen base GPT (on the CPU) and its tokenizer name (base_config's). DEFAULT_BASE is pretrained first,
    by pretrain.py on `device`, when it is missing; any other missing base is a UserError."""
    _, tokenizer_name = base_config(path)
    if not os.path.exists(path):
        print(f"{path} not found: pretraining the base model first")
        pretrain = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pretrain.py')  # from any directory
        subprocess.run([sys.executable, pretrain, f"--out_path={path}", f"--device={device}"], check=True)
    if os.path.isdir(path):
        try:
            return GPT.from_pretrained(path), tokenizer_name
        except (OSError, KeyError, ValueError, ImportError, pickle.UnpicklingError, RuntimeError, EOFError) as error:
            raise UserError(f"--base={path}: {error}") from None
    checkpoint = read_base_checkpoint(path)
    model = GPT(GPTConfig(**checkpoint['config']))
    model.load_state_dict(checkpoint['model'])
    return model, tokenizer_name


def base_fingerprint(model):
    """A SHA-256 of the frozen base weights (every tensor but the adapters), in state_dict order.

    Adapters only make sense on the base they were trained on; checkpoints store this so a
    run that loads them can tell when out/base.pt has been replaced since.
    """
    if hasattr(model, 'fingerprint'):   # set_precision's, of the weights as loaded, before it rounded them
        return model.fingerprint
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if not name.endswith(('lora_A', 'lora_B')):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_base(ckpt, model, ckpt_path):
    """UserError when the adapters in ckpt were trained on another base than the one model carries."""
    stored = ckpt.get('base_fingerprint')    # None in checkpoints written before fingerprints existed
    if stored is not None and stored != base_fingerprint(model):
        raise UserError(f"{ckpt_path} holds adapters trained on another base model than the one loaded now "
                        "(was the base pretrained again?): train them again, or pass --base=<the base they used>")


def read_resume(out_dir, n_members, rank, lora_alpha):
    """out_dir/ckpt.pt for --resume=true, its adapters of the run's shape (n_members, rank, lora_alpha); UserError
    when it is missing, unreadable or of another shape. resume_from loads it once the model is built."""
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.isfile(ckpt_path):
        raise UserError(f"--resume=true: {ckpt_path} not found, so there is nothing to resume; drop --resume=true")
    ckpt = read_checkpoint(ckpt_path)
    stored = ckpt['lora_config']
    for key, stored_value, value in (('n_members', stored['n_members'], n_members), ('lora_rank', stored['rank'], rank),
                                     ('lora_alpha', stored['lora_alpha'], lora_alpha)):
        if stored_value != value:
            raise UserError(f"--resume=true: {ckpt_path} holds adapters with {key}={stored_value}, this run's "
                            f"{key} is {value}: pass --{key}={stored_value}, or another --out_dir")
    return ckpt


def run_base(run_config):
    """The base an SFT or DPO run's adapters sit on: an SFT run's own, a DPO run's SFT run's."""
    if 'sft_dir' in run_config:
        run_config = read_checkpoint(os.path.join(run_config['sft_dir'], 'ckpt.pt'))['config']
    return run_config['base']


def save_checkpoint(path, model, optimizer, it, config, history, state=None):
    """Adapters, optimizer, step, config, RNG state, the running sums `state` ({name: tensor}, train_loop's
    caller's) and the base's fingerprint, written to a temporary file and renamed."""
    ckpt = dict(adapters=lora_state_dict(model), lora_config=model.lora_config, optimizer=optimizer.state_dict(),
                iter=it, config=config, history=history, rng=torch.get_rng_state(), state=state or {},
                base_fingerprint=base_fingerprint(model))
    save_atomically(ckpt, path)


def resume_from(ckpt, ckpt_path, model, optimizer, config, state=None):
    """Load a save_checkpoint dict's adapters, optimizer, RNG state and running sums (into the tensors of `state`);
    returns (start iter, history)."""
    check_base(ckpt, model, ckpt_path)
    model.load_state_dict(ckpt['adapters'], strict=False)   # the base is not in it; the shape was checked before
    if ckpt['config']['max_iters'] != config['max_iters']:
        print(f"warning: max_iters {config['max_iters']} differs from the checkpoint's "
              f"{ckpt['config']['max_iters']}, so the learning-rate schedule changes from here on")
    optimizer.load_state_dict(ckpt['optimizer'])
    torch.set_rng_state(ckpt['rng'])
    for name, tensor in (state or {}).items():
        tensor.copy_(ckpt.get('state', {}).get(name, torch.zeros_like(tensor)))  # older checkpoints: sums from 0
    print(f"resumed from {ckpt_path} at iter {ckpt['iter']}")
    return ckpt['iter'], ckpt['history']


def load_ensemble(ckpt_path, device='cpu', base=None):
    """The base GPT carrying the adapters of a train_sft.py or train_dpo.py checkpoint: (model, tokenizer name,
    the run's config). The base is `base`, by default the one the run sits on (run_base), checked against the
    stored fingerprint."""
    ckpt = read_checkpoint(ckpt_path)
    if ckpt['iter'] < ckpt['config']['max_iters']:
        print(f"warning: {ckpt_path} stopped at iter {ckpt['iter']} of {ckpt['config']['max_iters']}")
    base = base or run_base(ckpt['config'])
    if not os.path.exists(base):
        raise UserError(f"the base model {base} that {ckpt_path} was trained on is missing")
    model, tokenizer_name = load_base(base, device)
    lora = ckpt['lora_config']
    add_lora(model, lora['n_members'], lora['rank'], lora['lora_alpha'], lora['targets'], lora['layers'])
    check_base(ckpt, model, ckpt_path)
    model.load_state_dict(ckpt['adapters'], strict=False)  # the adapters alone; the base came from load_base
    return model, tokenizer_name, ckpt['config']
