"""
Files on disk: the frozen base model, training checkpoints, and the ensemble an
SFT or DPO run leaves behind.

A base is a pretrain.py checkpoint (the model config, its weights and the
tokenizer name) or a local Hugging Face GPT-2 directory (config.json plus
pytorch_model.bin or model.safetensors). A training checkpoint (ckpt.pt of
train_sft.py or train_dpo.py) holds the adapters alone, with the optimizer, the
step, the run's config, the loss history, the RNG state, the training loop's
running sums and a fingerprint of the base the adapters were trained on. Every
file is written to a temporary name and then renamed, so a crash never leaves a
half-written one. A file the user names that is missing, unreadable or of the
wrong kind raises config.UserError, naming it.
"""
import hashlib
import os
import pickle
import subprocess
import sys

import torch

import data
from config import UserError
from lora import add_lora, lora_state_dict
from model import GPT, GPTConfig, hf_config

DEFAULT_BASE = 'out/base.pt'   # pretrain.py's out_path: the one base that is pretrained when it is missing
RUN_KEYS = ('adapters', 'lora_config', 'config', 'iter')
A_RUN = "a checkpoint of train_sft.py or train_dpo.py"


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


def base_config(path, tokenizer=''):
    """(GPTConfig, tokenizer name) of the base at path, checked without building the model: every mistake a UserError.

    path: a pretrain.py checkpoint, a Hugging Face GPT-2 directory, or DEFAULT_BASE before pretrain.py has made it
    (then pretrain.py's defaults). tokenizer '' is the base's own: a pretrain.py checkpoint's stored name; for a
    Hugging Face directory 'gpt2', unless its vocabulary is exactly this project's tokenizer's (as in the tests'
    tiny random checkpoints). A named tokenizer must be the stored one, or fit the directory's vocabulary.
    """
    if os.path.isdir(path):
        try:
            config = hf_config(path)
        except (OSError, KeyError, ValueError) as error:
            raise UserError(f"--base={path}: {error}") from None
        own = data.DEFAULT_TOKENIZER if config.vocab_size == data.VOCAB_SIZE else 'gpt2'
    elif os.path.isfile(path):
        checkpoint = read_base_checkpoint(path)
        config, own = GPTConfig(**checkpoint['config']), checkpoint['tokenizer']
    elif os.path.normpath(path) == DEFAULT_BASE:
        import pretrain  # here, not at the top: pretrain.py builds on this module
        own = pretrain.defaults['tokenizer']
        config = pretrain.model_config(pretrain.defaults, data.get_tokenizer(own).n_vocab)
    else:
        raise UserError(f"--base={path} not found: expected a checkpoint of pretrain.py (make one with "
                        f"`python pretrain.py --out_path={path}`) or a Hugging Face GPT-2 directory")
    name = tokenizer or own
    if not os.path.isdir(path) and name != own:
        raise UserError(f"--tokenizer={tokenizer}: the base {path} uses tokenizer {own}")
    if data.get_tokenizer(name).n_vocab > config.vocab_size:
        raise UserError(f"--tokenizer={name} has {data.get_tokenizer(name).n_vocab} tokens, more than the "
                        f"vocabulary of {config.vocab_size} of the base {path}")
    return config, name


def load_base(path, device='cpu', tokenizer=''):
    """The frozen base GPT (on the CPU) and its tokenizer name (base_config's rules). DEFAULT_BASE is pretrained
    first, by pretrain.py on `device`, when it is missing; any other missing base is a UserError."""
    _, tokenizer_name = base_config(path, tokenizer)
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
    """(base path, tokenizer) that an SFT or DPO run's adapters sit on: an SFT run's own, a DPO run's SFT run's."""
    if 'sft_dir' in run_config:
        run_config = read_checkpoint(os.path.join(run_config['sft_dir'], 'ckpt.pt'))['config']
    return run_config['base'], run_config.get('tokenizer', '')


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
    run_base_path, tokenizer = run_base(ckpt['config'])
    base = base or run_base_path
    if not os.path.exists(base):
        raise UserError(f"the base model {base} that {ckpt_path} was trained on is missing")
    model, tokenizer_name = load_base(base, device, tokenizer)
    lora = ckpt['lora_config']
    add_lora(model, lora['n_members'], lora['rank'], lora['lora_alpha'], lora['targets'], lora['layers'])
    check_base(ckpt, model, ckpt_path)
    model.load_state_dict(ckpt['adapters'], strict=False)  # the adapters alone; the base came from load_base
    return model, tokenizer_name, ckpt['config']
