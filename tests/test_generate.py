"""GPT.generate's mixtures against slow references, and the KV cache against recomputation."""
import pytest
import torch

from model import GPT
from renyi_lora import mixture_next_token_logprobs, posterior_weights
from test_model import TINY, tiny_ensemble


def slow_sequence_mixture_greedy(model, prompt, max_new_tokens):
    """Greedy decoding of (1/M) sum_m p_m(y | x), recomputing every member's prefix likelihood from scratch.

    At each step: log p_m(y_<t | x) summed over the new tokens from a full forward pass, weights
    w_m = p_m(y_<t | x) / sum_k p_k(y_<t | x) in float64, next-token probabilities sum_m w_m p_m.
    """
    seq = prompt
    for t in range(max_new_tokens):
        member_logprobs = model(seq).double().log_softmax(-1)                    # (M, B, T, V)
        new = seq[:, prompt.shape[1]:]                                           # (B, t)
        prefix = member_logprobs[:, :, prompt.shape[1] - 1:-1].gather(
            -1, new.expand(model.n_members, *new.shape).unsqueeze(-1)).squeeze(-1).sum(-1)  # (M, B)
        weights = prefix.exp() / prefix.exp().sum(0)
        probs = (weights.unsqueeze(-1) * member_logprobs[:, :, -1].exp()).sum(0)  # (B, V)
        seq = torch.cat([seq, probs.argmax(-1, keepdim=True)], dim=1)
    return seq


def test_posterior_weights_and_mixture_by_hand():
    prefix = torch.tensor([[0.0], [-1.0]])                                       # (M=2, B=1)
    w0 = 1 / (1 + torch.exp(torch.tensor(-1.0)))
    torch.testing.assert_close(posterior_weights(prefix), torch.tensor([[w0], [1 - w0]]))
    member_logprobs = torch.tensor([[[0.9, 0.1]], [[0.2, 0.8]]]).log()           # (M=2, B=1, V=2)
    mixed = mixture_next_token_logprobs(member_logprobs, posterior_weights(prefix)).exp()
    torch.testing.assert_close(mixed, torch.tensor([[w0 * 0.9 + (1 - w0) * 0.2, w0 * 0.1 + (1 - w0) * 0.8]]))


@pytest.mark.parametrize('layers', [None, [1]])            # every block adapted / a shared frozen trunk
def test_sequence_mixture_greedy_matches_slow_reference(layers):
    model = tiny_ensemble(n_members=3, layers=layers, seed=1)
    prompt = torch.randint(0, TINY.vocab_size, (4, 3), generator=torch.Generator().manual_seed(0))
    expected = slow_sequence_mixture_greedy(model, prompt, 8)
    for use_cache in (True, False):
        out = model.generate(prompt, 8, temperature=0, mixture='sequence', use_cache=use_cache)
        assert out.shape == (4, 11)
        assert torch.equal(out, expected)


def test_token_mixture_greedy_is_argmax_of_mean_member_probabilities():
    model = tiny_ensemble(n_members=3, seed=2)
    prompt = torch.randint(0, TINY.vocab_size, (3, 2), generator=torch.Generator().manual_seed(1))
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, model(seq)[:, :, -1].softmax(-1).mean(0).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(model.generate(prompt, 6, temperature=0, mixture='token'), seq)


def test_mixtures_differ_once_members_disagree():
    """After a token that one member explains far better, the sequence mixture follows that member."""
    model = tiny_ensemble(n_members=3, seed=3)
    prompt = torch.randint(0, TINY.vocab_size, (8, 3), generator=torch.Generator().manual_seed(2))
    sequence = model.generate(prompt, 8, temperature=0, mixture='sequence')
    token = model.generate(prompt, 8, temperature=0, mixture='token')
    assert torch.equal(sequence[:, :4], token[:, :4])          # the first new token: equal weights in both
    assert not torch.equal(sequence, token)


@pytest.mark.parametrize('mixture', [None, 'sequence', 'token'])
@pytest.mark.parametrize('temperature', [0.0, 1.0])
@pytest.mark.parametrize('layers', [None, [1]])
def test_cache_gives_the_tokens_of_recomputation(mixture, temperature, layers):
    model = tiny_ensemble(n_members=3, layers=layers, seed=4)
    prompt = torch.randint(0, TINY.vocab_size, (3, 4), generator=torch.Generator().manual_seed(3))
    run = lambda use_cache: model.generate(prompt, 10, temperature=temperature, top_k=20, mixture=mixture,
                                           generator=torch.Generator().manual_seed(5), use_cache=use_cache)
    cached, recomputed = run(True), run(False)
    assert cached.shape == ((3, 3, 14) if mixture is None else (3, 14))
    assert torch.equal(cached, recomputed)


def test_cache_on_a_plain_gpt_and_past_block_size():
    torch.manual_seed(0)
    model = GPT(TINY)
    prompt = torch.randint(0, TINY.vocab_size, (2, 5))
    for new in (11, 14):                                       # 5 + 11 fits block_size 16; 5 + 14 does not
        cached = model.generate(prompt, new, temperature=0)
        assert torch.equal(cached, model.generate(prompt, new, temperature=0, use_cache=False))
        assert cached.shape == (2, 5 + new)


def test_cache_logits_equal_full_forward():
    model = tiny_ensemble(n_members=2, layers=[1], seed=5)
    seq = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    cache = [{} for _ in model.transformer.h]
    steps = [model(seq[:, :5], cache)[..., -1, :]] + [model(seq[:, t:t + 1], cache)[..., -1, :] for t in range(5, 9)]
    torch.testing.assert_close(torch.stack(steps, dim=-2), model(seq)[..., 4:, :], rtol=1e-5, atol=1e-5)


def test_unknown_mixture_is_an_error():
    with pytest.raises(ValueError, match="mixture"):
        tiny_ensemble().generate(torch.zeros(1, 2, dtype=torch.long), 2, mixture='tokens')
