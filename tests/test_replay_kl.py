"""experiments/replay_kl.py: token_kl against torch's kl_div, and its replays against the SFT loss and the KL
summed one token at a time on the tiny SFT run of test_train_dpo.py."""
import copy

import pytest
import torch
import torch.nn.functional as F

import data
import train_dpo
from config import UserError
from experiments import replay_kl
from lora import lora_parameters
from renyi_lora import renyi_loss
from test_train_dpo import files, tiny_config  # noqa: F401 (files is a fixture)


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


def test_the_replays_are_the_kl_and_the_sft_loss_summed_one_token_at_a_time(files, tmp_path):
    config = tiny_config(files, tmp_path, batch_size=3)
    sft_model, tokenizer_name, sft_config = train_dpo.load_sft(config)
    sft_model.eval()
    model = copy.deepcopy(sft_model)
    torch.manual_seed(0)
    with torch.no_grad():                                                 # move the members off their SFT selves
        for p in lora_parameters(model):
            p.add_(0.1 * torch.randn_like(p))
    tokenizer = data.get_tokenizer(tokenizer_name)
    sft_set = data.encode_sft(data.sft_rows_of(sft_config)[0], tokenizer, model.config.block_size)
    rows = [sft_set[i] for i in train_dpo.replay_indices(len(sft_set), 3, config['seed'], 5)]
    assert len({len(ids) for ids, _ in rows}) > 1                         # the batch pads some rows
    kl, columns = 0.0, []
    for ids, n_prompt in rows:
        with torch.no_grad():
            log_q = model(torch.tensor([ids]))[:, 0].double().log_softmax(-1)          # (M, T, V)
            log_p = sft_model(torch.tensor([ids]))[:, 0].double().log_softmax(-1)
        columns.append(sum(log_q[:, t - 1, ids[t]] for t in range(n_prompt, len(ids))))   # the response's log p
        for m in range(log_q.shape[0]):
            for t in range(len(ids) - 1):                                 # every token predicted, prompt and response
                kl += (log_p[m, t].exp() * (log_p[m, t] - log_q[m, t])).sum().item()
    kl /= log_q.shape[0] * len(rows)
    sft_loss = renyi_loss(torch.stack(columns, dim=1), sft_config['alpha']).item()     # logp (M, 3)
    replay = lambda with_sft_loss, policy: replay_kl.replay_with_kl(with_sft_loss)(
        policy, sft_set, tokenizer.eot_token, sft_config, config, it=5).item()
    assert replay(False, model) == pytest.approx(kl, rel=1e-4) and kl > 0.01
    assert replay(True, model) == pytest.approx(kl + sft_loss, rel=1e-5)
    assert replay(False, sft_model) == pytest.approx(0.0, abs=1e-6)      # nothing to hold before DPO moves
    assert replay(True, model) - replay(False, model) == pytest.approx(
        train_dpo.replay_loss(model, sft_set, tokenizer.eot_token, sft_config, config, it=5).item(), rel=1e-5)


def test_a_bad_replay_or_run_is_a_user_error():
    for argv in (['--replay=nll'], ['--run=train_sft']):
        with pytest.raises(UserError, match="--replay must be kl or both"):
            replay_kl.main(argv)
