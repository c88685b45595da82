"""
A small GPT in the manner of nanoGPT, with a member axis for LoRA ensembles.

Module names copy Hugging Face's GPT-2 (transformer.wte, transformer.h.0.attn.c_attn,
mlp.c_fc, ln_f, lm_head), so a GPT-2 checkpoint loads key by key.

The member axis. Without adapters the model is a plain GPT: idx (B, T) -> logits
(B, T, V). After lora.add_lora(model, n_members=M, ...) every call computes all M
members in one pass: idx (B, T) -> logits (M, B, T, V). Activations then carry a
leading member axis, (M, B, T, C). Blocks below the first adapted block are frozen
and identical for every member, so they run once on (B, T, C) and their output is
broadcast to the M members (the shared frozen trunk). During generation members'
continuations differ, so idx may also be (M, B, T).

Precision. set_dtype(torch.bfloat16) (or float16) stores the frozen weights in that dtype and
runs the forward pass under torch.autocast to it; the logits come back in float32 whatever the
dtype, so every log-probability read from them is float32 (METHOD.md §7).
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from renyi_lora import mixture_next_token_logprobs, posterior_weights


@dataclass
class GPTConfig:
    block_size: int = 128
    vocab_size: int = 1024
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, cache=None):
        *lead, T, C = x.shape                                   # lead = (B,) or (M, B)
        q, k, v = self.c_attn(x).split(C, dim=-1)               # each (*lead, T, C)
        # fold the member and batch axes together: attention never mixes them
        q, k, v = (t.reshape(-1, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (N, nh, T, hs)
        causal = True
        if cache is not None:                                   # generation: keys and values of earlier tokens
            if 'k' in cache:
                assert T == 1, "after the prompt the cache takes one token at a time"
                past_k, past_v = cache['k'], cache['v']         # (N', nh, T_past, hs)
                if past_k.shape[0] != k.shape[0]:               # members' continuations just diverged:
                    repeat = k.shape[0] // past_k.shape[0]      # the shared trunk's (B, ...) becomes (M * B, ...)
                    past_k, past_v = past_k.repeat(repeat, 1, 1, 1), past_v.repeat(repeat, 1, 1, 1)
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
                causal = False                                  # one new query may see every cached key
            cache['k'], cache['v'] = k, v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(*lead, T, C)              # (*lead, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate='tanh')))  # GPT-2's GELU


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.n_members = 0        # set by lora.add_lora; 0 means no ensemble
        self.share_trunk = True   # run frozen blocks below the first adapter once
        self.autocast_dtype = None  # set_dtype's: forward passes run under autocast to it
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight'):  # GPT-2's scaled init of residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def set_dtype(self, dtype):
        """Store the frozen weights in dtype and run forward passes under autocast to it; returns self. The
        trainable weights (the adapters, or all of a model being pretrained) stay float32. float32 changes nothing."""
        if dtype != torch.float32:
            for p in self.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(dtype)
            self.autocast_dtype = dtype
        return self

    def trunk_depth(self):
        """Number of leading blocks that carry no adapter (shared by all members)."""
        if not self.share_trunk:
            return 0
        for i, block in enumerate(self.transformer.h):
            if any(hasattr(mod, 'lora_A') for mod in block.modules()):
                return i
        return len(self.transformer.h)

    def forward(self, idx, cache=None):
        """idx (B, T) or, with an ensemble, (M, B, T) -> logits (B, T, V) or (M, B, T, V).

        cache: None, or during generation a list of one dict per block holding the keys and
        values of the tokens before idx (filled in here); idx then continues those tokens.
        The logits are float32 whatever autocast_dtype the layers ran in.
        """
        with torch.autocast(idx.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.logits(idx, cache).float()

    def logits(self, idx, cache=None):
        """forward without its autocast: logits in the dtype the layers computed them in."""
        T = idx.shape[-1]
        past = cache[0]['k'].shape[2] if cache is not None and 'k' in cache[0] else 0
        assert past + T <= self.config.block_size, f"sequence of {past + T} tokens, block_size is {self.config.block_size}"
        if idx.dim() == 3 and idx.shape[0] != self.n_members:
            raise ValueError(f"idx has {idx.shape[0]} members on its first axis, the model has {self.n_members}")
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C) or (M, B, T, C)
        trunk = self.trunk_depth() if idx.dim() == 2 else 0
        caches = cache if cache is not None else [None] * len(self.transformer.h)
        for block, block_cache in zip(self.transformer.h[:trunk], caches):
            x = block(x, block_cache)                           # (B, T, C): once for all members
        if self.n_members and x.dim() == 3:
            x = x.expand(self.n_members, *x.shape)              # (M, B, T, C), a view, no copy
        for block, block_cache in zip(self.transformer.h[trunk:], caches[trunk:]):
            x = block(x, block_cache)
        return self.lm_head(self.transformer.ln_f(x))           # (..., T, V)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, stop_token=None, generator=None,
                 mixture=None, use_cache=True):
        """Continue idx (B, T) by max_new_tokens tokens.

        temperature=0 decodes greedily; otherwise samples from the next-token distribution
        sharpened by 1 / temperature, restricted to the top_k tokens when top_k is set.
        With an ensemble, `mixture` says whose distribution that is (METHOD.md §6):
          None        every member decodes its own continuation: (M, B, T + new)
          'sequence'  one continuation per prompt from the sequence mixture (1/M) sum_m p_m(y | x)
                      that the alpha > 0 objective trains: members weighted by how well they
                      explain the tokens so far (posterior_weights): (B, T + new)
          'token'     one continuation from the equal-weight token mixture mean_m p_m: (B, T + new)
        Once a sequence emits stop_token it keeps emitting it, and decoding ends early when
        every sequence has stopped. use_cache keeps every block's keys and values (for all
        members at once, the shared trunk's once) so each step runs one new token; it falls
        back to recomputing the last block_size tokens when the sequence would outgrow block_size.
        The B prompts must share one length T: there is no padding mask (evaluate.prompt_batches
        groups prompts by length). Past block_size the members see a cropped window, but the
        sequence mixture's weights keep counting every token generated since the prompt.
        """
        if mixture not in (None, 'sequence', 'token'):
            raise ValueError(f"mixture must be None, 'sequence' or 'token', got {mixture!r}")
        mixing = mixture is not None and self.n_members > 0
        use_cache = use_cache and idx.shape[-1] + max_new_tokens <= self.config.block_size
        cache = [{} for _ in self.transformer.h] if use_cache else None
        prefix_logp = None                                      # (M, B): log p_m(new tokens so far | prompt)
        finished, step_input = None, idx
        for _ in range(max_new_tokens):
            if use_cache:
                logits = self(step_input, cache)[..., -1, :]   # (..., B, V)
            else:
                logits = self(idx[..., -self.config.block_size:])[..., -1, :]
            if mixing:
                member_logprobs = logits.float().log_softmax(-1)                    # (M, B, V)
                if prefix_logp is None:
                    prefix_logp = member_logprobs.new_zeros(member_logprobs.shape[:2])
                weights = (posterior_weights(prefix_logp) if mixture == 'sequence'
                           else torch.full_like(prefix_logp, 1.0 / self.n_members))
                logits = mixture_next_token_logprobs(member_logprobs, weights)      # (B, V)
            next_token = self._pick(logits, temperature, top_k, generator)          # (..., B, 1)
            if idx.dim() < next_token.dim():
                idx = idx.expand(self.n_members, *idx.shape)    # (M, B, T): members now diverge
            if stop_token is not None:
                finished = torch.zeros_like(next_token, dtype=torch.bool) if finished is None else finished
                next_token = next_token.masked_fill(finished, stop_token)
                finished = finished | (next_token == stop_token)
            if mixing:
                prefix_logp = prefix_logp + member_logprobs.gather(
                    -1, next_token.expand(self.n_members, *next_token.shape)).squeeze(-1)
            idx, step_input = torch.cat([idx, next_token], dim=-1), next_token
            if finished is not None and finished.all():
                break
        return idx

    @staticmethod
    def _pick(logits, temperature, top_k, generator):
        """The next token from (unnormalised) log-probabilities (..., V) -> (..., 1)."""
        if temperature == 0:
            return logits.argmax(-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float('-inf'))
        probs = F.softmax(logits, dim=-1).reshape(-1, logits.shape[-1])
        return torch.multinomial(probs, 1, generator=generator).view(*logits.shape[:-1], 1)

    @classmethod
    def from_pretrained(cls, path):
        """Load a local GPT-2 checkpoint in the Hugging Face layout; nothing is downloaded.

        path: a directory with config.json and pytorch_model.bin or
        model.safetensors. Conv1D weights, stored (in, out), are transposed into
        nn.Linear's (out, in); the attn.bias / attn.masked_bias buffers are skipped.
        """
        model = cls(hf_config(path))
        model.load_state_dict(_hf_to_state_dict(_read_hf_weights(path), model.state_dict()))
        return model


def hf_config(path):
    """The GPTConfig of a Hugging Face GPT-2 directory, read from its config.json (dropout 0, biases on)."""
    config_file = os.path.join(path, 'config.json')
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} not found: expected a Hugging Face GPT-2 directory")
    with open(config_file) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_file}:{error.lineno}: invalid JSON ({error.msg})") from None
    missing = [key for key in ('n_positions', 'vocab_size', 'n_layer', 'n_head', 'n_embd') if key not in hf]
    if missing:
        raise ValueError(f"{config_file} has no {missing[0]!r}: expected a GPT-2 config")
    return GPTConfig(block_size=hf['n_positions'], vocab_size=hf['vocab_size'], n_layer=hf['n_layer'],
                     n_head=hf['n_head'], n_embd=hf['n_embd'], dropout=0.0, bias=True)


def _read_hf_weights(path):
    """The raw tensors of pytorch_model.bin or model.safetensors in directory path."""
    bin_file = os.path.join(path, 'pytorch_model.bin')
    st_file = os.path.join(path, 'model.safetensors')
    if os.path.isfile(bin_file):
        return torch.load(bin_file, map_location='cpu', weights_only=True)
    if os.path.isfile(st_file):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{st_file} needs the safetensors package: pip install safetensors") from None
        return load_file(st_file)
    raise FileNotFoundError(f"neither pytorch_model.bin nor model.safetensors in {path}")


def _hf_to_state_dict(hf_state, own_state):
    """Map Hugging Face GPT-2 tensors onto our state dict, by name.

    HF files name keys 'h.0.attn.c_attn.weight' (GPT2Model) or
    'transformer.h.0...' (GPT2LMHeadModel); both are accepted.
    """
    hf_state = {k.removeprefix('transformer.'): v for k, v in hf_state.items()
                if not k.endswith(('.attn.bias', '.attn.masked_bias')) and k != 'lm_head.weight'}
    conv1d = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
    state = {}
    for key, own in own_state.items():
        if key == 'lm_head.weight':
            continue  # tied to transformer.wte.weight
        hf_key = key.removeprefix('transformer.')
        if hf_key not in hf_state:
            raise KeyError(f"checkpoint has no tensor for {hf_key}")
        tensor = hf_state.pop(hf_key)
        tensor = tensor.t() if key.endswith(conv1d) else tensor
        if tensor.shape != own.shape:
            raise ValueError(f"{hf_key}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(own.shape)}")
        state[key] = tensor
    if hf_state:
        raise KeyError(f"checkpoint tensors the model does not know: {sorted(hf_state)[:5]}")
    state['lm_head.weight'] = state['transformer.wte.weight']
    return state
