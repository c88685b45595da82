"""
The figures of a finished run, as PNG files beside its report, drawn from what training saved there:

    python plots.py --out_dir=out/sft      # loss.png, routing.png, uncertainty.png, reliability.png
    python plots.py --out_dir=out/dpo      # margins.png, routing.png

An SFT run's out_dir holds ckpt.pt (the loss history), report.json and readouts.pt (the
per-prompt scores, evaluate.py's); a DPO run's report.json and margins.pt. matplotlib with the
Agg backend: no display needed. The README's picture is an SFT run's uncertainty.png:
`python plots.py --out_dir=out/sft && cp out/sft/uncertainty.png assets/sft_uncertainty.png`.
"""
import json
import os

import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)
import torch  # noqa: E402

from config import UserError, parse_args, run_script  # noqa: E402

defaults = dict(
    out_dir='out/sft',      # a train_sft.py or train_dpo.py output directory
)


def loss_curves(ax, history):
    ax.plot(history['iter'], history['loss'], lw=0.8, label='train loss (nats / example)')
    ax.set_xlabel('iter')
    ax.set_ylabel('train loss')
    if history['val_iter']:
        twin = ax.twinx()
        twin.plot(history['val_iter'], history['val_nll'], 'o-', color='C1', label='val NLL / token')
        twin.set_ylabel('val NLL / token')
    ax.set_title('loss')


def routing_heatmap(ax, routing):
    """routing: {group: [mean responsibility of member 0, 1, ...]}"""
    groups = list(routing)
    matrix = np.array([routing[g] for g in groups]).T                          # (M, groups)
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap='viridis')
    ax.set_xticks(range(len(groups)), groups)
    ax.set_yticks(range(matrix.shape[0]), [f'member {m}' for m in range(matrix.shape[0])])
    for (m, g), value in np.ndenumerate(matrix):
        ax.text(g, m, f'{value:.2f}', ha='center', va='center', color='w' if value < 0.5 else 'k')
    ax.set_title('routing: mean responsibility')
    plt.colorbar(image, ax=ax)


def uncertainty_histograms(ax, scores_by_kind):
    """scores_by_kind: {kind: [epistemic score per prompt]}"""
    top = max((max(v) for v in scores_by_kind.values() if v), default=1.0)
    for kind, values in scores_by_kind.items():       # outlines, scaled per kind: the kinds differ in size
        ax.hist(values, bins=30, range=(0, top), density=True, histtype='step', linewidth=1.5, label=kind)
    ax.set_xlabel('epistemic uncertainty u (nats, summed along the response, sequence mixture)')
    ax.set_ylabel('density of prompts')
    ax.legend()
    ax.set_title('uncertainty by task kind')


def reliability_diagram(ax, confidence, correct, n_bins=10, label=None):
    """Accuracy against mean confidence in n_bins equal-width bins."""
    bins = (confidence * n_bins).long().clamp(max=n_bins - 1)
    centres, accuracies = [], []
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            centres.append(confidence[in_bin].mean().item())
            accuracies.append(correct[in_bin].float().mean().item())
    ax.plot([0, 1], [0, 1], 'k:', lw=0.8)
    ax.plot(centres, accuracies, 'o-', label=label)
    ax.set_xlabel('confidence (mixture, per token)')
    ax.set_ylabel('accuracy')
    ax.set_title('reliability')


def sft_plots(out_dir, history, report, scores_by_kind, scores):
    """Write loss.png, routing.png, uncertainty.png and reliability.png to out_dir."""
    figures = dict(loss=lambda ax: loss_curves(ax, history),
                   uncertainty=lambda ax: uncertainty_histograms(ax, scores_by_kind),
                   reliability=lambda ax: reliability_diagram(ax, scores['token_confidence'], scores['token_correct']))
    if report.get('routing'):
        figures['routing'] = lambda ax: routing_heatmap(ax, report['routing'])
    for name, draw in figures.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f'{name}.png'), dpi=100)
        plt.close(fig)


def margin_histograms(axes, margins_by_group):
    """One panel per group; in each, every member's implied reward margins. margins_by_group: {group: (M, n)}"""
    values = torch.cat([m.flatten() for m in margins_by_group.values()])
    low, high = values.min().item(), values.max().item()
    for ax, (group, margins) in zip(axes, margins_by_group.items()):
        for member, member_margins in enumerate(margins):
            ax.hist(member_margins.tolist(), bins=30, range=(low, high), alpha=0.5, label=f'member {member}')
        ax.axvline(0, color='k', lw=0.8)
        ax.set_title(f'{group} ({margins.shape[1]} pairs)')
        ax.set_xlabel('reward margin beta * h (> 0: prefers chosen)')
    axes[0].set_ylabel('pairs')
    axes[0].legend()


def dpo_plots(out_dir, margins_by_group, routing):
    """Write margins.png (reward margins per member and group) and routing.png to out_dir."""
    fig, axes = plt.subplots(1, len(margins_by_group), figsize=(4 * len(margins_by_group), 3.5), squeeze=False)
    margin_histograms(axes[0], margins_by_group)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, 'margins.png'), dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    routing_heatmap(ax, routing)
    plt.setp(ax.get_xticklabels(), rotation=20, ha='right')  # 'contested/<group>' labels are long
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, 'routing.png'), dpi=100)
    plt.close(fig)


def main(argv):
    config = parse_args(defaults, argv)
    out_dir = config['out_dir']
    paths = {name: os.path.join(out_dir, name) for name in ('report.json', 'ckpt.pt', 'readouts.pt', 'margins.pt')}
    if not os.path.isfile(paths['report.json']):
        raise UserError(f"{out_dir} has no report.json: expected a finished train_sft.py or train_dpo.py run")
    with open(paths['report.json']) as f:
        report = json.load(f)
    if os.path.isfile(paths['margins.pt']):                               # a DPO run
        dpo_plots(out_dir, torch.load(paths['margins.pt']), report['routing'])
        print(f"wrote {out_dir}/margins.png, routing.png")
        return
    if not (os.path.isfile(paths['readouts.pt']) and os.path.isfile(paths['ckpt.pt'])):
        raise UserError(f"{out_dir} has no readouts.pt or ckpt.pt: train it again with today's train_sft.py")
    readouts = torch.load(paths['readouts.pt'])
    history = torch.load(paths['ckpt.pt'], map_location='cpu', weights_only=False)['history']
    sft_plots(out_dir, history, report, readouts['by_kind'], readouts['scores'])
    print(f"wrote {out_dir}/loss.png, uncertainty.png, reliability.png" + (", routing.png" if report.get('routing') else ''))


if __name__ == '__main__':
    run_script(main)
