r"""
Answer prompts with a trained ensemble, in the manner of nanoGPT's sample.py: every member's
answer with its weight, the ensemble's answer, the epistemic uncertainty, and a verdict:
the members agree, the prompt is contested, or it looks unfamiliar (METHOD.md §6).

    python sample.py --out_dir=out/sft --prompt="Q: Add 3 and 4.\nA:"
    python sample.py --out_dir=out/dpo --prompts_file=prompts.txt --json=true
    python sample.py --out_dir=out/sft --prompt="Q: Name a fruit.\nA:" --temperature=1 --num_samples=3
    python sample.py --out_dir=out/sft --held_out=true     # the verdicts on the run's test and OOD prompts

In --prompt and in a plain prompts file, \n (backslash, n) stands for a newline, so the
benchmark's two-line prompts fit on one command line; write \\ for a backslash. The verdict's
thresholds are fitted on the run's validation prompts the first time a run is sampled, and saved
to out_dir/verdict.json. A mistake in the input ends with one line `error: ...` and exit status 2.
"""
import contextlib
import json
import os
import re
import sys

import torch

import data
from config import UserError, check_device, parse_args, run_script, torch_dtype
from evaluate import answer_prompts, answers_by_kind
from trainer import load_ensemble, read_checkpoint, set_precision

defaults = dict(
    out_dir='out/sft',      # a train_sft.py or train_dpo.py output directory, with its ckpt.pt
    prompt=None,            # one prompt
    prompts_file='',        # one prompt per line, or a .jsonl file of {"prompt": ...} objects
    num_samples=1,          # answers per prompt; more than one needs temperature > 0
    max_new_tokens=32,      # the most tokens an answer may have (fewer if the block size runs out)
    temperature=0.0,        # 0: greedy, the same answer every time, as when the thresholds were fitted
    top_k=0,                # with temperature > 0, sample among the top_k tokens only; 0: among all
    seed=1337,
    json=False,             # one JSON object per line, prompt and sample, instead of text
    held_out=False,         # instead of prompts: the share of each verdict on the run's test and OOD prompts
    batch_size=32,
    device='cuda' if torch.cuda.is_available() else 'cpu',
    dtype='auto',           # of the base and the forward pass: float32, bfloat16 or float16; 'auto' is bfloat16 on a
                            # CUDA device that has it, else float32. Log-probabilities and statistics stay float32
)


# -----------------------------------------------------------------------------
# the verdict: two thresholds fitted on held-out prompts

def best_split(negatives, positives):
    """The threshold t with the best balanced accuracy, (P(positive > t) + P(negative <= t)) / 2.

    The candidates are the midpoints between consecutive distinct values; the lowest wins a tie.
    negatives, positives: lists of numbers -> (t, its balanced accuracy).
    """
    values = sorted(set(negatives) | set(positives))
    candidates = [(low + high) / 2 for low, high in zip(values, values[1:])] or values
    accuracy = lambda t: (sum(p > t for p in positives) / len(positives)
                          + sum(n <= t for n in negatives) / len(negatives)) / 2
    best = max(candidates, key=lambda t: (accuracy(t), -t))
    return best, accuracy(best)


def quantile(values, q):
    """The q-quantile of a list of numbers, interpolated linearly (torch.quantile's default)."""
    return torch.quantile(torch.tensor(values, dtype=torch.float64), q).item()


def fit_thresholds(stats_by_kind, contested_quantile=0.95, unfamiliar_quantile=0.05):
    """The verdict's thresholds from held-out prompts: {kind: [{"disagreement", "confidence", ...}, ...]}.

      contested   the disagreement that best separates 'conflicting' from 'consistent' prompts
                  (best_split); without both kinds, the contested_quantile of every prompt's disagreement
      unfamiliar  the unfamiliar_quantile of every prompt's confidence: held-out prompts are all
                  in-distribution, so about that share of familiar prompts falls below it
    Returns both thresholds, how each was fitted and the number of prompts of each kind.
    """
    disagreements = lambda kind: [s['disagreement'] for s in stats_by_kind.get(kind, [])]
    every = [s for stats in stats_by_kind.values() for s in stats]
    if disagreements('conflicting') and disagreements('consistent'):
        contested, accuracy = best_split(disagreements('consistent'), disagreements('conflicting'))
        contested_fit = f"best split of conflicting from consistent prompts, balanced accuracy {accuracy:.3f}"
    else:
        contested = quantile([s['disagreement'] for s in every], contested_quantile)
        contested_fit = f"quantile {contested_quantile} of the disagreement (no conflicting and consistent prompts)"
    return dict(contested=contested, unfamiliar=quantile([s['confidence'] for s in every], unfamiliar_quantile),
                contested_fit=contested_fit, unfamiliar_fit=f"quantile {unfamiliar_quantile} of the confidence",
                n_prompts={kind: len(stats) for kind, stats in sorted(stats_by_kind.items())})


def verdict(stats, thresholds):
    """'unfamiliar' when the members are unsure of their own answers (confidence below its threshold);
    otherwise 'contested' when they disagree (disagreement above its threshold); otherwise 'agree'.

    Unfamiliarity comes first: off the training data the members disagree too, but what a
    person needs to know then is that no member knows the answer, not that they take sides.
    """
    if stats['confidence'] < thresholds['unfamiliar']:
        return 'unfamiliar'
    if stats['disagreement'] > thresholds['contested']:
        return 'contested'
    return 'agree'


def held_out_thresholds(model, tokenizer, rows, max_new_tokens, batch_size=32):
    """fit_thresholds on the greedy answers to held-out rows' prompts: what load_thresholds saves to verdict.json."""
    return fit_thresholds(answers_by_kind(model, tokenizer, rows, max_new_tokens, batch_size))


def verdict_shares(by_kind, thresholds):
    """{kind: {verdict: share of the kind's prompts}} for answers_by_kind's answers."""
    shares = {}
    for kind, answers in by_kind.items():
        verdicts = [verdict(answer, thresholds) for answer in answers]
        shares[kind] = {name: verdicts.count(name) / len(verdicts) for name in ('agree', 'contested', 'unfamiliar')}
    return shares


# -----------------------------------------------------------------------------
# the command line

def unescape(text):
    r"""A prompt as typed: '\n' (backslash, n) is a newline, '\\' a backslash."""
    return re.sub(r'\\([\\n])', lambda match: '\n' if match.group(1) == 'n' else '\\', text)


def read_prompts(config):
    """The prompts of --prompt or --prompts_file (one per non-blank line, or .jsonl objects with "prompt")."""
    if (config['prompt'] is None) == (not config['prompts_file']):
        raise UserError("give either --prompt=... or --prompts_file=FILE (or --held_out=true)")
    if config['prompt'] is not None:
        prompts = [unescape(config['prompt'])]
    elif not os.path.isfile(config['prompts_file']):
        raise UserError(f"prompts file {config['prompts_file']} not found")
    elif config['prompts_file'].endswith('.jsonl'):
        prompts = [data.check_text(obj, 'prompt', where, True)
                   for where, obj in data.read_jsonl(config['prompts_file'])]
    else:
        with open(config['prompts_file'], encoding='utf-8') as f:
            prompts = [unescape(line.rstrip('\n')) for line in f if line.strip()]
        if not prompts:
            raise UserError(f"prompts file {config['prompts_file']} has no prompts")
    if any(not prompt.strip() for prompt in prompts):
        raise UserError("the prompt is empty")
    return prompts


def check_settings(config):
    """Settings that cannot work fail before anything is loaded."""
    check_device(config['device'])
    torch_dtype(config['dtype'], config['device'])
    if config['temperature'] < 0 or config['top_k'] < 0 or config['max_new_tokens'] < 1 or config['num_samples'] < 1:
        raise UserError("temperature and top_k must be >= 0, max_new_tokens and num_samples >= 1")
    if config['held_out'] and (config['prompt'] is not None or config['prompts_file']):
        raise UserError("--held_out=true answers the run's own test prompts: drop --prompt and --prompts_file")
    if config['num_samples'] > 1 and config['temperature'] == 0:
        raise UserError("greedy decoding (temperature=0) gives the same answer every time: give --temperature > 0 "
                        "for num_samples > 1")


def load_run(out_dir, device):
    """(model, tokenizer, the run's config) of a train_sft.py or train_dpo.py output directory."""
    if not os.path.isdir(out_dir):
        raise UserError(f"{out_dir} is not a directory: expected the output directory of train_sft.py or train_dpo.py")
    if not os.path.isfile(os.path.join(out_dir, 'ckpt.pt')):
        raise UserError(f"{out_dir} has no ckpt.pt: expected the output directory of train_sft.py or train_dpo.py")
    with contextlib.redirect_stdout(sys.stderr):   # its warnings must not mix with --json lines
        model, tokenizer_name, run_config = load_ensemble(os.path.join(out_dir, 'ckpt.pt'), 'cpu')
    return model.to(device), data.get_tokenizer(tokenizer_name), run_config


def check_lengths(prompts, tokenizer, block_size):
    """Every prompt must leave room for an answer in the model's block."""
    for number, prompt in enumerate(prompts, 1):
        n_tokens = 1 + len(tokenizer.encode_ordinary(prompt))
        if n_tokens >= block_size:
            raise UserError(f"prompt {number} is {n_tokens} tokens with its leading end-of-text token; the model's "
                            f"block_size of {block_size} leaves no room for an answer")


def run_rows(config):
    """(validation rows, test rows and OOD rows) of a run, derived again from its stored config. A train_dpo.py
    run is judged on its SFT run's held-out prompts, whose kinds (consistent, high-entropy, ...) its pairs lack."""
    try:
        if 'sft_dir' in config:
            config = read_checkpoint(os.path.join(config['sft_dir'], 'ckpt.pt'))['config']
        _, val_rows, test_rows, ood_rows = data.sft_rows_of(config)
    except (OSError, ValueError) as error:
        raise UserError(f"the run's held-out prompts cannot be read again: {error}") from None
    return val_rows, test_rows + ood_rows


def load_thresholds(out_dir, model, tokenizer, run_config, max_new_tokens, batch_size):
    """out_dir/verdict.json, fitted on the run's validation prompts and saved the first time the run is sampled."""
    path = os.path.join(out_dir, 'verdict.json')
    if not os.path.isfile(path):
        val_rows = run_rows(run_config)[0]
        print(f"fitting the verdict's thresholds on the run's {len(val_rows)} validation rows, once: {path}",
              file=sys.stderr)
        with open(path, 'w') as f:
            json.dump(held_out_thresholds(model, tokenizer, val_rows, max_new_tokens, batch_size), f, indent=2)
    with open(path) as f:
        return json.load(f)


def verdict_line(answer, thresholds):
    """The one line a person acts on."""
    name = verdict(answer, thresholds)
    by_weight = ", ".join(f"{quoted(a['answer'])} {a['probability']:.2f}" for a in answer['distinct'])
    if name == 'unfamiliar':
        return "unfamiliar: the members are unsure even of their own answers; the prompt looks unlike the training data"
    if name == 'contested':
        return (f"contested: the members take sides, as annotators do on a contested prompt; the members' answers "
                f"by probability under the mixture: {by_weight}")
    if len(answer['distinct']) == 1:
        return "agree: every member gives this answer"
    return (f"agree: the members' answers differ, but less than on contested prompts; the members' answers by "
            f"probability under the mixture: {by_weight}")


def quoted(text):
    """Text in double quotes with its newlines and spaces visible, as JSON writes it."""
    return json.dumps(text, ensure_ascii=False)


def print_answer(answer, thresholds, heading):
    """A block of text: each member's answer and weight, the ensemble's, the statistics and the verdict."""
    print(f"{heading}: {quoted(answer['prompt'])}")
    for m, member in enumerate(answer['members']):
        print(f"  member {m}  weight {member['weight']:.2f}  {quoted(member['answer'])}")
    print(f"  ensemble  p {answer['probability']:.2f}  {quoted(answer['answer'])}  (greedy, token by token: the "
          "mixture's most probable answer can be another)")
    print(f"  epistemic {answer['epistemic']:.3f} nats; disagreement {answer['disagreement']:.3f} nats "
          f"(contested above {thresholds['contested']:.3f}); confidence {answer['confidence']:.3f} nats/token "
          f"(unfamiliar below {thresholds['unfamiliar']:.3f})")
    print(f"  verdict: {verdict_line(answer, thresholds)}")


def json_line(answer, thresholds, sample):
    """One JSON object: what print_answer shows, with the verdict's name."""
    members = [dict(answer=m['answer'], weight=m['weight']) for m in answer['members']]
    return json.dumps(dict(prompt=answer['prompt'], sample=sample, answer=answer['answer'],
                           probability=answer['probability'], members=members,
                           distinct=answer['distinct'], epistemic=answer['epistemic'],
                           disagreement=answer['disagreement'], confidence=answer['confidence'],
                           verdict=verdict(answer, thresholds)), ensure_ascii=False)


def print_held_out(out_dir, by_kind, thresholds, as_json):
    """The share of each verdict among the held-out prompts of each kind."""
    shares = verdict_shares(by_kind, thresholds)
    if as_json:
        print(json.dumps(dict(thresholds=thresholds, shares=shares)))
        return
    fitted_on = ', '.join(f"{n} {kind}" for kind, n in thresholds['n_prompts'].items())
    print(f"thresholds from the validation prompts ({fitted_on}): contested above {thresholds['contested']:.3f} nats "
          f"of disagreement, unfamiliar below {thresholds['unfamiliar']:.3f} nats/token of confidence")
    print(f"verdicts on {out_dir}'s test prompts (and OOD prompts, when the run has them):")
    print(f"{'kind':>12} {'prompts':>7} {'agree':>6} {'contested':>9} {'unfamiliar':>10}")
    for kind, share in sorted(shares.items()):
        print(f"{kind:>12} {len(by_kind[kind]):>7} {share['agree']:>6.3f} {share['contested']:>9.3f} "
              f"{share['unfamiliar']:>10.3f}")


def main(argv):
    config = parse_args(defaults, argv)
    check_settings(config)
    prompts = None if config['held_out'] else read_prompts(config)
    model, tokenizer, run_config = load_run(config['out_dir'], config['device'])
    set_precision(model, config)
    if prompts is not None:
        check_lengths(prompts, tokenizer, model.config.block_size)
    thresholds = load_thresholds(config['out_dir'], model, tokenizer, run_config, config['max_new_tokens'],
                                 config['batch_size'])
    if config['held_out']:
        by_kind = answers_by_kind(model, tokenizer, run_rows(run_config)[1], config['max_new_tokens'],
                                  config['batch_size'])
        print_held_out(config['out_dir'], by_kind, thresholds, config['json'])
        return
    generator = torch.Generator(device=config['device']).manual_seed(config['seed'])
    samples = [answer_prompts(model, tokenizer, prompts, config['max_new_tokens'], config['temperature'],
                              config['top_k'] or None, generator, config['batch_size'])
               for _ in range(config['num_samples'])]
    for number in range(len(prompts)):
        for sample, answers in enumerate(samples):
            if config['json']:
                print(json_line(answers[number], thresholds, sample))
            else:
                heading = f"prompt {number + 1}" + (f", sample {sample + 1}" if config['num_samples'] > 1 else "")
                print_answer(answers[number], thresholds, heading)


if __name__ == '__main__':
    run_script(main)
