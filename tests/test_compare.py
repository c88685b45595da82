"""baselines/compare.py end to end on a tiny base (n_layer=2, n_embd=32) and a few steps per method, checked
against what each row must be: the closed-form metrics of a single adapter, the NLL of the saved MAP
adapter recomputed on its own, and UAL's label smoothing from the data and from the saved ensemble."""
import json
import math

import pytest
import torch

import data
from baselines import compare, ual
from config import UserError
from evaluate import score_rows
from lora import load_adapters
from trainer import load_base

LABELS = ["MAP LoRA (M=1)", "SWAG (S=4, from MAP)", "deep ensemble (M=2, α=0)", "MultiSWAG (2×2, from deep ens.)",
          "α-Rényi (M=2, α=0.5)", "α-Rényi (M=2, α=1)",
          "α-Rényi (M=2, α=2)", "UAL, data u (M=1)", "UAL, ensemble u (M=1)"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_base):
    """One tiny comparison on the benchmark, shared by the tests: (config, rows, compare_dir)."""
    root = tmp_path_factory.mktemp("compare")
    config = compare.defaults | dict(
        base=tiny_base, compare_dir=str(root / "out"), n_members=2, lora_rank=2, max_iters=8, alpha_hold_iters=2,
        alpha_ramp_iters=4,
        batch_size=8, learning_rate=1e-2, warmup_iters=2, log_interval=8, eval_interval=8, swag_fraction=0.5,
        swag_every=1, swag_rank=3, swag_samples=4, max_new_tokens=3, device="cpu", seed=0)
    rows = compare.compare(config)
    return config, rows, root / "out"


def test_every_method_gets_a_row_a_table_line_and_plots(run):
    config, rows, out = run
    assert [label for label, _ in rows] == LABELS
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 2 + len(LABELS) and all(column in table[0] for column in compare.COLUMNS)
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(dict(rows)))
    for name in ("reliability", "uncertainty"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reports = dict(rows)
    for label, report in rows:
        for column in compare.COLUMNS:
            value = report[column]
            assert value is None or math.isfinite(value), (label, column)
        assert 0.0 <= report["accuracy_conflicting"] <= 1.0 and report["nll_high_entropy"] > 0
    assert reports[LABELS[1]]["n_members"] == 4 and reports[LABELS[3]]["n_members"] == 4
    # SWAG rows share their source run, so they report its training time
    assert reports[LABELS[1]]["train_seconds"] == reports[LABELS[0]]["train_seconds"]
    assert reports[LABELS[3]]["train_seconds"] == reports[LABELS[2]]["train_seconds"]


def test_single_adapter_rows_have_no_epistemic_uncertainty(run):
    """One member: mutual information is exactly 0 for every prompt, so every AUROC is a tie (0.5), and the
    one member tells nothing about the group (specialisation 0)."""
    _, rows, _ = run
    for label, report in rows:
        if "(M=1)" in label:
            assert report["auroc_conflict"] == 0.5 and report["auroc_ood"] == 0.5, label
            assert report["argmax_specialisation"] == 0.0, label
            assert report["nll"] == pytest.approx(report["nll_token_mixture"], rel=1e-5), label  # nothing to mix
            assert report["accuracy_conflicting"] == report["accuracy_conflicting_token_mixture"], label


def training_rows(config):
    return data.sft_rows_of(config)[0]


def held_out_rows(config):
    return data.sft_rows_of(config)[2]


def test_high_entropy_nll_matches_the_saved_map_adapter_scored_alone(run):
    config, rows, out = run
    map_config = compare.method_config(config, "map", {})
    model, tokenizer_name = load_base(map_config['base'], map_config['device'])
    load_adapters(model, str(out / "map" / "ckpt.pt"))
    model.eval()
    high_entropy = [row for row in held_out_rows(config) if row["kind"] == "high_entropy"]
    scores = score_rows(model, data.get_tokenizer(tokenizer_name), high_entropy, map_config['batch_size'])
    expected = -scores["logp"].sum().item() / scores["n_tokens"].sum().item()   # per-token NLL, M = 1
    assert dict(rows)[LABELS[0]]["nll_high_entropy"] == pytest.approx(expected, rel=1e-4)


def test_sequence_nll_of_the_saved_ensemble_by_a_python_loop(run):
    """nll = -sum_i log((1/M) sum_m p_m(y_i | x_i)) / (response tokens), from the saved deep ensemble: the
    report's token by token sequence mixture, summed, is the mixture of the members' whole-response likelihoods."""
    config, rows, out = run
    ensemble_config = compare.method_config(config, "deep_ensemble", dict(alpha=0.0))
    model, tokenizer_name = load_base(ensemble_config['base'], ensemble_config['device'])
    load_adapters(model, str(out / "deep_ensemble" / "ckpt.pt"))
    model.eval()
    scores = score_rows(model, data.get_tokenizer(tokenizer_name), held_out_rows(config), ensemble_config['batch_size'])
    total = math.fsum(math.log(math.fsum(math.exp(v) for v in column) / len(column))
                      for column in scores["logp"].double().t().tolist())
    expected = -total / scores["n_tokens"].sum().item()
    assert dict(rows)[LABELS[2]]["nll"] == pytest.approx(expected, rel=1e-4)


def test_ual_smoothing_from_the_data_and_from_the_alpha_one_ensemble(run):
    config, _, out = run
    train_rows = training_rows(config)
    eps_min, eps_max = config["ual_eps_min"], config["ual_eps_max"]
    from_data = ual.label_smoothing(config | dict(ual_source="data"))
    expected = torch.tensor([eps_min + (eps_max - eps_min) * row["uncertainty"] for row in train_rows])
    torch.testing.assert_close(from_data, expected)
    assert from_data.unique().numel() > 2                       # consistent, conflicting and high-entropy differ
    teacher = str(out / "renyi_1" / "ckpt.pt")
    from_ensemble = ual.label_smoothing(config | dict(ual_source="ensemble", ual_teacher=teacher))
    assert from_ensemble.shape == (len(train_rows),)
    assert from_ensemble.min().item() == pytest.approx(eps_min) and from_ensemble.max().item() == pytest.approx(eps_max)
    with pytest.raises(ValueError, match="ual_source must be"):     # before any output exists
        ual.train(config | dict(ual_source="llm", out_dir=str(out / "never")))
    assert not (out / "never").exists()


def test_methods_key_selects_in_order_and_refuses_unknown_names():
    config = compare.defaults | dict(methods='renyi_1,map')
    assert [name for name, _, _ in compare.selected_methods(config)] == ['map', 'renyi_1']
    assert len(compare.selected_methods(compare.defaults)) == 7
    with pytest.raises(UserError, match="--methods: unknown swag"):
        compare.selected_methods(compare.defaults | dict(methods='map,swag'))
