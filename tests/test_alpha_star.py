"""Tests for experiments/alpha_star.py: the matrix-free estimate of alpha* on a LoRA adapter against dense
autograd matrices, the command's table, its prior and its refusals."""
import numpy as np
import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
import train_sft
from config import run_script
from experiments import alpha_star
from lora import add_lora, lora_parameters
from model import GPT, GPTConfig
from renyi_lora import sequence_logprobs
from stability import DTYPE, critical_alpha
from trainer import load_base, save_checkpoint


# -----------------------------------------------------------------------------
# alpha* of a LoRA adapter (alpha_star.estimate_critical_alpha) against dense autograd matrices

ALL_TARGETS = ('c_attn', 'c_proj', 'c_fc')


def tiny_adapter(targets, seed=0, n_examples=40, length=12, n_prompt=7):
    """A random 1-layer GPT (width 8, vocabulary 32) in float64 with one rank-1 adapter whose B is not
    zero, and random examples (the last length - n_prompt tokens trained on) in two batches."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=8))
    add_lora(model, 1, 1, 2.0, targets=targets)
    model.double()
    with torch.no_grad():
        for param in lora_parameters(model):
            param.normal_(0, 0.3)
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 32, (n_examples, length), generator=generator)
    labels = idx.masked_fill(torch.arange(length) < n_prompt, -100)
    return model, [(idx[:16], labels[:16]), (idx[16:], labels[16:])]


def dense_matrices(model, batches):
    """J_data = -(1/N) sum_i H_i (P, P) by torch.autograd.functional.hessian and G (N, P) by its jacobian, of
    the flat adapter vector: a route independent of alpha_star.py's torch.func and double backward."""
    params = lora_parameters(model)
    names = [name for name, _ in model.named_parameters() if name.endswith(('lora_A', 'lora_B'))]
    idx, labels = (torch.cat(parts) for parts in zip(*batches))

    def log_likelihoods(flat):                                       # (P,) -> (N,)
        chunks = flat.split([param.numel() for param in params])
        values = {name: chunk.view_as(param) for name, chunk, param in zip(names, chunks, params)}
        return sequence_logprobs(functional_call(model, values, (idx,)), labels)[0]

    theta = torch.cat([param.detach().flatten() for param in params])
    with sdpa_kernel(SDPBackend.MATH):
        information = torch.autograd.functional.hessian(lambda flat: -log_likelihoods(flat).mean(), theta,
                                                             vectorize=True)
        gradients = torch.autograd.functional.jacobian(log_likelihoods, theta, vectorize=True)
    return information, gradients


@pytest.fixture(scope="module")
def adapted():
    """The tiny adapter on every target (P = 128, N = 40) and its dense J_data and G, made once."""
    model, batches = tiny_adapter(ALL_TARGETS)
    return model, batches, *dense_matrices(model, batches)


def positive_prior(information):
    """A prior precision that makes J = J_data + Lambda I positive definite at this random point."""
    return 0.05 + max(0.0, -torch.linalg.eigvalsh(information).min().item())


def test_gradients_and_hessian_products_match_dense_autograd(adapted):
    # sequence_logprobs takes its log-softmax in float32 on either route, hence 1e-6, not float64's 1e-12
    model, batches, information, gradients = adapted
    assert torch.allclose(alpha_star.per_example_gradients(model, batches), gradients, rtol=0,
                          atol=1e-6 * gradients.abs().max())
    directions = torch.randn(len(information), 3, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    expected = information @ directions                               # (P, 3)
    products = alpha_star.information_products(model, batches, directions)
    assert torch.allclose(products, expected, rtol=0, atol=1e-6 * expected.abs().max())


@pytest.mark.parametrize("n_directions", [2, 8])
def test_estimate_matches_the_dense_pencil_on_the_same_directions(adapted, n_directions):
    # the k x k pencil on C's top-k eigenvectors, formed from dense J and C: the same numbers to 1e-6
    model, batches, information, gradients = adapted
    prior = positive_prior(information)
    moment = gradients.T @ gradients / len(gradients)                 # (P, P)
    top = torch.linalg.eigh(moment)[1][:, -n_directions:]             # (P, k)
    projected_information = top.T @ (information + prior * torch.eye(len(moment), dtype=DTYPE)) @ top
    projected_moment = top.T @ moment @ top
    expected = np.sort(np.linalg.eigvals(np.linalg.solve(projected_information, projected_moment)).real)[::-1]
    mean_pull = top.T @ gradients.mean(0)
    centred = critical_alpha(projected_information, projected_moment - torch.outer(mean_pull, mean_pull))
    result = alpha_star.estimate_critical_alpha(model, batches, prior, n_directions)
    assert result['alpha_star'] == pytest.approx(1 / expected[0], rel=1e-6)
    assert result['eigenvalues'].numpy() == pytest.approx(expected.copy(), rel=1e-6, abs=1e-12)
    assert result['alpha_star_centred'] == pytest.approx(centred, rel=1e-6)
    direction = result['direction']                                   # C u = mu J u within the k directions
    full_information = information + prior * torch.eye(len(moment), dtype=DTYPE)
    assert (direction @ full_information @ direction).item() == pytest.approx(1.0, rel=1e-6)
    assert (direction @ moment @ direction).item() == pytest.approx(expected[0], rel=1e-6)
    assert torch.allclose(result['loadings'], gradients @ direction)


def test_estimate_bounds_the_exact_alpha_star_from_above():
    # Rayleigh-Ritz on nested subspaces: alpha* falls as k grows and stays above the exact
    # 1 / lambda_max(J^-1 C) of the full space. With c_attn alone P = 32 < N = 40, and k = 30 = rank C
    # holds every direction C has; the exact eigenvector still leaves that span (J couples it to C's
    # null space, the LoRA gauge A -> c A, B -> B / c among it): the gap measured here is 0.8 %.
    model, batches = tiny_adapter(('c_attn',))
    information, gradients = dense_matrices(model, batches)
    prior = positive_prior(information)
    moment = gradients.T @ gradients / len(gradients)
    exact = critical_alpha(information + prior * torch.eye(len(moment), dtype=DTYPE), moment)
    bounds = [alpha_star.estimate_critical_alpha(model, batches, prior, k)['alpha_star'] for k in (4, 15, 30)]
    assert torch.linalg.matrix_rank(moment).item() == 30
    assert bounds[0] >= bounds[1] >= bounds[2] >= exact
    assert bounds[2] <= 1.02 * exact


# -----------------------------------------------------------------------------
# the command: python -m experiments.alpha_star --sft_dir=...

def conflicting_rows():
    """SFT rows: 6 prompts that two annotator groups answer differently, 6 that have one answer."""
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]
    rows = []
    for a in range(6):
        prompt = f"Q: Add {a} and {a + 1}.\nA:"
        rows += [dict(prompt=prompt, response=f" {words[2 * a + 1]}, odd!", group="casual"),
                 dict(prompt=prompt, response=f" Sum: {2 * a + 1}.", group="formal")]
        rows.append(dict(prompt=f"Q: What is {a} plus {a}?\nA:", response=f" {2 * a}"))
    return rows


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory):
    """Checkpoints as train_sft.py writes them, on the tiny base, with random small adapters: 'single' (one
    adapter), 'ensemble' (two), 'other_base' (one, its config naming a base it was not trained on); the rows."""
    root = tmp_path_factory.mktemp("alpha_star_runs")
    rows_path = str(root / "rows.jsonl")
    data.write_jsonl(conflicting_rows(), rows_path)
    other_base = torch.load(tiny_base, weights_only=True)
    other_base['model']['lm_head.weight'] = other_base['model']['lm_head.weight'] + 0.01
    torch.save(other_base, root / "other_base.pt")
    paths = dict(rows=rows_path)
    for name, n_members, base in [("single", 1, tiny_base), ("ensemble", 2, tiny_base),
                                  ("other_base", 1, str(root / "other_base.pt"))]:
        torch.manual_seed(0)
        model, _ = load_base(tiny_base)
        params = add_lora(model, n_members, 2, 4.0)
        with torch.no_grad():
            for param in params:
                param.add_(0.01 * torch.randn_like(param))
        config = dict(train_sft.defaults, base=base, data=rows_path, n_members=n_members, lora_rank=2,
                      lora_alpha=4.0, max_iters=1, out_dir=str(root / name))
        save_checkpoint(str(root / name / "ckpt.pt"), model, torch.optim.AdamW(params), 1, config, {})
        paths[name] = str(root / name)
    return paths


def test_command_prints_alpha_star_per_slice_and_a_recommendation(runs, capsys):
    alpha_star.main([f"--sft_dir={runs['single']}", f"--data={runs['rows']}", "--n_directions=3"])
    out = capsys.readouterr().out
    for row in ("| all rows | 18 |", "| kind conflicting | 12 |", "| kind consistent | 6 |", "| group casual | 6 |",
                "| group formal | 6 |"):
        assert row in out
    assert "recommended alpha" in out and "examples loading most" in out


@pytest.mark.parametrize("run, extra, message", [
    ("ensemble", [], "holds 2 adapters"),
    ("other_base", [], "another base model"),
    ("single", ["--data=EMPTY"], "empty file"),
], ids=["ensemble", "other-base", "empty-data"])
def test_command_refuses_bad_input_in_one_line(runs, tmp_path, capsys, run, extra, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    argv = [f"--sft_dir={runs[run]}"] + [arg.replace("EMPTY", str(empty)) for arg in extra]
    with pytest.raises(SystemExit) as exit_info:
        run_script(alpha_star.main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def test_prior_precision_is_the_runs_own_whichever_rows_data_names(runs, tmp_path, capsys):
    """Lambda = 1 / (N sigma_p^2) with N the rows the adapter was trained on, not the rows of --data."""
    few = tmp_path / "few.jsonl"
    data.write_jsonl(conflicting_rows()[:6], str(few))
    alpha_star.main([f"--sft_dir={runs['single']}", f"--data={few}", "--n_directions=2"])
    n_train = len(data.load_sft_rows(runs['rows'], seed=train_sft.defaults['seed'])[0])     # the run's split
    header = capsys.readouterr().out.splitlines()[0]
    assert "on 6 rows" in header and header.endswith(f"Lambda = {1 / n_train:.3g}") and n_train != 6


def test_failed_slice_row_has_the_headers_columns():
    header = "| rows | N | alpha* | top mu of J^-1 C | alpha* on k/4, k/2, k directions | tr C captured | " \
             "eigenvalues of U^T J U | stationarity | alpha*, C centred |"
    assert alpha_star.slice_row("kind x", 3, dict(error="J is not positive definite")).count("|") == header.count("|")
