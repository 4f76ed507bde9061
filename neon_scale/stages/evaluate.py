"""Metric of a model under a sampler, from samples it draws: the eval stage's core.

The n samples are split into fixed chunks; chunk i is always drawn with the random stream
(seed, i) and is handled by rank i mod world, so every w sees the same noise and the result does
not depend on the number of ranks. Ranks work in rounds of one chunk each, a stop point per round.
Features accumulate as float64 moments, all-reduced once.
Image models hand their uint8 samples straight to the feature backbone (no PNG round trip);
other models (the toys) use their own features and reference statistics.
"""
from __future__ import annotations

import math

import torch

from .. import dist, rng, stop
from ..metrics.fid import Moments, frechet_distance
from ..specs.base import ModelSpec


class SampleMetric:
    """Features of samples and the reference they are compared with; built once per sweep.
    Image models: `backbone` (metrics.backbones) on spec.images(samples) against (mu_ref,
    sigma_ref); other models: their own features and reference statistics."""

    def __init__(self, spec: ModelSpec, backbone=None, ref: tuple | None = None, model_args=None):
        self.spec, self.model_args, self.backbone = spec, model_args, backbone
        if spec.makes_images:
            self.mu_ref, self.sigma_ref = ref
        else:
            self.mu_ref, self.sigma_ref = (t.numpy() for t in spec.reference_stats())

    def features(self, samples: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.backbone is None:
            return self.spec.features(samples)
        feats, _logits = self.backbone(self.spec.images(samples, self.model_args))
        return feats


@torch.no_grad()
def evaluate(metric: SampleMetric, model: torch.nn.Module, sampler, n: int, seed: int, chunk: int) -> float:
    moments = Moments(metric.mu_ref.shape[0])
    n_chunks = math.ceil(n / chunk)
    rounds = math.ceil(n_chunks / dist.world())
    mine = range(dist.rank(), n_chunks, dist.world())  # chunk i is rank i mod world's, in round i // world
    for i in stop.turns(mine, rounds, lambda r: f"an evaluation ({n} samples, chunk round {r + 1}/{rounds})",
                        "evaluated points kept"):
        count = min(chunk, n - i * chunk)
        samples = metric.spec.sample(model, count, rng.generator(seed, "eval", i), sampler, start=i * chunk)
        moments.add(metric.features(samples))
    mu, sigma = moments.all_reduce().mean_cov()
    return frechet_distance(mu, sigma, metric.mu_ref, metric.sigma_ref)
