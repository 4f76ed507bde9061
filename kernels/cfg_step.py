"""Fused classifier-free guidance + sampler-step kernels: one pass over the latent per step.

Public API (the signatures of kernels/sampling_reference.py plus `use_triton`):
  ddpm_step(x, model_out, noise, *, scale, guided_channels, sqrt_recip_ac, sqrt_recipm1_ac,
            mean_coef1, mean_coef2, log_var_min, log_var_max, use_triton=None)
  ddim_step(x, model_out, noise, *, scale, guided_channels, sqrt_recip_ac, sqrt_recipm1_ac,
            sqrt_ac_prev, dir_coef, sigma, use_triton=None)
  em_step(x, velocity, noise, *, scale, t, dt, use_triton=None)
`use_triton=None`: the Triton kernel iff x is on CUDA; True: the kernel (CUDA, or CPU tensors under
TRITON_INTERPRET=1); False: the torch reference (kernels/sampling_reference.py, the CPU path).

Contract (the reference's semantics; the kernels equal it up to rounding, see below):
- layout: x has B rows; with `scale` (not None) the model output has 2B rows [cond; uncond]
  evaluated at the same x, else B rows; the result has x's shape and dtype (a new contiguous
  tensor). Each program reads one block of x, the matching cond (and uncond) model-output
  elements and the noise once, and writes x_next: guidance and update are one kernel, one launch.
- DiT (ddpm/ddim): x [B, C, ...] (fp16/bf16/fp32/fp64), model_out [B or 2B, 2C, ...] for DDPM
  (eps, variance values), [B or 2B, C or 2C, ...] for DDIM (only eps is read). Output channels
  < guided_channels get uncond + scale (cond - uncond) (for DDPM this counts over the 2C output
  channels, as the reference's guided_out; DiT guides eps channels only), the others are the cond
  half's; uncond elements that are not guided are not read. Arithmetic in fp32.
- xAR (em): x [B, ...] fp32 or fp64, velocity [B or 2B, ...] (fp16/bf16/fp32/fp64), arithmetic in
  x's dtype (the scalars are passed as fp64 to the fp64 kernel); the drift is guided.
- noise: like x (any of the float dtypes above) or None (the last / deterministic step; also
  DDIM with sigma == 0).
- non-contiguous inputs are made contiguous (a copy); all tensors on x's device; shapes are
  checked (ValueError naming both shapes); any sizes, 0 and 1 included.
Rounding: every operation is the reference's, in its order, in the same precision (scalars are
rounded to fp32 in the fp32 kernels as torch does with Python scalars); divisions are IEEE
(div_rn) and FMA contraction is off, so on CPU (interpreter) the kernels equal the reference up
to exp's last bit; on the GPU, torch itself differs from this by its own rounding (it divides by
a scalar as a multiply with its reciprocal) and by its exp.
fp16/bf16 loads go through fp32 (the interpreter mishandles bf16 arithmetic); the result is cast on
store.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import sampling_reference as ref
from .launch import TL_DTYPES, check_dtypes, contiguous, launch, row_grid, use_kernel

_DTYPE_NAMES = "fp16/bf16/fp32/fp64"


# ------------------------------------------------------------------------------------ kernels

@triton.jit
def _row_block(nblk, row_numel, BLOCK: tl.constexpr):
    # One program = one block of one row of x: row `pid // nblk`, elements r of that row.
    pid = tl.program_id(0)
    row = pid // nblk
    r = (pid - row * nblk) * BLOCK + tl.arange(0, BLOCK)
    return row.to(tl.int64), r, r < row_numel


@triton.jit
def _ddpm_kernel(x_ptr, out_ptr, noise_ptr, y_ptr, row_numel, nblk, out_row, uncond_off, guided_eps, guided_var,
                 scale, sqrt_recip_ac, sqrt_recipm1_ac, mean_coef1, mean_coef2, log_var_min, log_var_max,
                 GUIDED: tl.constexpr, HAS_NOISE: tl.constexpr, OUT_T: tl.constexpr, BLOCK: tl.constexpr):
    row, r, mask = _row_block(nblk, row_numel, BLOCK)  # r: element of the row's C*S
    xo = row * row_numel + r
    eo = row * out_row + r  # eps element; its variance value is row_numel further
    x = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(out_ptr + eo, mask=mask, other=0.0).to(tl.float32)
    var = tl.load(out_ptr + eo + row_numel, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        # r < guided_eps: eps channel < guided_channels; r < guided_var: C + channel < guided_channels
        g_eps = mask & (r < guided_eps)
        g_var = mask & (r < guided_var)
        e_u = tl.load(out_ptr + uncond_off + eo, mask=g_eps, other=0.0).to(tl.float32)
        v_u = tl.load(out_ptr + uncond_off + eo + row_numel, mask=g_var, other=0.0).to(tl.float32)
        eps = tl.where(g_eps, e_u + scale * (eps - e_u), eps)
        var = tl.where(g_var, v_u + scale * (var - v_u), var)
    frac = (var + 1.0) * 0.5  # == (var + 1) / 2 exactly
    log_var = frac * log_var_max + (1.0 - frac) * log_var_min
    x0 = sqrt_recip_ac * x - sqrt_recipm1_ac * eps
    y = mean_coef1 * x0 + mean_coef2 * x
    if HAS_NOISE:
        n = tl.load(noise_ptr + xo, mask=mask, other=0.0).to(tl.float32)
        y = y + tl.exp(0.5 * log_var) * n
    tl.store(y_ptr + xo, y.to(OUT_T), mask=mask)


@triton.jit
def _ddim_kernel(x_ptr, out_ptr, noise_ptr, y_ptr, row_numel, nblk, out_row, uncond_off, guided_eps,
                 scale, sqrt_recip_ac, sqrt_recipm1_ac, sqrt_ac_prev, dir_coef, sigma,
                 GUIDED: tl.constexpr, HAS_NOISE: tl.constexpr, OUT_T: tl.constexpr, BLOCK: tl.constexpr):
    row, r, mask = _row_block(nblk, row_numel, BLOCK)
    xo = row * row_numel + r
    eo = row * out_row + r
    x = tl.load(x_ptr + xo, mask=mask, other=0.0).to(tl.float32)
    eps = tl.load(out_ptr + eo, mask=mask, other=0.0).to(tl.float32)
    if GUIDED:
        g_eps = mask & (r < guided_eps)
        e_u = tl.load(out_ptr + uncond_off + eo, mask=g_eps, other=0.0).to(tl.float32)
        eps = tl.where(g_eps, e_u + scale * (eps - e_u), eps)
    x0 = sqrt_recip_ac * x - sqrt_recipm1_ac * eps
    eps = tl.div_rn(sqrt_recip_ac * x - x0, sqrt_recipm1_ac)
    y = x0 * sqrt_ac_prev + dir_coef * eps
    if HAS_NOISE:
        n = tl.load(noise_ptr + xo, mask=mask, other=0.0).to(tl.float32)
        y = y + sigma * n
    tl.store(y_ptr + xo, y.to(OUT_T), mask=mask)


@triton.jit
def _load_acc(ptr, offs, mask, ACC: tl.constexpr, WIDE: tl.constexpr):
    # fp64 inputs load as they are; the others go through fp32 first (exact), then to ACC.
    if WIDE:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(ACC)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32).to(ACC)


@triton.jit
def _em_body(x_ptr, v_ptr, noise_ptr, y_ptr, row_numel, nblk, uncond_off,
             scale, ratio, var, half_diffusion, dt, sqrt_diffusion, sqrt_abs_dt,
             GUIDED: tl.constexpr, HAS_NOISE: tl.constexpr, ACC: tl.constexpr, V_WIDE: tl.constexpr,
             N_WIDE: tl.constexpr, BLOCK: tl.constexpr):
    row, r, mask = _row_block(nblk, row_numel, BLOCK)
    xo = row * row_numel + r  # x, velocity (cond) and noise rows have the same size
    x = tl.load(x_ptr + xo, mask=mask, other=0.0)
    v = _load_acc(v_ptr, xo, mask, ACC, V_WIDE)
    if ACC == tl.float64:
        drift = v - half_diffusion * ((ratio * v - x) / var)
    else:
        drift = v - half_diffusion * tl.div_rn(ratio * v - x, var)
    if GUIDED:
        v_u = _load_acc(v_ptr + uncond_off, xo, mask, ACC, V_WIDE)
        if ACC == tl.float64:
            d_u = v_u - half_diffusion * ((ratio * v_u - x) / var)
        else:
            d_u = v_u - half_diffusion * tl.div_rn(ratio * v_u - x, var)
        drift = d_u + scale * (drift - d_u)
    if HAS_NOISE:
        n = _load_acc(noise_ptr, xo, mask, ACC, N_WIDE)
        y = x + drift * dt + sqrt_diffusion * (n * sqrt_abs_dt)
    else:
        y = x + dt * drift
    tl.store(y_ptr + xo, y, mask=mask)


# The scalars have the accumulation type: on the GPU an unannotated Python float is an fp32
# argument, which would round the fp64 step's coefficients.
@triton.jit
def _em_kernel_f32(x_ptr, v_ptr, noise_ptr, y_ptr, row_numel, nblk, uncond_off,
                   scale: tl.float32, ratio: tl.float32, var: tl.float32, half_diffusion: tl.float32,
                   dt: tl.float32, sqrt_diffusion: tl.float32, sqrt_abs_dt: tl.float32,
                   GUIDED: tl.constexpr, HAS_NOISE: tl.constexpr, ACC: tl.constexpr, V_WIDE: tl.constexpr,
                   N_WIDE: tl.constexpr, BLOCK: tl.constexpr):
    _em_body(x_ptr, v_ptr, noise_ptr, y_ptr, row_numel, nblk, uncond_off, scale, ratio, var, half_diffusion, dt,
             sqrt_diffusion, sqrt_abs_dt, GUIDED, HAS_NOISE, ACC, V_WIDE, N_WIDE, BLOCK)


@triton.jit
def _em_kernel_f64(x_ptr, v_ptr, noise_ptr, y_ptr, row_numel, nblk, uncond_off,
                   scale: tl.float64, ratio: tl.float64, var: tl.float64, half_diffusion: tl.float64,
                   dt: tl.float64, sqrt_diffusion: tl.float64, sqrt_abs_dt: tl.float64,
                   GUIDED: tl.constexpr, HAS_NOISE: tl.constexpr, ACC: tl.constexpr, V_WIDE: tl.constexpr,
                   N_WIDE: tl.constexpr, BLOCK: tl.constexpr):
    _em_body(x_ptr, v_ptr, noise_ptr, y_ptr, row_numel, nblk, uncond_off, scale, ratio, var, half_diffusion, dt,
             sqrt_diffusion, sqrt_abs_dt, GUIDED, HAS_NOISE, ACC, V_WIDE, N_WIDE, BLOCK)


# ------------------------------------------------------------------------------------- checks

def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _check_common(name: str, x: torch.Tensor, out: torch.Tensor, noise: torch.Tensor | None, scale,
                  out_name: str) -> None:
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have a batch dimension, got shape {_shape(x)}")
    rows = 2 * x.shape[0] if scale is not None else x.shape[0]
    if out.dim() != x.dim() or out.shape[0] != rows:
        half = "2B ([cond; uncond], scale given)" if scale is not None else "B (no scale)"
        raise ValueError(f"{name}: {out_name} shape {_shape(out)} does not match x shape {_shape(x)}: "
                         f"expected {half} rows and as many dimensions as x")
    if noise is not None and noise.shape != x.shape:
        raise ValueError(f"{name}: noise shape {_shape(noise)} does not match x shape {_shape(x)}")
    for what, t in ((out_name, out), ("noise", noise)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name}: {what} on {t.device}, x on {x.device}")


def _check_dit(name: str, x, model_out, noise, scale, guided_channels, out_channels) -> None:
    if x.dim() < 2:
        raise ValueError(f"{name}: x must be [B, C, ...], got shape {_shape(x)}")
    _check_common(name, x, model_out, noise, scale, "model_out")
    c = x.shape[1]
    if model_out.shape[1] not in out_channels or model_out.shape[2:] != x.shape[2:]:
        want = " or ".join(f"{k}" for k in out_channels)
        raise ValueError(f"{name}: model_out shape {_shape(model_out)} does not match x shape {_shape(x)}: "
                         f"expected {want} channels (x has {c}) and the same trailing dimensions")
    if guided_channels < 0:
        raise ValueError(f"{name}: guided_channels must be >= 0, got {guided_channels}")


def _check_em(x, velocity, noise, scale) -> None:
    _check_common("em_step", x, velocity, noise, scale, "velocity")
    if velocity.shape[1:] != x.shape[1:]:
        raise ValueError(f"em_step: velocity shape {_shape(velocity)} does not match x shape {_shape(x)}")


# ----------------------------------------------------------------------------------- public API

def ddpm_step(x: torch.Tensor, model_out: torch.Tensor, noise: torch.Tensor | None, *, scale: float | None,
              guided_channels: int, sqrt_recip_ac: float, sqrt_recipm1_ac: float, mean_coef1: float,
              mean_coef2: float, log_var_min: float, log_var_max: float,
              use_triton: bool | None = None) -> torch.Tensor:
    """DiT's DDPM step with learned variance and CFG (see the module docstring and
    sampling_reference.ddpm_step)."""
    c = x.shape[1] if x.dim() >= 2 else 0
    _check_dit("ddpm_step", x, model_out, noise, scale, guided_channels, (2 * c,))
    coefs = dict(scale=scale, guided_channels=guided_channels, sqrt_recip_ac=sqrt_recip_ac,
                 sqrt_recipm1_ac=sqrt_recipm1_ac, mean_coef1=mean_coef1, mean_coef2=mean_coef2,
                 log_var_min=log_var_min, log_var_max=log_var_max)
    if not use_kernel(x, use_triton):
        return ref.ddpm_step(x, model_out, noise, **coefs)
    check_dtypes("ddpm_step: ", TL_DTYPES, _DTYPE_NAMES, x=x, model_out=model_out, noise=noise)
    x_c, out_c, noise_c = contiguous(x, model_out, noise)
    y = torch.empty_like(x_c)
    b = x.shape[0]
    spatial = math.prod(x.shape[2:])
    row_numel = c * spatial
    nblk, total = row_grid(b, row_numel)
    g = min(guided_channels, 2 * c)
    launch(_ddpm_kernel, total,
           x_c, out_c, x_c if noise_c is None else noise_c, y, row_numel, nblk, 2 * row_numel, b * 2 * row_numel,
           g * spatial, (g - c) * spatial, float(scale if scale is not None else 0.0), float(sqrt_recip_ac),
           float(sqrt_recipm1_ac), float(mean_coef1), float(mean_coef2), float(log_var_min), float(log_var_max),
           GUIDED=scale is not None, HAS_NOISE=noise_c is not None, OUT_T=TL_DTYPES[x.dtype],
           enable_fp_fusion=False)
    return y


def ddim_step(x: torch.Tensor, model_out: torch.Tensor, noise: torch.Tensor | None, *, scale: float | None,
              guided_channels: int, sqrt_recip_ac: float, sqrt_recipm1_ac: float, sqrt_ac_prev: float,
              dir_coef: float, sigma: float, use_triton: bool | None = None) -> torch.Tensor:
    """DiT's DDIM step with CFG (see the module docstring and sampling_reference.ddim_step)."""
    c = x.shape[1] if x.dim() >= 2 else 0
    _check_dit("ddim_step", x, model_out, noise, scale, guided_channels, (c, 2 * c))
    coefs = dict(scale=scale, guided_channels=guided_channels, sqrt_recip_ac=sqrt_recip_ac,
                 sqrt_recipm1_ac=sqrt_recipm1_ac, sqrt_ac_prev=sqrt_ac_prev, dir_coef=dir_coef, sigma=sigma)
    if not use_kernel(x, use_triton):
        return ref.ddim_step(x, model_out, noise, **coefs)
    check_dtypes("ddim_step: ", TL_DTYPES, _DTYPE_NAMES, x=x, model_out=model_out, noise=noise)
    x_c, out_c, noise_c = contiguous(x, model_out, None if sigma == 0 else noise)  # sigma 0: no noise read
    y = torch.empty_like(x_c)
    b = x.shape[0]
    spatial = math.prod(x.shape[2:])
    row_numel = c * spatial
    nblk, total = row_grid(b, row_numel)
    out_row = model_out.shape[1] * spatial
    launch(_ddim_kernel, total,
           x_c, out_c, x_c if noise_c is None else noise_c, y, row_numel, nblk, out_row, b * out_row,
           min(guided_channels, c) * spatial, float(scale if scale is not None else 0.0), float(sqrt_recip_ac),
           float(sqrt_recipm1_ac), float(sqrt_ac_prev), float(dir_coef), float(sigma),
           GUIDED=scale is not None, HAS_NOISE=noise_c is not None, OUT_T=TL_DTYPES[x.dtype],
           enable_fp_fusion=False)
    return y


def em_step(x: torch.Tensor, velocity: torch.Tensor, noise: torch.Tensor | None, *, scale: float | None,
            t: float, dt: float, use_triton: bool | None = None) -> torch.Tensor:
    """xAR's Euler-Maruyama step with the guided drift (see the module docstring and
    sampling_reference.em_step)."""
    _check_em(x, velocity, noise, scale)
    if not use_kernel(x, use_triton):
        return ref.em_step(x, velocity, noise, scale=scale, t=t, dt=dt)
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"em_step: x dtype {x.dtype} not supported by the kernel (fp32/fp64)")
    check_dtypes("em_step: ", TL_DTYPES, _DTYPE_NAMES, velocity=velocity, noise=noise)
    x_c, v_c, noise_c = contiguous(x, velocity, noise)
    y = torch.empty_like(x_c)
    b = x.shape[0]
    row_numel = math.prod(x.shape[1:])
    nblk, total = row_grid(b, row_numel)
    if total == 0:  # before the coefficients: no launch, nothing to compute
        return y
    ratio, var, diffusion = ref.em_coefficients(t)  # the reference's scalars (Python floats, i.e. fp64)
    wide = x.dtype == torch.float64
    kernel = _em_kernel_f64 if wide else _em_kernel_f32
    launch(kernel, total,
           x_c, v_c, x_c if noise_c is None else noise_c, y, row_numel, nblk, b * row_numel,
           float(scale if scale is not None else 0.0), float(ratio), float(var), float(0.5 * diffusion), float(dt),
           math.sqrt(diffusion) if noise_c is not None else 0.0, math.sqrt(abs(dt)) if noise_c is not None else 0.0,
           GUIDED=scale is not None, HAS_NOISE=noise_c is not None, ACC=TL_DTYPES[x.dtype],
           V_WIDE=velocity.dtype == torch.float64, N_WIDE=noise_c is not None and noise_c.dtype == torch.float64,
           enable_fp_fusion=False)
    return y
