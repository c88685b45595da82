"""--dtype and --compile on a tiny ensemble (n_layer=2, n_embd=32, M=3, the lower block a shared trunk): a
bfloat16 training step against the float32 one, float32 read-outs under autocast, float16's loss scaling,
compiled logits and gradients against eager ones, a bfloat16 run's checkpoint on the float32 base, and a bad
--dtype as one line and exit status 2."""
import os

import pytest
import torch

import pretrain
import sample
import train_sft
from config import run_script
from evaluate import score_batches
from lora import add_lora
from model import GPT, GPTConfig
from renyi_lora import renyi_loss, responsibilities, sequence_logprobs
from trainer import load_base, load_ensemble, save_checkpoint, set_precision, train_loop

TINY = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)
LOOP = dict(max_iters=1, learning_rate=0.1, min_lr=0.1, warmup_iters=0, grad_clip=1e9, log_interval=1000,
            eval_interval=1000, device='cpu')


def tiny_ensemble(dtype='float32', seed=0):
    """(model in dtype, its adapters, a batch idx (B, T) with labels masking the prompt): random B matrices, so the
    members differ and every adapter gets a gradient."""
    torch.manual_seed(seed)
    model = GPT(TINY)
    params = add_lora(model, n_members=3, rank=4, lora_alpha=8.0, layers=[1])
    with torch.no_grad():
        for p in params[1::2]:                                   # lora_B (M, out, r)
            p.normal_(0, 0.1)
    idx = torch.randint(0, TINY.vocab_size, (4, 12))             # (B, T)
    labels = idx.masked_fill(torch.arange(12) < 5, -100)         # the first 5 tokens are the prompt
    return set_precision(model, dict(dtype=dtype, device='cpu')), params, idx, labels


def renyi_step(model, params, idx, labels, optimizer, config=LOOP):
    """One train_loop step of the alpha-Renyi loss; returns (the loss, the adapters' change)."""
    before = [p.detach().clone() for p in params]
    history = dict(iter=[], loss=[])
    train_loop(model, params, optimizer, iter([None] * config['max_iters']),
               lambda forward, batch, it: renyi_loss(sequence_logprobs(forward(idx), labels), 2.0), config, history)
    return history['loss'][0], [p.detach() - b for p, b in zip(params, before)]


def test_a_bfloat16_step_matches_the_float32_step():
    """bfloat16 keeps 8 significant bits (a relative rounding of 2^-9 per operation). With plain SGD the step is the
    gradient, so it shows the gradients: within 5 % of float32's in norm (about 2 % measured), the loss within 1e-3
    relative (3e-5 measured)."""
    losses, steps = {}, {}
    for dtype in ('float32', 'bfloat16'):
        model, params, idx, labels = tiny_ensemble(dtype)
        losses[dtype], steps[dtype] = renyi_step(model, params, idx, labels, torch.optim.SGD(params, lr=0.1))
    assert losses['bfloat16'] == pytest.approx(losses['float32'], rel=1e-3)
    for low, exact in zip(steps['bfloat16'], steps['float32']):
        assert exact.norm() > 0 and (low - exact).norm() / exact.norm() < 0.05


def test_under_bfloat16_only_the_frozen_base_is_bfloat16_and_every_read_out_is_float32():
    model, params, idx, labels = tiny_ensemble('bfloat16')
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16          # frozen: stored in bfloat16
    assert model.lm_head.weight.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in params)
    logits = model(idx)                                                              # (M, B, T, V)
    assert logits.dtype == torch.float32
    with torch.autocast('cpu', torch.bfloat16):
        assert model.logits(idx).dtype == torch.bfloat16                             # what the layers computed
    logp = sequence_logprobs(logits, labels)                                         # (M, B)
    loss = renyi_loss(logp, 2.0)
    assert logp.dtype == loss.dtype == responsibilities(logp.detach(), 2.0).dtype == torch.float32
    read_outs = score_batches(model, [(idx, labels)])
    for key in ('logp', 'epistemic', 'epistemic_token', 'total', 'aleatoric', 'token_confidence', 'token_true_prob'):
        assert read_outs[key].dtype == torch.float32, key
    optimizer = torch.optim.AdamW(params)
    loss.backward()
    optimizer.step()
    assert all(p.grad.dtype == torch.float32 for p in params)
    assert all(t.dtype == torch.float32 for state in optimizer.state.values() for t in state.values())


def test_float16_scales_the_loss_and_takes_finite_steps():
    model, params, idx, labels = tiny_ensemble('float16')
    exact, *_ = tiny_ensemble('float32')
    assert model.lm_head.weight.dtype == torch.float16
    torch.testing.assert_close(model(idx), exact(idx), rtol=0, atol=0.01)            # float16 keeps 11 bits
    loss, step = renyi_step(model, params, idx, labels, torch.optim.AdamW(params, lr=1e-2), LOOP | dict(max_iters=5))
    assert torch.isfinite(torch.tensor(loss)) and all(torch.isfinite(p).all() for p in params)
    assert all(change.abs().max() > 0 for change in step)                            # every adapter moved


def test_a_bfloat16_runs_checkpoint_loads_on_the_float32_base(tiny_base, tmp_path):
    """The checkpoint keeps the fingerprint of the base's weights as loaded, not as rounded to bfloat16."""
    model, _ = load_base(tiny_base)
    params = add_lora(model, 2, 4, 8.0)
    set_precision(model, dict(dtype='bfloat16', device='cpu'))
    run_config = train_sft.defaults | dict(base=tiny_base, n_members=2, lora_rank=4, lora_alpha=8.0, dtype='bfloat16')
    save_checkpoint(str(tmp_path / 'ckpt.pt'), model, torch.optim.AdamW(params), 0, run_config, dict(iter=[], loss=[]))
    loaded, _, _ = load_ensemble(str(tmp_path / 'ckpt.pt'))                          # check_base passes
    assert loaded.lm_head.weight.dtype == torch.float32 and model.lm_head.weight.dtype == torch.bfloat16


def test_a_compiled_forward_gives_the_eager_logits_and_gradients(monkeypatch):
    """train_loop's torch.compile, with the member axis and the shared trunk. The suite compiles with the aot_eager
    backend: TorchDynamo's graph of GPT.forward and AOT autograd's backward, the parts our code can break; inductor's
    kernels take about a minute per graph on a CPU (test_inductor_gives_the_eager_logits below)."""
    compile_ = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda model: compile_(model, backend='aot_eager'))
    losses, steps = {}, {}
    for compiled in (False, True):
        model, params, idx, labels = tiny_ensemble()
        losses[compiled], steps[compiled] = renyi_step(model, params, idx, labels, torch.optim.SGD(params, lr=0.1),
                                                       LOOP | dict(compile=compiled))
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    for compiled_step, eager_step in zip(steps[True], steps[False]):
        torch.testing.assert_close(compiled_step, eager_step, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(os.environ.get('RENYI_TEST_INDUCTOR') != '1',
                    reason="inductor compiles for about a minute on a CPU: RENYI_TEST_INDUCTOR=1 runs it")
def test_inductor_gives_the_eager_logits():
    model, _, idx, _ = tiny_ensemble()
    members_idx = idx.expand(3, *idx.shape)                                          # (M, B, T): no shared trunk
    with torch.no_grad():
        for tokens in (idx, members_idx):
            torch.testing.assert_close(torch.compile(model)(tokens), model(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('main, args', [(train_sft.main, []), (pretrain.main, []),
                                        (sample.main, ['--prompt=Q: Hi?\\nA:'])])
def test_a_bad_dtype_is_one_line_and_exit_status_2(main, args, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_script(main, ['--dtype=float64', f'--out_dir={tmp_path / "never"}' if main is not pretrain.main
                          else f'--out_path={tmp_path / "never" / "base.pt"}', *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == "error: --dtype=float64: expected auto, float32, bfloat16 or float16\n"
    assert not (tmp_path / "never").exists()
