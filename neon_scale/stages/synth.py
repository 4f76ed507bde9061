"""Stage `synth`: draw S from theta_r with each configured sampler, as webdataset shards.

Shard c of a set holds samples [c * shard_size, ...) drawn with the random stream (seed,
setting, c) by rank c mod world, so the set is the same whatever the number of ranks; existing
shards are complete (atomic writes) and skipped on resume. Ranks work in rounds of one shard each,
and every rank reaches the same stop points (one per sampling batch): on a stop signal the
finished shards stay and the one being drawn is dropped.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from .. import dist, rng, stop
from ..console import log, progress
from ..data.shards import shard_name, write_manifest, write_shard
from .common import RunContext, StageDir, legacy_sampler_tag


def sample_batches(ctx: RunContext, model, count: int, gen: torch.Generator, sampler, batch_size: int, first: int):
    """`count` samples (set indices first, first + 1, ...) in calls of at most batch_size, one
    dict per call; image models with synth.save_images also get their decoded images."""
    for start in range(0, count, batch_size):
        part = ctx.spec.sample(model, min(batch_size, count - start), gen, sampler, start=first + start)
        if ctx.cfg.synth.save_images and ctx.spec.makes_images:
            part["image"] = ctx.spec.images(part, ctx.model_args())
        yield part


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg.synth
    stage = StageDir(ctx.run_dir / "synth", ctx.fingerprint("synth"), "synth")
    if stage.is_done():
        log("synth: complete, skipped")
        return
    stage.prepare()
    model = ctx.load_model(ctx.base_weights())
    rank, world = dist.rank(), dist.world()
    n_shards = math.ceil(cfg.n / cfg.shard_size)
    per_shard = math.ceil(cfg.shard_size / cfg.batch_size)  # sampling calls (and stop points) per round
    for settings in cfg.samplers:
        sampler = ctx.spec.parse_sampler(settings)
        set_dir = ctx.synth_dir(settings)
        tag = set_dir.name  # sampler_tag, or an older run's folder name
        stream = legacy_sampler_tag(settings)  # S's random stream: its key predates the folder names
        set_dir.mkdir(parents=True, exist_ok=True)
        record_settings = {"sampler": dataclasses.asdict(sampler), "model": ctx.cfg.model.name}
        rounds = math.ceil(n_shards / world)
        with progress(f"synth {tag}", rounds) as bar:
            for r in range(rounds):
                c = r * world + rank
                path = set_dir / shard_name(c)
                todo = c < n_shards and not path.exists()
                count = min(cfg.shard_size, cfg.n - c * cfg.shard_size)
                batches = sample_batches(ctx, model, count, rng.generator(cfg.seed, stream, c), sampler,
                                         cfg.batch_size, c * cfg.shard_size) if todo else ()
                # a stop point per sampling batch, as many on every rank, with work or without
                parts = list(stop.turns(batches, per_shard, f"synth {tag} (shard round {r + 1}/{rounds})",
                                        f"finished shards kept in {set_dir}"))
                if todo:
                    write_shard(path, {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, record_settings,
                                key_prefix=f"{c:06d}")
                bar.update()
        dist.barrier()
        if dist.is_main():
            shards = [{"name": shard_name(c), "count": min(cfg.shard_size, cfg.n - c * cfg.shard_size)} for c in range(n_shards)]
            write_manifest(set_dir, shards, sampler=settings, n=cfg.n)
        log(f"synth {tag}: {cfg.n} samples in {n_shards} shard(s) -> {set_dir}")
    stage.mark_done()
