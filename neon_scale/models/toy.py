"""The paper's toy experiments (appendix): 2-D Gaussian data, a diffusion MLP and a 2-D
autoregressive model. The ground truth every stage is first checked on.

Data: N(0, [[2, 1], [1, 2]]). Metric: the Frechet distance between the samples' (mean,
covariance) and the true ones, i.e. FID with the identity as feature map.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import rng
from ..config import _f
from .registry import ModelSpec, register

TRUE_MEAN = torch.zeros(2, dtype=torch.float64)
TRUE_COV = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)


class _ToyGaussianData:
    has_real_data = True
    metric_name = "fd"

    def real_data(self, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        chol = torch.linalg.cholesky(TRUE_COV).float()
        return {"x": torch.randn(n, 2, generator=gen) @ chol.T}

    def features(self, samples: dict[str, torch.Tensor]) -> torch.Tensor:
        return samples["x"].double()

    def reference_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return TRUE_MEAN.clone(), TRUE_COV.clone()


# ------------------------------------------------------------------------------ diffusion

def cosine_alphas_cumprod(n_steps: int) -> torch.Tensor:
    """abar(t) = f(t) / f(0) for t = 0..n_steps-1, f(t) = cos(((t / n) + 0.008) / 1.008 pi/2)^2,
    the cosine schedule built for the step count in use (NEON.md); abar(0) = 1."""
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


@dataclass
class ToyDiffusionArgs:
    hidden: int = _f(32, min=1)
    depth: int = _f(4, min=0)
    train_steps: int = _f(1000, min=2, help="diffusion steps T used in training")


@dataclass
class ToyDiffusionSampler:
    zeta: float = _f(1.0, min=0.0, help="score scale: > 1 mode-seeking, < 1 diversity-seeking")
    steps: int = _f(20, min=2)
    eta: float = _f(0.0, min=0.0, max=1.0, help="DDIM noise: 0 deterministic (as the authors ran it), 1 ancestral")


@register
class ToyDiffusion(_ToyGaussianData, ModelSpec):
    name = "toy2d_diffusion"
    Args = ToyDiffusionArgs
    Sampler = ToyDiffusionSampler

    def build(self, args: ToyDiffusionArgs) -> nn.Module:
        model = EpsMLP(args.hidden, args.depth)
        model.train_steps = args.train_steps
        return model

    def enable_activation_checkpointing(self, model: EpsMLP) -> None:
        model.checkpointing = True

    def loss(self, model, batch, gen):
        x0 = batch["x"].float()
        n_steps = model.train_steps
        abar = cosine_alphas_cumprod(n_steps).float()
        t = rng.randint(gen, n_steps, (x0.shape[0],))
        eps = rng.randn(gen, x0.shape)
        a = abar[t].unsqueeze(1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = model(xt, (t.float() / (n_steps - 1)).unsqueeze(1))
        return F.mse_loss(pred, eps)

    @torch.no_grad()
    def sample(self, model, n, gen, sampler: ToyDiffusionSampler, start: int = 0):
        """Ancestral DDIM over `steps`; the x0 prediction uses the score scaled by zeta, the
        direction term the unscaled eps."""
        steps, zeta, eta = sampler.steps, sampler.zeta, sampler.eta
        abar = cosine_alphas_cumprod(steps).tolist()
        x = torch.randn(n, 2, generator=gen)
        for t in reversed(range(steps)):
            eps = model(x, torch.full((n, 1), t / (steps - 1)))
            a = abar[t]
            x0 = (x - math.sqrt(1 - a) * zeta * eps) / math.sqrt(a)
            if t == 0:  # abar(0) = 1: the last step returns the x0 prediction
                x = x0
                break
            a_prev = abar[t - 1]
            sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
            x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * torch.randn(n, 2, generator=gen)
        return {"x": x}


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


def _gaussian_nll(x, mean, log_std):
    return (log_std + 0.5 * ((x - mean) * torch.exp(-log_std)) ** 2 + 0.5 * math.log(2 * math.pi)).mean()


@dataclass
class ToyARArgs:
    hidden: int = _f(64, min=1)


@dataclass
class ToyARSampler:
    temperature: float = _f(1.0, min=0.0, help="multiplies both stds: < 1 mode-seeking, > 1 diversity-seeking")


@register
class ToyAR(_ToyGaussianData, ModelSpec):
    name = "toy2d_ar"
    Args = ToyARArgs
    Sampler = ToyARSampler

    def build(self, args: ToyARArgs) -> nn.Module:
        return GaussianAR(args.hidden)

    def loss(self, model, batch, gen):
        x = batch["x"].float()
        x1, x2 = x[:, :1], x[:, 1:]
        m2, ls2 = model.conditional(x1)
        return _gaussian_nll(x1, model.mean1.float(), model.log_std1.float()) + _gaussian_nll(x2, m2, ls2)

    @torch.no_grad()
    def sample(self, model, n, gen, sampler: ToyARSampler, start: int = 0):
        tau = sampler.temperature
        x1 = model.mean1 + tau * model.log_std1.exp() * torch.randn(n, 1, generator=gen)
        m2, ls2 = model.conditional(x1)
        x2 = m2 + tau * ls2.exp() * torch.randn(n, 1, generator=gen)
        return {"x": torch.cat([x1, x2], dim=1)}
