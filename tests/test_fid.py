"""Streaming float64 moments and the Frechet distance against independent float64 references."""
import numpy as np
import torch

from neon_scale.metrics.fid import Moments, frechet_distance


def _sqrtm_psd(a):
    vals, vecs = np.linalg.eigh(a)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def test_moments_match_numpy_in_chunks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5003, 6)) @ rng.normal(size=(6, 6)) + 3.0
    m = Moments(6)
    for chunk in np.array_split(x, 7):
        m.add(torch.from_numpy(chunk).float())
    mu, cov = m.mean_cov()
    xf = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu.numpy(), xf.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(xf.T), rtol=1e-9, atol=1e-9)


def test_frechet_distance_matches_symmetric_sqrt_formula():
    rng = np.random.default_rng(1)
    for d in (2, 5, 16):
        a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
        s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        r1 = _sqrtm_psd(s1)
        ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(_sqrtm_psd(r1 @ s2 @ r1))
        assert abs(frechet_distance(mu1, s1, mu2, s2) - ref) <= 1e-9 * max(1.0, abs(ref))
    s = np.array([[2.0, 1.0], [1.0, 2.0]])
    assert abs(frechet_distance(np.zeros(2), s, np.zeros(2), s)) < 1e-12
