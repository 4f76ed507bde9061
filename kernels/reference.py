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
    finite = torch.isfinite(b)
    if not bool(finite.all()):
        torch.where(finite, out, b, out=out)
    return out.to(base.dtype)
