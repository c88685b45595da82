"""
SWAG over LoRA adapters (METHOD.md §4): a Gaussian posterior fitted to the iterates of ordinary training.

Train as usual; from swag_start on, hold the learning rate constant so the
iterates keep wandering around the optimum, and every collect_every steps
record the flattened LoRA vector theta of each member: its running mean mu,
running mean of squares s, and the last K deviations from the running mean.
The Gaussian N(mu, scale * (diag(var) + D^T D / (K - 1))) is the posterior
guess; S draws from it are S LoRA adapters, so they run as an S-member
ensemble through lora.MultiLoRALinear in one batched forward pass.
MultiSWAG fits one such Gaussian per member of an independently trained
(deep) ensemble and pools their draws. compare.py runs both.
"""
import math

import torch

from lora import lora_parameters
from trainer import learning_rate


class SWAG:
    """Running moments of a list of tensors (one member's LoRA parameters) and draws from their Gaussian.

        mean   mu = (1/n) sum_k theta_k            sq_mean s = (1/n) sum_k theta_k^2
        variance  = clamp(s - mu^2, 1e-30)         (P,)
        deviations D (K, P): theta_k - mu_k for the last K collections, mu_k the mean just after theta_k

    params are read, never written: pass views into the live parameters and call
    collect() whenever their current values should enter the moments.
    Moments are kept in float64 on the CPU: s - mu^2 cancels badly in float32.
    """

    def __init__(self, params, max_rank=20):
        self.params = list(params)
        size = sum(p.numel() for p in self.params)
        self.max_rank = max_rank
        self.n_collected = 0
        self.mean = torch.zeros(size, dtype=torch.float64)
        self.sq_mean = torch.zeros(size, dtype=torch.float64)
        self.deviations = []                                   # at most max_rank tensors of shape (P,)

    def collect(self):
        theta = torch.cat([p.detach().reshape(-1) for p in self.params]).double().cpu()    # (P,)
        n = self.n_collected
        self.mean = (n * self.mean + theta) / (n + 1)
        self.sq_mean = (n * self.sq_mean + theta ** 2) / (n + 1)
        self.n_collected = n + 1
        self.deviations = (self.deviations + [theta - self.mean])[-self.max_rank:]

    @property
    def variance(self):
        return (self.sq_mean - self.mean ** 2).clamp_min(1e-30)

    def sample(self, scale=0.5, generator=None):
        """One draw theta~ (P,), float64:

            theta~ = mu + sqrt(scale) * ( sqrt(var) * z1 + D^T z2 / sqrt(K - 1) ),   z1 ~ N(0, I_P), z2 ~ N(0, I_K)

        K counts the deviations held so far, fewer than max_rank early on; below
        K = 2 there is no low-rank part yet and only the diagonal is used.
        scale = 0 returns the mean: SWA. scale = 0.5 is the SWAG paper's choice.
        """
        if self.n_collected == 0:
            raise RuntimeError("SWAG.sample() before any collect()")
        noise = self.variance.sqrt() * torch.randn(self.mean.shape, dtype=torch.float64, generator=generator)
        n_deviations = len(self.deviations)
        if n_deviations >= 2:
            z2 = torch.randn(n_deviations, dtype=torch.float64, generator=generator)     # (K,)
            noise += torch.stack(self.deviations).T @ z2 / math.sqrt(n_deviations - 1)   # (P, K) @ (K,)
        return self.mean + math.sqrt(scale) * noise


def member_views(model, member):
    """Member m's LoRA tensors, in lora_parameters order, as views sharing the live parameters' storage."""
    return [p.detach()[member] for p in lora_parameters(model)]


class SWAGCollector:
    """An on_step hook for train_sft.train: one SWAG per member, collected every `every` steps after `start`.

    MultiSWAG is simply this on an ensemble run; on a single adapter (M = 1) it is plain SWAG.
    """

    def __init__(self, start, every, max_rank):
        self.start, self.every, self.max_rank = start, every, max_rank
        self.swags = []

    def __call__(self, done, model):
        if done <= self.start or (done - self.start) % self.every:
            return
        if not self.swags:   # the adapters exist only once training has begun
            self.swags = [SWAG(member_views(model, m), self.max_rank) for m in range(model.n_members)]
        for swag in self.swags:
            swag.collect()


def swag_learning_rate(it, config):
    """trainer.learning_rate's warm-up and cosine decay, reaching swag_lr at swag_start; constant swag_lr after.

    The constant rate is what SWAG needs: the iterates keep sampling the
    neighbourhood of the optimum instead of settling into one point of it.
    """
    if it >= config['swag_start']:
        return config['swag_lr']
    return learning_rate(it, config | dict(max_iters=config['swag_start'], min_lr=config['swag_lr']))


@torch.no_grad()
def load_members(model, vectors):
    """Write flat LoRA vectors (S, P) into the S members of model's adapters, member s <- vectors[s]."""
    if len(vectors) != model.n_members:
        raise ValueError(f"{len(vectors)} vectors for a model with {model.n_members} members")
    for member, vector in enumerate(vectors):
        views = member_views(model, member)
        for view, chunk in zip(views, vector.split([v.numel() for v in views])):
            view.copy_(chunk.view_as(view))


def sample_members(model, swags, scale, generator=None):
    """Fill model's members with SWAG draws, equally many from each SWAG (MultiSWAG pools them).

    model carries S = len(swags) * draws adapters; member j * draws + s is draw s of swags[j].
    """
    draws, rest = divmod(model.n_members, len(swags))
    if rest:
        raise ValueError(f"{model.n_members} members do not split evenly over {len(swags)} SWAGs")
    load_members(model, torch.stack([swag.sample(scale, generator) for swag in swags for _ in range(draws)]))
