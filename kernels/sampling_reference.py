"""Pure-torch references of the fused sampling steps (no Triton import: the CPU production path).

Each function is one sampler update with classifier-free guidance folded in, written with the
official code's operations in the official order, so that the Triton kernels in
`kernels/cfg_step.py` can be compared against them and the samplers equal the official ones.

Guidance layout (as the official samplers): when `scale` is not None the model was run on the
batch [cond rows; uncond rows] at the same x and its output has 2B rows; `scale` is applied as
uncond + scale (cond - uncond). In every step x has B rows and the result has B rows.

- `ddpm_step`: DiT's p_sample with learned variance (clip_denoised=False). `x` has B rows: DiT's
  forward_with_cfg evaluates both halves at the cond half's x ([x; x]), so the official uncond
  half never influences the cond half and only the cond half is kept. The guided eps is the cond
  eps with its first `guided_channels` channels replaced by uncond + s (cond - uncond); the other
  eps channels and the variance values are the cond half's.
- `ddim_step`: DiT's ddim_sample (the eps is recomputed from the x0 prediction, as official).
- `em_step`: xAR's Euler-Maruyama step on the linear path (alpha = 1 - t, sigma = t); `x` has B
  rows (both halves of the model input are the same x); the drift is guided, not the velocity.
  `noise=None` is the final mean step.
Arithmetic: DDPM/DDIM in float32 (the official coefficients are cast to float32), Euler-Maruyama
in x's dtype (float64 in the official sampler); the result has x's dtype.
"""
from __future__ import annotations

import math

import torch


def _guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def guided_out(out: torch.Tensor, scale: float | None, guided_channels: int) -> torch.Tensor:
    """out [N, K, ...]; with a scale, N = 2B ([cond; uncond]) and the result is the cond half
    [B, K, ...] whose channels < guided_channels hold uncond + s (cond - uncond) (DiT's
    forward_with_cfg, cond half)."""
    if scale is None:
        return out
    cond, uncond = out.chunk(2)
    guided = _guide(cond[:, :guided_channels], uncond[:, :guided_channels], scale)
    return torch.cat([guided, cond[:, guided_channels:]], dim=1)


def ddpm_step(x: torch.Tensor, model_out: torch.Tensor, noise: torch.Tensor | None, *, scale: float | None,
              guided_channels: int, sqrt_recip_ac: float, sqrt_recipm1_ac: float, mean_coef1: float,
              mean_coef2: float, log_var_min: float, log_var_max: float) -> torch.Tensor:
    """x [B, C, ...], model_out [B or 2B, 2C, ...] (eps, variance values in [-1, 1]), noise like x
    or None (the last step). Coefficients are the (respaced) schedule's values at this step."""
    c = x.shape[1]
    xf = x.float()
    out = guided_out(model_out.float(), scale, guided_channels)
    eps = out[:, :c]
    frac = (out[:, c:] + 1) / 2
    log_var = frac * log_var_max + (1 - frac) * log_var_min
    x0 = sqrt_recip_ac * xf - sqrt_recipm1_ac * eps
    mean = mean_coef1 * x0 + mean_coef2 * xf
    if noise is None:
        return mean.to(x.dtype)
    return (mean + torch.exp(0.5 * log_var) * noise.float()).to(x.dtype)


def ddim_step(x: torch.Tensor, model_out: torch.Tensor, noise: torch.Tensor | None, *, scale: float | None,
              guided_channels: int, sqrt_recip_ac: float, sqrt_recipm1_ac: float, sqrt_ac_prev: float,
              dir_coef: float, sigma: float) -> torch.Tensor:
    """x [B, C, ...], model_out [B or 2B, C or 2C, ...] (only eps is used); dir_coef = sqrt(1 -
    ac_prev - sigma^2); noise None or sigma 0: deterministic."""
    c = x.shape[1]
    xf = x.float()
    eps = guided_out(model_out[:, :c].float(), scale, guided_channels)
    x0 = sqrt_recip_ac * xf - sqrt_recipm1_ac * eps
    eps = (sqrt_recip_ac * xf - x0) / sqrt_recipm1_ac
    mean = x0 * sqrt_ac_prev + dir_coef * eps
    if noise is None or sigma == 0:
        return mean.to(x.dtype)
    return (mean + sigma * noise.float()).to(x.dtype)


def em_coefficients(t: float) -> tuple[float, float, float]:
    """(alpha/d_alpha, the path variance, the diffusion coefficient) of the linear path at time t,
    in the official order: alpha/d_alpha = (1 - t) / -1 = t - 1, var = t^2 - (t - 1) t, g = 2t.
    Python floats (float64); the Triton kernel takes the same values."""
    ratio = (1 - t) / -1.0
    return ratio, t * t - ratio * 1.0 * t, 2 * t


def em_step(x: torch.Tensor, velocity: torch.Tensor, noise: torch.Tensor | None, *, scale: float | None,
            t: float, dt: float) -> torch.Tensor:
    """x [B, ...] (float32 or float64), velocity [B or 2B, ...] (any float dtype), noise like x
    or None (the final mean step); t > 0 the current time, dt = t_next - t < 0."""
    acc = x.dtype
    v = velocity.to(acc)
    ratio, var, diffusion = em_coefficients(t)
    if scale is not None:
        xx = torch.cat([x, x])
    else:
        xx = x
    score = (ratio * v - xx) / var
    drift = v - 0.5 * diffusion * score
    if scale is not None:
        cond, uncond = drift.chunk(2)
        drift = _guide(cond, uncond, scale)
    if noise is None:
        return x + dt * drift
    return x + drift * dt + math.sqrt(diffusion) * (noise.to(acc) * math.sqrt(abs(dt)))
