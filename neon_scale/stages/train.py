"""Stage `train`: fine-tune theta_r on each synthetic set with a DeepSpeed engine -> theta_s.

theta_s (fp32 master weights) is exported as safetensors at every `train.save_steps`. A DeepSpeed
checkpoint every `train.ckpt_every` steps (and at each save step) makes a killed run resume
exactly: the data order and the loss noise are functions of (seed, step, rank), not of history.
"""
from __future__ import annotations

import json
import math
import shutil

import torch

from .. import dist, rng
from ..console import log, progress
from ..data.loader import load_rank_batches
from ..errors import NeonError
from ..io import save_state_dict, write_json, write_text
from ..train.engine import full_fp32_state_dict, initialize, micro_batch_size
from .common import RunContext, StageDir, sampler_tag


def _resume(engine, ckpt_dir) -> int:
    if not (ckpt_dir / "latest").is_file():
        return 0
    path, client = engine.load_checkpoint(str(ckpt_dir), load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise NeonError(f"{ckpt_dir}: cannot load the DeepSpeed checkpoint named by 'latest'")
    return int(client["step"])


def _save_checkpoint(engine, ckpt_dir, step: int) -> None:
    tag = f"step{step:06d}"
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step})
    dist.barrier()
    if dist.is_main():  # keep only the newest: `latest` already names it
        for old in ckpt_dir.iterdir():
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old)
    dist.barrier()


def _trim_metrics(path, step: int) -> None:
    """Drop log lines past the resumed step so the file reads like an uninterrupted run."""
    if dist.is_main() and path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        write_text(path, "".join(ln + "\n" for ln in lines))


def finetune(ctx: RunContext, settings: dict) -> None:
    cfg = ctx.cfg.train
    out_dir, ckpt_dir = ctx.train_dir(settings), ctx.train_dir(settings) / "ckpt"
    tag = sampler_tag(settings)
    save_steps = sorted(set(cfg.save_steps))
    if (out_dir / "done.json").is_file():
        log(f"train {tag}: complete, skipped")
        return
    rank, world = dist.rank(), dist.world()
    batches = load_rank_batches(ctx.synth_dir(settings), micro_batch_size(cfg, world), cfg.seed, rank, world)
    model = ctx.load_model(ctx.base_weights()).train()
    engine = initialize(ctx.spec, model, cfg, world)
    start = _resume(engine, ckpt_dir)
    if start:
        log(f"train {tag}: resuming from step {start}")
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = out_dir / "metrics.jsonl"
    _trim_metrics(metrics, start)
    total = save_steps[-1]
    with progress(f"train {tag}", total) as bar:
        bar.update(completed=start)
        for step in range(start, total):
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                batch = batches.get(step * cfg.grad_accum + micro)
                loss = engine(batch, rng.generator(cfg.seed, "loss", step, micro, rank))
                engine.backward(loss)
                engine.step()
                loss_sum += loss.item()
            done = step + 1
            if dist.any_flag(not math.isfinite(loss_sum)):
                raise NeonError(f"train {tag}: non-finite loss at step {done}; last good checkpoint kept in {ckpt_dir}")
            if done % cfg.log_every == 0 or done == total:
                mean = dist.all_reduce_sum(torch.tensor([loss_sum / cfg.grad_accum], dtype=torch.float64)).item() / world
                if dist.is_main():
                    with open(metrics, "a") as f:
                        f.write(json.dumps({"step": done, "loss": mean, "lr": engine.get_lr()[0]}) + "\n")
                bar.update(completed=done, info=f"loss {mean:.5f}")
            if done in save_steps:
                state = full_fp32_state_dict(engine)
                if dist.is_main():
                    save_state_dict(out_dir / f"theta_s-step{done:06d}.safetensors", state, {"step": done, "sampler": tag})
            if done in save_steps or done % cfg.ckpt_every == 0:
                _save_checkpoint(engine, ckpt_dir, done)
    dist.barrier()
    if dist.is_main():
        write_json(out_dir / "done.json", {"steps": save_steps})
    log(f"train {tag}: theta_s at steps {save_steps} -> {out_dir}")


def run(ctx: RunContext) -> None:
    stage = StageDir(ctx.run_dir / "train", ctx.fingerprint("train"), "train")
    if stage.is_done():
        log("train: complete, skipped")
        return
    stage.prepare()
    for settings in ctx.cfg.synth.samplers:
        finetune(ctx, settings)
    stage.mark_done()
