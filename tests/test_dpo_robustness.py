"""dpo_robustness.py: the targets each DPO run is held to, on hand-made reports, and its refusals."""
import json

import pytest
import torch

from experiments import dpo_robustness


def report(best, worst_consensus, consensus, auroc, starved=()):
    """A DPO report with two members: member 0 takes g0's side at `best`, member 1 g1's."""
    return dict(accuracy_by_group={'contested/g0': [best, 1 - best], 'contested/g1': [1 - best, best],
                                   'consensus': [worst_consensus, 1.0]},
                ensemble_accuracy_by_group={'consensus': consensus}, auroc_contested=auroc,
                starved_members=list(starved), train_accuracy_by_group={'consensus': [1.0, worst_consensus + 0.1]})


SINGLE = dict(accuracy_by_group={'contested/g0': [0.7], 'contested/g1': [0.3], 'consensus': [0.9]},
              ensemble_accuracy_by_group={'consensus': 0.9}, auroc_contested=None, starved_members=[],
              train_accuracy_by_group={'consensus': [0.95]})


def test_a_run_that_meets_every_target_misses_nothing():
    r = dpo_robustness.row('user_160', 1337, 'default', report(0.95, 0.8, 0.86, 0.92), SINGLE)
    assert r['misses'] == [] and r['sides'] == {'g0': 0.95, 'g1': 0.95} and r['single_sides'] == 0.7
    assert r['d_consensus'] == pytest.approx(-0.04) and r['worst_member_training_consensus'] == pytest.approx(0.9)
    assert r['single_training_consensus'] == 0.95


def test_a_difference_of_exactly_the_margin_meets_the_target():
    r = dpo_robustness.row('long', 1337, 'default', report(1.0, 0.9, 0.75, 0.95), SINGLE | dict(
        ensemble_accuracy_by_group={'consensus': 0.800000011920929}))    # 32 / 40 in float32
    assert r['d_consensus'] < -0.05 and r['misses'] == []


def test_each_target_is_checked():
    answers = dict(answer_accuracy=dict(consistent=0.70, conflicting=0.90),
                   answer_accuracy_sft=dict(consistent=0.80, conflicting=0.95))        # a fall of 0.10 and one of 0.05
    r = dpo_robustness.row('user_160', 1, 'default', report(0.85, 0.5, 0.80, 0.7, starved=[1]) | answers, SINGLE)
    assert r['misses'] == ['starved', 'sides', 'consensus', 'auroc', 'answers']
    lines = dpo_robustness.table([r]).splitlines()
    assert len(lines) == 3
    assert lines[2] == ('| user_160 | default | 1 | 1 | 0.85 / 0.85 | – | 0.70 | 0.80 (-0.10) | 0.60 (0.95) | 0.70 | '
                        'conflicting 0.95 → 0.90, consistent 0.80 → 0.70 | starved, sides, consensus, auroc, answers |')
    old = dpo_robustness.row('user_160', 1, 'default', report(0.95, 0.8, 0.86, 0.92), SINGLE)   # before the read-outs
    assert old['misses'] == [] and '| – | none |' in dpo_robustness.table([old])


def test_pair_coverage_asks_a_member_for_every_ordered_pair_not_for_every_group():
    """Three groups, one prompt each way; member 0 ranks a > b > c, member 1 c > b > a: every ordered pair
    has a member that holds it, though no member puts b first."""
    responses = {'a': ' A.', 'b': ' B.', 'c': ' C.'}
    pairs = [dict(prompt='p', chosen=' right', rejected=' wrong', task='fact', group='all')]   # consensus: ignored
    pairs += [dict(prompt='q', chosen=responses[g], rejected=responses[h], task='record', group=g)
              for g in 'abc' for h in 'abc' if g != h]
    rank = [{'a': 3, 'b': 2, 'c': 1}, {'a': 1, 'b': 2, 'c': 3}]
    margins = {f'contested/{g}': torch.tensor([[float(r[g] - r[h]) for h in 'abc' if h != g] for r in rank])
               for g in 'abc'}                                                   # (M, n) in file order
    assert dpo_robustness.pair_coverage(margins, pairs) == 1.0
    # b's side against everyone is nobody's: sides would read 0.5 for b, and coverage does not
    assert max((margins['contested/b'] > 0).float().mean(1)).item() == 0.5
    margins['contested/b'][0, 1] = -1.0                      # member 0 gives up b over c, which member 1 never held
    assert dpo_robustness.pair_coverage(margins, pairs) == 0.0


def test_pair_coverage_asks_one_member_to_hold_all_of_a_pairs_prompts():
    """a over b on two prompts, member 0 holding one and member 1 the other: the best member holds half."""
    pairs = [dict(prompt=p, chosen=f' {g}{p}', rejected=f' {h}{p}', task='record', group=g)
             for p in 'pq' for g, h in (('a', 'b'), ('b', 'a'))]
    margins = {'contested/a': torch.tensor([[1.0, -1.0], [-1.0, 1.0]]),          # columns: prompts p, q
               'contested/b': torch.tensor([[1.0, 1.0], [1.0, 1.0]])}
    assert dpo_robustness.pair_coverage(margins, pairs) == 0.5


def test_bad_sets_variants_and_seeds_are_refused(tmp_path):
    for arg, message in (('--sets=no_conflict', "unknown set 'no_conflict'"),
                         ('--variants=single', "unknown variant 'single'"),
                         ('--seeds=1,x', "--seeds: comma-separated whole numbers")):
        with pytest.raises(ValueError, match=message):
            dpo_robustness.main([arg, f'--study_dir={tmp_path}', '--train=false'])
    assert not any(tmp_path.iterdir())                        # refused before writing anything


def test_train_false_tabulates_only_finished_runs(tmp_path):
    for run, values in (('default_seed1337', {}), ('single_seed1337', {}),
                        ('dpo_default_seed1337', report(0.95, 0.8, 0.86, 0.92)), ('dpo_single_seed1337', SINGLE)):
        path = tmp_path / 'user_160' / run
        path.mkdir(parents=True)
        (path / 'report.json').write_text(json.dumps(values))
    dpo_robustness.main(['--sets=user_160,long', '--seeds=1337', '--train=false', f'--study_dir={tmp_path}'])
    lines = (tmp_path / 'dpo_table.md').read_text().splitlines()
    assert len(lines) == 3 and lines[2].startswith('| user_160 | default | 1337 | 0 | 0.95 / 0.95 | – | 0.70 |')
    assert (tmp_path / 'data' / 'user_160' / 'pairs_train.jsonl').exists()


def test_the_new_prompts_set_keeps_pairs_and_held_out_prompts_off_the_sft_rows():
    """experiments.new_prompts: no pair and no held-out row shares a prompt with an SFT row, each contested prompt
    has both personas' pairs, and each held-out continent prompt both personas' answers."""
    from experiments.new_prompts import make_set, parse_variants
    rows = make_set(0)
    sft_prompts = {row['prompt'] for row in rows['sft']}
    assert not sft_prompts & {row['prompt'] for row in rows['pairs'] + rows['pairs_val'] + rows['held_out']}
    pairs = rows['pairs'] + rows['pairs_val']
    for prompt in {pair['prompt'] for pair in pairs if pair.get('group')}:
        assert sorted(pair['group'] for pair in pairs if pair['prompt'] == prompt) == ['casual', 'formal']
    conflicting = [row for row in rows['held_out'] if row['kind'] == 'conflicting']
    assert len(conflicting) == 12 and len({row['prompt'] for row in conflicting}) == 6
    assert parse_variants("sft_replay=0;sft_replay=0,sft_weight=0") == [{'sft_replay': '0'},
                                                                         {'sft_replay': '0', 'sft_weight': '0'}]
