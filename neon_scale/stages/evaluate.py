"""Metric of a model under a sampler, from samples it draws, with its standard error: the sweep's core.

The n samples are split into fixed chunks; chunk i is always drawn with the random stream
(seed, i) (common random numbers: every w sees the same noise), by any rank: the missing chunks
are dealt out round-robin, a stop point per round. Each chunk's features go to rank 0, which keeps
them on disk (FeatureStore) until the sweep no longer needs them, so a point at 2n reuses its n
samples and a killed evaluation resumes from the chunks it has. Rank 0 sums the chunks' float64
moments in chunk order, so the metric does not depend on the number of ranks (bit for bit), and
adds the jackknife replicates of metrics.uncertainty (the standard error of the point and of its
difference to any other point evaluated with the same noise) and its FD-infinity (the 1/n bias
extrapolated away).
Image models hand their uint8 samples straight to the feature backbone (no PNG round trip);
other models (the toys) use their own features and reference statistics.
"""
from __future__ import annotations

import hashlib
import math
import pathlib
import shutil
from dataclasses import dataclass

import torch

from .. import dist, rng, stop
from ..io import load_state_dict, save_state_dict
from ..metrics.fid import Moments, frechet_distance
from ..metrics.uncertainty import FrechetToReference, extrapolated_distance, jackknife_replicates, jackknife_se
from ..specs.base import ModelSpec


@dataclass(frozen=True)
class Estimate:
    """A point's metric at n samples, its jackknife replicates (None: too few samples) and its
    FD-infinity (None: n under 8 rows per feature dimension)."""
    metric: float
    n: int
    replicates: tuple[float, ...] | None = None
    infinity: float | None = None

    @property
    def se(self) -> float | None:
        return jackknife_se(self.replicates)


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
        self.dim = self.mu_ref.shape[0]
        self.dtype = torch.float32 if backbone is not None else torch.float64  # what features() returns
        self.to_reference = FrechetToReference(self.mu_ref, self.sigma_ref, dist.device())

    def features(self, samples: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.backbone is None:
            return self.spec.features(samples)
        feats, _logits = self.backbone(self.spec.images(samples, self.model_args))
        return feats


class FeatureStore:
    """Features of evaluated chunks, rank 0's: <root>/<point>/chunk-<i>-<count>.safetensors, written
    atomically. `point` names what the features depend on besides the eval settings (the sweep
    directory's fingerprint covers those). root None: kept in memory."""

    def __init__(self, root: pathlib.Path | None):
        self.root, self.memory = root, {}

    @staticmethod
    def _dir_name(point: str) -> str:
        return hashlib.sha256(point.encode()).hexdigest()[:16]

    def _path(self, point: str, i: int, count: int) -> pathlib.Path:
        return self.root / self._dir_name(point) / f"chunk-{i:06d}-{count}.safetensors"

    def has(self, point: str, i: int, count: int) -> bool:
        return (point, i, count) in self.memory if self.root is None else self._path(point, i, count).is_file()

    def save(self, point: str, i: int, count: int, feats: torch.Tensor) -> None:
        if self.root is None:
            self.memory[(point, i, count)] = feats
        else:
            self._path(point, i, count).parent.mkdir(parents=True, exist_ok=True)
            save_state_dict(self._path(point, i, count), {"features": feats}, {"point": point})

    def load(self, point: str, i: int, count: int) -> torch.Tensor:
        if self.root is None:
            return self.memory[(point, i, count)]
        return load_state_dict(self._path(point, i, count))["features"]

    def drop(self, point: str) -> None:
        """Forget a point's features (its results row keeps its metric and replicates)."""
        if self.root is None:
            self.memory = {k: v for k, v in self.memory.items() if k[0] != point}
        else:
            shutil.rmtree(self.root / self._dir_name(point), ignore_errors=True)


def chunk_counts(n: int, chunk: int) -> list[int]:
    """The sizes of the chunks of n samples (chunk i always gets the same noise: a larger n reuses them)."""
    return [min(chunk, n - i * chunk) for i in range(math.ceil(n / chunk))]


@torch.no_grad()
def evaluate(metric: SampleMetric, model: torch.nn.Module, sampler, n: int, seed: int, chunk: int,
             store: FeatureStore | None = None, point: str = "") -> Estimate:
    """Collective: every rank returns the same Estimate. `store`: where the chunks' features are
    kept under the name `point` (None: in memory, for this call only)."""
    store = FeatureStore(None) if store is None else store
    counts = chunk_counts(n, chunk)
    # ------------------------------------------------------------------ Sample the missing chunks
    missing = dist.broadcast_object([i for i, c in enumerate(counts) if not store.has(point, i, c)]
                                    if dist.is_main() else None)
    world, rank = dist.world(), dist.rank()
    rounds = math.ceil(len(missing) / world)
    for r in range(rounds):
        j = r * world + rank  # the j-th missing chunk is rank j mod world's, in round j // world
        index, feats = torch.zeros(0, dtype=torch.int64), torch.zeros(0, metric.dim, dtype=metric.dtype)
        if j < len(missing):
            i = missing[j]
            samples = metric.spec.sample(model, counts[i], rng.generator(seed, "eval", i), sampler, start=i * chunk)
            feats = metric.features(samples).to(metric.dtype).cpu()
            index = torch.arange(i * chunk, i * chunk + counts[i])
        gathered = dist.gather_rows(index, feats)
        if gathered is not None:
            all_index, rows = gathered
            for i in missing[r * world:(r + 1) * world]:
                lo = i * chunk
                store.save(point, i, counts[i], rows[(all_index >= lo) & (all_index < lo + counts[i])].contiguous())
        stop.check(f"an evaluation ({n} samples, chunk round {r + 1}/{rounds})", "evaluated chunks kept")
    # ------------------------------------------------------------------ Metric and its jackknife (rank 0)
    estimate = None
    if dist.is_main():
        estimate = _estimate(metric, [store.load(point, i, c) for i, c in enumerate(counts)], n)
    return dist.broadcast_object(estimate)


def _estimate(metric: SampleMetric, chunks: list[torch.Tensor], n: int) -> Estimate:
    moments = Moments(metric.dim)
    for feats in chunks:  # in chunk order: the same float64 sums for any number of ranks
        moments.add(feats)
    mu, sigma = moments.mean_cov()
    value = frechet_distance(mu, sigma, metric.mu_ref, metric.sigma_ref)
    rows = torch.cat(chunks)
    reps = jackknife_replicates(rows, moments.sum, moments.outer, metric.to_reference)
    return Estimate(value, n, None if reps is None else tuple(reps), extrapolated_distance(rows, metric.to_reference))
