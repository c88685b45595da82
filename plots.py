"""
The report's figures, as PNG files. matplotlib with the Agg backend: no display needed.
"""
import os

import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the backend)
import torch  # noqa: E402


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



def variance_boxes(ax, runs, ylabel):
    """A box per run and kind of pair (contested beside consensus) of per-pair variances, on a log scale.

    runs: [(label, {'contested': [variance per pair], 'consensus': [...]})]. A variance of 0 (members that agree
    exactly) cannot sit on a log scale; it is drawn at 1e-12.
    """
    for offset, kind, colour in ((-0.18, 'contested', 'C3'), (0.18, 'consensus', 'C0')):
        values = [np.maximum(variances[kind], 1e-12) for _, variances in runs]
        positions = np.arange(len(runs)) + offset
        boxes = ax.boxplot(values, positions=positions, widths=0.3, whis=(5, 95), showfliers=False, patch_artist=True)
        plt.setp(boxes['boxes'], facecolor=colour, alpha=0.4)
        for position, run_values in zip(positions, values):
            ax.plot(np.full(len(run_values), position), run_values, '.', color=colour, ms=2, alpha=0.5)
        means = [np.mean(v) if len(v) else np.nan for v in values]                # a run without such pairs: no mean
        ax.plot(positions, means, 'D', color=colour, ms=5, label=f'{kind} (diamond: mean)')
    ax.set_yscale('log')
    ax.set_xticks(range(len(runs)), [label for label, _ in runs], fontsize=8)
    ax.set_ylabel(ylabel)


def disagreement_plot(path, panels):
    """Write to path one variance_boxes panel per (ylabel, runs) of panels, stacked: the members' disagreement per
    held-out pair. Boxes: quartiles; whiskers: 5th to 95th percentile; dots: the pairs."""
    n_runs = len(panels[0][1])
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 1.1 * n_runs), 3.4 * len(panels)), squeeze=False)
    for ax, (ylabel, runs) in zip(axes[:, 0], panels):
        variance_boxes(ax, runs, ylabel)
    axes[0, 0].set_title("members' disagreement per held-out pair (box: quartiles, whiskers: 5-95%)", fontsize=10)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def routing_entropy_curves(path, panels):
    """Write one figure to path: a panel per routing, in it the mean routing entropy of each run against the iter.

    panels: {title: [(label, iters, entropies in nats, n_members)]}. A dotted line marks log M, the entropy of
    routing that trains every member alike; 0 means every example trains one member alone.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False, sharey=True)
    for ax, (title, runs) in zip(axes[0], panels.items()):
        for label, iters, entropies, _ in runs:
            ax.plot(iters, entropies, 'o-', ms=3, label=label)
        for n_members in sorted({run[3] for run in runs}):
            ax.axhline(np.log(n_members), color='k', ls=':', lw=0.8)
            ax.text(ax.get_xlim()[0], np.log(n_members), f' log {n_members}', va='bottom', fontsize=8)
        ax.set_xlabel('iter (end of the eval window)')
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel('mean entropy of w(x) (nats)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
