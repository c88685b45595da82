import json
import os

import pytest
import torch

from lora import (LoRALinear, MultiLoRALinear, add_lora, export_peft, load_adapters, lora_parameters,
                  merge_member, save_adapters)
from model import GPT, GPTConfig

TINY = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)


def tiny_ensemble(n_members=3, layers=None, seed=0):
    """A tiny GPT with an ensemble whose B matrices are random, so members differ."""
    torch.manual_seed(seed)
    model = GPT(TINY)
    params = add_lora(model, n_members=n_members, rank=4, lora_alpha=8, layers=layers)
    with torch.no_grad():
        for p in params:
            if p.dim() == 3 and p.shape[-1] == 4:  # lora_B: (M, out, r)
                p.normal_(0, 0.1)
    return model


def test_members_equal_base_at_init():
    torch.manual_seed(0)
    model = GPT(TINY)
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    base_logits = model(idx)                                   # (B, T, V)
    add_lora(model, n_members=3, rank=4, lora_alpha=8)
    logits = model(idx)                                        # (M, B, T, V)
    assert logits.shape == (3, 2, 10, TINY.vocab_size)
    for m in range(3):
        torch.testing.assert_close(logits[m], base_logits, rtol=0, atol=1e-6)


def test_multi_lora_member_equals_single_lora_and_explicit_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    multi = MultiLoRALinear(base, n_members=3, rank=2, lora_alpha=4)
    with torch.no_grad():
        multi.lora_B.normal_()
    x = torch.randn(3, 2, 7, 6)                                # (M, B, T, in)
    y = multi(x)
    for m in range(3):
        single = LoRALinear(base, rank=2, lora_alpha=4)
        with torch.no_grad():
            single.lora_A.copy_(multi.lora_A[m])
            single.lora_B.copy_(multi.lora_B[m])
        explicit = x[m] @ base.weight.T + base.bias + 2.0 * x[m] @ multi.lora_A[m].T @ multi.lora_B[m].T
        torch.testing.assert_close(y[m], single(x[m]), rtol=0, atol=1e-6)
        torch.testing.assert_close(y[m], explicit, rtol=0, atol=1e-6)


def test_members_have_independent_A_init():
    multi = MultiLoRALinear(torch.nn.Linear(64, 8), n_members=2, rank=4, lora_alpha=4)
    assert not torch.equal(multi.lora_A[0], multi.lora_A[1])
    bound = 1 / 64 ** 0.5                                      # kaiming_uniform(a=sqrt 5) on fan-in 64
    assert multi.lora_A.abs().max() <= bound and (multi.lora_B == 0).all()


def test_gradient_reaches_only_its_member():
    model = tiny_ensemble()
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    model(idx)[1].sum().backward()                             # a loss on member 1 only
    for name, p in model.named_parameters():
        if name.endswith(('lora_A', 'lora_B')):
            assert p.grad[1].abs().sum() > 0, name
            assert (p.grad[0] == 0).all() and (p.grad[2] == 0).all(), name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_merge_member_reproduces_member_logits():
    model = tiny_ensemble()
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    logits = model(idx)
    for m in range(3):
        merged = merge_member(model, m)
        assert merged.n_members == 0
        torch.testing.assert_close(merged(idx), logits[m], rtol=0, atol=1e-5)


def test_frozen_trunk_equals_all_members_path():
    model = tiny_ensemble(layers=[1])
    assert model.trunk_depth() == 1
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    shared = model(idx)
    model.share_trunk = False
    assert model.trunk_depth() == 0
    assert torch.equal(model(idx), shared)
    # and the per-member input path (used while decoding) agrees too
    assert torch.equal(model(idx.expand(3, 2, 10)), shared)


def test_add_lora_rejects_bad_arguments():
    for kwargs, message in [(dict(n_members=0), 'n_members'), (dict(rank=0), 'rank'),
                            (dict(targets=('c_attn', 'q_proj')), 'q_proj'), (dict(layers=[2]), 'layers')]:
        args = dict(n_members=2, rank=2, lora_alpha=4) | kwargs
        with pytest.raises(ValueError, match=message):
            add_lora(GPT(TINY), **args)


def test_generate_greedy_matches_stepwise_argmax_per_member():
    model = tiny_ensemble()
    prompt = torch.randint(0, TINY.vocab_size, (2, 4))
    out = model.generate(prompt, max_new_tokens=5, temperature=0)
    assert out.shape == (3, 2, 9)
    for m in range(3):
        seq = prompt
        merged = merge_member(model, m)
        for _ in range(5):
            seq = torch.cat([seq, merged(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out[m], seq)


def test_generate_sampling_is_seeded_and_respects_top_k():
    torch.manual_seed(0)
    model = GPT(TINY)
    prompt = torch.randint(0, TINY.vocab_size, (3, 2))
    sample = lambda seed, **kw: model.generate(prompt, 6, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(sample(1, temperature=1.0), sample(1, temperature=1.0))
    top1 = sample(2, temperature=1.0, top_k=1)
    assert torch.equal(top1, model.generate(prompt, 6, temperature=0))


def test_generate_stops_at_stop_token():
    torch.manual_seed(0)
    model = GPT(TINY)
    prompt = torch.zeros(1, 2, dtype=torch.long)
    first = model.generate(prompt, 1, temperature=0)[0, -1].item()
    out = model.generate(prompt, 8, temperature=0, stop_token=first)
    assert out.shape == (1, 3)                                 # stopped right after emitting it


def write_hf_checkpoint(model, path, fmt='bin'):
    """Write model in Hugging Face's GPT-2 layout: Conv1D (in, out) weights, no 'transformer.' prefix."""
    os.makedirs(path, exist_ok=True)
    cfg = model.config
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump(dict(n_positions=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                       n_head=cfg.n_head, n_embd=cfg.n_embd), f)
    conv1d = ('c_attn.weight', 'c_proj.weight', 'c_fc.weight')
    state = {}
    for key, t in model.state_dict().items():
        if key == 'lm_head.weight':
            continue
        state[key.removeprefix('transformer.')] = t.t().contiguous() if key.endswith(conv1d) else t
    for i in range(cfg.n_layer):
        state[f'h.{i}.attn.bias'] = torch.tril(torch.ones(cfg.block_size, cfg.block_size))
    torch.save(state, os.path.join(path, 'pytorch_model.bin'))
    return state


def test_from_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = GPT(TINY)
    write_hf_checkpoint(model, tmp_path)
    loaded = GPT.from_pretrained(str(tmp_path))
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)


def test_from_pretrained_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match='config.json'):
        GPT.from_pretrained(str(tmp_path))
    torch.manual_seed(0)
    state = write_hf_checkpoint(GPT(TINY), tmp_path)
    del state['h.1.mlp.c_fc.bias']
    torch.save(state, tmp_path / 'pytorch_model.bin')
    with pytest.raises(KeyError, match=r'h\.1\.mlp\.c_fc\.bias'):
        GPT.from_pretrained(str(tmp_path))
    state['h.1.mlp.c_fc.bias'] = torch.zeros(7)
    torch.save(state, tmp_path / 'pytorch_model.bin')
    with pytest.raises(ValueError, match=r'h\.1\.mlp\.c_fc\.bias.*\(7,\).*\(128,\)'):
        GPT.from_pretrained(str(tmp_path))


def test_safetensors_only_directory_without_package_says_what_to_install(tmp_path, monkeypatch):
    write_hf_checkpoint(GPT(TINY), tmp_path)
    os.replace(tmp_path / 'pytorch_model.bin', tmp_path / 'model.safetensors')
    monkeypatch.setitem(__import__('sys').modules, 'safetensors.torch', None)
    with pytest.raises(ImportError, match='pip install safetensors'):
        GPT.from_pretrained(str(tmp_path))


def test_save_and_load_adapters_round_trip(tmp_path):
    model = tiny_ensemble(layers=[1])
    save_adapters(model, str(tmp_path / 'adapters.pt'))
    saved = torch.load(tmp_path / 'adapters.pt', weights_only=True)
    assert all(k.endswith(('lora_A', 'lora_B')) for k in saved['adapters'])
    torch.manual_seed(0)
    fresh = GPT(TINY)                                          # same seed, same base weights
    load_adapters(fresh, str(tmp_path / 'adapters.pt'))
    idx = torch.randint(0, TINY.vocab_size, (2, 10))
    torch.testing.assert_close(fresh(idx), model(idx), rtol=0, atol=0)


def test_export_peft_files_keys_shapes_and_config(tmp_path):
    model = tiny_ensemble(layers=[0])
    export_peft(model, 2, str(tmp_path), base_model_name_or_path='gpt2')
    with open(tmp_path / 'adapter_config.json') as f:
        cfg = json.load(f)
    assert cfg['peft_type'] == 'LORA' and cfg['r'] == 4 and cfg['lora_alpha'] == 8
    assert cfg['bias'] == 'none' and cfg['fan_in_fan_out'] is True and cfg['lora_dropout'] == 0.0
    assert sorted(cfg['target_modules']) == ['c_attn', 'c_fc', 'c_proj']
    assert cfg['base_model_name_or_path'] == 'gpt2' and cfg['layers_to_transform'] == [0]
    files = os.listdir(tmp_path)
    if 'adapter_model.safetensors' in files:
        from safetensors.torch import load_file
        tensors = load_file(tmp_path / 'adapter_model.safetensors')
    else:
        tensors = torch.load(tmp_path / 'adapter_model.bin', weights_only=True)
    prefix = 'base_model.model.transformer.h.0.'
    expected = {'attn.c_attn': (96, 32), 'attn.c_proj': (32, 32), 'mlp.c_fc': (128, 32), 'mlp.c_proj': (32, 128)}
    assert sorted(tensors) == sorted(f'{prefix}{m}.lora_{ab}.weight' for m in expected for ab in 'AB')
    for module, (out_features, in_features) in expected.items():
        layer = model.get_submodule(f'transformer.h.0.{module}')
        assert torch.equal(tensors[f'{prefix}{module}.lora_A.weight'], layer.lora_A[2])
        assert tensors[f'{prefix}{module}.lora_A.weight'].shape == (4, in_features)
        assert tensors[f'{prefix}{module}.lora_B.weight'].shape == (out_features, 4)
    # PEFT's merge with fan_in_fan_out: W_conv1d + s * (B @ A)^T, i.e. our merged weight transposed
    delta = 2.0 * tensors[f'{prefix}mlp.c_fc.lora_B.weight'] @ tensors[f'{prefix}mlp.c_fc.lora_A.weight']
    layer = model.get_submodule('transformer.h.0.mlp.c_fc')
    torch.testing.assert_close(layer.weight + delta, layer.merged_weight(2).detach())


def test_lora_parameters_are_the_only_trainable_ones():
    model = tiny_ensemble()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in lora_parameters(model)}
    assert len(trainable) == 2 * 4 * TINY.n_layer             # A and B on 4 linears per block
