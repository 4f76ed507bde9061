"""Standard errors of a Frechet distance from the samples that gave it: the delete-a-block jackknife.

The n feature rows of a point (in sample order) are cut into B = min(BLOCKS, n) contiguous blocks;
replicate k is the distance with block k left out, and

    se = sqrt((B - 1) / B * sum_k (r_k - mean(r))^2).

Two points evaluated with the same noise (the sweep's common random numbers: sample j always comes
from the same random stream) have replicates over the same blocks, so the standard error of their
DIFFERENCE is the jackknife of r_a,k - r_b,k: the noise they share cancels, which is what lets a
race drop a clearly worse point after a few hundred samples.

Why blocks of samples and not the sampling chunks: a point has as many chunks as n / eval.chunk
(4 on the toys), too few for a jackknife; samples are independent draws, so any contiguous split
of them is a valid one. Why a second route to the distance (`FrechetToReference`): B + 1
distances per point against one fixed reference. With R = sqrt(sigma_ref), tr sqrt(sigma sigma_ref)
= sum sqrt(eigvalsh(R sigma R)), a symmetric eigenproblem (several times faster than the general
one of metrics.fid at d = 2048); the point's own value stays metrics.fid's (torch-fidelity's).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .fid import Moments

BLOCKS = 20  # jackknife blocks: the SE of the SE is about 1 / sqrt(2 (B - 1)) = 16%
INFINITY_SIZES = 8  # prefix sizes of the FD-infinity fit (Chong & Forsyth use 15)
INFINITY_SMALLEST = 0.1  # the smallest prefix, as a fraction of n (theirs: 5k of 50k)
# and at least 4 rows per feature dimension: below, the 1/m law fails and the fit overshoots (on
# Gaussian features, d = 16 and 64, n = 4 d, 30 seeds, prefixes from n / 10: errors -0.63 and -1.97
# for true distances 1.05 and 3.93). From 4 d, n = 8 d to 64 d: 86-97% of FD's bias removed, the
# noise 1.2-1.7x FD's (tests/test_uncertainty.py)
INFINITY_ROWS_PER_DIM = 4


class FrechetToReference:
    """The Frechet distance of (mu, sigma) to one fixed reference, for many (mu, sigma)."""

    def __init__(self, mu_ref, sigma_ref, device: torch.device | str = "cpu"):
        # on a GPU, float64 eigvalsh at d = 2048 takes milliseconds (CPU: ~2-4 s per distance)
        self.device = torch.device(device)
        self.mu_ref = torch.as_tensor(np.asarray(mu_ref, np.float64)).to(self.device)
        sigma_ref = torch.as_tensor(np.asarray(sigma_ref, np.float64)).to(self.device)
        evals, evecs = torch.linalg.eigh((sigma_ref + sigma_ref.T) / 2)
        self.root = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T  # the PSD square root
        self.trace_ref = float(torch.trace(sigma_ref))

    def __call__(self, mu: torch.Tensor, sigma: torch.Tensor) -> float:
        mu, sigma = mu.to(self.device, torch.float64), sigma.to(self.device, torch.float64)
        diff = mu - self.mu_ref
        inner = self.root @ sigma @ self.root
        ev = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0)  # rounding can make tiny ones negative
        return float(diff @ diff + torch.trace(sigma) + self.trace_ref - 2 * ev.sqrt().sum())


def block_bounds(n: int, blocks: int = BLOCKS) -> list[int]:
    """Boundaries of min(blocks, n) contiguous blocks of n samples: block k is [b[k], b[k + 1])."""
    b = min(blocks, n)
    return [k * n // b for k in range(b + 1)]


def jackknife_replicates(features: torch.Tensor, total_sum: torch.Tensor, total_outer: torch.Tensor,
                         distance: FrechetToReference) -> list[float] | None:
    """The distance with each block of `features` [n, d] left out, given the float64 sum and outer
    product of all n rows (the point's own moments); None when a leave-one-out set would hold
    fewer than 2 samples (no covariance). One block's outer product at a time: memory O(d^2)."""
    n = features.shape[0]
    bounds = block_bounds(n)
    if n - max(hi - lo for lo, hi in zip(bounds, bounds[1:])) < 2:
        return None
    reps = []
    for lo, hi in zip(bounds, bounds[1:]):
        block = features[lo:hi].double()
        m = n - (hi - lo)
        mu = (total_sum - block.sum(0)) / m
        cov = (total_outer - block.T @ block - m * torch.outer(mu, mu)) / (m - 1)
        reps.append(distance(mu, cov))
    return reps


def jackknife_se(replicates: list[float] | None) -> float | None:
    if not replicates or len(replicates) < 2:
        return None
    b = len(replicates)
    mean = sum(replicates) / b
    return math.sqrt((b - 1) / b * sum((r - mean) ** 2 for r in replicates))


def paired_se(replicates_a: list[float] | None, replicates_b: list[float] | None) -> float | None:
    """Standard error of metric_a - metric_b for two points evaluated with the same noise and the
    same n (their replicates leave out the same blocks); None when it cannot be known."""
    if not replicates_a or not replicates_b or len(replicates_a) != len(replicates_b):
        return None
    return jackknife_se([a - b for a, b in zip(replicates_a, replicates_b)])


def infinity_sizes(n: int, dim: int, sizes: int = INFINITY_SIZES, smallest: float = INFINITY_SMALLEST) -> list[int]:
    """The prefix sizes of the FD-infinity fit: `sizes` distinct values evenly spaced from
    max(smallest * n, INFINITY_ROWS_PER_DIM * dim) to n; none when that range is under a factor 2."""
    lo = max(2, math.ceil(smallest * n), INFINITY_ROWS_PER_DIM * dim)
    if n < 2 * lo:
        return []
    return sorted({round(lo + k * (n - lo) / (sizes - 1)) for k in range(sizes)})


def extrapolated_distance(features: torch.Tensor, distance: FrechetToReference,
                          sizes: int = INFINITY_SIZES, smallest: float = INFINITY_SMALLEST) -> float | None:
    """FD-infinity of `features` [n, d] (rows in sample order): the intercept a of the least-squares
    line FD(m) = a + b / m through the distances of the first m rows at infinity_sizes(n, d); None
    when n is too small for the fit (under 8 rows per dimension). One pass over the rows:
    the moments of each prefix extend the previous one's."""
    d = features.shape[1]
    ms = infinity_sizes(features.shape[0], d, sizes, smallest)
    if len(ms) < 3:
        return None
    moments, start, fds = Moments(d), 0, []
    for m in ms:
        moments.add(features[start:m])
        fds.append(distance(*moments.mean_cov()))
        start = m
    _slope, intercept = np.polyfit(np.array([1.0 / m for m in ms]), np.array(fds), 1)
    return float(intercept)
