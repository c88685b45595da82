"""throughput.py against hand counts: the bytes autograd saves, a member's adapter parameters, the cards' peaks and
the MFU; and its bfloat16 run on CPU."""
import re

import pytest
import torch

from config import UserError
from experiments import throughput


def test_saved_for_backward_counts_activations_once_and_leaves_out_weights():
    weight = torch.nn.Parameter(torch.randn(64, 32))
    x = torch.randn(16, 64)
    # x @ W saves x (16 x 64 floats) for W's gradient, relu its output (16 x 32); a parameter is not an activation
    mb = throughput.saved_for_backward_mb(lambda: (x @ weight).relu().sum())
    assert mb == pytest.approx((16 * 64 + 16 * 32) * 4 / 2 ** 20, rel=0, abs=0)


def test_memory_run_counts_a_members_adapter_parameters_by_hand():
    config = throughput.defaults | dict(n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=16, batch_size=2,
                                   seq_len=8, prompt_len=2, lora_rank=4, n_warmup=0, n_timed=1,
                                   memory_run='ensemble:3')
    result = throughput.memory_run(config)
    rank, width = 4, 32      # c_attn (C -> 3C), attn.c_proj (C -> C), c_fc (C -> 4C), mlp.c_proj (4C -> C)
    per_layer = sum(rank * (fan_in + fan_out) for fan_in, fan_out in
                    ((width, 3 * width), (width, width), (width, 4 * width), (4 * width, width)))
    assert result['adapter_params'] == 2 * per_layer
    assert result['peak_mb'] >= result['built_mb'] > 0 and result['saved_mb'] > 0 and result['ms'] > 0


@pytest.mark.parametrize("device_name, peak", [
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12), ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A10G", 125e12), ("NVIDIA L4", 121e12), ("NVIDIA GeForce RTX 4090", 165e12),
    ("NVIDIA GeForce RTX 3090", 71e12), ("Tesla V100-SXM2-16GB", 125e12), ("Tesla V100-PCIE-32GB", 112e12),
    ("Tesla T4", 65e12), ("NVIDIA L40S", None), ("NVIDIA GeForce GTX 1080", None)])
def test_card_peak_is_the_dense_16_bit_peak_of_the_card_named(device_name, peak):
    """Datasheet values by hand (sparse figures halved); an L40S is not an L4, and a card not listed has no peak."""
    assert throughput.card_peak(device_name) == peak


def test_mfu_by_hand_and_none_without_a_peak():
    # 3.12 TFLOP in 50 ms is 62.4 TFLOP/s: a fifth of an A100's 312
    assert throughput.mfu(3.12e12, 0.05, 312e12) == pytest.approx(0.2, rel=1e-12)
    assert throughput.mfu(3.12e12, 0.05, None) is None


TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--vocab_size=50", "--block_size=16", "--batch_size=2",
        "--seq_len=8", "--prompt_len=2", "--n_warmup=0", "--n_timed=1", "--new_tokens=2", "--cache_new_tokens=2",
        "--cache_prompt_len=4", "--device=cpu"]


def test_bfloat16_on_cpu_prints_every_row_and_the_mfu_against_the_given_peak(capsys):
    """--dtype=bfloat16 on CPU: the base in bfloat16, the adapters float32, every row printed; --peak_flops replaces
    the matmul timed here, and the MFU is the printed FLOP/s over it."""
    model = throughput.ensemble(throughput.defaults | dict(n_layer=2, n_head=2, n_embd=32, vocab_size=50,
                                                           block_size=16, device="cpu", dtype="bfloat16"), 2)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert {p.dtype for p in throughput.trainable(model)} == {torch.float32}
    throughput.main(TINY + ["--dtype=bfloat16", "--peak_flops=2e9"])
    out = capsys.readouterr().out
    assert "base in torch.bfloat16" in out and "peak for the MFU: 2.0 GFLOP/s (--peak_flops)" in out
    for row in ("(a) ensemble, M=4 on B", "(b) one adapter on 4*B", "(c) loop over 4 adapters", "(d) torch.func",
                "4 members together", "mixture=sequence, KV cache", "trunk shared"):
        assert row in out
    gflops, percent = re.search(r"MFU of \(a\) +([\d.]+) GFLOP/s = (\d+)% of peak", out).groups()
    assert int(percent) == pytest.approx(float(gflops) / 2.0 * 100, abs=3)    # both rounded for print


def test_peak_flops_overrides_the_measured_peak_and_a_bad_dtype_is_the_users():
    assert throughput.peak_flops(throughput.defaults | dict(device="cpu", peak_flops=5e12), torch.float32) == 5e12
    with pytest.raises(UserError, match="--dtype=float8"):
        throughput.main(["--device=cpu", "--dtype=float8"])
