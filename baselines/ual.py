"""
UAL, uncertainty-aware learning (Wang et al., 2024): supervised fine-tuning in which each training
example's label smoothing grows with its uncertainty (METHOD.md §5), a baseline beside the ensemble.

    python -m baselines.ual --ual_source=data                 # u_i: each row's "uncertainty" field
    python -m baselines.ual --ual_source=ensemble --ual_teacher=out/sft/ckpt.pt   # u_i: a trained ensemble's

It is train_sft.py with one change: each example's smoothed NLL takes the place of -log p_m(x) in
the loss (train_sft.train's objective hook). Any train_sft.py key applies; n_members is 1 here, the
single model of the UAL paper. The report is train_sft.py's, in out_dir.
"""
import json

import torch

import data
import train_sft
from config import UserError, parse_args, run_script
from evaluate import epistemic_per_token, score_rows
from renyi_lora import label_smoothed_nll, renyi_loss, responsibilities, ual_smoothing
from trainer import load_ensemble, read_checkpoint

defaults = train_sft.defaults | dict(
    n_members=1,
    out_dir='out/sft_ual',
    ual_source='data',      # 'data': u_i is each row's `uncertainty`; 'ensemble': ual_teacher's epistemic uncertainty
    ual_teacher='out/sft/ckpt.pt',  # a trained ensemble (train_sft.py's checkpoint), for ual_source=ensemble
    ual_eps_min=0.0,        # eps_i = ual_eps_min + (ual_eps_max - ual_eps_min) * u_i
    ual_eps_max=0.3,
)


def rescaled_epistemic(model, tokenizer, rows, batch_size):
    """The ensemble's epistemic uncertainty per token of every row (evaluate.epistemic_per_token), min-max
    rescaled to [0, 1], (N,): u_i when an ensemble plays the UAL paper's "more capable model"."""
    score = epistemic_per_token(score_rows(model, tokenizer, rows, batch_size))
    return (score - score.min()) / (score.max() - score.min()).clamp_min(1e-12)


def label_smoothing(config):
    """eps_i of every training row, (N,), in the order train_sft.train reads them; every mistake a UserError."""
    if config['ual_source'] not in ('data', 'ensemble'):
        raise UserError(f"ual_source must be 'data' or 'ensemble', got {config['ual_source']!r}")
    train_rows = train_sft.read_inputs(config)[0]          # every train_sft.py input checked first
    if config['ual_source'] == 'data':
        missing = [row for row in train_rows if row.get('uncertainty') is None]
        if missing:
            raise UserError(f"--ual_source=data: {len(missing)} training rows have no 'uncertainty' "
                            f"(first: {missing[0].get('source', 'a benchmark row')})")
        uncertainty = torch.tensor([float(row['uncertainty']) for row in train_rows])
    else:
        read_checkpoint(config['ual_teacher'])
        teacher, tokenizer_name, _ = load_ensemble(config['ual_teacher'], config['device'], base=config['base'])
        uncertainty = rescaled_epistemic(teacher.to(config['device']), data.get_tokenizer(tokenizer_name), train_rows,
                                         config['batch_size'])
    return ual_smoothing(uncertainty, config['ual_eps_min'], config['ual_eps_max'])


def smoothed_objective(smoothing):
    """train_sft.train's objective with UAL's smoothed likelihood: log p_m(x) = -label_smoothed_nll(x, eps_x)."""
    def objective(logits, labels, indices, alpha):
        logp = -label_smoothed_nll(logits, labels, smoothing[indices].to(logits.device))       # (M, B)
        return renyi_loss(logp, alpha), responsibilities(logp.detach(), alpha)
    return objective


def train(config, **hooks):
    """train_sft.train with UAL's label smoothing; returns what it returns. hooks: its lr_schedule, on_step."""
    return train_sft.train(config, objective=smoothed_objective(label_smoothing(config)), **hooks)


def main(argv):
    config = parse_args(defaults, argv)
    _, _, report, _ = train(config)
    if report is not None:
        print(json.dumps({k: v for k, v in report.items() if not isinstance(v, (dict, list))}, indent=2))


if __name__ == '__main__':
    run_script(main)
