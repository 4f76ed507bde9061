"""The toy specs: the paper's 2-D Gaussian experiments, the ground truth every stage is first
checked on. Metric: the Frechet distance between the samples' (mean, covariance) and the true
ones, i.e. FID with the identity as feature map."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import rng
from ..fields import setting
from ..models.toy import TRUE_COV, TRUE_MEAN, EpsMLP, GaussianAR, cosine_alphas_cumprod, gaussian_nll
from .base import ModelSpec


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

@dataclass
class ToyDiffusionArgs:
    hidden: int = setting(32, min=1)
    depth: int = setting(4, min=0)
    train_steps: int = setting(1000, min=2, help="diffusion steps T used in training")


@dataclass
class ToyDiffusionSampler:
    zeta: float = setting(1.0, min=0.0, help="score scale: > 1 mode-seeking, < 1 diversity-seeking")
    steps: int = setting(20, min=2)
    eta: float = setting(0.0, min=0.0, max=1.0, help="DDIM noise: 0 deterministic (as the authors ran it), 1 ancestral")


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

@dataclass
class ToyARArgs:
    hidden: int = setting(64, min=1)


@dataclass
class ToyARSampler:
    temperature: float = setting(1.0, min=0.0, help="multiplies both stds: < 1 mode-seeking, > 1 diversity-seeking")


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
        return gaussian_nll(x1, model.mean1.float(), model.log_std1.float()) + gaussian_nll(x2, m2, ls2)

    @torch.no_grad()
    def sample(self, model, n, gen, sampler: ToyARSampler, start: int = 0):
        tau = sampler.temperature
        x1 = model.mean1 + tau * model.log_std1.exp() * torch.randn(n, 1, generator=gen)
        m2, ls2 = model.conditional(x1)
        x2 = m2 + tau * ls2.exp() * torch.randn(n, 1, generator=gen)
        return {"x": torch.cat([x1, x2], dim=1)}
