"""FID pre-processing: uint8 images -> TF1 bilinear resize to 299 x 299 -> (x - 128) / 128.

The same float32 arithmetic as torch-fidelity 0.4.0's InceptionV3 forward (`x.to(float32)`,
`interpolate_bilinear_2d_like_tensorflow1x(x, (299, 299), align_corners=False)`, `(x - 128) / 128`),
in one pass over the uint8 input: the compiled op `neon_scale._fid_ops` (csrc/) when built, else a
pure-torch fallback (`preprocess_reference`) that warns once per process.
"""
from __future__ import annotations

import importlib
import warnings

import torch

try:
    _ops = importlib.import_module("neon_scale._fid_ops")
except ImportError:
    _ops = None

_warned = False
_BUILD_HINT = "build it with `make install` or `pip install --no-build-isolation --no-deps -e .`"


def have_compiled_op() -> bool:
    """True when the compiled extension `neon_scale._fid_ops` was imported."""
    return _ops is not None


def _check(images, layout: str, size: int) -> None:
    if layout not in ("nchw", "nhwc"):
        raise ValueError(f"FID preprocess: layout must be 'nchw' or 'nhwc', got {layout!r}")
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"FID preprocess: expected a torch.Tensor, got {type(images).__name__}")
    shape = tuple(images.shape)
    spatial = shape[2:] if layout == "nchw" else shape[1:3]
    ok = (images.dtype == torch.uint8 and len(shape) == 4 and shape[1 if layout == "nchw" else 3] == 3
          and min(spatial) >= 1)
    if not ok:
        want = "[N, 3, H, W]" if layout == "nchw" else "[N, H, W, 3]"
        raise ValueError(f"FID preprocess: expected uint8 {want} ({layout!r}, H, W >= 1), "
                         f"got {images.dtype} of shape {list(shape)}")
    if int(size) < 1:
        raise ValueError(f"FID preprocess: size must be >= 1, got {size}")


def _taps(in_size: int, size: int, device: torch.device):
    """torch-fidelity's resample_manually grid: float32 g = i * float32(in / out)."""
    g = torch.arange(size, dtype=torch.float32, device=device)
    g = g * torch.tensor(in_size / size, dtype=torch.float32, device=device)
    lo = g.long()
    return lo, (lo + 1).clamp_max(in_size - 1), g - lo.float()


def preprocess_reference(images: torch.Tensor, layout: str = "nchw", size: int = 299,
                         channels_last_out: bool = False) -> torch.Tensor:
    """Pure-torch fallback: gather the 4 uint8 neighbours, then the float32 arithmetic."""
    _check(images, layout, size)
    x = images.permute(0, 3, 1, 2) if layout == "nhwc" else images  # logical NCHW view, uint8
    y_lo, y_hi, dy = _taps(x.shape[2], size, x.device)
    x_lo, x_hi, dx = _taps(x.shape[3], size, x.device)
    dx, dy = dx.view(1, 1, 1, size), dy.view(1, 1, size, 1)
    # Gather the 4 neighbour sets from the uint8 input: rows with index_select, then columns with
    # gather (several times faster than index_select on the last dim of a uint8 tensor).
    r0, r1 = x.index_select(2, y_lo), x.index_select(2, y_hi)
    cols = [i.view(1, 1, 1, size).expand(x.shape[0], 3, size, size) for i in (x_lo, x_hi)]
    v00, v01 = (r0.gather(3, i).float() for i in cols)
    v10, v11 = (r1.gather(3, i).float() for i in cols)
    # In place, one rounding per op, in torch-fidelity's order: a = v00 + (v01 - v00) * dx, ...
    a = v01.sub_(v00).mul_(dx).add_(v00)
    b = v11.sub_(v10).mul_(dx).add_(v10)
    out = b.sub_(a).mul_(dy).add_(a).sub_(128).div_(128)
    fmt = torch.channels_last if channels_last_out else torch.contiguous_format
    return out.contiguous(memory_format=fmt)


def _warn_once(device: torch.device) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    if _ops is None:
        why = "the compiled FID pre-processing op neon_scale._fid_ops is missing"
    else:
        why = f"the compiled FID pre-processing op neon_scale._fid_ops does not support {device} tensors"
        why += " (built without CUDA)" if device.type == "cuda" else ""
    warnings.warn(f"{why}; using the slower pure-torch fallback (same values): {_BUILD_HINT}",
                  RuntimeWarning, stacklevel=3)


def preprocess(images: torch.Tensor, layout: str = "nchw", size: int = 299,
               channels_last_out: bool = False) -> torch.Tensor:
    """uint8 images ([N, 3, H, W] for "nchw", [N, H, W, 3] for "nhwc") -> float32
    [N, 3, size, size] Inception input in [-1, 1), NCHW-contiguous or channels_last memory."""
    _check(images, layout, size)
    dev = images.device.type
    if _ops is not None and (dev == "cpu" or (dev == "cuda" and _ops.with_cuda)):
        return _ops.preprocess(images, layout == "nhwc", int(size), bool(channels_last_out))
    _warn_once(images.device)
    return preprocess_reference(images, layout, size, channels_last_out)
