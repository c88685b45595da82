"""experiments/replay_kl.py: token_kl against torch's kl_div (its replays against a slow loop are in
test_dpo_answers.py, beside the default replay's, on the same tiny SFT run)."""
import pytest
import torch
import torch.nn.functional as F

from config import UserError
from experiments import replay_kl


def test_token_kl_is_the_masked_sum_of_kl_div_and_flat_at_the_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)      # (M, B, T, V)
    reference = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    real = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)   # (B, T)
    per_position = F.kl_div(logits[..., :-1, :].log_softmax(-1), reference[..., :-1, :].log_softmax(-1),
                            log_target=True, reduction='none').sum(-1)               # (M, B, T-1): KL(ref || policy)
    expected = (per_position * real[:, 1:]).sum(-1)                                   # position t counts if t+1 is real
    assert torch.allclose(replay_kl.token_kl(logits, reference, real).double(), expected, atol=1e-5)
    at_reference = reference.clone().requires_grad_(True)
    kl = replay_kl.token_kl(at_reference, reference, real)
    kl.sum().backward()
    assert kl.abs().max() < 1e-6 and at_reference.grad.abs().max() < 1e-6


def test_a_bad_replay_or_run_is_a_user_error():
    for argv in (['--replay=nll'], ['--run=train_sft']):
        with pytest.raises(UserError, match="--replay must be kl or both"):
            replay_kl.main(argv)
