"""Stage `base`: theta_r on disk as safetensors.

With `base.weights` the file is validated against the model (io.load_into: a missing key or shape is
an error, a key the model does not have a warning, an error under `strict_keys`) and its model keys
copied into the run; without,
the model is trained from scratch: the toys on their built-in real data (full-batch Adam on rank 0,
the paper's appendix recipe); image models on the training split of `data.source`, by the same
DeepSpeed trainer as the fine-tune (stages/train.py: ZeRO, EMA, checkpoints, exact resume), every
rank taking part. The split is written once as shards in base/real/; the trainer's checkpoints and
metrics.jsonl live in base/train/.
"""
from __future__ import annotations

import dataclasses
import pathlib

import torch

from .. import dist, rng, stop
from ..console import log, progress
from ..data.real import load_real
from ..data.shards import MANIFEST, shard_name, write_manifest, write_shard
from ..io import load_into, load_state_dict, save_state_dict
from .common import RunContext, StageDir
from .train import run_trainer

SHARD_SIZE = 1000  # real images per shard of base/real/


def train_from_scratch(ctx: RunContext) -> dict[str, torch.Tensor] | None:
    """The toy's theta_r (rank 0 alone, seconds to a minute); None when a stop signal reached this
    rank first (a rerun trains it again from scratch, to the same weights)."""
    cfg, spec = ctx.cfg.base, ctx.spec
    torch.manual_seed(rng.seed_of(cfg.seed, "init"))
    model = spec.build(ctx.model_args())
    data = spec.real_data(cfg.n_real, rng.generator(cfg.seed, "real"))
    gen = rng.generator(cfg.seed, "loss")
    batch_gen = rng.generator(cfg.seed, "batches")
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    with progress("base: training theta_r", cfg.steps) as bar:
        for step in range(cfg.steps):
            if step % 100 == 0 and stop.requested():  # local: the other ranks wait in a barrier
                return None
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


def real_split_shards(ctx: RunContext) -> pathlib.Path:
    """The training split of data.source as the trainer's input: shards of the network's input
    ("x") and labels ("cls") in base/real/ (rank 0 writes, every rank waits)."""
    out = ctx.run_dir / "base" / "real"
    if dist.is_main() and not (out / MANIFEST).is_file():
        real = load_real(ctx.cfg.data.source)
        train_idx, _ = real.split(ctx.cfg.data.holdout, ctx.cfg.data.seed)
        samples = {**ctx.spec.from_images(real.images[train_idx], ctx.model_args()), "cls": real.labels[train_idx]}
        out.mkdir(parents=True, exist_ok=True)
        shards = []
        for c, start in enumerate(range(0, len(train_idx), SHARD_SIZE)):
            part = {k: v[start:start + SHARD_SIZE] for k, v in samples.items()}
            write_shard(out / shard_name(c), part, {"data": ctx.cfg.data.source}, key_prefix=f"{c:06d}")
            shards.append({"name": shard_name(c), "count": len(part["cls"])})
        write_manifest(out, shards, data=ctx.cfg.data.source, n=len(train_idx))
    dist.barrier()
    return out


def train_on_real(ctx: RunContext) -> None:
    """theta_r of an image model trained from scratch on data.source by the DeepSpeed trainer."""
    base, cfg = ctx.cfg.base, ctx.cfg.base.train
    # base.seed sets the initialisation and, with base.train.seed, the trainer's data order and noise
    cfg = dataclasses.replace(cfg, seed=rng.seed_of("base", base.seed, cfg.seed))
    data_dir = real_split_shards(ctx)
    final = max(cfg.save_steps)

    def build() -> torch.nn.Module:
        torch.manual_seed(rng.seed_of(base.seed, "init"))
        return ctx.spec.build(ctx.model_args()).to(dist.device()).train()

    def export(step: int) -> pathlib.Path:
        return ctx.base_weights() if step == final else ctx.run_dir / "base" / f"theta_r-step{step:06d}.safetensors"

    run_trainer(ctx, cfg, build, data_dir, ctx.run_dir / "base" / "train", "base", export)


def run(ctx: RunContext) -> None:
    stage = StageDir(ctx.run_dir / "base", ctx.fingerprint("base"), "base")
    if stage.is_done():
        log("base: complete, skipped")
        return
    stage.prepare()
    cut = False
    if ctx.cfg.data.source is not None and not ctx.cfg.base.weights and not ctx.cfg.base.random_init:
        train_on_real(ctx)  # stops (and checkpoints) inside the trainer
    elif dist.is_main():
        if ctx.cfg.base.weights:
            state = load_state_dict(ctx.cfg.base.weights, ctx.cfg.base.weights_key)
            # a released file: keys the model lacks are ignored with a warning (strict_keys: an error)
            state = load_into(ctx.spec.build(ctx.model_args()), state, ctx.cfg.base.weights, official=True)
        elif ctx.cfg.base.random_init:
            torch.manual_seed(rng.seed_of(ctx.cfg.base.seed, "init"))
            state = ctx.spec.build(ctx.model_args()).state_dict()
        else:
            state = train_from_scratch(ctx)
            cut = state is None
        if not cut:
            save_state_dict(ctx.base_weights(), state, {"model": ctx.cfg.model.name})
    dist.barrier()
    if dist.any_flag(cut):
        raise stop.Stopped(stop.message("base (training theta_r from scratch on rank 0)",
                                        "nothing kept: it trains again from scratch, to the same weights"))
    stage.mark_done()
    log(f"base: wrote {ctx.base_weights()}")
    stop.check("base", f"theta_r kept in {ctx.base_weights()}")
