"""Fused Neon merge kernel: out = base + w (base - synth), fp32 arithmetic, base kept where it is
not finite, cast to the output dtype on store. fp32 / fp16 / bf16 in and out; in place when
`out is base`. Runs on CUDA, or on CPU tensors under TRITON_INTERPRET=1 (tests).

`extrapolate_reference` is the pure-torch twin the tests compare against.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _extrapolate_kernel(base_ptr, synth_ptr, out_ptr, n, w, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # Loads go through fp32 (the interpreter mishandles bf16 arithmetic).
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(synth_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = b + w * (b - s)
    finite = (b == b) & (tl.abs(b) < float("inf"))
    out = tl.where(finite, out, b)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def extrapolate(base: torch.Tensor, synth: torch.Tensor, w: float, out: torch.Tensor | None = None) -> torch.Tensor:
    if base.shape != synth.shape:
        raise ValueError(f"shape mismatch: {tuple(base.shape)} vs {tuple(synth.shape)}")
    base_c, synth_c = base.contiguous(), synth.contiguous()
    if out is None:
        out = torch.empty_like(base_c)
    n = base_c.numel()
    if n:
        _extrapolate_kernel[(triton.cdiv(n, BLOCK),)](base_c, synth_c, out, n, float(w), BLOCK=BLOCK)
    return out


def extrapolate_reference(base: torch.Tensor, synth: torch.Tensor, w: float) -> torch.Tensor:
    """The formula in torch ops: fp32 arithmetic (fp64 for fp64 tensors), the base's dtype out."""
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    b, s = base.to(acc), synth.to(acc)
    out = torch.where(torch.isfinite(b), b + w * (b - s), b)
    return out.to(base.dtype)
