"""What the networks share: the timestep embedding (DiT and xAR) and the class-label rules
(balanced labels for sampling, the range check of every label a network or sampler sees)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NeonError


# ------------------------------------------------------------------------------------------ Timesteps

def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[..., dim] = [cos(t f_i), sin(t f_i)] with f_i = max_period^(-i / (dim/2)), float32 (GLIDE's
    embedding, shared by DiT and xAR). The frequencies are computed on the CPU and moved, as both
    official implementations do."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
    angles = t[..., None].float() * freqs
    out = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(out, (0, 1)) if dim % 2 else out


class TimestepEmbedder(nn.Module):
    """sinusoid(freq_dim) -> Linear -> SiLU -> Linear, as `t_embedder` (DiT) and `time_embed` (xAR)."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))



# ------------------------------------------------------------------------------------------ Class labels

def balanced_labels(start: int, n: int, num_classes: int, device=None) -> torch.Tensor:
    return (torch.arange(start, start + n, device=device) % num_classes).long()


def check_labels(labels: torch.Tensor, num_classes: int, allow_null: bool, where: str) -> None:
    """One line naming the first label outside [0, num_classes) ([0, num_classes] with the null class)."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise NeonError(f"{where}: class labels must be integers, got {labels.dtype}")
    top = num_classes + 1 if allow_null else num_classes
    bad = (labels < 0) | (labels >= top)
    if bool(bad.any()):
        first = int(labels[bad.nonzero()[0, 0]])
        allowed = f"[0, {num_classes}]" if allow_null else f"[0, {num_classes - 1}]"
        raise NeonError(f"{where}: class label {first} is out of range {allowed} (model.args.num_classes = "
                        f"{num_classes})")
