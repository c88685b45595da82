"""
Two replays that also hold each member to its own SFT self, measured against the DPO default's and not adopted
(experiments/RESULTS.md §3, "A KL to each member's SFT self"). The default, train_dpo.replay_loss, replays the
SFT run's α-Rényi loss of the responses of batch_size of its training rows. The variants swap it for

    kl     the KL from each member's frozen SFT self pi_SFT,m at every token of those rows, prompt and response:
               KL_m(x) = sum_t sum_v pi_SFT,m(v | x_<=t) * [log pi_SFT,m(v | x_<=t) - log pi_m(v | x_<=t)]
           averaged over members and rows (zero, with a zero gradient, before DPO moves a member)
    both   the default's SFT loss plus that KL

and run train_dpo.py, experiments.dpo_robustness or experiments.new_prompts with the rest of the command line:

    python -m experiments.replay_kl --replay=both --run=train_dpo --seed=1 --sft_dir=out/seeds/default_seed1 --out_dir=out/seeds/dpo_both_seed1
    python -m experiments.replay_kl --replay=kl --run=dpo_robustness --seeds=1337 --prefix=dpo_kl
"""
import torch

import data
import train_dpo
from config import UserError, parse_args, run_script, to_device
from experiments import dpo_robustness, new_prompts
from renyi_lora import renyi_loss, sequence_logprobs
from trainer import set_precision

RUNS = dict(train_dpo=train_dpo.main, dpo_robustness=dpo_robustness.main, new_prompts=new_prompts.main)
STUDY = dict(
    replay='both',          # kl: the KL alone, in place of the SFT loss; both: the SFT loss plus the KL
    run='train_dpo',        # what to run with the rest of the command line: train_dpo, dpo_robustness or new_prompts
)


def token_kl(logits, ref_logits, mask):
    """KL_m(x) above per member and row, (M, B) in float32: logits, ref_logits (M, B, T, V), member m's reference in
    ref_logits[m]; mask (B, T), True at real tokens; position t counts when token t + 1 is real."""
    log_q = logits[..., :-1, :].float().log_softmax(-1)                # (M, B, T-1, V)
    log_p = ref_logits[..., :-1, :].float().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)                        # (M, B, T-1)
    return torch.where(mask[..., 1:], kl, 0.0).sum(-1)


_frozen = {}    # sft_dir -> the frozen SFT ensemble, loaded once per run


def frozen_sft(config):
    """The SFT run of config['sft_dir'], frozen, in the run's precision and on its device."""
    if config['sft_dir'] not in _frozen:
        _frozen.clear()                                                 # a study moves from one SFT run to the next
        model = train_dpo.load_sft(config)[0]
        _frozen[config['sft_dir']] = set_precision(model, config).to(config['device']).requires_grad_(False).eval()
    return _frozen[config['sft_dir']]


def replay_with_kl(with_sft_loss):
    """A replay_loss with train_dpo.replay_loss's arguments: the KL, plus the SFT loss when with_sft_loss."""
    def replay_loss(forward, sft_set, pad_id, sft_config, config, it):
        indices = train_dpo.replay_indices(len(sft_set), config['batch_size'], config['seed'], it)
        idx, labels = to_device(data.sft_batch(sft_set, indices, pad_id), config['device'])
        real = (idx != pad_id) | (labels != -100)      # the prompt, and the response with its closing <|endoftext|>
        with torch.no_grad():
            sft_logits = frozen_sft(config)(idx)        # (M, B, T, V)
        logits = forward(idx)
        kl = token_kl(logits, sft_logits, real).mean()
        return kl + renyi_loss(sequence_logprobs(logits, labels), sft_config['alpha']) if with_sft_loss else kl
    return replay_loss


def main(argv):
    if '--help' in argv or '-h' in argv:
        parse_args(STUDY, ['--help'])
    own = [arg for arg in argv if arg.split('=')[0][2:] in STUDY]
    study = parse_args(STUDY, own)
    if study['replay'] not in ('kl', 'both') or study['run'] not in RUNS:
        raise UserError(f"--replay must be kl or both, --run one of {', '.join(RUNS)}; got --replay={study['replay']} "
                        f"--run={study['run']}")
    train_dpo.replay_loss = replay_with_kl(study['replay'] == 'both')
    RUNS[study['run']]([arg for arg in argv if arg not in own])


if __name__ == '__main__':
    run_script(main)
