"""
alpha* of a trained LoRA adapter on its own data: the stability criterion of stability.py
(METHOD.md §3) in the adapter's own parameters, per slice of the rows (all, each kind, each
group), and the alpha it recommends.

    python -m experiments.alpha_star --sft_dir=out/sft_single           # a train_sft.py run with --n_members=1
    python -m experiments.alpha_star --sft_dir=out/sft_single --data=mine.jsonl

The adapter has tens of thousands of parameters, so J is never formed: the estimate works in
the k leading principal directions of the per-example gradients and needs k Hessian-vector
products (`estimate_critical_alpha`). The prior precision Lambda is the run's own,
1 / (N sigma_p^2) with N the run's training rows, whichever rows --data names.
"""
import math
import os
import time

import torch
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
from config import UserError, parse_args, run_script
from lora import lora_parameters
from renyi_lora import sequence_logprobs
from stability import critical_alpha, generalized_eigen
from trainer import load_ensemble, read_checkpoint

defaults = dict(
    sft_dir='out/sft_single',   # a train_sft.py output directory holding ONE adapter (--n_members=1)
    data='',                # the rows to estimate on: '' the run's own training rows, or a JSONL file of SFT rows
    n_directions=10,        # k: leading principal directions of the per-example gradients searched, per slice
    batch_size=64,          # examples per forward pass
    n_loadings=6,           # examples printed that load most on the leading direction, each way
    device='cpu',
)


# -----------------------------------------------------------------------------
# alpha* of a LoRA adapter: per-example gradients, Hessian-vector products, a k-dimensional pencil

def per_example_gradients(model, batches):
    """g_i = d log p(x_i | theta) / d theta for one adapter, every example: G (N, P), rows in batch order.

    log p(x_i) is sequence_logprobs' summed response log-likelihood; theta is lora_parameters(model)
    flattened in order. torch.func: functional_call of the model on one example, vmap(grad) over each
    batch. Right-padding does not change an example's log-likelihood (causal attention).
    """
    names = [name for name, _ in model.named_parameters() if name.endswith(('lora_A', 'lora_B'))]
    values = {name: tensor.detach() for name, tensor in model.named_parameters() if name in names}

    def log_likelihood(values, idx, labels):           # idx, labels: (T,) -> scalar
        return sequence_logprobs(functional_call(model, values, (idx[None],)), labels[None]).sum()

    per_batch = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    with sdpa_kernel(SDPBackend.MATH):                  # vmap has no batching rule for the flash kernel
        rows = [torch.cat([g.flatten(1) for g in per_batch(values, idx, labels).values()], 1)  # (B, P)
                for idx, labels in batches]
    return torch.cat(rows)


def information_products(model, batches, directions):
    """J_data u = -(1/N) sum_i H_i u for every column u of directions (P, k) -> (P, k), no prior.

    Per batch: one forward and first backward with create_graph, then one second backward per
    direction (double backward). CPU flash attention has no double backward, hence the math kernel.
    """
    params = lora_parameters(model)
    n_examples = sum(len(idx) for idx, _ in batches)
    products = torch.zeros_like(directions)
    with sdpa_kernel(SDPBackend.MATH):
        for idx, labels in batches:
            nll = -sequence_logprobs(model(idx), labels).sum() / n_examples
            flat = torch.cat([g.flatten() for g in torch.autograd.grad(nll, params, create_graph=True)])  # (P,)
            for j in range(directions.shape[1]):
                hessian_rows = torch.autograd.grad(flat, params, directions[:, j].to(flat.dtype), retain_graph=True)
                products[:, j] += torch.cat([h.flatten() for h in hessian_rows]).to(products.dtype)
    return products


def principal_directions(gradients, n_directions):
    """The leading eigenvectors U (P, k) of C = G^T G / N and their eigenvalues (k,), from G (N, P).

    Through the N x N Gram matrix G G^T / N: its eigenvector v with eigenvalue lambda gives C's
    eigenvector G^T v / sqrt(N lambda). Only directions with lambda > 0 are kept, so k <= rank C.
    """
    n_examples = len(gradients)
    eigenvalues, eigenvectors = torch.linalg.eigh(gradients @ gradients.T / n_examples)  # (N,), (N, N) ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0)[:n_directions], eigenvectors.flip(1)[:, :n_directions]
    keep = eigenvalues > eigenvalues[0] * 1e-10
    eigenvalues, eigenvectors = eigenvalues[keep], eigenvectors[:, keep]
    directions = gradients.T @ eigenvectors / (n_examples * eigenvalues).sqrt()  # (P, k)
    return directions, eigenvalues


def estimate_critical_alpha(model, batches, prior_precision=0.0, n_directions=10):
    """alpha* = 1 / mu_max of a GPT carrying one adapter on the examples of `batches`, at the adapter's
    current values, with the spread restricted to the k leading principal directions of the per-example
    gradients (METHOD.md §3):

        U (P, k): top eigenvectors of C,   U^T C U y = mu U^T J U y,   J = J_data + Lambda I

    U^T C U is diagonal (C's eigenvalues); U^T J U costs k Hessian-vector products. mu_max of the
    k-dimensional pencil is a lower bound on lambda_max(J^-1 C) (Courant-Fischer), so alpha* is an
    upper bound, exact once U holds the leading eigenvector of J^-1 C. batches: (idx, labels) pairs
    as data.sft_batch makes them; the model in eval mode (dropout would make J random). Returns a dict:
      alpha_star          1 / mu_max (inf when C = 0)
      eigenvalues         mu of the pencil, largest first (k,)
      alpha_star_by_k     {k': alpha*} on the first k' directions, k' = k/4, k/2, k: how the bound moves
      alpha_star_centred  the same with C - gbar gbar^T, gbar = mean_i g_i: without the examples' mean pull,
                          which dominates C away from a stationary point (the race of METHOD.md §3)
      direction           the leading direction u = U y (P,), u^T J u = 1
      loadings            g_i . u (N,): the first-order change of each example's log-likelihood along u
      variance_captured   share of tr C in the k directions
      information_range   (smallest, largest) eigenvalue of U^T J U
      stationarity        |mean_i g_i - Lambda theta| / sqrt(tr C): 0 at a stationary point
    ValueError when U^T J U is not positive definite (theta* is no maximum along U).
    """
    batches = list(batches)
    gradients = per_example_gradients(model, batches).double()          # (N, P)
    directions, moment_diagonal = principal_directions(gradients, n_directions)  # (P, k), (k,)
    products = information_products(model, batches, directions) + prior_precision * directions  # J U: (P, k)
    information = (directions.T @ products + products.T @ directions) / 2  # U^T J U, symmetrised: (k, k)
    moment = torch.diag(moment_diagonal)                                # U^T C U: (k, k)
    eigenvalues, pencil_vectors = generalized_eigen(moment, information)
    n_kept = len(moment_diagonal)
    by_k = {k: critical_alpha(information[:k, :k], moment[:k, :k]) for k in sorted({max(1, n_kept // 4),
                                                                                    max(1, n_kept // 2), n_kept})}
    leading = directions @ pencil_vectors[:, 0]                         # (P,)
    mean_gradient = gradients.mean(0)                                   # gbar: (P,)
    mean_pull = directions.T @ mean_gradient                            # U^T gbar: (k,)
    theta = torch.cat([p.detach().flatten() for p in lora_parameters(model)]).double()
    total_moment = gradients.pow(2).sum() / len(gradients)              # tr C
    spectrum = torch.linalg.eigvalsh(information)
    return dict(alpha_star=1.0 / eigenvalues[0].item() if eigenvalues[0] > 0 else math.inf,
                eigenvalues=eigenvalues, alpha_star_by_k=by_k,
                alpha_star_centred=critical_alpha(information, moment - torch.outer(mean_pull, mean_pull)),
                direction=leading, loadings=gradients @ leading,
                variance_captured=(moment_diagonal.sum() / total_moment).item(),
                information_range=(spectrum[0].item(), spectrum[-1].item()),
                stationarity=((mean_gradient - prior_precision * theta).norm() / total_moment.sqrt()).item())


# -----------------------------------------------------------------------------
# the command: alpha* per slice of a run's rows, and the alpha it recommends

def load_single_adapter(sft_dir, device):
    """(model in eval mode, tokenizer, run config) of a train_sft.py run with one adapter; UserError otherwise.

    An ensemble has no collapsed point to expand around: its members differ, and the mean of their A
    and B is not the mean of their functions (the update B A is bilinear), so it is refused.
    """
    ckpt_path = os.path.join(sft_dir, 'ckpt.pt')
    if not os.path.isfile(ckpt_path):
        raise UserError(f"--sft_dir={sft_dir}: no ckpt.pt there: expected the output directory of train_sft.py")
    ckpt = read_checkpoint(ckpt_path)
    if 'sft_dir' in ckpt['config']:
        raise UserError(f"--sft_dir={sft_dir} is a train_dpo.py run: alpha* here is that of the SFT log-likelihood")
    n_members = ckpt['lora_config']['n_members']
    if n_members != 1:
        raise UserError(f"--sft_dir={sft_dir} holds {n_members} adapters: alpha* is measured where the members "
                        "coincide, on one adapter; train one with `python train_sft.py --n_members=1 "
                        "--out_dir=out/sft_single` and pass that")
    model, tokenizer_name, run_config = load_ensemble(ckpt_path, 'cpu')
    return model.eval().to(device), data.get_tokenizer(tokenizer_name), run_config


def estimation_rows(config, run_config):
    """--data's SFT rows, their kinds read from the data (data.mark_conflicts), or the run's training rows."""
    if config['data']:
        return data.mark_conflicts(data.load_sft_jsonl(config['data']))
    return data.sft_rows_of(run_config)[0]


def row_slices(rows):
    """{name: row indices}: all rows, then each kind and each group ('all' aside) when rows differ in it."""
    slices = {'all rows': list(range(len(rows)))}
    for key in ('kind', 'group'):
        for value in sorted({row.get(key) for row in rows} - {None, 'all'}):
            indices = [i for i, row in enumerate(rows) if row.get(key) == value]
            if len(indices) < len(rows):
                slices[f"{key} {value}"] = indices
    return slices


def sorted_batches(encoded, indices, batch_size, pad_id, device):
    """The examples `indices` ordered by length (less padding) -> (that order, [(idx, labels)])."""
    order = sorted(indices, key=lambda i: len(encoded[i][0]))
    batches = [tuple(t.to(device) for t in data.sft_batch(encoded, order[k:k + batch_size], pad_id))
               for k in range(0, len(order), batch_size)]
    return order, batches


def slice_row(name, n_rows, result):
    """One markdown row of the table."""
    if 'error' in result:
        return f"| {name} | {n_rows} | – | {result['error']} | | | | | |"
    eigenvalues = ' '.join(f"{mu:.3f}" for mu in result['eigenvalues'][:4].tolist())
    by_k = ', '.join(f"{alpha:.3f}" for alpha in result['alpha_star_by_k'].values())
    smallest, largest = result['information_range']
    return (f"| {name} | {n_rows} | {result['alpha_star']:.3f} | {eigenvalues} | {by_k} | "
            f"{result['variance_captured']:.2f} | {smallest:.3g} .. {largest:.3g} | {result['stationarity']:.3f} | "
            f"{result['alpha_star_centred']:.3f} |")


def print_loadings(result, rows, n_loadings):
    """The examples whose log-likelihood moves most along the leading direction, each way."""
    loadings = result['loadings']
    ranked = loadings.argsort(descending=True).tolist()
    print("examples loading most on the leading direction u of all rows (g_i . u; + : favoured by theta* + eps u):")
    for position in ranked[:n_loadings] + ranked[-n_loadings:]:
        row = rows[result['order'][position]]
        where = '/'.join(str(row.get(key)) for key in ('kind', 'group', 'task') if row.get(key))
        print(f"  {loadings[position].item():+8.2f}  {where:<32} {row['prompt']!r} -> {row['response']!r}")


def recommendation(results):
    """The alpha to train with: twice alpha* of all rows (METHOD.md §3), with the kinds' thresholds around it."""
    alpha_star = results['all rows'].get('alpha_star', math.nan)
    lines = [f"recommended alpha: 2 alpha*(all rows) = {2 * alpha_star:.2f}, held at 0 and ramped as train_sft.py "
             "does: there the leading spread grows as fast as a spread that does not pay (mu = 0) decays"]
    conflicting, consistent = (results.get(f"kind {kind}", {}).get('alpha_star') for kind in ('conflicting', 'consistent'))
    if conflicting is not None and consistent is not None:
        lines.append(f"alpha above {conflicting:.2f} (conflicting rows) and below {consistent:.2f} (consistent rows) "
                     "splits the one and keeps the other collapsed, each slice taken alone")
    return '\n'.join(lines)


def main(argv=None):
    config = parse_args(defaults, argv)
    if config['n_directions'] < 1 or config['batch_size'] < 1:
        raise UserError("--n_directions and --batch_size must be >= 1")
    start = time.time()
    model, tokenizer, run_config = load_single_adapter(config['sft_dir'], config['device'])
    rows = estimation_rows(config, run_config)
    encoded = data.encode_sft(rows, tokenizer, model.config.block_size)
    n_train = len(data.sft_rows_of(run_config)[0])     # the prior the adapter was trained with: the run's N
    prior_precision = 1 / (n_train * run_config['sigma_p'] ** 2)                 # Lambda, METHOD.md §2
    n_params = sum(p.numel() for p in lora_parameters(model))
    print(f"alpha* of the adapter in {config['sft_dir']} ({n_params} parameters) on {len(rows)} rows, "
          f"k = {config['n_directions']} directions per slice, Lambda = {prior_precision:.3g}")
    print("| rows | N | alpha* | top mu of J^-1 C | alpha* on k/4, k/2, k directions | tr C captured | "
          "eigenvalues of U^T J U | stationarity | alpha*, C centred |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for name, indices in row_slices(rows).items():
        order, batches = sorted_batches(encoded, indices, config['batch_size'], tokenizer.eot_token, config['device'])
        try:
            results[name] = estimate_critical_alpha(model, batches, prior_precision, config['n_directions'])
        except ValueError as error:  # U^T J U not positive definite
            results[name] = dict(error=str(error).split(':')[0])
        results[name]['order'] = order
        print(slice_row(name, len(indices), results[name]), flush=True)
    if 'loadings' in results['all rows']:
        print_loadings(results['all rows'], rows, config['n_loadings'])
    print(recommendation(results))
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    run_script(main)
