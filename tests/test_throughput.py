"""throughput.py's memory accounting against hand counts: the bytes autograd saves, and a member's adapter parameters."""
import pytest
import torch

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
