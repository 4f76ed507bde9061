"""A small classifier trained on the real training split, as a feature backbone for the Frechet
distance (the usual practice for data Inception does not see well, such as 8x8 digits).

Network: two 3x3 convolutions (the second with stride 2) and a linear layer to `dim` features
(ReLU), then a linear head to the classes; features are the `dim`-d layer (FD), logits the head.
Input: uint8 images [N, C, H, W] scaled to [-1, 1]. Trained once with Adam on the training split
(light pixel noise as augmentation), its held-out accuracy measured, and saved as safetensors with
its architecture and accuracy in the metadata, so every evaluation reuses the same file.
"""
from __future__ import annotations

import json
import pathlib
import time

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .. import io
from ..errors import NeonError
from .backbone_base import load_weights


# ------------------------------------------------------------------------------------ network

class SmallCNN(nn.Module):
    def __init__(self, channels: int, size: int, num_classes: int, width: int = 32, dim: int = 64):
        super().__init__()
        self.arch = {"channels": channels, "size": size, "num_classes": num_classes, "width": width, "dim": dim}
        half = (size + 1) // 2
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.fc = nn.Linear(2 * width * half * half, dim)
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return f, self.head(f)


def to_input(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------- training

def train_classifier(images: torch.Tensor, labels: torch.Tensor, held_images: torch.Tensor, held_labels: torch.Tensor,
                     num_classes: int, seed: int = 0, steps: int = 1500, batch: int = 128, lr: float = 1e-3,
                     noise: float = 0.05) -> tuple[SmallCNN, float]:
    """Train on (images, labels) -> (network in eval mode, accuracy on the held-out images)."""
    channels, size = images.shape[1], images.shape[2]
    torch.manual_seed(seed)
    net = SmallCNN(channels, size, num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x_all = to_input(images)
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (batch,), generator=gen)
        x = x_all[idx] + noise * torch.randn(x_all[idx].shape, generator=gen)  # light noise: smoother features
        loss = F.cross_entropy(net(x)[1], labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval().requires_grad_(False)
    return net, accuracy(net, held_images, held_labels)


@torch.no_grad()
def accuracy(net: SmallCNN, images: torch.Tensor, labels: torch.Tensor) -> float:
    if len(images) == 0:
        return float("nan")
    return (net(to_input(images))[1].argmax(1) == labels).double().mean().item()


def save_classifier(path: str | pathlib.Path, net: SmallCNN, held_accuracy: float, source: str) -> None:
    io.save_state_dict(path, net.state_dict(), {"arch": json.dumps(net.arch), "heldout_accuracy": held_accuracy,
                                                "data": source, "kind": "neon_scale classifier"})


def load_classifier(path: str | pathlib.Path) -> tuple[SmallCNN, dict]:
    """The network and its metadata (arch, heldout_accuracy, data) from a file save_classifier wrote."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise NeonError(f"{path}: classifier weights not found (the sweep trains one on the real data; "
                        f"`neon fid --features classifier` needs its file)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        arch = json.loads(meta["arch"])
    except (KeyError, ValueError, OSError) as e:
        raise NeonError(f"{path}: not a classifier file written by neon_scale ({type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001  (safetensors' header errors)
        raise NeonError(f"{path}: cannot read safetensors file ({e})") from None
    net = SmallCNN(**arch)
    load_weights(net, io.load_state_dict(path), f"{path} (classifier)")
    return net.eval().requires_grad_(False), meta


# ----------------------------------------------------------------------------------- backbone

class ClassifierFeatures:
    """The feature-backbone protocol (metrics.backbone_base) over a saved classifier."""

    def __init__(self, weights: str, device: torch.device | None = None, batch_size: int = 512):
        self.net, self.meta = load_classifier(weights)
        self.device = device or torch.device("cpu")
        self.net.to(self.device)
        self.dim, self.logits_dim = self.net.arch["dim"], self.net.arch["num_classes"]
        self.batch_size = max(batch_size, 1)
        self.seconds = {"preprocess": 0.0, "network": 0.0}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, layout: str = "nchw") -> tuple[torch.Tensor, torch.Tensor]:
        if layout == "nhwc":
            images = images.permute(0, 3, 1, 2)
        arch = self.net.arch
        if arch["channels"] == 1 and images.shape[1] == 3 and bool((images == images[:, :1]).all()):
            images = images[:, :1]  # grey images decoded as RGB (image folders): the same pixels
        if tuple(images.shape[1:]) != (arch["channels"], arch["size"], arch["size"]):
            raise NeonError(f"classifier features: images of shape {list(images.shape[1:])}, the classifier was "
                            f"trained on {[arch['channels'], arch['size'], arch['size']]}")
        feats, logits = [], []
        for chunk in images.split(self.batch_size):
            t0 = time.perf_counter()
            x = to_input(chunk.to(self.device))
            t1 = time.perf_counter()
            f, lg = self.net(x)
            feats.append(f.cpu())
            logits.append(lg.cpu())
            self.seconds["preprocess"] += t1 - t0
            self.seconds["network"] += time.perf_counter() - t1
        return torch.cat(feats), torch.cat(logits)
