"""xAR's sampler (the official `sample_tokens` + `euler_maruyama_sampler`, our implementation).

The cells are generated one after the other (raster order). Cell k gets the guidance scale
1 + (cfg - 1) k / (clusters - 1) (1 for the first cell, cfg for the last) and is integrated from
pure noise with Euler-Maruyama over `num_steps` model evaluations: times linspace(1, 0.04,
num_steps) then 0; every step but the last adds noise, the last one (to t = 0) is the mean
step. The drift is v - t * score with score = ((t - 1) v - x) / t (linear path); guidance acts
on the drift: uncond + s (cond - uncond) when s > 1, else the conditional drift.

The previous cells enter as clean tokens (t = 0). The first evaluation of cell k feeds the
finished cell k-1 and cell k, reading cells 0..k-2 from the key/value cache and appending
cell k-1 to it; the other evaluations feed cell k alone. (The official code appends twice
when num_steps = 2 and fails at num_steps = 1; here any num_steps >= 1 works.)
`use_cache=False` recomputes all previous cells at every evaluation instead (a check).

Batches: with cfg > 1 the model runs [cond; uncond] rows (the null class `class_num` in the
second half). The first cell's guidance is 1, so only its first evaluation runs the
unconditional rows (they fill the unconditional cache the later cells read); the official code
runs them at every evaluation and discards them, which changes nothing row by row.
"""
from __future__ import annotations

import contextlib
import math

import torch

from ..errors import NeonError
from ..kernels.cfg_step import em_step
from .layers import check_labels
from .xar import XAR


def em_times(num_steps: int) -> list[float]:
    """The official time grid: linspace(1, 0.04, num_steps) in float64, then 0."""
    return torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]


def cell_scale(cfg: float, k: int, clusters: int) -> float:
    return (cfg - 1) * k / (clusters - 1.0) + 1


@torch.no_grad()
def sample_xar(model: XAR, labels: torch.Tensor, gen: torch.Generator, *, num_steps: int, cfg: float,
               use_cache: bool = True, amp: bool | None = None) -> torch.Tensor:
    """Sample latents for class `labels` [B] (each in [0, class_num)).

    Returns float32 [B, vae_embed_dim, h, w] (16 x 16 x 16 at 256 px) in the model's scale,
    i.e. VAE latents x 0.2325: divide by 0.2325 (LATENT_SCALE) before the VAE decoder.

    Noise comes from `gen` only, in this order: for each cell, its start noise [B, cell_len, C]
    (float32, then held in float64), then for each step but the last its noise [B, cell_len, C]
    (float64). The sampler's state is float64; the model sees its inputs in its own dtype, and
    on CUDA a float32 model runs under float16 autocast as official (`amp`: None = that rule).
    """
    return _generate(model, labels, gen, num_steps=num_steps, cfg=cfg, use_cache=use_cache, amp=amp).float()


@torch.no_grad()
def _generate(model: XAR, labels: torch.Tensor, gen: torch.Generator, *, num_steps: int, cfg: float,
              use_cache: bool = True, amp: bool | None = None, official_batches: bool = False) -> torch.Tensor:
    """sample_xar before its float32 cast (float64); official_batches=True runs [cond; uncond]
    rows at every evaluation whatever the scale, as the official code does (slower, the same result)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise NeonError(f"xAR sampler: num_steps must be an integer >= 1, got {num_steps!r}")
    if not math.isfinite(cfg):
        raise NeonError(f"xAR sampler: cfg must be a finite number, got {cfg!r}")
    device = model.mask.device
    dtype = model.z_proj.weight.dtype
    labels = labels.to(device)
    check_labels(labels, model.num_classes, allow_null=False, where="xAR sampler")
    if amp is None:
        amp = device.type == "cuda" and dtype == torch.float32
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext()

    b, length, channels = labels.shape[0], model.cell_len, model.vae_embed_dim
    guided = cfg > 1 or official_batches
    both = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    times = em_times(num_steps)
    cache = model.new_cache() if use_cache else None
    cells: list[torch.Tensor] = []  # finished cells, float64 [B, cell_len, C]

    def velocity(x: torch.Tensor, t: float, k: int, first: bool, two: bool) -> torch.Tensor:
        """The model's velocity for the tokens of cell k (x: its current state) at time t:
        [2B or B, cell_len, C] in float64."""
        if not use_cache:  # recompute all the previous cells
            feed, start, keep = cells[:k], 0, 0
        elif first and k:  # the previous cell is computed once more and joins the cache
            feed, start, keep = [cells[k - 1]], k - 1, 1
        else:  # cells 0..k-1 come from the cache
            feed, start, keep = [], k, 0
        tokens = torch.cat([c.to(dtype) for c in feed] + [x.to(dtype)], dim=1)
        cell_t = torch.tensor([0.0] * len(feed) + [t], dtype=torch.float64, device=device)  # clean cells: t = 0
        y = both if two else labels
        if two:
            tokens = torch.cat([tokens, tokens])
        with autocast:
            out = model(tokens, y, cell_t.expand(tokens.shape[0], -1), start_cell=start, cache=cache,
                        keep_cells=keep)
        return out[:, -length:].to(torch.float64)

    was_training = model.training
    model.eval()
    try:
        for k in range(model.clusters):
            scale = cell_scale(cfg, k, model.clusters)
            x = torch.randn(b, length, channels, generator=gen, device=gen.device).to(device, torch.float64)
            for i in range(num_steps):
                t, t_next = times[i], times[i + 1]
                last = i == num_steps - 1
                noise = None if last else torch.randn(b, length, channels, generator=gen, device=gen.device,
                                                      dtype=torch.float64).to(device)
                # the unconditional rows: needed for guidance, and (cached) to write their cache
                two = guided and (scale > 1 or official_batches or (use_cache and i == 0))
                v = velocity(x, t, k, i == 0, two)
                if two and scale > 1:
                    x = em_step(x, v, noise, scale=scale, t=t, dt=t_next - t)
                else:
                    x = em_step(x, v[:b], noise, scale=None, t=t, dt=t_next - t)
            cells.append(x)
    finally:
        model.train(was_training)
    return model.unclusterify(torch.cat(cells, dim=1))
