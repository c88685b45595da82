"""Tests for experiments/stability_observed.py: the symmetric split of a member pair."""
import torch

from experiments.stability_observed import clone_member
from lora import lora_parameters
from test_model import tiny_ensemble


def test_clone_member_copies_the_source_and_splits_the_pair_symmetrically():
    model = tiny_ensemble(n_members=3)
    before = [p.detach().clone() for p in lora_parameters(model)]
    clone_member(model, source=0, target=2, spread=0.01, generator=torch.Generator().manual_seed(0))
    for old, new in zip(before, lora_parameters(model)):
        torch.testing.assert_close((new[0] + new[2]) / 2, old[0])                  # the pair's mean is the source
        gap = (new[2] - new[0]) / 2                                                # delta = spread * std * z
        assert abs(gap.std() / old[0].std() / 0.01 - 1) < 0.3                    # 128+ draws of z per tensor
        torch.testing.assert_close(new[1], old[1], rtol=0, atol=0)                 # other members untouched
