"""long_study.py: the table read from hand-made histories, one-line errors with status 2, and a tiny end-to-end study
whose table and figure come from the runs' own checkpoints."""
import json
import math
import os

import pytest
import torch

import data
import train_sft
from config import run_script
from experiments import long_study
from lora import add_lora, lora_state_dict
from test_train_sft import files, load_rows, tiny_config  # noqa: F401 (files is a fixture)
from trainer import load_base
from evaluate import score_rows
from renyi_lora import renyi_loss, responsibilities, vb_loss
from test_renyi_lora import moderate_logp, reference_l_alpha


def test_row_and_table_read_the_history_by_hand():
    history = dict(val_iter=[10, 20, 30], routing_entropy=[1.2, 0.5, 0.25],
                   member_share=[[0.25] * 4, [0.5, 0.45, 0.04, 0.01]])
    report = dict(soft_specialisation=0.125, nll=0.75)
    row = long_study.row(4, 0.8, True, report, history, [10, 40])
    assert row['entropy_at'] == {10: 1.2, 40: None}                 # iter 40 was never evaluated
    assert (row['final_iter'], row['final_entropy']) == (30, 0.25)
    assert row['starved'] == [2, 3]                                  # below 1/(4M) = 0.0625 of the last window
    lines = long_study.table([row], [10, 40]).splitlines()
    assert lines[2] == "| 4 | 0.8 | per token | 1.200 | – | 0.250 (30) | 0.12 | 2 | 0.50 0.45 0.04 0.01 | 0.750 |"
    assert len({line.count('|') for line in lines}) == 1              # every line has the header's columns


# ---------------------------------------------------------------------------
# routing per token: the order alpha / |y| per example

N_TOKENS = torch.tensor([1, 3, 10, 60, 2, 45])                  # (B,) response lengths


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_length_normalised_loss_is_the_renyi_loss_of_order_alpha_over_length(alpha):
    logp = (20 * moderate_logp()).requires_grad_()             # (M, B): whole responses, tens of nats
    loss, weights = long_study.per_token_renyi_loss(logp, alpha, N_TOKENS)
    (grad,) = torch.autograd.grad(loss, logp)
    columns = logp.detach().t().tolist()
    expected = -math.fsum(reference_l_alpha(c, alpha / n) for c, n in zip(columns, N_TOKENS.tolist())) / len(columns)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    plain_logp = logp.detach().clone().requires_grad_()         # the closed form |y| l_alpha(logp / |y|), autograd
    plain = -(N_TOKENS / alpha * torch.log(torch.exp(alpha * plain_logp / N_TOKENS).mean(0))).mean()
    (plain_grad,) = torch.autograd.grad(plain, plain_logp)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, -weights / len(columns))


def test_length_normalised_loss_keeps_the_ends_and_length_one():
    logp = 20 * moderate_logp()
    loss = lambda *args: long_study.per_token_renyi_loss(*args)[0].item()
    assert loss(logp, 0, N_TOKENS) == pytest.approx(vb_loss(logp).item(), abs=1e-12)    # order 0: nothing to normalise
    ones = torch.ones(logp.shape[1], dtype=torch.long)
    assert loss(logp, 1.5, ones) == pytest.approx(renyi_loss(logp, 1.5).item(), abs=1e-12)
    same = logp[:1].expand(4, -1)                               # identical members: l(x) = log p(x) at any order
    assert loss(same, 2.0, N_TOKENS) == pytest.approx(vb_loss(same).item(), abs=1e-9)


def test_length_normalised_responsibilities_by_hand():
    logp = torch.tensor([[-30.0, -2.0], [-36.0, -2.0]], dtype=torch.float64)  # (M=2, B=2)
    _, weights = long_study.per_token_renyi_loss(logp, 2.0, torch.tensor([60, 1]))
    first = 1 / (1 + math.exp(2.0 * (-36.0 + 30.0) / 60))       # 6 nats over 60 tokens: order 2/60
    torch.testing.assert_close(weights, torch.tensor([[first, 0.5], [1 - first, 0.5]], dtype=torch.float64))
    assert responsibilities(logp, 2.0)[0, 0].item() == pytest.approx(1 / (1 + math.exp(-12.0)), abs=1e-15)



# ---------------------------------------------------------------------------
# train_sft.train with the study's objective: the logged routing entropy

def test_length_normalise_routes_per_token_and_logs_the_mean_routing_entropy(files, tmp_path):
    """history['routing_entropy'] against the entropy of softmax_m(alpha * log p_m(x) / |y|), recomputed by hand from
    the adapters each step started from and the batches the seeded order gave it, averaged over each eval's window."""
    config = tiny_config(files, tmp_path, max_iters=4, eval_interval=2, alpha_hold_iters=0, alpha_ramp_iters=0)
    states = {0: None}                                                  # step -> adapters it started from

    def keep_adapters(done, model):
        states[done] = {name: t.clone() for name, t in lora_state_dict(model).items()}

    train_sft.train(config, objective=long_study.per_token_objective, on_step=keep_adapters)
    history = torch.load(tmp_path / "ckpt.pt", weights_only=False)["history"]
    train_rows = load_rows(config)[0]
    batches = data.shuffled_batches(len(train_rows), config["batch_size"], config["seed"])
    model, tokenizer_name = load_base(config["base"], config["device"])
    add_lora(model, config["n_members"], config["lora_rank"], config["lora_alpha"])   # B = 0: step 0's members
    tokenizer = data.get_tokenizer(tokenizer_name)
    per_token, summed = [], []                                          # entropy of every routed example, by step
    for step in range(config["max_iters"]):
        if states[step] is not None:
            model.load_state_dict(states[step], strict=False)
        scores = score_rows(model, tokenizer, [train_rows[i] for i in next(batches)], config["batch_size"])
        for column, n_tokens in zip(scores["logp"].t().tolist(), scores["n_tokens"].tolist()):
            for entropies, length in ((per_token, n_tokens), (summed, 1)):
                exps = [math.exp(config["alpha"] * (v - max(column)) / length) for v in column]
                entropies.append(-sum(e / sum(exps) * math.log(e / sum(exps)) for e in exps))
    window = len(per_token) // 2
    expected = [sum(per_token[:window]) / window, sum(per_token[window:]) / window]
    assert history["routing_entropy"] == pytest.approx(expected, abs=1e-4)
    assert expected[1] < math.log(2) - 1e-3                             # the members differ by then ...
    assert sum(summed[window:]) / window < expected[1] - 1e-3          # ... and the per-token routing is the flatter


@pytest.mark.parametrize("arg, message", [
    ("--alphas=0.5,x", "error: --alphas: 'x' is not a number"),
    ("--alphas=-1", "error: alpha must be a finite number >= 0, got -1.0"),
    ("--members=two", "error: --members: 'two' is not an int"),
    ("--normalise=maybe", "error: --normalise=maybe: expected true/false/1/0"),
    ("--n_members=8", "error: --n_members: this study takes --members=4,8"),
    ("--set=huge", "error: --set=huge: must be one of user_160, long,"),
    ("--max_iter=5", "error: unknown config key 'max_iter'"),
])
def test_bad_keys_end_with_one_line_and_status_2(tmp_path, capsys, arg, message):
    with pytest.raises(SystemExit) as stop:
        run_script(long_study.main, [arg, f"--study_dir={tmp_path / 'never'}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "never").exists()


def test_tiny_study_tabulates_its_runs_from_their_histories(tiny_base, tmp_path):
    argv = [f"--base={tiny_base}", "--set=user_160", "--members=2", "--alphas=2", "--normalise=false,true",
            "--max_iters=4", "--eval_interval=2", "--table_iters=2", "--lora_rank=4", "--batch_size=8",
            "--learning_rate=0.03", "--max_new_tokens=4", "--device=cpu", f"--study_dir={tmp_path}"]
    long_study.main(argv)
    with open(tmp_path / "results.json") as f:
        rows = json.load(f)
    histories = [torch.load(os.path.join(long_study.run_dir(str(tmp_path), 2, 2.0, normalise), "ckpt.pt"),
                            weights_only=False)["history"] for normalise in (False, True)]
    for row, history in zip(rows, histories):
        assert row['entropy_at'] == {'2': history['routing_entropy'][0]}
        assert (row['final_iter'], row['final_entropy']) == (4, history['routing_entropy'][1])
    summed, per_token = (history['routing_entropy'][0] for history in histories)
    # both runs take the same first step (identical members route evenly), then route the same second batch:
    # for two members, dividing the gap by |y| >= 1 can only flatten the weights
    assert summed < per_token - 1e-3 and per_token <= math.log(2) + 1e-6
    with open(tmp_path / "entropy.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = os.path.join(long_study.run_dir(str(tmp_path), 2, 2.0, False), "report.json")
    written = os.path.getmtime(report)
    long_study.main(argv + ["--train=false", "--alphas=2,3"])        # alpha 3 never ran: left out, nothing trained
    assert os.path.getmtime(report) == written
    with open(tmp_path / "results.json") as f:
        assert json.load(f) == rows
