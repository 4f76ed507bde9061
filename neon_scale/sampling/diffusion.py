"""DiT's Gaussian diffusion: the linear 1000-step schedule, timestep respacing, the DDPM sampler
with learned variance, DDIM, classifier-free guidance, and the training loss (MSE + VLB).

Written from the formulas of the official DiT/ADM code (facebookresearch/DiT `diffusion/`):
- betas linspace(1e-4, 2e-2, 1000) in float64; every coefficient is computed in float64 and
  used in float32 (as the official `_extract_into_tensor`);
- a respaced process keeps a subset of the 1000 steps ("250" -> evenly strided, "ddim50" -> the
  DDIM stride) with betas 1 - abar(t_i) / abar(t_{i-1}); the network sees the original index;
- the model predicts eps and variance values v in [-1, 1]: log var = (v+1)/2 log beta_t +
  (1 - (v+1)/2) log posterior_var_clipped_t;
- guidance as DiT's `forward_with_cfg`: the network runs on [x; x] with labels [y; null class];
  the first `guided_channels` eps channels are guided. The official sampler also carries an
  uncond half of x, but forward_with_cfg evaluates both halves at the cond half and the uncond
  half is dropped at the end, so it never influences the result: we carry x [B] only;
- training: t ~ U{0..999}, loss = mean-squared eps error + the VLB term (in bits) for the variance
  (with the mean frozen), decoder NLL at t = 0.
The per-step update (guidance + step) is one fused kernel (neon_scale.kernels.cfg_step) on CUDA
and its torch reference elsewhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .. import rng
from ..kernels import cfg_step

TRAIN_STEPS = 1000


def linear_betas(n: int = TRAIN_STEPS) -> np.ndarray:
    scale = 1000 / n
    return np.linspace(scale * 1e-4, scale * 0.02, n, dtype=np.float64)


def space_timesteps(num_timesteps: int, spacing: str) -> list[int]:
    """The kept steps of the original process, ascending: "ddimN" uses the integer stride giving N
    steps; "a,b,c" splits the process into equal sections with a, b, c evenly spaced steps each."""
    if spacing.startswith("ddim"):
        want = int(spacing[4:])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == want:
                return list(range(0, num_timesteps, stride))
        raise ValueError(f"cannot make exactly {want} DDIM steps out of {num_timesteps} with an integer stride")
    counts = [int(c) for c in spacing.split(",")]
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(k * stride) for k in range(count)]
        start += size
    return sorted(set(steps))


@dataclass
class Schedule:
    """Coefficients of a (possibly respaced) process, float64 numpy arrays indexed by step."""
    timestep_map: list[int]
    betas: np.ndarray

    @classmethod
    def respaced(cls, spacing: str | None, num_timesteps: int = TRAIN_STEPS) -> "Schedule":
        base_ac = np.cumprod(1.0 - linear_betas(num_timesteps))
        keep = list(range(num_timesteps)) if not spacing else space_timesteps(num_timesteps, spacing)
        betas, last = [], 1.0
        for i in keep:
            betas.append(1 - base_ac[i] / last)
            last = base_ac[i]
        return cls(keep, np.array(betas, dtype=np.float64))

    def __post_init__(self):
        b = self.betas
        self.ac = np.cumprod(1.0 - b)
        self.ac_prev = np.append(1.0, self.ac[:-1])
        self.sqrt_ac = np.sqrt(self.ac)
        self.sqrt_1m_ac = np.sqrt(1.0 - self.ac)
        self.sqrt_recip_ac = np.sqrt(1.0 / self.ac)
        self.sqrt_recipm1_ac = np.sqrt(1.0 / self.ac - 1)
        post_var = b * (1.0 - self.ac_prev) / (1.0 - self.ac)
        self.post_log_var_clipped = np.log(np.append(post_var[1], post_var[1:])) if len(b) > 1 else np.array([0.0])
        self.post_c1 = b * np.sqrt(self.ac_prev) / (1.0 - self.ac)
        self.post_c2 = (1.0 - self.ac_prev) * np.sqrt(1.0 - b) / (1.0 - self.ac)
        self.log_betas = np.log(b)

    @property
    def steps(self) -> int:
        return len(self.betas)

    def at(self, name: str, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Coefficient `name` at steps t (a [B] tensor), float32, shaped [B, 1, ...] for ndim dims."""
        table = torch.from_numpy(getattr(self, name)).to(t.device)
        return table[t].float().view(-1, *([1] * (ndim - 1)))


# ------------------------------------------------------------------------------- sampling

@torch.no_grad()
def sample(model, noise: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, *, method: str, steps: int,
           cfg: float, null_class: int, guided_channels: int = 3, eta: float = 0.0,
           num_timesteps: int = TRAIN_STEPS, guidance: bool | None = None,
           use_triton: bool | None = None) -> torch.Tensor:
    """DDPM ("ddpm", `steps` evenly respaced steps) or DDIM ("ddim", the DDIM stride) from
    `noise` [B, C, H, W] with classifier-free guidance `cfg` (> 1 runs the [cond; uncond] batch as
    DiT's sample_ddp.py; <= 1: the plain conditional model; `guidance=True` runs the guided batch
    whatever cfg is). Step noise comes from `gen`.
    Returns the final latents [B, C, H, W] (float32)."""
    sched = Schedule.respaced(f"ddim{steps}" if method == "ddim" else str(steps), num_timesteps)
    guided = cfg > 1.0 if guidance is None else guidance
    x = noise.float()
    y = torch.cat([labels, torch.full_like(labels, null_class)]) if guided else labels
    scale = cfg if guided else None
    tmap = torch.tensor(sched.timestep_map, device=x.device)
    for i in reversed(range(sched.steps)):
        x_in = torch.cat([x, x]) if guided else x
        out = model(x_in, tmap[torch.full((x_in.shape[0],), i, device=x.device)], y).float()
        step_noise = torch.randn(x.shape, generator=gen, device=gen.device).to(x.device) if i > 0 else None
        common = dict(scale=scale, guided_channels=guided_channels, sqrt_recip_ac=float(sched.sqrt_recip_ac[i]),
                      sqrt_recipm1_ac=float(sched.sqrt_recipm1_ac[i]), use_triton=use_triton)
        if method == "ddpm":
            x = cfg_step.ddpm_step(x, out, step_noise, mean_coef1=float(sched.post_c1[i]),
                                   mean_coef2=float(sched.post_c2[i]), log_var_min=float(sched.post_log_var_clipped[i]),
                                   log_var_max=float(sched.log_betas[i]), **common)
        else:
            ac, ac_prev = float(sched.ac[i]), float(sched.ac_prev[i])
            sigma = eta * math.sqrt((1 - ac_prev) / (1 - ac)) * math.sqrt(1 - ac / ac_prev)
            x = cfg_step.ddim_step(x, out, step_noise if sigma > 0 else None, sqrt_ac_prev=math.sqrt(ac_prev),
                                   dir_coef=math.sqrt(max(1 - ac_prev - sigma**2, 0.0)), sigma=sigma, **common)
    return x


# -------------------------------------------------------------------------------- training

def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) of a Gaussian discretised to 256 bins on [-1, 1] (ADM's decoder likelihood), nats."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


def training_loss(model, x0: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, *, learn_sigma: bool = True,
                  sched: Schedule | None = None) -> torch.Tensor:
    """DiT's training loss on latents x0 [B, C, H, W] (already x 0.18215): the batch mean of
    MSE(eps) + (learned variance) the VLB term with the mean prediction frozen."""
    sched = sched or Schedule.respaced(None)
    dev = x0.device
    t = rng.randint(gen, sched.steps, (x0.shape[0],)).to(dev)
    noise = rng.randn(gen, x0.shape).to(dev)
    x0 = x0.float()
    nd = x0.ndim
    xt = sched.at("sqrt_ac", t, nd) * x0 + sched.at("sqrt_1m_ac", t, nd) * noise
    out = model(xt, torch.tensor(sched.timestep_map, device=dev)[t], labels).float()
    c = x0.shape[1]
    if not learn_sigma:
        return _mean_flat((noise - out) ** 2).mean()
    eps, var_values = out[:, :c], out[:, c:]
    # the VLB term trains the variance only: the mean comes from the detached eps
    frac = (var_values + 1) / 2
    log_var = frac * sched.at("log_betas", t, nd) + (1 - frac) * sched.at("post_log_var_clipped", t, nd)
    x0_pred = sched.at("sqrt_recip_ac", t, nd) * xt - sched.at("sqrt_recipm1_ac", t, nd) * eps.detach()
    mean = sched.at("post_c1", t, nd) * x0_pred + sched.at("post_c2", t, nd) * xt
    true_mean = sched.at("post_c1", t, nd) * x0 + sched.at("post_c2", t, nd) * xt
    true_log_var = sched.at("post_log_var_clipped", t, nd)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    mse = _mean_flat((noise - eps) ** 2)
    return (mse + vb).mean()
