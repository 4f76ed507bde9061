"""The paper's toy networks (appendix): a diffusion MLP and a 2-D autoregressive model, and the
true distribution of their data, N(0, [[2, 1], [1, 2]])."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


TRUE_MEAN = torch.zeros(2, dtype=torch.float64)
TRUE_COV = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)


# ------------------------------------------------------------------------------ diffusion

def cosine_alphas_cumprod(n_steps: int) -> torch.Tensor:
    """abar(t) = f(t) / f(0) for t = 0..n_steps-1, f(t) = cos(((t / n) + 0.008) / 1.008 pi/2)^2,
    the cosine schedule built for the step count in use, as in the paper's appendix; abar(0) = 1."""
    t = torch.arange(n_steps, dtype=torch.float64)
    f = torch.cos(((t / n_steps) + 0.008) / 1.008 * math.pi / 2) ** 2
    return f / f[0]


class EpsMLP(nn.Module):
    """epsilon(x, t / (n_steps - 1)): Linear(3, h) -> depth x [Linear(h, h) + ReLU] -> Linear(h, 2)."""

    def __init__(self, hidden: int = 32, depth: int = 4):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(3, hidden)]
        for _ in range(depth):
            layers += [nn.Linear(hidden, hidden), nn.ReLU()]
        layers.append(nn.Linear(hidden, 2))
        self.net = nn.Sequential(*layers)
        self.checkpointing = False

    def forward(self, x: torch.Tensor, t01: torch.Tensor) -> torch.Tensor:
        """Inputs in any float dtype are cast to the weights' (bf16 under a bf16 engine); out in fp32."""
        h = torch.cat([x, t01], dim=1).to(self.net[0].weight.dtype)
        if self.checkpointing and torch.is_grad_enabled():
            for layer in self.net:
                h = checkpoint(layer, h, use_reentrant=False)
        else:
            h = self.net(h)
        return h.float()


# -------------------------------------------------------------------------- autoregressive

class GaussianAR(nn.Module):
    """p(x1) p(x2 | x1): a learned Gaussian for x1, an MLP 1 -> h -> h -> 2 giving the mean and
    log-std of x2 given x1."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.mean1 = nn.Parameter(torch.zeros(1))
        self.log_std1 = nn.Parameter(torch.zeros(1))
        self.cond = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def conditional(self, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.cond(x1.to(self.cond[0].weight.dtype)).float()
        return out[:, :1], out[:, 1:]


def gaussian_nll(x, mean, log_std):
    return (log_std + 0.5 * ((x - mean) * torch.exp(-log_std)) ** 2 + 0.5 * math.log(2 * math.pi)).mean()
