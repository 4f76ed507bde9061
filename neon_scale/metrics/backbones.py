"""Feature backbones for the Frechet distance: the registry, an explicit list of names above the
backbones it builds. Each backbone has the call of `backbone_base.Backbone`:

- `inception`: torch-fidelity's FID InceptionV3 (FID; logits give IS);
- `dinov2`:    DINOv2 ViT from the official checkpoint layout (FD_DINOv2, as edm2 / dgm-eval);
- `classifier`: a small CNN trained by the project on the real training split (digits and other
  data Inception does not see well); its logits are the class scores.

Grey images are repeated to 3 channels for the ImageNet backbones. Every backbone's weights go
through `backbone_base.load_weights`: a checked load (io.load_into: a missing key or shape is an error;
a key the network lacks a warning for the released Inception / DINOv2 files, an error with --strict),
then one line naming the first tensor holding NaN/inf.
"""
from __future__ import annotations

import torch

from ..errors import NeonError
from .backbone_base import Backbone
from .classifier import ClassifierFeatures
from .dinov2 import DINOv2Features
from .features import InceptionFeatures

BACKBONES = ["inception", "dinov2", "classifier"]

# The metric's name in results and tables, per backbone.
METRIC_NAMES = {"inception": "fid", "dinov2": "fd_dinov2", "classifier": "fd_classifier"}

_FEATURES = {"inception": InceptionFeatures, "dinov2": DINOv2Features, "classifier": ClassifierFeatures}


def check_name(name: str, where: str) -> None:
    if name not in BACKBONES:
        raise NeonError(f"{where}: unknown feature backbone {name!r}; known: {', '.join(BACKBONES)}")


def load_backbone(name: str, weights: str, device: torch.device | None = None, batch_size: int = 64) -> Backbone:
    """The backbone `name` with its weights read from the local file `weights` (never downloaded)."""
    check_name(name, "features")
    return _FEATURES[name](weights, device, batch_size)
