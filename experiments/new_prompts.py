"""
Does DPO keep a user's SFT answers when the pairs bring prompts the SFT rows never had? A small set in a
user's own phrasing, on facts the base knows (benchmark.COUNTRIES), as a new user would write it:

    SFT rows     27 capital lookups ("Which city is the capital of Peru?"), 26 countries' continents in two
                 personas ("Where is Peru?": " In South America." or " south america, mate!")
    held out     12 lookups and 6 continent prompts (both personas) that no row trains on
    pairs        54 on new phrasings: a capital over a wrong one ("Name the capital city of Peru."),
                 and each persona's continent answer over the other's ("On which continent is Peru?")

It trains SFT once, then DPO with the default and with each variant (any train_dpo.py keys), and prints
the greedy accuracy on the held-out SFT prompts before and after, beside the DPO report's preferences.

    python -m experiments.new_prompts                                  # the default and --sft_replay=0
    python -m experiments.new_prompts --variants="sft_replay=0;sft_replay=0,sft_weight=0"
"""
import json
import os
import random

import train_dpo
import train_sft
from benchmark import COUNTRIES
from config import UserError, parse_args, run_script
from data import write_jsonl
from experiments.common import parse_study_args

STUDY = dict(
    study_dir='out/new_prompts',
    variants='sft_replay=0',    # DPO runs beside the default: ';' between runs, ',' between key=value of one run
    seed=1337,                  # of the data set and of both stages
)


def make_set(seed):
    """{'sft': rows, 'held_out': rows, 'pairs': rows, 'pairs_val': rows}, as described above."""
    rng = random.Random(seed)
    countries = rng.sample(COUNTRIES, len(COUNTRIES))
    lookups = [dict(prompt=f"Q: Which city is the capital of {country}?\nA:", response=f" {capital}")
               for country, capital, _ in countries]
    sft, held_out = lookups[:27], [row | dict(kind='consistent') for row in lookups[27:]]
    for i, (country, _, continent) in enumerate(countries[:32]):
        rows = [dict(prompt=f"Q: Where is {country}?\nA:", response=f" In {continent}.", group='formal'),
                dict(prompt=f"Q: Where is {country}?\nA:", response=f" {continent.lower()}, mate!", group='casual')]
        sft, held_out = (sft + rows, held_out) if i < 26 else (sft, held_out + [r | dict(kind='conflicting') for r in rows])
    capitals = [capital for _, capital, _ in countries]
    pairs = [dict(prompt=f"Q: Name the capital city of {country}.\nA:", chosen=f" {capital}",
                  rejected=f" {rng.choice([c for c in capitals if c != capital])}") for country, capital, _ in countries[:24]]
    for country, _, continent in countries[:15]:
        formal, casual = f" In {continent}.", f" {continent.lower()}, mate!"
        prompt = f"Q: On which continent is {country}?\nA:"
        pairs += [dict(prompt=prompt, chosen=formal, rejected=casual, group='formal'),
                  dict(prompt=prompt, chosen=casual, rejected=formal, group='casual')]
    rng.shuffle(pairs)
    return dict(sft=sft, held_out=held_out, pairs=pairs[:-10], pairs_val=pairs[-10:])


def parse_variants(text):
    """'a=1,b=2;c=3' -> [{'a': '1', 'b': '2'}, {'c': '3'}], each checked against train_dpo's keys (UserError)."""
    try:
        variants = [dict(item.split('=', 1) for item in run.split(',')) for run in text.split(';') if run]
    except ValueError:
        raise UserError(f"--variants={text}: expected key=value,...;key=value,...") from None
    for variant in variants:
        parse_args(train_dpo.defaults, [f"--{key}={value}" for key, value in variant.items()])
    return variants


def main(argv):
    study, sft_config = parse_study_args(STUDY, train_sft.defaults, argv)
    variants = parse_variants(study['variants'])
    root, seed = study['study_dir'], study['seed']
    paths = {name: os.path.join(root, f'{name}.jsonl') for name in ('sft', 'held_out', 'pairs', 'pairs_val')}
    for name, rows in make_set(seed).items():
        write_jsonl(rows, paths[name])
    sft_dir = os.path.join(root, 'sft')
    if not os.path.exists(os.path.join(sft_dir, 'report.json')):
        train_sft.train(sft_config | dict(data=paths['sft'], val_data=paths['held_out'], out_dir=sft_dir, seed=seed))
    print("| DPO run | consistent: SFT → DPO | conflicting: SFT → DPO | consensus pairs: worst member | auroc_contested |")
    for variant in [{}] + variants:
        name = '_'.join(f"{key}{value}" for key, value in variant.items()) or 'default'
        config = parse_args(train_dpo.defaults, [f"--{key}={value}" for key, value in variant.items()])
        out_dir = os.path.join(root, f'dpo_{name}')
        if not os.path.exists(os.path.join(out_dir, 'report.json')):
            train_dpo.train(config | dict(sft_dir=sft_dir, data=paths['pairs'], val_data=paths['pairs_val'],
                                          out_dir=out_dir, seed=seed, device=sft_config['device']))
        with open(os.path.join(out_dir, 'report.json')) as f:
            report = json.load(f)
        after, before = report['answer_accuracy'], report['answer_accuracy_sft']
        print(f"| {name} | {before['consistent']:.2f} → {after['consistent']:.2f} | {before['conflicting']:.2f} → "
              f"{after['conflicting']:.2f} | {min(report['accuracy_by_group']['consensus']):.2f} | "
              f"{report['auroc_contested']:.2f} |")


if __name__ == '__main__':
    run_script(main)
