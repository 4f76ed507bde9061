"""Pure-torch reference of the Neon merge kernel (no Triton import: the CPU production path).

out = base + w (base - synth) in fp32 (fp64 for fp64 tensors), the base kept where it is not
finite, cast to the base's dtype.
"""
import torch


def extrapolate_reference(base: torch.Tensor, synth: torch.Tensor, w: float) -> torch.Tensor:
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    b, s = base.to(acc), synth.to(acc)
    # (b - s) * w + b: the same three roundings as b + w * (b - s), in one buffer, in place
    out = torch.sub(b, s).mul_(w).add_(b)
    if not has_only_finite(b):
        torch.where(torch.isfinite(b), out, b, out=out)
    return out.to(base.dtype)


def has_only_finite(x: torch.Tensor) -> bool:
    """Cheap test: a NaN or inf element makes the sum non-finite (a finite sum proves none; an
    overflowing sum only sends the caller down the exact, slower path)."""
    return bool(torch.isfinite(x.sum()))
