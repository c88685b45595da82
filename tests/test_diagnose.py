"""diagnose.py: its read-outs against hand-computed values, and one run end to end on a tiny base."""
import math

import pytest
import torch

import data
from experiments import common, diagnose
import train_sft
from config import UserError
from evaluate import score_rows
from renyi_lora import mutual_information

SURE, NEVER = 0.0, -1e4


def test_sides_finds_each_tasks_split_even_when_the_sides_swap_between_tasks():
    """Task s: member 0 explains group a, member 1 group b; task t the other way round; u has one group only."""
    rows = [dict(task='s', group='a'), dict(task='s', group='b'), dict(task='t', group='a'), dict(task='t', group='b'),
            dict(task='u', group='a'), dict(task='s', group='all')]              # 'all': agreed, not a group's row
    logp = torch.tensor([[SURE, NEVER, NEVER, SURE, SURE, SURE], [NEVER, SURE, SURE, NEVER, NEVER, SURE]])
    found = diagnose.sides(logp, rows)
    assert set(found) == {'s', 't'}
    assert found['s'][0] == pytest.approx(1.0) and found['t'][0] == pytest.approx(1.0)
    assert found['s'][1] == {'a': pytest.approx([1.0, 0.0]), 'b': pytest.approx([0.0, 1.0])}
    assert found['t'][1] == {'a': pytest.approx([0.0, 1.0]), 'b': pytest.approx([1.0, 0.0])}


def test_sharing_is_the_mean_entropy_of_the_responsibilities_by_kind():
    rows = [dict(kind='consistent'), dict(kind='consistent'), dict(kind='conflicting')]
    logp = torch.tensor([[0.0, math.log(3.0), 0.0], [0.0, 0.0, -1e4]])          # alpha 1: (1/2, 1/2), (3/4, 1/4), (1, 0)
    entropy = lambda p: -sum(q * math.log(q) for q in p if q > 0)
    found = diagnose.sharing(logp, rows, alpha=1.0)
    assert found['consistent'] == pytest.approx((entropy([0.5, 0.5]) + entropy([0.75, 0.25])) / 2)
    assert found['conflicting'] == pytest.approx(0.0, abs=1e-12)


@pytest.fixture(scope='module')
def run(tmp_path_factory, tiny_base):
    """A tiny M=2 SFT run on two groups' conflicting rows and consistent ones, with its held-out file."""
    root = tmp_path_factory.mktemp('diagnose')
    rows = [dict(prompt=f"Q: {q}?\nA:", response=r) for q, r in (("2 plus 3", " 5"), ("4 plus 4", " 8"))]
    rows += [dict(prompt=f"Q: Tell me about {c}.\nA:", response=r, group=g)
             for c in ("Spain", "Peru") for g, r in (("a", f" Capital: {c}."), ("b", f" {c.lower()}!"))]
    data.write_jsonl(rows, root / 'train.jsonl')
    config = train_sft.defaults | dict(base=tiny_base, data=str(root / 'train.jsonl'), val_data=str(root / 'train.jsonl'),
                                       out_dir=str(root / 'sft'), n_members=2, lora_rank=4, max_iters=10, batch_size=4,
                                       alpha_ramp_iters=0, alpha_hold_iters=0, warmup_iters=2, log_interval=1000,
                                       eval_interval=1000, max_new_tokens=3, seed=0, device='cpu')
    train_sft.train(config)
    return config


def test_first_and_rest_add_up_to_the_reports_summed_disagreement(run):
    """first + rest * (n - 1) is the equal-weight epistemic uncertainty summed over the response (evaluate.score_batches)."""
    model, tokenizer_name, _ = diagnose.load_ensemble(f"{run['out_dir']}/ckpt.pt")
    model.eval()
    tokenizer = data.get_tokenizer(tokenizer_name)
    rows = data.load_sft_jsonl(run['data'])
    first, rest = diagnose.first_and_rest(model, tokenizer, rows, batch_size=3)
    for i, row in enumerate(rows):
        scores = score_rows(model, tokenizer, [row], 1)                      # one row at a time
        n = scores['n_tokens'].item()
        summed = first[i] + (rest[i] * (n - 1) if n > 1 else 0.0)
        assert summed == pytest.approx(scores['epistemic_token'].item(), rel=1e-4, abs=1e-6)
    # "first" is the first response token: the members' disagreement about what follows the prompt alone
    for i, row in enumerate(rows):
        ids = torch.tensor([[tokenizer.eot_token] + tokenizer.encode_ordinary(row['prompt'])])
        after_prompt = model(ids)[:, 0, -1].float().softmax(-1)                     # (M, V)
        assert first[i] == pytest.approx(mutual_information(after_prompt).item(), rel=1e-4, abs=1e-6)
    nan = float('nan')
    by_kind = diagnose.token_disagreement([0.1, 0.2, 0.3, nan], [0.5, nan, 0.7, 0.9],
                                          [dict(kind='a'), dict(kind='a'), dict(kind='a'), dict(kind='b')])
    assert by_kind['a'] == (pytest.approx(0.2), pytest.approx(0.6)) and math.isnan(by_kind['b'][0])


def test_a_run_is_diagnosed_and_its_task_split_matches_the_report(run, capsys):
    diagnose.main([f"--run={run['out_dir']}", '--top=2', '--max_new_tokens=3', '--device=cpu'])
    out = capsys.readouterr().out
    report = common.finished_report(run, may_train=False)
    lines = out.splitlines()
    assert lines[0].startswith('sides:') and lines[1].startswith(f"  (no task): {report['per_task_specialisation']:.2f}")
    assert any(line.startswith('sharing:') for line in lines) and 'consistent:' in out and 'conflicting:' in out
    assert any(line.startswith('tokens:') for line in lines)
    first_token = [line for line in lines if 'AUROC of conflicting against consistent prompts' in line]
    assert len(first_token) == 1 and 0.0 <= float(first_token[0].split()[-1]) <= 1.0
    assert 'disagree: the 2 of 2 consistent prompts' in out


@pytest.mark.parametrize('argument, message', [('--top=0', 'top must be a whole number >= 1'),
                                               ('--kind=nope', "kind 'nope': the held-out rows of")])
def test_bad_settings_are_refused_in_one_line(run, argument, message):
    with pytest.raises(UserError, match=message):
        diagnose.main([f"--run={run['out_dir']}", argument, '--device=cpu'])


def test_a_missing_run_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match='not found'):
        diagnose.main([f'--run={tmp_path}', '--device=cpu'])


def test_a_dpo_run_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(diagnose, 'load_ensemble', lambda path, device: (None, 'gpt2', dict(sft_dir='out/sft')))
    with pytest.raises(UserError, match='is a train_dpo.py run; diagnose.py reads train_sft.py runs'):
        diagnose.main(['--run=out/dpo', '--device=cpu'])
