"""Fused guidance + sampler-step kernels (STUB: dispatches to the torch reference until the
Triton kernels land). Public API: ddpm_step, ddim_step, em_step with the signatures of
kernels/sampling_reference.py plus `use_triton: bool | None = None` (None: Triton iff x is on CUDA).
"""
from __future__ import annotations

from . import sampling_reference as ref


def ddpm_step(x, model_out, noise, *, use_triton=None, **coefs):
    return ref.ddpm_step(x, model_out, noise, **coefs)


def ddim_step(x, model_out, noise, *, use_triton=None, **coefs):
    return ref.ddim_step(x, model_out, noise, **coefs)


def em_step(x, velocity, noise, *, use_triton=None, **coefs):
    return ref.em_step(x, velocity, noise, **coefs)
