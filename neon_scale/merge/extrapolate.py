"""The Neon merge, once: theta_neon = theta_r + w (theta_r - theta_s) = lerp(theta_r, theta_s, -w).

Policy (from the authors' runs): non-float tensors are copied from the base; elements where the
base is not finite (e.g. -inf attention masks) keep the base value; keys missing from theta_s
keep the base. Arithmetic is fp32 (fp64 for fp64 tensors); the result has the base's dtype.
On CUDA the fused Triton kernel (neon_scale.kernels.extrapolate) does the element-wise work.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import NeonError, name_keys


def extrapolate_tensor(base: torch.Tensor, synth: torch.Tensor, w: float) -> torch.Tensor:
    """Merge one float tensor: the Triton kernel on CUDA, its torch reference elsewhere."""
    from neon_scale.kernels.extrapolate import extrapolate, extrapolate_reference

    if base.is_cuda and base.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return extrapolate(base, synth.to(base.device), w)
    return extrapolate_reference(base, synth, w)


@dataclass
class MergeReport:
    merged: int = 0
    copied_non_float: list[str] = field(default_factory=list)
    missing_in_synth: list[str] = field(default_factory=list)
    non_finite_elements: int = 0


def extrapolate_state(base: dict[str, torch.Tensor], synth: dict[str, torch.Tensor], w: float,
                      report: MergeReport | None = None) -> dict[str, torch.Tensor]:
    """Merge two state dicts with the policy above. Keys only in theta_s are an error."""
    extra = [k for k in synth if k not in base]
    if extra:
        raise NeonError(f"theta_s has key {name_keys(extra)} that the base lacks")
    report = report if report is not None else MergeReport()
    out = {}
    for key, b in base.items():
        if key not in synth:
            report.missing_in_synth.append(key)
            out[key] = b.clone()
            continue
        s = synth[key]
        if tuple(s.shape) != tuple(b.shape):
            raise NeonError(f"key '{key}': base shape {tuple(b.shape)} vs theta_s shape {tuple(s.shape)}")
        if not b.is_floating_point():
            report.copied_non_float.append(key)
            out[key] = b.clone()
            continue
        report.non_finite_elements += int((~torch.isfinite(b)).sum())
        out[key] = extrapolate_tensor(b, s, w)
        report.merged += 1
    return out
