"""Metric of a model under a sampler, from samples it draws: the eval stage's core.

The n samples are split into fixed chunks; chunk i is always drawn with the random stream
(seed, i) and is handled by rank i mod world, so every w sees the same noise and the result does
not depend on the number of ranks. Features accumulate as float64 moments, all-reduced once.
"""
from __future__ import annotations

import math

import torch

from .. import dist, rng
from ..models.registry import ModelSpec
from .fid import Moments, frechet_distance


@torch.no_grad()
def evaluate(spec: ModelSpec, model: torch.nn.Module, sampler, n: int, seed: int, chunk: int) -> float:
    mu_ref, sigma_ref = spec.reference_stats()
    moments = Moments(mu_ref.numel())
    n_chunks = math.ceil(n / chunk)
    for i in range(dist.rank(), n_chunks, dist.world()):
        count = min(chunk, n - i * chunk)
        samples = spec.sample(model, count, rng.generator(seed, "eval", i), sampler)
        moments.add(spec.features(samples))
    mu, sigma = moments.all_reduce().mean_cov()
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)
