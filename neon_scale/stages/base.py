"""Stage `base`: theta_r on disk as safetensors.

With `base.weights` the file is validated against the model and copied into the run; without,
the model is trained from scratch on its built-in real data (the toys), on rank 0.
"""
from __future__ import annotations

import torch

from .. import dist, rng
from ..console import log, progress
from ..io import load_into, load_state_dict, save_state_dict
from .common import RunContext, StageDir


def train_from_scratch(ctx: RunContext) -> dict[str, torch.Tensor]:
    cfg, spec = ctx.cfg.base, ctx.spec
    torch.manual_seed(rng.seed_of(cfg.seed, "init"))
    model = spec.build(spec.parse_args(ctx.cfg.model.args))
    data = spec.real_data(cfg.n_real, rng.generator(cfg.seed, "real"))
    gen = rng.generator(cfg.seed, "loss")
    batch_gen = rng.generator(cfg.seed, "batches")
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    with progress("base: training theta_r", cfg.steps) as bar:
        for step in range(cfg.steps):
            if cfg.batch_size and cfg.batch_size < cfg.n_real:
                idx = torch.randint(0, cfg.n_real, (cfg.batch_size,), generator=batch_gen)
                batch = {k: v[idx] for k, v in data.items()}
            else:
                batch = data
            loss = spec.loss(model, batch, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 100 == 0 or step == cfg.steps - 1:
                bar.update(completed=step + 1, info=f"loss {loss.item():.4f}")
    return model.state_dict()


def run(ctx: RunContext) -> None:
    stage = StageDir(ctx.run_dir / "base", ctx.fingerprint("base"), "base")
    if stage.is_done():
        log("base: complete, skipped")
        return
    stage.prepare()
    if dist.is_main():
        if ctx.cfg.base.weights:
            state = load_state_dict(ctx.cfg.base.weights, ctx.cfg.base.weights_key)
            load_into(ctx.spec.build(ctx.model_args()), state, ctx.cfg.base.weights)
        elif ctx.cfg.base.random_init:
            torch.manual_seed(rng.seed_of(ctx.cfg.base.seed, "init"))
            state = ctx.spec.build(ctx.model_args()).state_dict()
        else:
            state = train_from_scratch(ctx)
        save_state_dict(ctx.base_weights(), state, {"model": ctx.cfg.model.name})
    dist.barrier()
    stage.mark_done()
    log(f"base: wrote {ctx.base_weights()}")
