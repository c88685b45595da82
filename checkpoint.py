"""
Files on disk: the frozen base model, training checkpoints, and the ensemble an
SFT or DPO run leaves behind.

A base checkpoint (pretrain.py) holds the model config, its weights and the
tokenizer name. A training checkpoint (ckpt.pt of train_sft.py or train_dpo.py)
holds the adapters alone, with the optimizer, the step, the run's config, the
loss history, the RNG state and a fingerprint of the base the adapters were
trained on. Every file is written to a temporary name and then renamed, so a
crash never leaves a half-written one.
"""
import hashlib
import os
import subprocess
import sys

import torch

from lora import add_lora, lora_state_dict
from model import GPT, GPTConfig


def save_atomically(obj, path):
    """torch.save to a temporary file, then rename, so a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(obj, path + '.tmp')
    os.replace(path + '.tmp', path)


def load_base(path, device='cpu'):
    """The frozen base GPT and its tokenizer name; runs pretrain.py first when the checkpoint is missing."""
    if not os.path.exists(path):
        print(f"{path} not found: pretraining the base model first")
        pretrain = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'pretrain.py')  # from any directory
        subprocess.run([sys.executable, pretrain, f"--out_path={path}", f"--device={device}"], check=True)
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    model = GPT(GPTConfig(**checkpoint['config']))
    model.load_state_dict(checkpoint['model'])
    return model, checkpoint['tokenizer']


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


def load_ensemble(ckpt_path, device='cpu', base=None):
    """The base GPT carrying the adapters of a train_sft.py or train_dpo.py checkpoint: (model, tokenizer name,
    the run's config). The base is `base`, by default the one the run's config names (a train_dpo.py config
    names none: pass its SFT run's), checked against the stored fingerprint."""
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=False)
    if ckpt['iter'] < ckpt['config']['max_iters']:
        print(f"warning: {ckpt_path} stopped at iter {ckpt['iter']} of {ckpt['config']['max_iters']}")
    model, tokenizer_name = load_base(base or ckpt['config']['base'], device)
    lora = ckpt['lora_config']
    add_lora(model, lora['n_members'], lora['rank'], lora['lora_alpha'], lora['targets'], lora['layers'])
    model.load_state_dict(ckpt['adapters'], strict=False)  # the adapters alone; the base came from load_base
    check_base(ckpt, model, ckpt_path)
    return model, tokenizer_name, ckpt['config']
