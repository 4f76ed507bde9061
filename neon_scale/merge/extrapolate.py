"""The Neon merge, once: theta_neon = theta_r + w (theta_r - theta_s) = lerp(theta_r, theta_s, -w).

Policy (from the authors' runs), shared by every merge path (in-memory dicts, the streaming
`neon merge`, the in-place partition merge):
- non-float tensors are copied from the base;
- elements where the base is not finite (e.g. -inf attention masks) keep the base value;
- keys missing from theta_s keep the base (with a warning);
- keys only in theta_s, shape mismatches and float/non-float mismatches are errors.
Arithmetic is fp32 (fp64 for fp64 tensors); the result has the base's dtype. On CUDA the fused
Triton kernel (neon_scale.kernels.extrapolate) does the element-wise work.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from neon_scale.kernels.extrapolate import extrapolate
from neon_scale.kernels.reference import extrapolate_reference, has_only_finite

from ..errors import NeonError, name_keys

MERGE, COPY_NON_FLOAT, COPY_MISSING = "merge", "copy-non-float", "copy-missing"


def extrapolate_tensor(base: torch.Tensor, theta_s: torch.Tensor, w: float) -> torch.Tensor:
    """Merge one float tensor: the Triton kernel on CUDA, its torch reference elsewhere."""
    if base.is_cuda and base.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return extrapolate(base, theta_s.to(base.device), w)
    return extrapolate_reference(base, theta_s, w)


def check_keys(base_keys, theta_s_keys) -> None:
    extra = [k for k in theta_s_keys if k not in set(base_keys)]
    if extra:
        raise NeonError(f"theta_s has key {name_keys(extra)} that the base lacks")


def action_for(key: str, base_shape, base_dtype: torch.dtype, theta_s_shape=None, theta_s_dtype=None) -> str:
    """What the policy does with one key (raises for the error cases)."""
    if theta_s_shape is None:
        return COPY_MISSING
    if tuple(theta_s_shape) != tuple(base_shape):
        raise NeonError(f"key '{key}': base shape {tuple(base_shape)} vs theta_s shape {tuple(theta_s_shape)}")
    if base_dtype.is_floating_point != theta_s_dtype.is_floating_point:
        raise NeonError(f"key '{key}': base dtype {base_dtype} vs theta_s dtype {theta_s_dtype} (float vs non-float)")
    return MERGE if base_dtype.is_floating_point else COPY_NON_FLOAT


@dataclass
class MergeReport:
    merged: int = 0
    copied_non_float: list[str] = field(default_factory=list)
    missing_in_theta_s: list[str] = field(default_factory=list)
    non_finite_elements: int = 0

    def record(self, key: str, action: str, base: torch.Tensor | None = None) -> None:
        """Count one key; for merged keys, the non-finite elements of `base` (a tensor or a chunk)."""
        if action == COPY_MISSING:
            self.missing_in_theta_s.append(key)
        elif action == COPY_NON_FLOAT:
            self.copied_non_float.append(key)
        else:
            self.merged += 1
            if base is not None:
                self.count_non_finite(base)

    def count_non_finite(self, base: torch.Tensor) -> None:
        if not has_only_finite(base):
            self.non_finite_elements += base.numel() - int(torch.count_nonzero(torch.isfinite(base)))


def extrapolate_state(base: dict[str, torch.Tensor], theta_s: dict[str, torch.Tensor], w: float,
                      report: MergeReport | None = None) -> dict[str, torch.Tensor]:
    """Merge two in-memory state dicts with the policy above."""
    check_keys(base, theta_s)
    report = report if report is not None else MergeReport()
    out = {}
    for key, b in base.items():
        s = theta_s.get(key)
        action = action_for(key, b.shape, b.dtype, None if s is None else s.shape, None if s is None else s.dtype)
        report.record(key, action, b)
        out[key] = extrapolate_tensor(b, s, w) if action == MERGE else b.clone()
    return out
