"""Frechet distance from streaming float64 moments (the one place FID statistics are computed).

Moments accumulate sum(x), sum(x x^T) and the count in float64, are summed across ranks with one
all-reduce, and give (mu, sigma) with the unbiased covariance. The distance follows
torch-fidelity 0.4: ||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 sum(sqrt(eigvals(s1 @ s2))).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import dist


class Moments:
    def __init__(self, dim: int):
        self.dim = dim
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, feats: torch.Tensor) -> None:
        f = feats.to(torch.float64).reshape(-1, self.dim)
        self.count += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def all_reduce(self) -> "Moments":
        flat = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64), self.sum, self.outer.flatten()])
        dist.all_reduce_sum(flat)
        self.count = int(round(flat[0].item()))
        self.sum = flat[1:1 + self.dim].clone()
        self.outer = flat[1 + self.dim:].reshape(self.dim, self.dim).clone()
        return self

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.count
        if n < 2:
            raise ValueError(f"need at least 2 samples for a covariance, got {n}")
        mu = self.sum / n
        cov = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu, cov


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = (np.asarray(m, dtype=np.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    diff = mu1 - mu2
    eig = np.linalg.eigvals(sigma1 @ sigma2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)
