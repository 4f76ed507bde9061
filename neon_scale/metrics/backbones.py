"""Feature backbones for the Frechet distance: an explicit registry of names.

Every backbone takes uint8 images [N, C, H, W] (C = 1 or 3; NHWC with layout="nhwc") and returns
(features float32 [N, dim], logits float32 [N, logits_dim] or None) on the CPU:

- `inception`: torch-fidelity's FID InceptionV3 (FID; logits give IS);
- `dinov2`:    DINOv2 ViT from the official checkpoint layout (FD_DINOv2, as edm2 / dgm-eval);
- `classifier`: a small CNN trained by the project on the real training split (digits and other
  data Inception does not see well); its logits are the class scores.

Grey images are repeated to 3 channels for the ImageNet backbones. Every backbone's weights go
through `load_weights`: a strict load, then one line naming the first tensor holding NaN/inf.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .. import io
from ..errors import NeonError

BACKBONES = ["inception", "dinov2", "classifier"]

# The metric's name in results and tables, per backbone.
METRIC_NAMES = {"inception": "fid", "dinov2": "fd_dinov2", "classifier": "fd_classifier"}


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


def check_name(name: str, where: str) -> None:
    if name not in BACKBONES:
        raise NeonError(f"{where}: unknown feature backbone {name!r}; known: {', '.join(BACKBONES)}")


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """`io.load_into` (strict, one line per bad key or shape), then reject NaN/inf: such weights give
    NaN features and so NaN metrics, far from the file that caused them."""
    io.load_into(module, state, source)
    for key, value in state.items():  # file order: the first bad key is named
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise NeonError(f"{source}: key '{key}' holds {bad} non-finite value(s) (NaN/inf) of {value.numel()}")


def load_backbone(name: str, weights: str, device: torch.device | None = None, batch_size: int = 64) -> Backbone:
    """The backbone `name` with its weights read from the local file `weights` (never downloaded)."""
    check_name(name, "features")
    if name == "inception":
        from .features import InceptionFeatures

        return InceptionFeatures(weights, device, batch_size)
    if name == "dinov2":
        from .dinov2 import DINOv2Features

        return DINOv2Features(weights, device, batch_size)
    from .classifier import ClassifierFeatures

    return ClassifierFeatures(weights, device, batch_size)
