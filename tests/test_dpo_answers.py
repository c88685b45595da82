"""What DPO does to the answers, on the tiny SFT run of test_train_dpo.py: the read-outs of the log and the
report (each member's pair log-likelihoods, the greedy answers' accuracy) against slow loops, and the replay
of the SFT rows (sft_replay) against the SFT run's loss scored one token at a time, beside the KL replays of
experiments/replay_kl.py."""
import copy

import pytest
import torch

import data
import train_dpo
from evaluate import score_rows
from experiments import replay_kl
from lora import lora_parameters
from renyi_lora import renyi_loss
from report import answer_accuracy as report_answer_accuracy
from test_train_dpo import files, pair_rows, tiny_config  # noqa: F401 (files is a fixture)
from train_dpo import pair_logprobs

# ---------------------------------------------------------------------------
# what DPO does to the answers: the read-outs against slow loops

def test_pair_likelihoods_average_each_members_chosen_and_rejected_log_likelihood(files, tmp_path):
    config = tiny_config(files, tmp_path)
    model, tokenizer_name, _ = train_dpo.load_sft(config)
    tokenizer = data.get_tokenizer(tokenizer_name)
    encoded = data.encode_pref(pair_rows(), tokenizer, 64)
    got = train_dpo.pair_likelihoods(model, encoded, tokenizer.eot_token, config)
    model.eval()
    one_by_one = [pair_logprobs(model, *data.pref_batch(encoded, [i], tokenizer.eot_token)) for i in range(len(encoded))]
    for key, side in (("logp_chosen", 0), ("logp_rejected", 1)):
        expected = torch.stack([pair[side][:, 0] for pair in one_by_one]).mean(0)            # (M,)
        assert got[key] == pytest.approx(expected.tolist(), rel=1e-5)


def test_answer_accuracy_against_answers_decoded_one_prompt_at_a_time(files, tmp_path):
    """Rows whose response is the answer the ensemble (or member 1) gives when asked alone, and rows it misses."""
    config = tiny_config(files, tmp_path)
    model, tokenizer_name, _ = train_dpo.load_sft(config)
    model.eval()
    tokenizer, eot = data.get_tokenizer(tokenizer_name), data.get_tokenizer(tokenizer_name).eot_token
    prompts = [f"Q: Tell me a word, number {k}.\nA:" for k in range(5)]     # not the benchmark's: rows judge alone

    def alone(prompt, mixture):
        idx = torch.tensor([[eot] + tokenizer.encode_ordinary(prompt)])
        out = model.generate(idx, 6, temperature=0, stop_token=eot, mixture=mixture)        # (1, T') or (M, 1, T')
        ids = (out if mixture else out[1])[0, idx.shape[1]:].tolist()
        return tokenizer.decode(ids[:ids.index(eot)] if eot in ids else ids)

    rows = [dict(prompt=p, kind="consistent", response=alone(p, "sequence") if k < 3 else " no such answer")
            for k, p in enumerate(prompts)]                                                   # the ensemble: 3 of 5
    rows += [dict(prompt=p + " ", kind="conflicting", group="a", response=alone(p + " ", None)) for p in prompts[:2]]
    got = report_answer_accuracy(model, tokenizer, rows, 6)
    assert got["answer_accuracy"]["consistent"] == pytest.approx(3 / 5)
    assert got["best_member_accuracy"]["conflicting"] == 1.0                                 # member 1's own answers


def test_the_log_warns_when_greedy_accuracy_falls_below_the_sft_runs(monkeypatch, capsys):
    history = dict(generations=[], sft_start=dict(val=dict(logp_chosen=[-5.0], logp_rejected=[-9.0]),
                                                  answers=dict(answer_accuracy=dict(consistent=0.8, conflicting=0.75),
                                                               best_member_accuracy=dict(consistent=0.8, conflicting=0.75))))
    monkeypatch.setattr(train_dpo, "pair_likelihoods", lambda *args: dict(logp_chosen=[-20.0], logp_rejected=[-40.0]))
    monkeypatch.setattr(train_dpo, "answer_accuracy", lambda *args: dict(
        answer_accuracy=dict(consistent=0.76, conflicting=0.25), best_member_accuracy=dict(consistent=0.8, conflicting=0.3)))
    train_dpo.watch_generations(None, data.get_tokenizer(), [], [], dict(max_new_tokens=4, batch_size=4), history, 75)
    out = capsys.readouterr().out
    assert "chosen -20.0 (SFT -5.0), rejected -40.0 (SFT -9.0)" in out
    assert "consistent 0.76 (SFT 0.80; best member 0.80)" in out                 # within 0.05: no warning for it
    assert "warning: the ensemble's greedy accuracy on conflicting prompts fell more than 0.05" in out
    assert history["generations"] == [dict(iter=75, logp_chosen=[-20.0], logp_rejected=[-40.0], answer_accuracy=dict(
        consistent=0.76, conflicting=0.25), best_member_accuracy=dict(consistent=0.8, conflicting=0.3))]


@pytest.mark.parametrize("lost, warned", [(1, False), (2, True)])
def test_losing_one_prompt_of_a_small_kind_is_not_warned_about(monkeypatch, capsys, lost, warned):
    """12 high-entropy prompts: one answer lost is 0.083, past 0.05 but within one prompt; two are warned about."""
    rows = [dict(prompt=f"Q: Name a colour {i}.\nA:", response=" red", kind="high_entropy") for i in range(12)]
    history = dict(generations=[], sft_start=dict(val=dict(logp_chosen=[-5.0], logp_rejected=[-9.0]),
                                                  answers=dict(answer_accuracy=dict(high_entropy=6 / 12),
                                                               best_member_accuracy=dict(high_entropy=6 / 12))))
    monkeypatch.setattr(train_dpo, "pair_likelihoods", lambda *args: dict(logp_chosen=[-5.0], logp_rejected=[-9.0]))
    monkeypatch.setattr(train_dpo, "answer_accuracy", lambda *args: dict(
        answer_accuracy=dict(high_entropy=(6 - lost) / 12), best_member_accuracy=dict(high_entropy=6 / 12)))
    train_dpo.watch_generations(None, data.get_tokenizer(), [], rows, dict(max_new_tokens=4, batch_size=4), history, 75)
    assert ("warning: the ensemble's greedy accuracy on high_entropy" in capsys.readouterr().out) == warned


# ---------------------------------------------------------------------------
# replaying the SFT rows

def test_replay_draws_distinct_rows_from_the_step_alone():
    first = train_dpo.replay_indices(10, 4, seed=0, it=7)
    assert first == train_dpo.replay_indices(10, 4, seed=0, it=7)          # a resumed run draws the same
    assert len(set(first)) == 4 and all(0 <= i < 10 for i in first)
    assert sorted(train_dpo.replay_indices(10, 20, seed=0, it=7)) == list(range(10))   # a small set: every row once
    draws = {tuple(train_dpo.replay_indices(10, 4, seed=0, it=it)) for it in range(20)}
    assert len(draws) > 15                                                     # steps draw different rows


def test_replay_loss_is_the_sft_runs_renyi_loss_on_its_rows_scored_one_token_at_a_time(files, tmp_path):
    config = tiny_config(files, tmp_path, batch_size=3)
    model, tokenizer_name, sft_config = train_dpo.load_sft(config)
    model.eval()
    tokenizer = data.get_tokenizer(tokenizer_name)
    sft_set = data.encode_sft(data.sft_rows_of(sft_config)[0], tokenizer, model.config.block_size)
    got = train_dpo.replay_loss(model, sft_set, tokenizer.eot_token, sft_config, config, it=5)
    columns = []
    for i in train_dpo.replay_indices(len(sft_set), 3, config['seed'], 5):
        ids, n_prompt = sft_set[i]
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[:, 0].double()                     # (M, T, V)
        columns.append(sum(logits[:, t - 1].log_softmax(-1)[:, ids[t]] for t in range(n_prompt, len(ids))))
    expected = renyi_loss(torch.stack(columns, dim=1), sft_config['alpha'])   # logp (M, 3)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_replay_holds_the_sft_rows_that_pairs_on_other_prompts_pull_away(files, tmp_path):
    """DPO on pairs whose prompts no SFT row has lowers the SFT rows' likelihood less with the replay than without."""
    pairs = [dict(prompt=f"Q: Describe a {animal}.\nA:", chosen=f" {sound}!", rejected=" Capital: Lima.")
             for animal, sound in (("sheep", "baa"), ("pig", "oink"), ("owl", "hoot"), ("goat", "bleat"))]
    data.write_jsonl(pairs, tmp_path / "new.jsonl")
    sft_logp = {}
    for replay in (0.0, 1.0):
        config = tiny_config(files, tmp_path / str(replay), data=str(tmp_path / "new.jsonl"),
                             val_data=str(tmp_path / "new.jsonl"), max_iters=16, sft_replay=replay)
        model, tokenizer, _ = train_dpo.train(config)
        model.eval()
        sft_rows = data.sft_rows_of(train_dpo.load_sft(config)[2])[0]
        sft_logp[replay] = score_rows(model, tokenizer, sft_rows, 8)['logp'].mean().item()
    start_model, tokenizer_name, sft_config = train_dpo.load_sft(config)
    start_model.eval()
    start = score_rows(start_model, data.get_tokenizer(tokenizer_name), data.sft_rows_of(sft_config)[0], 8)
    start = start['logp'].mean().item()
    assert sft_logp[0.0] < start - 1.0                      # the new pairs pull the SFT answers away...
    assert abs(sft_logp[1.0] - start) < 0.5 * abs(sft_logp[0.0] - start)    # ...the replay holds them


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
