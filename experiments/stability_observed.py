"""
The stability criterion's prediction against what training does, on the LoRA ensemble (METHOD.md §3).

    python -m experiments.stability_observed --sft_dir=out/sft_single      # M members from theta* +- a small spread, fixed alpha
    python -m experiments.stability_observed --onset=true                    # the default ramped SFT run: when does it split?

Fixed alpha: the M = 1 adapter of sft_dir is theta*. For every M and alpha of the grid, M members
start at theta* plus a small symmetric spread (clone_member on pairs, so the mean stays at
theta*) and ascend the alpha-Rényi objective (renyi_loss + prior_penalty, as train_sft.py) by plain
gradient steps of size learning_rate * M (at collapse each member gets 1/M of every gradient):
linearised, the offsets then grow as exp(learning_rate * t * (alpha C - J)), and a positive-definite
preconditioner would not move the threshold. The spread is measured where it
matters, in the members' log-likelihoods: s = sqrt(mean_i Var_m log p_m(x_i)) on training rows.
The observed threshold is the smallest alpha whose spread ended above where it started.

Onset: `python train_sft.py` with its defaults, watched every few steps: the spread s of the
members on the conflicting and on the consistent training rows, beside the ramped alpha_t.
"""
import json
import os
import time

import torch

import data
import train_sft
from config import parse_args, run_script
from lora import add_lora, lora_parameters
from renyi_lora import alpha_at, prior_penalty, renyi_loss, sequence_logprobs
from stability import observed_threshold
from trainer import load_base, load_ensemble

defaults = dict(
    sft_dir='out/sft_single',   # the M = 1 run whose adapter is theta*
    alphas='0.7,0.75,0.8,0.85,0.9,0.95,1.0,1.1',
    members='2,4',
    n_steps=200,
    learning_rate=0.005,    # plain gradient steps of lr = learning_rate * M: at collapse a member gets 1/M of each
                            # example's gradient, so every M then moves alike; 0.005 * 74 (J's top eigenvalue) < 2
    spread=1e-3,            # the symmetric perturbation, relative to each adapter tensor's std (clone_member)
    batch_size=32,
    n_eval=128,             # training rows (seeded choice) on which the spread is measured
    eval_interval=25,
    onset=False,            # instead: watch the default SFT run (train_sft.py's defaults) split
    onset_dir='out/sft_onset',
    onset_interval=10,
    out_json='out/stability_observed.json',     # the grid's spreads; the onset's go to ..._onset.json
    alpha_star=0.0,         # the estimate (python stability.py --sft_dir=...), drawn when > 0
    plot='out/stability_lora.png',              # drawn once both json files exist
    seed=1337,
)


@torch.no_grad()
def clone_member(model, source, target, spread, generator=None):
    """Overwrite member `target` with member `source`, then push the two apart symmetrically:

        theta_source <- theta_source - delta,   theta_target <- theta_source + delta,
        delta = spread * std(tensor) * z,  z ~ N(0, I), for each adapter tensor

    The pair's mean stays at the source, where the stability criterion (METHOD.md §3) decides
    whether the spread grows (the source's examples conflict) or decays (they do not).
    """
    for p in lora_parameters(model):
        delta = spread * p[source].std() * torch.randn(p[source].shape, generator=generator).to(p.device)
        p[target] = p[source] + delta
        p[source] -= delta



def member_spread(model, batch):
    """s = sqrt( mean_i Var_m log p_m(x_i) ): the members' disagreement on one batch (idx, labels) -> float."""
    with torch.no_grad():
        logp = sequence_logprobs(model(batch[0]), batch[1])            # (M, B)
    return logp.var(0, unbiased=False).mean().sqrt().item()


def spread_ensemble(run_config, theta_star, n_members, spread, seed):
    """A base GPT carrying n_members copies of the adapter theta_star (tensors (1, ...)), pushed apart in
    pairs by clone_member: member 2j - delta_j, member 2j + 1 + delta_j, so the mean stays theta*."""
    model, _ = load_base(run_config['base'])
    params = add_lora(model, n_members, run_config['lora_rank'], run_config['lora_alpha'])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param, star in zip(params, theta_star):
            param.copy_(star.expand_as(param))
        for pair in range(n_members // 2):
            clone_member(model, 2 * pair, 2 * pair + 1, spread, generator)
    return model, params


def spread_history(config, run_config, theta_star, encoded, eot, n_members, alpha):
    """Train n_members from theta* +- spread at fixed alpha; the spread every eval_interval steps / the first."""
    model, params = spread_ensemble(run_config, theta_star, n_members, config['spread'], config['seed'])
    optimizer = torch.optim.SGD(params, lr=config['learning_rate'] * n_members)
    chosen = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(config['seed']))[:config['n_eval']]
    eval_batch = data.sft_batch(encoded, chosen.tolist(), eot)
    batches = data.shuffled_batches(len(encoded), config['batch_size'], config['seed'])
    history = [member_spread(model, eval_batch)]
    for step in range(1, config['n_steps'] + 1):
        idx, labels = data.sft_batch(encoded, next(batches), eot)
        loss = renyi_loss(sequence_logprobs(model(idx), labels), alpha) + prior_penalty(
            params, len(encoded), n_members, run_config['sigma_p'])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % config['eval_interval'] == 0:
            history.append(member_spread(model, eval_batch))
    return [s / history[0] for s in history]


def fixed_alpha_grid(config):
    """{M: {alpha: spread history}} over the grid, printed as a table of final / initial spreads."""
    single, tokenizer_name, run_config = load_ensemble(os.path.join(config['sft_dir'], 'ckpt.pt'))
    theta_star = [p.detach().clone() for p in lora_parameters(single)]
    tokenizer = data.get_tokenizer(tokenizer_name)
    rows = data.sft_rows_of(run_config)[0]
    encoded = data.encode_sft(rows, tokenizer, single.config.block_size)
    alphas = [float(a) for a in config['alphas'].split(',')]
    results = {}
    for n_members in [int(m) for m in config['members'].split(',')]:
        results[n_members] = {}
        for alpha in alphas:
            start = time.time()
            history = spread_history(config, run_config, theta_star, encoded, tokenizer.eot_token, n_members, alpha)
            results[n_members][alpha] = history
            print(f"M = {n_members}, alpha = {alpha}: spread / initial " + ' '.join(f"{s:.2f}" for s in history) +
                  f" ({time.time() - start:.0f} s)", flush=True)
    print("| M | " + " | ".join(f"alpha = {a:g}" for a in alphas) + " | observed threshold |")
    print("|---|" + "---|" * (len(alphas) + 1))
    for n_members, by_alpha in results.items():
        growth = torch.tensor([by_alpha[a][-1] for a in alphas])
        print(f"| {n_members} | " + " | ".join(f"{g:.2f}" for g in growth.tolist()) +
              f" | {observed_threshold(alphas, growth)} |")
    return results


def split_onset(config):
    """Train with train_sft.py's defaults into onset_dir; every onset_interval steps record alpha_t and the
    members' spread on the conflicting and on the consistent training rows. -> {step, alpha, conflicting, consistent}."""
    run_config = dict(train_sft.defaults, out_dir=config['onset_dir'], device='cpu')
    rows = data.load_sft_rows('')[0]
    base, tokenizer_name = load_base(run_config['base'])
    tokenizer = data.get_tokenizer(tokenizer_name)
    encoded = data.encode_sft(rows, tokenizer, base.config.block_size)
    kinds = {kind: [i for i, row in enumerate(rows) if row['kind'] == kind] for kind in ('conflicting', 'consistent')}
    watched = {kind: data.sft_batch(encoded, indices, tokenizer.eot_token) for kind, indices in kinds.items()}
    record = dict(step=[], alpha=[], conflicting=[], consistent=[])

    def watch(done, model):
        if done % config['onset_interval'] == 0:
            model.eval()
            record['step'].append(done)
            record['alpha'].append(alpha_at(done, run_config['alpha'], run_config['alpha_ramp_iters'],
                                            run_config['alpha_hold_iters']))
            for kind, batch in watched.items():
                record[kind].append(member_spread(model, batch))
            model.train()
            print(f"step {done}: alpha_t {record['alpha'][-1]:.3f}, spread conflicting {record['conflicting'][-1]:.3f}, "
                  f"consistent {record['consistent'][-1]:.3f}", flush=True)

    train_sft.train(run_config, on_step=watch)
    return record


def plot(grid, onset, alpha_star, path):
    """Left: final / initial spread against alpha for each M, the estimate dashed. Right: the default run's
    spread on conflicting and consistent rows against the step, alpha_t beside, the step where alpha_t = alpha*."""
    import matplotlib.pyplot as plt
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for n_members, by_alpha in grid.items():
        alphas = sorted(by_alpha, key=float)
        left.semilogy([float(a) for a in alphas], [by_alpha[a][-1] for a in alphas], 'o-', label=f"M = {n_members}")
    left.axhline(1.0, color='gray', lw=0.8)
    right.plot(onset['step'], onset['conflicting'], label='conflicting rows')
    right.plot(onset['step'], onset['consistent'], label='consistent rows')
    ramp = right.twinx()
    ramp.plot(onset['step'], onset['alpha'], color='gray', ls=':', label='alpha_t')
    ramp.set_ylabel('alpha_t (dotted)')
    if alpha_star > 0:
        left.axvline(alpha_star, color='k', ls='--', label=f"estimate alpha* = {alpha_star:.3f}")
        crossing = next((step for step, alpha in zip(onset['step'], onset['alpha']) if alpha >= alpha_star), None)
        if crossing is not None:
            right.axvline(crossing, color='k', ls='--', label=f"alpha_t = alpha* (step {crossing})")
    left.set(xlabel='alpha (fixed)', ylabel='spread after / before', title='M members from theta* +- spread')
    right.set(xlabel='step', ylabel='spread sqrt(mean_i Var_m log p_m(x_i))', yscale='log',
              title='the default SFT run (hold, ramp to alpha = 2)')
    left.legend(fontsize=8)
    right.legend(fontsize=8, loc='lower right')
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"saved {path}")


def main(argv):
    config = parse_args(defaults, argv)
    torch.manual_seed(config['seed'])
    grid_path, onset_path = config['out_json'], config['out_json'].replace('.json', '_onset.json')
    results = split_onset(config) if config['onset'] else fixed_alpha_grid(config)
    path = onset_path if config['onset'] else grid_path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")
    if os.path.isfile(grid_path) and os.path.isfile(onset_path):
        with open(grid_path) as f, open(onset_path) as g:
            plot(json.load(f), json.load(g), config['alpha_star'], config['plot'])


if __name__ == '__main__':
    run_script(main)
