"""uint8 images -> backbone features -> per-input statistics, on every rank.

`InceptionFeatures` runs the csrc pre-processing op and the network on a batch (from a sampler in
memory, or decoded by DataLoader workers); other backbones (`backbones.py`) have the same call
(`backbone_base.Backbone`).
`FeatureStats` keeps what the metrics need: float64 moments for the Frechet distance (all-reduced
once), and, only when IS/KID/PR are asked for, the rows themselves with their global indices
(gathered to rank 0 in input order); its sizes are the backbone's. `extract` drives one input source.
"""
from __future__ import annotations

import math
import time

import torch
from torch.utils.data import DataLoader

from .. import dist, stop
from ..console import progress
from ..errors import NeonError
from .backbone_base import Backbone, as_rgb
from .fid import Moments
from .inception import FEATURE_DIM, LOGITS_DIM, load_inception, no_tf32
from .inputs import RankShare, collate
from .preprocess import preprocess


class InceptionFeatures:
    """uint8 [N, C, H, W] (or NHWC; C = 1 or 3) -> (pool [N, 2048], logits_unbiased [N, 1008]) float32
    on the CPU. Grey images are repeated to RGB."""

    dim = FEATURE_DIM
    logits_dim = LOGITS_DIM

    def __init__(self, weights: str, device: torch.device | None = None, batch_size: int = 64):
        self.device = device or dist.device()
        self.batch_size = batch_size
        self.model = load_inception(weights, self.device).to(memory_format=torch.channels_last)
        self.seconds = {"preprocess": 0.0, "network": 0.0}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, layout: str = "nchw") -> tuple[torch.Tensor, torch.Tensor]:
        pools, logits = [], []
        with no_tf32():
            for chunk in images.split(self.batch_size):
                t0 = time.perf_counter()
                x = preprocess(as_rgb(chunk.to(self.device, non_blocking=True), layout), layout=layout,
                               channels_last_out=True)
                self._sync()
                t1 = time.perf_counter()
                pool, logit = self.model(x)
                pools.append(pool.cpu())
                logits.append(logit.cpu())
                t2 = time.perf_counter()
                self.seconds["preprocess"] += t1 - t0
                self.seconds["network"] += t2 - t1
        return torch.cat(pools), torch.cat(logits)


class FeatureStats:
    """One input's statistics on this rank; `finish()` combines ranks. `dim` and `logits_dim` are the
    backbone's (default: Inception's); `keep_logits` needs a backbone with logits."""

    def __init__(self, keep_pool: bool = False, keep_logits: bool = False, dim: int = FEATURE_DIM,
                 logits_dim: int | None = LOGITS_DIM):
        if keep_logits and logits_dim is None:
            raise ValueError("FeatureStats: keep_logits needs a backbone with logits (logits_dim is None)")
        self.dim, self.logits_dim = dim, logits_dim
        self.moments = Moments(dim)
        self.keep_pool, self.keep_logits = keep_pool, keep_logits
        self.index: list[torch.Tensor] = []
        self.pool: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.n = 0
        self.bad = 0

    @classmethod
    def for_backbone(cls, backbone: Backbone, keep_pool: bool = False, keep_logits: bool = False) -> "FeatureStats":
        return cls(keep_pool, keep_logits, dim=backbone.dim, logits_dim=backbone.logits_dim)

    def add(self, index: torch.Tensor, pool: torch.Tensor, logits: torch.Tensor | None) -> None:
        self.moments.add(pool)
        self.n += pool.shape[0]
        if self.keep_pool or self.keep_logits:
            self.index.append(index.reshape(-1).to(torch.int64))
        if self.keep_pool:
            self.pool.append(pool)
        if self.keep_logits:
            self.logits.append(logits)

    def add_images(self, features: Backbone, images: torch.Tensor, index: torch.Tensor,
                   layout: str = "nchw") -> None:
        """In-memory uint8 images (e.g. straight from a sampler) with their global indices."""
        self.add(index, *features(images, layout))

    def finish(self, source: str | None = None) -> dict:
        """All ranks: mu/sigma (float64) and n; rank 0 also `pool`/`logits` in global index order.
        `source` (the input's path) names the input when it has fewer than 2 images."""
        self.moments.all_reduce()
        counts = torch.tensor([float(self.n), float(self.bad)], dtype=torch.float64)
        dist.all_reduce_sum(counts)
        out = {"n": int(counts[0].item()), "bad": int(counts[1].item())}
        # the global counts: every rank raises the same line; skipped images explain a short input
        skipped = f" ({out['bad']} unreadable image(s) skipped by --skip-bad)" if out["bad"] else ""
        mu, sigma = self.moments.mean_cov(source, skipped)
        out.update(mu=mu.numpy(), sigma=sigma.numpy())
        index = torch.cat(self.index) if self.index else torch.zeros(0, dtype=torch.int64)
        for name, keep, dim in (("pool", self.keep_pool, self.dim), ("logits", self.keep_logits, self.logits_dim)):
            if keep:
                rows = torch.cat(getattr(self, name)) if getattr(self, name) else torch.zeros(0, dim)
                gathered = dist.gather_rows(index, rows)
                if gathered is not None:
                    out[name] = gathered[1]
        return out


def extract(source, features: Backbone, stats: FeatureStats, workers: int = 2, skip_bad: bool = False,
            label: str = "features") -> dict:
    """Run this rank's share of `source` (i % world == rank) through `features` into `stats`.
    Returns timings in seconds: decode (waiting for decoded batches), preprocess, network, total."""
    share = RankShare(source, range(dist.rank(), len(source), dist.world()))
    loader = DataLoader(share, batch_size=features.batch_size, num_workers=workers, collate_fn=collate,
                        worker_init_fn=_one_thread if workers else None, persistent_workers=False)
    before = dict(features.seconds)
    decode = 0.0
    start = time.perf_counter()
    # every rank reaches as many stop points as rank 0 (the largest share) has batches
    stop_points = math.ceil(len(range(0, len(source), dist.world())) / features.batch_size)
    with progress(label, len(share)) as bar:
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                groups, bad = next(it)
            except StopIteration:
                break
            decode += time.perf_counter() - t0
            for i, err in bad:
                if not skip_bad:
                    raise NeonError(f"{source.name(i)}: unreadable image ({err}); --skip-bad skips and counts such images")
                stats.bad += 1
            done = len(bad)
            for index, images in groups:
                stats.add_images(features, images, index, layout="nhwc")
                done += len(index)
            rate = stats.n / max(time.perf_counter() - start, 1e-9) * dist.world()
            bar.update(advance=done, info=f"{rate:.1f} img/s")
            stop.check(label, "nothing kept: feature extraction starts again")
            stop_points -= 1
        for _ in range(stop_points):
            stop.check(label, "nothing kept: feature extraction starts again")
    total = time.perf_counter() - start
    return {"decode": decode, "total": total,
            **{k: features.seconds[k] - before[k] for k in features.seconds}}


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)
