"""Stage `train`: fine-tune theta_r on each synthetic set with a DeepSpeed engine -> theta_s.

Data streams from the synth shards (data/stream.py). theta_s (fp32: the EMA when
`train.ema_decay` > 0, else the master weights) is exported as safetensors at every
`train.save_steps`. DeepSpeed checkpoints (train/train_state.py) every `train.ckpt_every_images`
images, at each save step and at the end make a killed run resume exactly: the data-stream
positions, the EMA and the optimizer are restored, and the loss noise is a function of (seed,
step, rank), not of history.
"""
from __future__ import annotations

import contextlib
import json
import math
import pathlib
import time
from typing import Callable

import torch

from .. import dist, rng, stop
from ..console import log, progress
from ..data.stream import MicroBatchLoader
from ..config import TrainConfig
from ..errors import NeonError
from ..io import disk_errors, save_state_dict, write_json, write_text
from ..train import train_state
from ..train.ema import PartitionEMA
from ..train.deepspeed_config import micro_batch_size
from ..train.deepspeed_engine import full_fp32_state_dict, initialize
from ..tracking import open_tracker
from .common import RunContext, StageDir, sampler_tag


def drop_labels(batch: dict[str, torch.Tensor], p: float, null: int, noise) -> dict[str, torch.Tensor]:
    """Label dropout for classifier-free guidance: each label becomes `null` with probability p
    (`noise`: a torch.Generator or the step's rng.StepNoise)."""
    labels = batch["cls"]
    drop = rng.rand(noise, labels.shape) < p
    return {**batch, "cls": torch.where(drop, torch.full_like(labels, null), labels)}


def _trim_metrics(path, step: int) -> None:
    """Drop log lines past the resumed step so the file reads like an uninterrupted run."""
    if dist.is_main() and path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        write_text(path, "".join(ln + "\n" for ln in lines))


def _grad_norm_before_step(engine) -> float | None:
    """Without ZeRO DeepSpeed reports no gradient norm; compute it from the (all-reduced) grads."""
    if engine.zero_optimization_stage() > 0:
        return None
    grads = [p.grad.detach().float().norm() ** 2 for p in engine.module.parameters() if p.grad is not None]
    return math.sqrt(sum(g.item() for g in grads)) if grads else 0.0


def finetune(ctx: RunContext, settings: dict) -> None:
    """theta_r fine-tuned on the synthetic set of one sampler setting -> theta_s at every save step."""
    out_dir = ctx.train_dir(settings)
    run_trainer(ctx, ctx.cfg.train, lambda: ctx.load_model(ctx.base_weights()).train(), ctx.synth_dir(settings),
                out_dir, sampler_tag(settings), lambda step: out_dir / f"theta_s-step{step:06d}.safetensors")


def run_trainer(ctx: RunContext, cfg: TrainConfig, build: Callable[[], torch.nn.Module], data_dir: pathlib.Path,
                out_dir: pathlib.Path, tag: str, export: Callable[[int], pathlib.Path]) -> None:
    """The one DeepSpeed trainer (fine-tunes, and image bases trained from scratch): the model that
    `build()` returns, trained on the shards of `data_dir` with `cfg`; its weights (the EMA when on)
    written to `export(step)` at every save step; checkpoints, metrics.jsonl and done.json in `out_dir`."""
    ckpt_dir = out_dir / "ckpt"
    save_steps = sorted(set(cfg.save_steps))
    if (out_dir / "done.json").is_file():
        log(f"train {tag}: complete, skipped")
        return
    rank, world = dist.rank(), dist.world()
    micro = micro_batch_size(cfg, world)
    model = build()
    if cfg.activation_checkpointing:
        ctx.spec.enable_activation_checkpointing(model)
    null = ctx.spec.null_class(ctx.model_args()) if cfg.label_dropout > 0 else None
    engine = initialize(ctx.spec, model, cfg, world)
    ema = PartitionEMA(engine, cfg.ema_decay) if cfg.ema_decay > 0 else None
    state = train_state.resume(engine, ckpt_dir, ema) or {}
    start = int(state.get("step", 0))
    if start:
        how = "" if state.get("world", world) == world else f", re-partitioned from {state['world']} to {world} rank(s)"
        log(f"train {tag}: resuming from step {start} ({start * cfg.global_batch} images seen{how})")
    loader = MicroBatchLoader(data_dir, micro, cfg.seed, rank, world, cfg.workers, cfg.skip_bad,
                              state.get("loader"), grad_accum=cfg.grad_accum)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = out_dir / "metrics.jsonl"
    _trim_metrics(metrics, start)
    total = save_steps[-1]

    def bad_total() -> int:  # collective
        return int(dist.all_reduce_sum(torch.tensor([loader.bad], dtype=torch.float64)).item())

    def save_checkpoint(step: int) -> None:
        train_state.save(engine, ckpt_dir, step, {"loader": loader.state(bad_total())}, ema, cfg.keep_last)

    name = str(out_dir.relative_to(ctx.run_dir)) if out_dir.is_relative_to(ctx.run_dir) else tag
    purge = start + 1 if start else None  # TensorBoard then hides what a stopped run logged after its checkpoint
    with progress(f"train {tag}", total) as bar, open_tracker(ctx.run_dir, ctx.cfg.run, name, purge_step=purge) as tracker:
        bar.update(completed=start)
        tick, tick_step = time.perf_counter(), start
        for step in range(start, total):
            # ---------------------------------------------------------- One optimizer step
            loss_sum, norm = 0.0, None
            for k in range(cfg.grad_accum):
                batch = loader.next()
                offset = batch.pop("__offset__")
                if null is not None:  # noise follows the sample's place in the step, not the rank
                    batch = drop_labels(batch, cfg.label_dropout, null,
                                        rng.StepNoise((cfg.seed, "labels", step), cfg.global_batch, offset))
                loss = engine(batch, rng.StepNoise((cfg.seed, "loss", step), cfg.global_batch, offset))
                engine.backward(loss)
                if k == cfg.grad_accum - 1:
                    norm = _grad_norm_before_step(engine)
                engine.step()
                loss_sum += loss.item()
            done = step + 1
            norm = engine.get_global_grad_norm() if norm is None else norm
            norm = None if norm is None else float(norm)
            if dist.any_flag(not math.isfinite(loss_sum)):
                raise NeonError(f"train {tag}: non-finite loss at step {done}; last good checkpoint kept in {ckpt_dir}")
            # fp16 overflows are the loss scaler's business (DeepSpeed skips the step); not so in fp32/bf16
            if dist.any_flag(norm is not None and not math.isfinite(norm) and cfg.dtype != "fp16"):
                raise NeonError(f"train {tag}: non-finite gradient norm at step {done}; last good checkpoint kept "
                                f"in {ckpt_dir}")
            if ema is not None and engine.was_step_applied():
                ema.update()
            # ---------------------------------------------------------- Report status
            if done % cfg.log_every == 0 or done == total:
                mean = dist.all_reduce_sum(torch.tensor([loss_sum / cfg.grad_accum], dtype=torch.float64)).item() / world
                bad = bad_total()
                now = time.perf_counter()
                speed = (done - tick_step) * cfg.global_batch / max(now - tick, 1e-9)
                tick, tick_step = now, done
                lr = engine.get_lr()[0]
                if dist.is_main():
                    row = {"step": done, "images": done * cfg.global_batch, "loss": mean, "lr": lr, "grad_norm": norm,
                           "images_per_s": round(speed, 1), "bad_records": bad}
                    with disk_errors(metrics), open(metrics, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    tracker.scalars("train", {k: row[k] for k in ("loss", "lr", "grad_norm", "images_per_s")}, done)
                bar.update(completed=done, info=f"loss {mean:.5f}  lr {lr:.2e}  {speed:,.0f} img/s"
                                                 + (f"  bad {bad}" if bad else ""))
            # ---------------------------------------------------------- Save snapshot
            if done in save_steps:
                with ema.swapped_in() if ema is not None else contextlib.nullcontext():
                    state_dict = full_fp32_state_dict(engine)
                if dist.is_main():
                    save_state_dict(export(done), state_dict,
                                    {"step": done, "sampler": tag, "weights": "ema" if ema else "model"})
            every = cfg.ckpt_every_images
            crossed = every > 0 and (done * cfg.global_batch) // every > (step * cfg.global_batch) // every
            saved = done in save_steps or crossed
            if saved:
                save_checkpoint(done)
            # ---------------------------------------------------------- Stop on a signal (all ranks agree)
            if done < total and stop.agreed():
                if not saved:
                    save_checkpoint(done)
                raise stop.Stopped(stop.message(f"train {tag}", f"checkpoint at step {done} ({done * cfg.global_batch} "
                                                                f"images) in {ckpt_dir}"))
    bad = bad_total()
    if dist.is_main():
        write_json(out_dir / "done.json", {"steps": save_steps, "bad_records": bad})
    log(f"train {tag}: weights at steps {save_steps} -> {export(save_steps[-1]).parent}")


def run(ctx: RunContext) -> None:
    stage = StageDir(ctx.run_dir / "train", ctx.fingerprint("train"), "train")
    if stage.is_done():
        log("train: complete, skipped")
        return
    stage.prepare()
    for settings in ctx.cfg.synth.samplers:
        finetune(ctx, settings)
    stage.mark_done()
