"""FID statistics: streaming float64 moments, the Frechet distance, ADM-style `.npz` stats files.

Moments accumulate sum(x), sum(x x^T) and the count in float64, are summed across ranks with one
all-reduce, and give (mu, sigma) with the unbiased covariance. The distance is torch-fidelity
0.4's: ||mu1 - mu2||^2 + tr(s1) + tr(s2) - 2 sum(Re sqrt(eigvals(s1 @ s2))).
Stats files hold `mu` [d] and `sigma` [d, d], as the ADM reference batches do, so numbers are
comparable with published ones. `read_stats` rejects a `sigma` that is no covariance (see
`check_covariance`): the formula above then gives meaningless numbers (sigma = -I: FID -1427).
"""
from __future__ import annotations

import pathlib

import numpy as np
import torch

from .. import dist, io
from ..errors import NeonError


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
        self.outer.addmm_(f.T, f)

    def all_reduce(self) -> "Moments":
        flat = torch.cat([torch.tensor([float(self.count)], dtype=torch.float64), self.sum, self.outer.flatten()])
        dist.all_reduce_sum(flat)
        self.count = int(round(flat[0].item()))
        self.sum = flat[1:1 + self.dim].clone()
        self.outer = flat[1 + self.dim:].reshape(self.dim, self.dim).clone()
        return self

    def mean_cov(self, source: str | None = None, note: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, unbiased covariance); fewer than 2 samples is one line naming `source`, plus `note`."""
        n = self.count
        if n < 2:
            where = f"{source}: " if source else ""
            raise NeonError(f"{where}need at least 2 samples for a covariance, got {n}{note}")
        mu = self.sum / n
        cov = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu, cov


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    mu1, mu2 = (np.asarray(m, dtype=np.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    diff = mu1 - mu2
    product = sigma1 @ sigma2
    if not np.isfinite(product).all():  # overflow (absurd scales): eigvals would raise; callers reject NaN
        return float("nan")
    eig = np.linalg.eigvals(product).astype(np.complex128)
    tr_sqrt = np.sqrt(eig).real.sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_sqrt)


def read_stats(path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise NeonError(f"{path}: statistics file not found")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if not {"mu", "sigma"} <= keys:
                raise NeonError(f"{path}: statistics file needs keys 'mu' and 'sigma', found {sorted(keys)}")
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
    except NeonError:
        raise
    except Exception as e:  # noqa: BLE001 (zip/npy/pickle errors are all "not a stats file")
        raise NeonError(f"{path}: not a readable .npz statistics file ({type(e).__name__}: {e})")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise NeonError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} are not [d] and [d, d]")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise NeonError(f"{path}: 'mu'/'sigma' contain non-finite values")
    check_covariance(sigma, path)
    return mu, sigma


# Relative tolerances for a stored covariance. Our own sigmas (n < d, rank-deficient) measure
# asymmetry 0 and smallest/largest eigenvalue -7e-16 as float64, -3e-9 once stored as float32:
# 1e-6 accepts those with a wide margin and still rejects anything that is not a covariance.
SYMMETRY_RTOL = 1e-6
PSD_RTOL = 1e-6


def check_covariance(sigma: np.ndarray, path) -> None:
    """One line unless `sigma` is a covariance up to rounding: max|S - S^T| <= SYMMETRY_RTOL * max|S|
    and the smallest eigenvalue of (S + S^T) / 2 >= -PSD_RTOL * its largest |eigenvalue|
    (relative, so the check does not depend on the features' scale; an all-zero sigma passes)."""
    scale = np.abs(sigma).max(initial=0.0)
    asym = np.abs(sigma - sigma.T).max(initial=0.0)
    if asym > SYMMETRY_RTOL * scale:
        raise NeonError(f"{path}: 'sigma' is not symmetric (max |sigma - sigma^T| = {asym:.3g}, max |sigma| = "
                        f"{scale:.3g}; tolerance {SYMMETRY_RTOL:g} relative): not a covariance matrix")
    eig = np.linalg.eigvalsh((sigma + sigma.T) / 2)
    top = np.abs(eig).max(initial=0.0)
    if eig.size and eig[0] < -PSD_RTOL * top:
        raise NeonError(f"{path}: 'sigma' is not positive semi-definite (smallest eigenvalue {eig[0]:.6g}, "
                        f"largest |eigenvalue| {top:.6g}; tolerance {PSD_RTOL:g} relative): not a covariance matrix")


def write_stats(path: str | pathlib.Path, mu, sigma, n: int) -> None:
    """mu/sigma float64 (plus n), written atomically; loads in ADM's evaluator and our `read_stats`."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    with io.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=mu, sigma=sigma, n=np.int64(n))


def check_same_dim(a: tuple[str, int], b: tuple[str, int]) -> None:
    """(name, feature dimension) of two inputs: one line when they differ."""
    (name_a, dim_a), (name_b, dim_b) = a, b
    if dim_a != dim_b:
        raise NeonError(f"feature dimensions differ: {name_a} has {dim_a}, {name_b} has {dim_b}")
