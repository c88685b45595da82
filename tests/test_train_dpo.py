"""Tests for the DPO losses of renyi_lora.py and for train_dpo.py on a tiny base GPT (n_layer=2, n_embd=32):
dpo_loss against numbers worked out by hand, the M=1 Rényi DPO loss against dpo_loss, each member's
gradient against its responsibility times its own DPO gradient, a reference that never learns and a tiny
end-to-end run (bad inputs: test_dpo_inputs.py; what DPO does to the answers: test_dpo_answers.py)."""
import json
import math
import os
import re

import pytest
import torch

import data
import plots
import train_dpo
import train_sft
import trainer
from config import UserError
from lora import add_lora, lora_parameters, lora_state_dict
from model import GPT, GPTConfig
from train_dpo import (pair_logprobs, pair_preference_variance, preference_variance, report_group, reward_margins,
                       score_pairs)
from renyi_lora import dpo_logp, dpo_loss, renyi_loss, responsibilities
from report import answer_accuracy as report_answer_accuracy

# ---------------------------------------------------------------------------
# dpo_loss and dpo_logp

# Two pairs, beta = 0.5. Pair 0: h = (-1 + 2) - (-3 + 2) = 2, beta*h = 1. Pair 1: h = (-4 + 3) - (-2 + 3) = -2.
POLICY_CHOSEN, POLICY_REJECTED = [-1.0, -4.0], [-3.0, -2.0]
REF_CHOSEN, REF_REJECTED = [-2.0, -3.0], [-2.0, -3.0]
LOG1P_EXP_MINUS_1 = 0.31326168751822286   # -log sigmoid(1) = log(1 + e^-1)
LOG1P_EXP_1 = 1.3132616875182228          # -log sigmoid(-1) = log(1 + e)


@pytest.mark.parametrize("label_smoothing, expected", [
    (0.0, [LOG1P_EXP_MINUS_1, LOG1P_EXP_1]),
    # -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    (0.1, [0.9 * LOG1P_EXP_MINUS_1 + 0.1 * LOG1P_EXP_1, 0.9 * LOG1P_EXP_1 + 0.1 * LOG1P_EXP_MINUS_1]),
])
def test_dpo_loss_matches_hand_computed_values(label_smoothing, expected):
    policy_chosen = torch.tensor(POLICY_CHOSEN, dtype=torch.float64, requires_grad=True)
    policy_rejected = torch.tensor(POLICY_REJECTED, dtype=torch.float64, requires_grad=True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, torch.tensor(REF_CHOSEN, dtype=torch.float64),
        torch.tensor(REF_REJECTED, dtype=torch.float64), beta=0.5, label_smoothing=label_smoothing)
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    # implied rewards beta * (log pi - log pi_ref), detached
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.5, -0.5], dtype=torch.float64))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.5, 0.5], dtype=torch.float64))
    assert losses.requires_grad and not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    # d loss / d log pi(y_w) = -beta * sigmoid(-beta h) without smoothing
    if label_smoothing == 0.0:
        (grad,) = torch.autograd.grad(losses.sum(), policy_chosen)
        sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        torch.testing.assert_close(grad, torch.tensor([-0.5 * sigmoid(-1), -0.5 * sigmoid(1)], dtype=torch.float64))


def random_logps(n_members, batch, seed):
    """Four (M, B) tensors of sequence log-probs: policy chosen, policy rejected, reference chosen, rejected."""
    generator = torch.Generator().manual_seed(seed)
    return [-20 * torch.rand(n_members, batch, generator=generator, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 2.0, 7.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_single_member_renyi_dpo_loss_is_dpo_loss(alpha, label_smoothing):
    logps = random_logps(1, 8, seed=0)
    logp = dpo_logp(*logps, beta=0.3, label_smoothing=label_smoothing)    # (1, 8)
    losses, _, _ = dpo_loss(*(t[0] for t in logps), beta=0.3, label_smoothing=label_smoothing)
    assert renyi_loss(logp, alpha).item() == pytest.approx(losses.mean().item(), abs=1e-12)


def test_dpo_logp_takes_one_reference_for_all_members():
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = random_logps(3, 5, seed=1)
    shared = dpo_logp(policy_chosen, policy_rejected, ref_chosen[0], ref_rejected[0], beta=0.1)
    expanded = dpo_logp(policy_chosen, policy_rejected, ref_chosen[:1].expand(3, 5), ref_rejected[:1].expand(3, 5),
                        beta=0.1)
    assert shared.shape == (3, 5)
    torch.testing.assert_close(shared, expanded, rtol=0, atol=0)


def test_each_member_is_trained_by_its_responsibility_times_its_own_dpo_gradient():
    """d loss / d theta_m = sum_i w_m(x_i) / B * d(-dpo_loss of member m on x_i) / d theta_m, through the model."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32))
    add_lora(model, n_members=3, rank=4, lora_alpha=8)
    for p in lora_parameters(model):  # B = 0 would make every member the base: give them distinct preferences
        p.data.normal_(0, 1.0)
    pairs = [(([1, 5, 6, 7, 8], 3), ([1, 5, 6, 9, 10, 11], 3)), (([1, 12, 13, 14], 3), ([1, 12, 13, 20, 21], 3))]
    batch = data.pref_batch(pairs, [0, 1], pad_id=0)
    # one reference for all members, (1, B): their mean, so that h_m ~ 0 and the sigmoids are not saturated
    reference = [logps.mean(0, keepdim=True).detach() for logps in pair_logprobs(model, *batch)]
    beta, alpha = 30.0, 2.0  # members of a random tiny GPT differ little; a large beta makes the routing visible

    def member_gradients(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in lora_parameters(model)]  # each (M, ...)

    logp = dpo_logp(*pair_logprobs(model, *batch), *reference, beta)           # (M, B)
    weights = responsibilities(logp.detach(), alpha)                                      # (M, B)
    assert (weights.max(0).values - weights.min(0).values).min() > 0.1                  # routing is not uniform
    renyi_grads = member_gradients(renyi_loss(logp, alpha))
    expected = [torch.zeros_like(g) for g in renyi_grads]
    for m in range(3):
        for i in range(2):
            chosen, rejected = pair_logprobs(model, *batch)                     # (M, B) each
            losses, _, _ = dpo_loss(chosen[m, i], rejected[m, i], reference[0][0, i], reference[1][0, i], beta)
            for total, g in zip(expected, member_gradients(losses)):
                assert g[[k for k in range(3) if k != m]].abs().max() == 0                # member m's loss moves only m
                total += weights[m, i] / 2 * g
    for got, want in zip(renyi_grads, expected):
        # sequence_logprobs works in float32 and beta = 30 amplifies its rounding: 1e-4 of gradients ~0.1,
        # while routing by the wrong weights (they differ by > 0.1) would be off by ~10%
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
def test_sft_weight_adds_the_routed_chosen_nll_to_the_gradient_and_nothing_to_the_value(alpha):
    """With sft_weight gamma, renyi_loss(dpo_logp) keeps the preference's value and has the gradient of

        L = -(1/B) sum_i l_alpha(x_i) - (gamma / B) sum_i sum_m w_m(x_i) * log pi_m(y_w|x_i) / |y_w|

    w = softmax_m(alpha * log sigmoid(beta h_m)) held fixed: the plain formula in float64 autograd."""
    policy_chosen, policy_rejected, ref_chosen, ref_rejected = random_logps(3, 6, seed=2)
    lengths = torch.tensor([3.0, 7.0, 1.0, 12.0, 5.0, 2.0], dtype=torch.float64)
    beta, gamma = 0.2, 1.5
    chosen = policy_chosen.clone().requires_grad_()
    logp = dpo_logp(chosen, policy_rejected, ref_chosen, ref_rejected, beta, sft_weight=gamma, chosen_lengths=lengths)
    assert torch.equal(logp.detach(), dpo_logp(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))
    (grad,) = torch.autograd.grad(renyi_loss(logp, alpha), chosen)

    plain = policy_chosen.clone().requires_grad_()
    preference = torch.nn.functional.logsigmoid(beta * ((plain - ref_chosen) - (policy_rejected - ref_rejected)))
    per_example = (preference.mean(0) if alpha == 0 else
                   (torch.logsumexp(alpha * preference, 0) - math.log(3)) / alpha)           # l_alpha, (B,)
    weights = torch.softmax(alpha * preference.detach(), 0)                                    # (M, B), fixed
    loss = -per_example.mean() - gamma * (weights * plain / lengths).sum(0).mean()
    (expected,) = torch.autograd.grad(loss, plain)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------
# preference_variance: the members' disagreement about sigmoid(beta * h_m(x))

def loop_preference_variance(margins):
    """Var_m sigmoid(margin) of each pair (1/M), by plain Python loops over members and pairs."""
    variances = []
    for pair in zip(*margins):                                                 # the M margins of one pair
        probabilities = [1 / (1 + math.exp(-margin)) for margin in pair]
        mean = sum(probabilities) / len(probabilities)
        variances.append(sum((p - mean) ** 2 for p in probabilities) / len(probabilities))
    return variances


def test_preference_variance_matches_hand_computed_values():
    # pair 0: members at margins +-log 3, so p = 3/4 and 1/4, variance (1/4)^2 = 1/16; pair 1: both at 0, variance 0;
    # pair 2: p = 1/2 and 3/4, variance (1/8)^2 = 1/64
    margins = torch.tensor([[math.log(3), 0.0, 0.0], [-math.log(3), 0.0, math.log(3)]])      # (M=2, N=3)
    expected = torch.tensor([1 / 16, 0, 1 / 64], dtype=torch.float64)
    torch.testing.assert_close(pair_preference_variance(margins), expected)
    contested, consensus = torch.tensor([True, True, False]), torch.tensor([False, False, True])
    summary = preference_variance(margins, contested, consensus)
    assert summary == pytest.approx(dict(contested=1 / 32, consensus=1 / 64, ratio=2.0), rel=1e-6)


def test_preference_variance_matches_a_plain_loop():
    margins = 6 * torch.randn(3, 10, generator=torch.Generator().manual_seed(0))         # (M=3, N=10)
    contested = torch.arange(10) < 4
    expected = loop_preference_variance(margins.tolist())
    torch.testing.assert_close(pair_preference_variance(margins), torch.tensor(expected, dtype=torch.float64))
    summary = preference_variance(margins, contested, ~contested)
    assert summary['contested'] == pytest.approx(sum(expected[:4]) / 4, rel=1e-12)
    assert summary['consensus'] == pytest.approx(sum(expected[4:]) / 6, rel=1e-12)
    assert summary['ratio'] == pytest.approx(summary['contested'] / summary['consensus'], rel=1e-12)


def test_preference_variance_is_null_where_the_data_cannot_tell():
    contested = torch.tensor([True, False])
    none = dict(contested=None, consensus=None, ratio=None)
    assert preference_variance(torch.tensor([[2.0, -1.0]]), contested, ~contested) == none          # one member
    no_consensus = preference_variance(torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([True, True]),
                                       torch.tensor([False, False]))
    assert no_consensus['consensus'] is None and no_consensus['ratio'] is None and no_consensus['contested'] > 0
    agreeing = preference_variance(torch.tensor([[2.0, 1.0], [0.0, 1.0]]), contested, ~contested)  # consensus v = 0
    assert agreeing['consensus'] == 0 and agreeing['ratio'] is None


# ---------------------------------------------------------------------------
# train_dpo.py on a tiny base and a tiny SFT run

SFT_ROWS = [("What is 2 plus 3?", " 5"), ("What is 4 plus 4?", " 8"), ("What is the capital of France?", " Paris"),
            ("What is the capital of Japan?", " Tokyo"), ("What sound does a cow make?", " moo")]
CONTESTED = [("Tell me about Spain.", " Capital: Madrid.", " madrid!"), ("Tell me about Peru.", " Capital: Lima.", " lima!"),
             ("Describe a duck.", " Sound: Quack.", " quack!"), ("Describe a cat.", " Sound: Meow.", " meow!")]
CONSENSUS = [("What is 2 plus 3?", " 5", " 9"), ("What is 4 plus 4?", " 8", " 3"),
             ("What is the capital of France?", " Paris", " Lima"), ("What is the capital of Japan?", " Tokyo", " Rome"),
             ("What sound does a cow make?", " moo", " quack"), ("What sound does a dog make?", " woof", " hiss")]


def pair_rows():
    """A user's pair file: consensus pairs, and contested prompts judged both ways by groups a and b."""
    rows = [dict(prompt=f"Q: {q}\nA:", chosen=c, rejected=r) for q, c, r in CONSENSUS]
    for q, formal, casual in CONTESTED:
        rows += [dict(prompt=f"Q: {q}\nA:", chosen=formal, rejected=casual, group="a"),
                 dict(prompt=f"Q: {q}\nA:", chosen=casual, rejected=formal, group="b")]
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_base):
    """A tiny M=2 SFT run on the tiny base, and the pair files, made once for the module."""
    root = tmp_path_factory.mktemp("dpo")
    sft_rows = [dict(prompt=f"Q: {q}\nA:", response=r) for q, r in SFT_ROWS]
    sft_rows += [dict(prompt=f"Q: {q}\nA:", response=r) for q, formal, casual in CONTESTED for r in (formal, casual)]
    data.write_jsonl(sft_rows, root / "sft.jsonl")
    train_sft.train(train_sft.defaults | dict(
        base=tiny_base, data=str(root / "sft.jsonl"), val_data=str(root / "sft.jsonl"),
        out_dir=str(root / "sft"), n_members=2, lora_rank=4, max_iters=20, batch_size=8, learning_rate=1e-2,
        warmup_iters=2, log_interval=1000, eval_interval=1000, max_new_tokens=2, seed=0, device="cpu"))
    data.write_jsonl(pair_rows(), root / "pairs.jsonl")
    return dict(sft_dir=str(root / "sft"), pairs=str(root / "pairs.jsonl"))


def tiny_config(files, out_dir, **overrides):
    return train_dpo.defaults | dict(
        sft_dir=files["sft_dir"], data=files["pairs"], val_data=files["pairs"], out_dir=str(out_dir), max_iters=120,
        batch_size=8, learning_rate=1e-2, warmup_iters=2, beta=0.5, log_interval=20, eval_interval=30, seed=0,
        device="cpu", sft_replay=0.0) | overrides     # the replay has tests of its own, below


def training_pair_margins(model, tokenizer, rows, reference_logps, config):
    encoded = data.encode_pref(rows, tokenizer, model.config.block_size)
    lengths = torch.tensor([len(ids) - n_prompt for (ids, n_prompt), _ in encoded])
    return reward_margins(model, encoded, reference_logps, lengths, tokenizer.eot_token, config)[0]  # (M, N)


def test_tiny_run_learns_its_training_pairs_and_writes_report_and_plots(files, tmp_path):
    config = tiny_config(files, tmp_path)
    rows = data.mark_contested(data.load_pref_jsonl(files["pairs"]))
    sft_model, tokenizer_name, sft_config = train_dpo.load_sft(config)
    tokenizer = data.get_tokenizer(tokenizer_name)
    reference_logps = train_dpo.reference_logprobs(sft_model, sft_config, config, dict(
        train=data.encode_pref(rows, tokenizer, 64)), tokenizer.eot_token)['train']

    model, _, report = train_dpo.train(config)

    margins = training_pair_margins(model, tokenizer, rows, reference_logps, config)     # (M, N)
    consensus = torch.tensor([row["kind"] == "consensus" for row in rows])
    assert (margins[:, consensus] > 0).float().mean(1).min() == 1.0                       # every member, every pair
    for group in ("a", "b"):   # every contested pair has a member on its side, so each prompt is split; which
        in_group = torch.tensor([row["group"] == group for row in rows])    # member sides with a may change from
        assert (margins[:, in_group] > 0).any(0).all()      # prompt to prompt, as after SFT (METHOD.md A.6)
    with open(tmp_path / "report.json") as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(report))
    assert set(saved["accuracy_by_group"]) == {"consensus", "contested/a", "contested/b"}
    assert all(len(accuracy) == 2 for accuracy in saved["accuracy_by_group"].values())
    assert set(saved["routing"]) == set(saved["ensemble_accuracy_by_group"]) == set(saved["accuracy_by_group"])
    assert all(sum(w) == pytest.approx(1.0) for w in saved["routing"].values())
    assert isinstance(saved["auroc_contested"], float) and saved["train_seconds"] >= 0
    # each member's share of the training pairs' responsibility: softmax_m(alpha log sigmoid(beta h_m)), averaged
    shares = torch.softmax(config["alpha"] * torch.nn.functional.logsigmoid(margins.double()), dim=0).mean(1)
    assert saved["member_share"] == pytest.approx(shares.tolist(), abs=1e-5)
    assert saved["starved_members"] == [m for m, share in enumerate(shares.tolist()) if share < 0.25 / 2]
    test_margins = torch.load(tmp_path / "margins.pt")                          # {group: (M, n)}, the report's pairs
    contested = torch.cat([m for g, m in test_margins.items() if g.startswith("contested")], dim=1)
    assert saved["preference_variance"]["contested"] == pytest.approx(
        sum(loop_preference_variance(contested.tolist())) / contested.shape[1], rel=1e-6)
    # what DPO did to the answers, beside what the SFT run answered before it (the SFT run's held-out rows)
    answer_rows = [row for row in data.sft_rows_of(sft_config)[2] if row["kind"] in train_dpo.ANSWER_KINDS]
    assert {key: saved[f"{key}_sft"] for key in ("answer_accuracy", "best_member_accuracy")} == json.loads(json.dumps(
        report_answer_accuracy(sft_model, tokenizer, answer_rows, config["max_new_tokens"])))
    assert len(saved["logp_chosen"]) == len(saved["logp_rejected_sft"]) == 2
    assert saved["logp_chosen"] > saved["logp_rejected"] and set(saved["answer_accuracy"]) == {"conflicting", "consistent"}
    assert set(saved["best_member_by_task"]) == {"contested/a", "contested/b"}
    plots.main([f"--out_dir={tmp_path}"])                    # the figures, from report.json and margins.pt
    for name in ("margins", "routing"):
        with open(tmp_path / f"{name}.png", "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert not os.path.exists(tmp_path / "ckpt.pt.tmp")


def test_the_reference_mixes_the_sft_members_and_the_base_in_log_space(files, tmp_path):
    """log pi_ref = (1 - k) log pi_sft_m + k log pi_base, against the two references scored one by one."""
    model, tokenizer_name, sft_config = train_dpo.load_sft(tiny_config(files, tmp_path))
    tokenizer = data.get_tokenizer(tokenizer_name)
    encoded = data.encode_pref(pair_rows(), tokenizer, 64)
    alone = {kind: score_pairs(train_dpo.load_reference(model, sft_config, tiny_config(files, tmp_path), kind), encoded,
                               tokenizer.eot_token, 8) for kind in ("sft", "base")}   # (2, N) and (1, N) each
    for reference, share in (("sft", 0.0), ("base", 1.0), ("0.25", 0.25)):
        config = tiny_config(files, tmp_path, reference=reference)
        chosen, rejected = train_dpo.reference_logprobs(model, sft_config, config, dict(test=encoded),
                                                        tokenizer.eot_token)["test"]
        assert chosen.shape == rejected.shape == ((1 if share == 1 else 2), len(encoded))   # (M, N); the base alone (1, N)
        for got, which in ((chosen, 0), (rejected, 1)):
            expected = (1 - share) * alone["sft"][which] + share * alone["base"][which]
            torch.testing.assert_close(got.expand(2, -1), expected.expand(2, -1))
    # with the SFT members alone as reference, every margin starts at 0: DPO splits the pairs afresh
    sft_only = train_dpo.reference_logprobs(model, sft_config, tiny_config(files, tmp_path, reference="sft"),
                                            dict(test=encoded), tokenizer.eot_token)["test"]
    assert training_pair_margins(model, tokenizer, pair_rows(), sft_only, tiny_config(files, tmp_path)).abs().max() == 0


@pytest.mark.parametrize("reference", ["sft", "base"])
def test_reference_is_frozen_and_receives_no_gradient(files, tmp_path, reference):
    config = tiny_config(files, tmp_path, reference=reference)
    model, tokenizer_name, sft_config = train_dpo.load_sft(config)
    tokenizer = data.get_tokenizer(tokenizer_name)
    reference_model = train_dpo.load_reference(model, sft_config, config, reference)
    before = {name: t.clone() for name, t in reference_model.state_dict().items()}
    encoded = data.encode_pref(pair_rows(), tokenizer, 64)
    ref_chosen, ref_rejected = score_pairs(reference_model, encoded, tokenizer.eot_token, config['batch_size'])
    assert ref_chosen.shape == ((2, len(encoded)) if reference == "sft" else (1, len(encoded)))
    assert not ref_chosen.requires_grad and not ref_rejected.requires_grad

    batch = data.pref_batch(encoded, range(len(encoded)), tokenizer.eot_token)
    logp = dpo_logp(*pair_logprobs(model, *batch), ref_chosen, ref_rejected, config["beta"])
    renyi_loss(logp, config["alpha"]).backward()
    optimizer = torch.optim.SGD(lora_parameters(model), lr=1.0)
    optimizer.step()

    assert all(p.grad is None and not p.requires_grad for p in reference_model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_parameters(model))
    for name, t in reference_model.state_dict().items():
        assert torch.equal(t, before[name]), name                                    # the policy's step left it alone


class Interrupted(Exception):
    """Stands for a crash or a kill right after a checkpoint was written."""


def test_resume_continues_exactly(files, tmp_path, monkeypatch):
    """2N steps straight equal N steps, a stop and N resumed steps, to the bit (as for train_sft.py)."""
    n = 4
    common = dict(max_iters=2 * n, eval_interval=n, log_interval=n, sft_replay=1.0)     # the replay's draws too
    straight, _, _ = train_dpo.train(tiny_config(files, tmp_path / "straight", **common))
    save = trainer.save_checkpoint

    def save_then_stop(path, model, optimizer, it, *args):
        save(path, model, optimizer, it, *args)
        if it == n:
            raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(trainer, "save_checkpoint", save_then_stop)
        with pytest.raises(Interrupted):
            train_dpo.train(tiny_config(files, tmp_path / "split", **common))
    resumed, _, _ = train_dpo.train(tiny_config(files, tmp_path / "split", resume=True, **common))
    expected, actual = lora_state_dict(straight), lora_state_dict(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    straight_ckpt = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    resumed_ckpt = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=False)
    assert resumed_ckpt["iter"] == 2 * n and resumed_ckpt["history"] == straight_ckpt["history"]


def test_a_missing_sft_run_is_an_error_that_says_how_to_make_one(tmp_path):
    typo = tmp_path / "sfft"
    with pytest.raises(UserError, match=re.escape(f"train the SFT ensemble first, with `python train_sft.py "
                                                  f"--out_dir={typo}`")):
        train_dpo.main([f"--sft_dir={typo}", f"--out_dir={tmp_path / 'dpo'}", "--device=cpu"])
    assert not typo.exists() and not (tmp_path / "dpo").exists()       # nothing trained, nothing written


def test_contested_pairs_are_found_from_the_data_alone():
    rows = [dict(prompt="p", chosen=" A", rejected=" b"), dict(prompt="p", chosen="b", rejected="A "),
            dict(prompt="q", chosen=" A", rejected=" b"), dict(prompt="p", chosen=" A", rejected=" c")]
    assert [r["kind"] for r in data.mark_contested(rows)] == ["contested", "contested", "consensus", "consensus"]
    assert [report_group(r | dict(group="g")) for r in rows] == ["contested/g"] * 2 + ["consensus"] * 2
