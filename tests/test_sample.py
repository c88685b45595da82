"""The members' answers (evaluate.py) and the verdict (sample.py) against hand-computed numbers and slow loops,
and sample.py's command line on a tiny random ensemble: the JSON lines, thresholds fitted on the validation
prompts the first time a run is sampled, and a one-line error with exit status 2 for each bad input."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import data
import sample
import train_dpo
import train_sft
from config import run_script
from evaluate import answer_labels, answer_prompts, disagreement, distinct_answers
from lora import add_lora
from model import GPT, GPTConfig
from sample import best_split, fit_thresholds, verdict
from trainer import save_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSISTENT = [("What is 2 plus 2?", " 4"), ("What is 3 plus 1?", " 4"), ("What sound does a cow make?", " moo"),
              ("What is the capital of Peru?", " Lima")]
CONFLICTING = [("Tell me about Spain.", " Capital: Madrid.", " madrid!"), ("Describe a cat.", " Sound: Meow.", " meow!"),
               ("Add 2 and 3.", " Sum: 5.", " five!"), ("Describe a dog.", " Sound: Woof.", " woof!")]
PROMPTS = ["Q: What is 2 plus 2?\nA:", "Q: Tell me about Spain.\nA:", "Q: Name a fruit.\nA:"]


# ---------------------------------------------------------------------------
# the members' answers and the verdict, by hand

def test_answer_labels_score_the_answer_up_to_its_first_stop_token():
    out = torch.tensor([[9, 8, 5, 6, 0, 0, 0],       # stop token 0 after two answer tokens, then padding
                        [9, 8, 0, 4, 0, 3, 3],       # stops at once: only the stop token is scored
                        [9, 7, 5, 6, 7, 2, 1]])      # never stops
    expected = torch.tensor([[-100, -100, 5, 6, 0, -100, -100],
                             [-100, -100, 0, -100, -100, -100, -100],
                             [-100, -100, 5, 6, 7, 2, 1]])
    assert torch.equal(answer_labels(out, 2, stop_token=0), expected)


def test_distinct_answers_and_disagreement_by_hand():
    texts = [" a", " b", " a"]
    p = torch.tensor([[0.5, 0.1, 0.5],      # [k, m] = p_k(member m's answer): member 1's answer is " b"
                      [0.2, 0.6, 0.2],
                      [0.4, 0.1, 0.4]])
    answers = distinct_answers(texts, p.log())
    # weight(a) = sum_k p_k(a) / sum_a' sum_k p_k(a') = 1.1 / 1.9, weight(b) = 0.8 / 1.9
    assert [a["answer"] for a in answers] == [" a", " b"] and [a["members"] for a in answers] == [[0, 2], [1]]
    assert [a["weight"] for a in answers] == pytest.approx([1.1 / 1.9, 0.8 / 1.9], rel=1e-6)
    # probability(a) = (1/M) sum_k p_k(a): what the mixture gives the whole answer
    assert [a["probability"] for a in answers] == pytest.approx([1.1 / 3, 0.8 / 3], rel=1e-6)
    # q_k = p_k over {a, b}, renormalised; disagreement = H(mean_k q_k) - mean_k H(q_k)
    q = [[0.5 / 0.6, 0.1 / 0.6], [0.2 / 0.8, 0.6 / 0.8], [0.4 / 0.5, 0.1 / 0.5]]
    entropy = lambda dist: -sum(x * math.log(x) for x in dist)
    mean_q = [sum(row[i] for row in q) / 3 for i in range(2)]
    assert disagreement(texts, p.log()) == pytest.approx(entropy(mean_q) - sum(map(entropy, q)) / 3, rel=1e-6)
    assert disagreement([" a"] * 3, p.log()) == 0.0                     # one answer: nothing to disagree on
    assert f"{disagreement([' a'] * 3, p.log()):.3f}" == "0.000"         # not -0.000 (H of one answer is -0.0)
    sure = torch.tensor([[1.0, 1e-9], [1e-9, 1.0]]).log()               # each sure of its own, ruling out the other
    assert disagreement([" a", " b"], sure) == pytest.approx(math.log(2), rel=1e-6)


def test_fit_thresholds_by_hand():
    stat = lambda d, c: dict(disagreement=d, confidence=c)
    stats = dict(consistent=[stat(0.0, -0.1), stat(0.1, -0.2), stat(0.4, -0.3)],
                 conflicting=[stat(0.3, -0.1), stat(0.6, -0.1)],
                 high_entropy=[stat(0.9, -2.0)])
    thresholds = fit_thresholds(stats)
    # midpoints 0.05, 0.2, 0.35, 0.5; balanced accuracy (P(conflicting > t) + P(consistent <= t)) / 2 there:
    # (1 + 1/3) / 2, (1 + 2/3) / 2 = 5/6, (1/2 + 2/3) / 2, (1/2 + 1) / 2: 0.2 wins
    assert thresholds["contested"] == pytest.approx(0.2)
    assert best_split([0.0, 0.1, 0.4], [0.3, 0.6]) == (pytest.approx(0.2), pytest.approx(5 / 6))
    # confidences sorted: -2, -0.3, -0.2, -0.1, -0.1, -0.1; quantile 0.05 sits at 0.25 of the way from -2 to -0.3
    assert thresholds["unfamiliar"] == pytest.approx(-2.0 + 0.25 * 1.7)
    assert thresholds["n_prompts"] == dict(conflicting=2, consistent=3, high_entropy=1)
    # without conflicting prompts: quantile 0.95 of all disagreements (0, 0.1, 0.4, 0.9): 0.4 + 0.85 * 0.5
    no_conflicts = fit_thresholds(dict(consistent=stats["consistent"], high_entropy=stats["high_entropy"]))
    assert no_conflicts["contested"] == pytest.approx(0.4 + 0.85 * 0.5)


@pytest.mark.parametrize("disagreement_, confidence, expected", [
    (0.1, -0.2, "agree"), (0.9, -0.2, "contested"), (0.1, -3.0, "unfamiliar"),
    (0.9, -3.0, "unfamiliar"),            # unsure members outrank their disagreement
    (0.5, -1.0, "agree"),                 # at either threshold: not above, not below
])
def test_verdict_rule(disagreement_, confidence, expected):
    assert verdict(dict(disagreement=disagreement_, confidence=confidence),
                   dict(contested=0.5, unfamiliar=-1.0)) == expected


# ---------------------------------------------------------------------------
# answer_prompts against a slow loop on a tiny random ensemble

def random_ensemble(seed=0, n_members=3, eot_bias=0.0):
    """A random 2-layer GPT on the shipped tokenizer's vocabulary, with members whose B matrices are random.

    eot_bias raises the end-of-text logit by about that much, so that some answers stop early.
    """
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=data.VOCAB_SIZE, n_layer=2, n_head=2, n_embd=32))
    params = add_lora(model, n_members, 4, 8.0)
    with torch.no_grad():
        for p in params:
            if p.dim() == 3 and p.shape[-1] == 4:       # lora_B (M, out, r)
                p.normal_(0, 0.5)
        eot = model.transformer.wte.weight[data.get_tokenizer().eot_token].clone()
        model.transformer.ln_f.bias += eot_bias * eot / eot.norm() ** 2
    return model.eval(), params


def slow_answer_logp(model, prompt_ids, answer_ids):
    """log p_k(answer | prompt) (M,) and the members' next-token distributions along it (M, A, V), in float64."""
    logprobs = model(torch.tensor([prompt_ids + answer_ids]))[:, 0].double().log_softmax(-1)   # (M, T, V)
    along = logprobs[:, len(prompt_ids) - 1:-1]                                                  # (M, A, V)
    return along[:, torch.arange(len(answer_ids)), answer_ids].sum(-1), along.exp()


def slow_epistemic(probs, answer_ids):
    """u along an answer from slow_answer_logp's distributions (M, A, V): per token H(sum_m w_m p_m) -
    sum_m w_m H(p_m), w_m the members' posterior after the answer so far, summed; and the same with w_m = 1/M."""
    entropy = lambda p: -(p * p.log()).sum(-1)
    token_logp = probs[:, torch.arange(len(answer_ids)), answer_ids].log()                   # (M, A)
    w = torch.softmax(token_logp.cumsum(-1) - token_logp, dim=0)                             # (M, A)
    weighted = entropy((w.unsqueeze(-1) * probs).sum(0)) - (w * entropy(probs)).sum(0)       # (A,)
    uniform = entropy(probs.mean(0)) - entropy(probs).mean(0)
    return weighted.sum().item(), uniform.sum().item()


def answer_ids(out, n_prompt, stop):
    ids = out[n_prompt:].tolist()
    return ids[:ids.index(stop) + 1] if stop in ids else ids


def test_the_verdicts_epistemic_weighs_members_by_their_posterior():
    """With members far apart the posterior weights matter, and u along the ensemble's answer follows them."""
    model, _ = random_ensemble()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    tokenizer = data.get_tokenizer()
    stop = tokenizer.eot_token
    for prompt, answer in zip(PROMPTS, answer_prompts(model, tokenizer, PROMPTS, max_new_tokens=5)):
        prompt_ids = [stop] + tokenizer.encode_ordinary(prompt)
        ensemble = answer_ids(model.generate(torch.tensor([prompt_ids]), 5, 0, stop_token=stop, mixture='sequence')[0],
                              len(prompt_ids), stop)
        weighted, uniform = slow_epistemic(slow_answer_logp(model, prompt_ids, ensemble)[1], ensemble)
        assert answer["epistemic"] == pytest.approx(weighted, abs=1e-4) and abs(weighted - uniform) > 0.05


@pytest.mark.parametrize("eot_bias", [0.2, 0.3])   # some answers stop early; some members give the same answer
def test_answer_prompts_match_a_slow_loop(eot_bias):
    model, _ = random_ensemble(eot_bias=eot_bias)
    tokenizer = data.get_tokenizer()
    stop = tokenizer.eot_token
    answers = answer_prompts(model, tokenizer, PROMPTS, max_new_tokens=5)
    assert [a["prompt"] for a in answers] == PROMPTS
    n_distinct = [len(a["distinct"]) for a in answers]
    assert min(n_distinct) < 3 if eot_bias == 0.3 else min(n_distinct) == 3
    for prompt, answer in zip(PROMPTS, answers):
        prompt_ids = [stop] + tokenizer.encode_ordinary(prompt)
        idx = torch.tensor([prompt_ids])
        ensemble = answer_ids(model.generate(idx, 5, 0, stop_token=stop, mixture='sequence')[0], len(prompt_ids), stop)
        members = [answer_ids(out[0], len(prompt_ids), stop)
                   for out in model.generate(idx, 5, 0, stop_token=stop, mixture=None)]
        stopped_early = [ids[-1] == stop and len(ids) < 5 for ids in members + [ensemble]]
        assert any(stopped_early) and (eot_bias == 0.3 or not all(stopped_early))
        assert answer["answer"] == tokenizer.decode([t for t in ensemble if t != stop])
        # member weights: softmax_m of log p_m(ensemble's answer)
        logp, probs = slow_answer_logp(model, prompt_ids, ensemble)
        weights = [m["weight"] for m in answer["members"]]
        assert weights == pytest.approx(torch.softmax(logp, 0).tolist(), abs=1e-5) and sum(weights) == pytest.approx(1)
        assert answer["probability"] == pytest.approx(logp.exp().mean().item(), rel=1e-4)    # (1/M) sum_m p_m(answer)
        assert answer["epistemic"] == pytest.approx(slow_epistemic(probs, ensemble)[0], abs=1e-5)
        # confidence: mean over members of the per-token log-likelihood of their own answer
        own = [slow_answer_logp(model, prompt_ids, ids)[0][m].item() / len(ids) for m, ids in enumerate(members)]
        assert answer["confidence"] == pytest.approx(sum(own) / len(own), abs=1e-5)
        # distinct answers: the sequence mixture (1/M) sum_k p_k(a), renormalised over them
        texts = [tokenizer.decode([t for t in ids if t != stop]) for ids in members]
        assert [m["answer"] for m in answer["members"]] == texts
        mixture = {text: slow_answer_logp(model, prompt_ids, ids)[0].exp().mean().item() for text, ids in zip(texts, members)}
        assert {a["answer"]: a["weight"] for a in answer["distinct"]} == pytest.approx(
            {text: p / sum(mixture.values()) for text, p in mixture.items()}, abs=1e-5)
        assert {a["answer"]: a["probability"] for a in answer["distinct"]} == pytest.approx(mixture, rel=1e-4)


# ---------------------------------------------------------------------------
# sample.py on a run directory

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An SFT run directory (a random base and ensemble, its config naming a user's data) and a DPO one on it."""
    root = tmp_path_factory.mktemp("sample")
    model, params = random_ensemble(n_members=2)
    base = dict(config=dataclasses.asdict(model.config), tokenizer=data.DEFAULT_TOKENIZER,
                model={k: v for k, v in model.state_dict().items() if not k.endswith(("lora_A", "lora_B"))})
    torch.save(base, root / "base.pt")
    rows = [dict(prompt=f"Q: {q}\nA:", response=r) for q, r in CONSISTENT for _ in range(2)]
    rows += [dict(prompt=f"Q: {q}\nA:", response=r) for q, a, b in CONFLICTING for r in (a, b)]
    data.write_jsonl(rows, root / "sft.jsonl")
    pairs = [dict(prompt=f"Q: {q}\nA:", chosen=r, rejected=" no") for q, r in CONSISTENT]
    pairs += [dict(prompt=f"Q: {q}\nA:", chosen=c, rejected=r) for q, a, b in CONFLICTING for c, r in ((a, b), (b, a))]
    data.write_jsonl(pairs, root / "pairs.jsonl")
    optimizer = torch.optim.AdamW(params)
    sft = train_sft.defaults | dict(base=str(root / "base.pt"), data=str(root / "sft.jsonl"), val_fraction=0.5,
                                    n_members=2, lora_rank=4, lora_alpha=8.0, max_iters=0, seed=0, device="cpu")
    save_checkpoint(str(root / "sft" / "ckpt.pt"), model, optimizer, 0, sft, {})
    dpo = train_dpo.defaults | dict(sft_dir=str(root / "sft"), data=str(root / "pairs.jsonl"), val_fraction=0.5,
                                    max_iters=0, seed=0, device="cpu")
    save_checkpoint(str(root / "dpo" / "ckpt.pt"), model, optimizer, 0, dpo, {})
    return dict(root=root, sft=str(root / "sft"), dpo=str(root / "dpo"))


def run_sample(capsys, *args):
    sample.main(["--device=cpu", "--max_new_tokens=4", *args])
    return capsys.readouterr()


@pytest.mark.parametrize("run", ["sft", "dpo"])
def test_thresholds_are_fitted_on_the_validation_prompts_the_first_time(runs, capsys, run):
    """A DPO run's too: on its SFT run's validation prompts, whose kinds its pairs do not carry."""
    written = run_sample(capsys, f"--out_dir={runs[run]}", "--prompt=Q: Describe a cat.\\nA:")
    assert "fitting the verdict's thresholds on the run's" in written.err
    with open(os.path.join(runs[run], "verdict.json")) as f:
        thresholds = json.load(f)
    val_rows = data.load_sft_rows(str(runs["root"] / "sft.jsonl"), "", 0.5, 0)[1]
    kinds = {row["prompt"]: row["kind"] for row in val_rows}
    assert thresholds["n_prompts"] == {k: list(kinds.values()).count(k) for k in sorted(set(kinds.values()))}
    assert set(thresholds["n_prompts"]) == {"conflicting", "consistent"}
    again = run_sample(capsys, f"--out_dir={runs[run]}", "--prompt=Q: Describe a cat.\\nA:")
    assert "fitting" not in again.err and again.out == written.out       # read back, greedy: the same


def test_json_lines_carry_the_answers_weights_and_verdict(runs, capsys, tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("Q: What is 2 plus 2?\\nA:\n\nQ: Tell me about Spain.\\nA:\n", encoding="utf-8")
    out = run_sample(capsys, f"--out_dir={runs['sft']}", f"--prompts_file={prompts_file}", "--json=true",
                     "--temperature=1", "--num_samples=2").out
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(line["prompt"], line["sample"]) for line in lines] == [
        ("Q: What is 2 plus 2?\nA:", 0), ("Q: What is 2 plus 2?\nA:", 1),
        ("Q: Tell me about Spain.\nA:", 0), ("Q: Tell me about Spain.\nA:", 1)]
    with open(os.path.join(runs["sft"], "verdict.json")) as f:
        thresholds = json.load(f)
    for line in lines:
        assert len(line["members"]) == 2 and all(set(m) == {"answer", "weight"} for m in line["members"])
        assert sum(m["weight"] for m in line["members"]) == pytest.approx(1.0)
        assert sum(a["weight"] for a in line["distinct"]) == pytest.approx(1.0)
        assert isinstance(line["answer"], str) and isinstance(line["epistemic"], float) and line["epistemic"] >= 0
        assert line["verdict"] == verdict(line, thresholds)


def test_held_out_mode_gives_the_share_of_each_verdict_per_kind(runs, capsys):
    result = json.loads(run_sample(capsys, f"--out_dir={runs['sft']}", "--held_out=true", "--json=true").out)
    assert set(result["shares"]) == {"conflicting", "consistent"}       # the user's data has no OOD file
    for shares in result["shares"].values():
        assert set(shares) == {"agree", "contested", "unfamiliar"} and sum(shares.values()) == pytest.approx(1.0)


def test_text_output_names_every_member_and_ends_each_block_with_the_verdict(runs, capsys):
    out = run_sample(capsys, f"--out_dir={runs['sft']}", "--prompt=Q: Add 2 and 3.\\nA:").out.splitlines()
    assert out[0] == 'prompt 1: "Q: Add 2 and 3.\\nA:"'
    assert out[1].startswith("  member 0  weight ") and out[2].startswith("  member 1  weight ")
    assert out[3].startswith("  ensemble  p ") and "greedy, token by token" in out[3]
    assert out[4].startswith("  epistemic ")
    assert out[5].startswith("  verdict: ") and len(out) == 6


@pytest.mark.parametrize("make, args, message", [
    (None, ["--out_dir={root}/missing", "--prompt=hi"], "{root}/missing is not a directory"),
    ("empty_dir", ["--out_dir={root}/empty_dir", "--prompt=hi"], "{root}/empty_dir has no ckpt.pt"),
    ("text", ["--out_dir={root}/text", "--prompt=hi"], "is not a checkpoint torch can read"),
    ("base", ["--out_dir={root}/base", "--prompt=hi"], "is not a checkpoint of train_sft.py or train_dpo.py"),
    (None, ["--out_dir={sft}", "--prompt="], "the prompt is empty"),
    (None, ["--out_dir={sft}", "--prompt=  "], "the prompt is empty"),
    (None, ["--out_dir={sft}", "--prompt=" + "one two " * 20], "prompt 1 is 42 tokens"),
    (None, ["--out_dir={sft}"], "give either --prompt=... or --prompts_file=FILE"),
    (None, ["--out_dir={sft}", "--prompt=hi", "--num_samples=3"], "greedy decoding (temperature=0)"),
    (None, ["--out_dir={sft}", "--prompt=hi", "--held_out=true"], "drop --prompt and --prompts_file"),
    (None, ["--out_dir={sft}", "--prompts_file={root}/none.txt"], "prompts file {root}/none.txt not found"),
    (None, ["--out_dir={sft}", "--prompt=hi", "--temprature=1"], "unknown config key 'temprature'"),
])
def test_bad_input_ends_with_one_error_line_and_status_2(runs, capsys, make, args, message):
    root = runs["root"]
    if make:
        os.makedirs(root / make, exist_ok=True)
    if make == "text":
        (root / "text" / "ckpt.pt").write_text("not a checkpoint")
    if make == "base":
        (root / "base" / "ckpt.pt").write_bytes((root / "base.pt").read_bytes())
    with pytest.raises(SystemExit) as exit_info:    # as on the command line: UserError -> one line, status 2
        run_script(sample.main, ["--device=cpu", *[a.format(root=root, sft=runs["sft"]) for a in args]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.format(root=root) in err
    assert err.count("\n") == 1


def test_the_command_line_prints_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "sample.py", f"--out_dir={tmp_path / 'missing'}", "--prompt=hi"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: {tmp_path / 'missing'} is not a directory: expected the output directory of " \
                            "train_sft.py or train_dpo.py\n"
