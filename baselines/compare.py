"""
The methods of the three source papers side by side: one benchmark split, one step budget, one seed.

    python -m baselines.compare                        # -> out/compare/table.md, reliability.png, uncertainty.png
    python -m baselines.compare --max_iters=100        # any train_sft.py key applies to every method
    python -m baselines.compare --methods=map          # some of the methods only (here MAP LoRA, and SWAG from it)

Seven training runs make the nine rows; SWAG and MultiSWAG are read off other runs' iterates.
Every run takes train_sft.py's defaults, including the α ramp (alpha_ramp_iters):
  MAP LoRA        one adapter (M = 1), its last iterate
  SWAG            S draws from the Gaussian of the MAP run's iterates (baselines/swag.py), an S-member ensemble
  deep ensemble   M adapters, alpha = 0: each member fits every example on its own
  MultiSWAG       S / M draws from the Gaussian of each deep-ensemble member's iterates
  α-Rényi         M adapters, alpha = 0.5, 1 and 2 (train_sft.py's default α and ramp, on the schedule below)
  UAL (data)      one adapter, label smoothing from each training row's `uncertainty` (baselines/ual.py)
  UAL (ensemble)  one adapter, label smoothing from the alpha = 1 ensemble's epistemic uncertainty
Every run follows swag.swag_learning_rate: warm-up and cosine decay to swag_lr by the start of the
last swag_fraction of the steps, then swag_lr held constant (where SWAG collects). Every row's plots
go to compare_dir/<name>/ (with report.json and ckpt.pt for the seven trained ones); results.json holds
all nine reports, table.md the table.
"""
import json
import os
import time

import torch

import data
import train_sft
from baselines import ual
from baselines.swag import SWAGCollector, sample_members, swag_learning_rate
from config import UserError, parse_args, run_script
from evaluate import calibration
from experiments.common import markdown_table
from lora import add_lora
from plots import plt, reliability_diagram, sft_plots, uncertainty_histograms  # plt: with plots.py's Agg backend
from report import sft_report
from trainer import load_base

defaults = train_sft.defaults | {key: ual.defaults[key] for key in ('ual_eps_min', 'ual_eps_max')} | dict(
    compare_dir='out/compare',
    swag_fraction=0.4,       # SWAG collects over this last share of max_iters, at the constant rate swag_lr
    swag_lr=1e-3,
    swag_every=5,            # steps between collections
    swag_rank=20,            # K: deviations kept for the low-rank part of the covariance
    swag_scale=0.5,          # 0 would give SWA, the mean alone
    swag_samples=16,         # S: draws evaluated as one S-member ensemble (MultiSWAG: S / M from each member)
    methods='all',           # or a comma-separated subset of the names of compare.methods (ual_ensemble needs renyi_1)
)

COLUMNS = ('accuracy_consistent', 'accuracy_high_entropy', 'accuracy_conflicting', 'accuracy_conflicting_token_mixture',
           'nll', 'nll_token_mixture', 'nll_high_entropy', 'ece', 'brier', 'soft_specialisation', 'ensemble_coherence',
           'ensemble_coherence_token_mixture', 'coherence', 'auroc_conflict', 'auroc_ood', 'train_seconds')
SWAG_OF = {'map': 'swag', 'deep_ensemble': 'multiswag'}   # the rows read off another run's iterates


def methods(config):
    """(name, label, train_sft overrides) of the seven training runs, in the order they must run."""
    n_members = config['n_members']
    teacher = os.path.join(config['compare_dir'], 'renyi_1', 'ckpt.pt')
    return [('map', 'MAP LoRA (M=1)', dict(n_members=1)),
            ('deep_ensemble', f'deep ensemble (M={n_members}, α=0)', dict(alpha=0.0)),
            ('renyi_0.5', f'α-Rényi (M={n_members}, α=0.5)', dict(alpha=0.5)),
            ('renyi_1', f'α-Rényi (M={n_members}, α=1)', dict(alpha=1.0)),
            ('renyi_2', f'α-Rényi (M={n_members}, α=2)', dict(alpha=2.0)),     # train_sft.py's α, this schedule
            ('ual_data', 'UAL, data u (M=1)', dict(n_members=1, ual_source='data')),
            ('ual_ensemble', 'UAL, ensemble u (M=1)', dict(n_members=1, ual_source='ensemble', ual_teacher=teacher))]


def selected_methods(config):
    """The methods of config['methods'] ('all' or a comma-separated list of names), in methods' order."""
    every = methods(config)
    if config['methods'] == 'all':
        return every
    names = config['methods'].split(',')
    unknown = [name for name in names if name not in [n for n, _, _ in every]]
    if unknown:
        raise UserError(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(n for n, _, _ in every)}")
    return [method for method in every if method[0] in names]


def method_config(config, name, overrides):
    """The train_sft config of one row: its own out_dir."""
    return config | overrides | dict(out_dir=os.path.join(config['compare_dir'], name))


def table_metrics(test_rows, readouts):
    """What the table needs beyond sft_report: the sequence mixture's NLL on the high-entropy prompts alone."""
    scores = readouts['scores']
    is_high_entropy = torch.tensor([row.get('kind') == 'high_entropy' for row in test_rows])
    token_mask = is_high_entropy.repeat_interleave(scores['n_tokens'])     # rows' tokens lie consecutively
    token_scores = {key: scores[key][token_mask] for key in ('token_confidence', 'token_correct', 'token_true_prob')}
    return dict(nll_high_entropy=calibration(token_scores)['nll'] if token_mask.any() else None)


def swag_ensemble(config, source, swags):
    """A fresh base carrying as many SWAG draws as fit evenly in swag_samples, one draw per member."""
    model, _ = load_base(config['base'], config['device'])
    lora = source.lora_config
    n_draws = config['swag_samples'] // len(swags) * len(swags)
    add_lora(model, n_draws, lora['rank'], lora['lora_alpha'], lora['targets'], lora['layers'])
    sample_members(model.to(config['device']), swags, config['swag_scale'],
                   torch.Generator().manual_seed(config['seed']))
    return model


def swag_row(name, run, source, swags, tokenizer, test_rows, ood_rows):
    """(label, report, readouts) of the SWAG draws of a finished run."""
    model = swag_ensemble(run, source, swags)
    label = (f'SWAG (S={model.n_members}, from MAP)' if name == 'swag' else
             f'MultiSWAG ({len(swags)}×{model.n_members // len(swags)}, from deep ens.)')
    swag_run = method_config(run, name, dict(n_members=model.n_members))
    os.makedirs(swag_run['out_dir'], exist_ok=True)
    history = torch.load(os.path.join(run['out_dir'], 'ckpt.pt'), weights_only=False)['history']
    report, readouts = sft_report(model, tokenizer, test_rows, ood_rows, swag_run['alpha'], swag_run['batch_size'],
                                  swag_run['max_new_tokens'], swag_run['seed'])
    sft_plots(swag_run['out_dir'], history, report, readouts['by_kind'], readouts['scores'])
    report |= table_metrics(test_rows, readouts)
    return label, report, readouts


def compare(config):
    """Train and evaluate every method; writes table.md, results.json and the plots; returns [(label, report)]."""
    config = config | dict(swag_start=int(round((1 - config['swag_fraction']) * config['max_iters'])))
    chosen = selected_methods(config)
    os.makedirs(config['compare_dir'], exist_ok=True)
    _, _, test_rows, ood_rows = data.sft_rows_of(config)
    results = []                                                          # (label, report, readouts)
    for name, label, overrides in chosen:
        run = method_config(config, name, overrides)
        print(f"== {label}", flush=True)
        # SWAG from the MAP run, MultiSWAG from the deep-ensemble run: their iterates, collected on the way
        collector = SWAGCollector(config['swag_start'], config['swag_every'], config['swag_rank']) if (
            name in SWAG_OF) else None
        train = ual.train if 'ual_source' in overrides else train_sft.train
        model, tokenizer, report, readouts = train(run, lr_schedule=swag_learning_rate, on_step=collector)
        sft_plots(run['out_dir'], torch.load(os.path.join(run['out_dir'], 'ckpt.pt'), weights_only=False)['history'],
                  report, readouts['by_kind'], readouts['scores'])
        report |= table_metrics(test_rows, readouts)
        results.append((label, report, readouts))
        if collector is not None:
            label, swag_report, swag_readouts = swag_row(SWAG_OF[name], run, model, collector.swags, tokenizer,
                                                         test_rows, ood_rows)
            swag_report['train_seconds'] = report['train_seconds']
            results.append((label, swag_report, swag_readouts))
    rows = [(label, report) for label, report, _ in results]
    with open(os.path.join(config['compare_dir'], 'table.md'), 'w') as f:
        f.write(markdown_table(rows, COLUMNS) + '\n')
    with open(os.path.join(config['compare_dir'], 'results.json'), 'w') as f:
        json.dump(dict(rows), f, indent=2)
    comparison_plots(config['compare_dir'], results)
    return rows


def comparison_plots(out_dir, results):
    """Write reliability.png (every method) and uncertainty.png (methods with more than one member), side by side.

    results: [(label, report, readouts)], report and readouts as filled by evaluate.sft_report.
    A single adapter has no epistemic uncertainty (mutual information 0), so it gets no histogram.
    """
    def reliability(ax, label, report, readouts):
        reliability_diagram(ax, readouts['scores']['token_confidence'], readouts['scores']['token_correct'])
        ax.set_title(f"{label}\nECE {report['ece']:.3f}", fontsize=9)

    def uncertainty(ax, label, report, readouts):
        uncertainty_histograms(ax, readouts['by_kind'])
        ax.set_title(label, fontsize=9)

    ensembles = [result for result in results if result[1]['n_members'] > 1]
    for name, draw, panels in (('reliability', reliability, results), ('uncertainty', uncertainty, ensembles)):
        n_rows = -(-len(panels) // 4)                              # at most 4 panels a row, rows filled evenly
        n_cols = -(-len(panels) // n_rows)
        fig, axes = plt.subplots(n_rows, n_cols, figsize=(4 * n_cols, 3.4 * n_rows), squeeze=False)
        for ax, panel in zip(axes.flat, panels):
            draw(ax, *panel)
            ax.xaxis.label.set_fontsize(8)
        for ax in axes.flat[len(panels):]:
            ax.axis('off')
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f'{name}.png'), dpi=90)
        plt.close(fig)


def main(argv):
    config = parse_args(defaults, argv)
    start = time.time()
    rows = compare(config)
    print(markdown_table(rows, COLUMNS))
    print(f"compare.py: {len(rows)} methods in {time.time() - start:.0f}s")


if __name__ == '__main__':
    run_script(main)
