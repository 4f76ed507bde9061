"""What every feature backbone is and shares, below the backbones and their registry (`backbones.py`):

- `Backbone`: the call every backbone has: uint8 images [N, C, H, W] (C = 1 or 3; NHWC with
  layout="nhwc") -> (features float32 [N, dim], logits float32 [N, logits_dim] or None) on the CPU;
- `as_rgb`: grey images repeated to 3 channels for the ImageNet backbones;
- `load_weights`: the checked load of a backbone's weights (io.load_into), then one line naming the
  first tensor holding NaN/inf.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .. import io
from ..errors import NeonError


class Backbone(Protocol):
    dim: int
    logits_dim: int | None
    batch_size: int
    seconds: dict[str, float]

    def __call__(self, images: torch.Tensor, layout: str = "nchw") -> tuple[torch.Tensor, torch.Tensor | None]:
        ...


def as_rgb(images: torch.Tensor, layout: str = "nchw") -> torch.Tensor:
    """Grey uint8 images repeated to 3 channels (ImageNet backbones); RGB unchanged."""
    axis = 1 if layout == "nchw" else -1
    if images.shape[axis] == 1:
        return images.repeat_interleave(3, dim=axis)
    return images


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str, official: bool = False) -> None:
    """`io.load_into` (one line per missing key or bad shape; keys the model lacks an error, or for an
    `official` released file a warning unless --strict), then reject NaN/inf: such weights give NaN
    features and so NaN metrics, far from the file that caused them."""
    state = io.load_into(module, state, source, official)
    for key, value in state.items():  # file order: the first bad key is named
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise NeonError(f"{source}: key '{key}' holds {bad} non-finite value(s) (NaN/inf) of {value.numel()}")
