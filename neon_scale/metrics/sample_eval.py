"""Metric of a model under a sampler, from samples it draws: the eval stage's core.

The n samples are split into fixed chunks; chunk i is always drawn with the random stream
(seed, i) and is handled by rank i mod world, so every w sees the same noise and the result does
not depend on the number of ranks. Features accumulate as float64 moments, all-reduced once.
Image models hand their uint8 samples straight to the Inception extractor (no PNG round trip);
other models (the toys) use their own features and reference statistics.
"""
from __future__ import annotations

import math

import torch

from .. import dist, rng
from ..models.registry import ModelSpec
from .fid import Moments, frechet_distance


class SampleMetric:
    """Features of samples and the reference they are compared with; built once per sweep."""

    def __init__(self, spec: ModelSpec, eval_cfg=None, model_args=None):
        self.spec, self.model_args = spec, model_args
        if spec.makes_images:
            from .features import InceptionFeatures
            from .fid import read_stats

            self.inception = InceptionFeatures(eval_cfg.inception_weights, batch_size=eval_cfg.batch_size)
            self.mu_ref, self.sigma_ref = read_stats(eval_cfg.ref_stats)
        else:
            self.inception = None
            self.mu_ref, self.sigma_ref = (t.numpy() for t in spec.reference_stats())

    def features(self, samples: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.inception is None:
            return self.spec.features(samples)
        pool, _logits = self.inception(self.spec.images(samples, self.model_args))
        return pool


@torch.no_grad()
def evaluate(metric: SampleMetric, model: torch.nn.Module, sampler, n: int, seed: int, chunk: int) -> float:
    moments = Moments(metric.mu_ref.shape[0])
    n_chunks = math.ceil(n / chunk)
    for i in range(dist.rank(), n_chunks, dist.world()):
        count = min(chunk, n - i * chunk)
        samples = metric.spec.sample(model, count, rng.generator(seed, "eval", i), sampler, start=i * chunk)
        moments.add(metric.features(samples))
    mu, sigma = moments.all_reduce().mean_cov()
    return frechet_distance(mu, sigma, metric.mu_ref, metric.sigma_ref)
