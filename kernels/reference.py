"""Pure-torch reference of the Neon merge kernel (no Triton import: the CPU production path).

out = base + w (base - synth) in fp32 (fp64 for fp64 tensors), the base kept where it is not
finite, cast to the base's dtype.
"""
import torch


def extrapolate_reference(base: torch.Tensor, synth: torch.Tensor, w: float) -> torch.Tensor:
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    b, s = base.to(acc), synth.to(acc)
    out = torch.where(torch.isfinite(b), b + w * (b - s), b)
    return out.to(base.dtype)
