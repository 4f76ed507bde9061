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
import dataclasses
import json
import math
import pathlib
import time
from typing import Any, Callable

import torch

from .. import dist, rng, stop
from ..console import log, progress
from ..data.stream import MicroBatchLoader
from ..config import TrainConfig
from ..errors import NeonError
from ..io import atomic_path, disk_errors, write_json, write_text
from ..merge.sources import TensorMeta
from ..merge.writer import StreamingSafetensorsWriter
from ..train import train_state
from ..train.ema import PartitionEMA
from ..train.deepspeed_config import micro_batch_size
from ..train.deepspeed_engine import fp32_layout, fp32_tensors, initialize
from ..tracking import Tracker, open_tracker
from .common import RunContext, StageDir


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
                out_dir, out_dir.name, lambda step: out_dir / f"theta_s-step{step:06d}.safetensors")


def run_trainer(ctx: RunContext, cfg: TrainConfig, build: Callable[[], torch.nn.Module], data_dir: pathlib.Path,
                out_dir: pathlib.Path, tag: str, export: Callable[[int], pathlib.Path]) -> None:
    """The one DeepSpeed trainer (fine-tunes, and image bases trained from scratch): the model that
    `build()` returns, trained on the shards of `data_dir` with `cfg`; its weights (the EMA when on)
    written to `export(step)` at every save step; checkpoints, metrics.jsonl and done.json in `out_dir`."""
    if (out_dir / "done.json").is_file():
        log(f"train {tag}: complete, skipped")
        return
    save_steps = sorted(set(cfg.save_steps))
    total = save_steps[-1]

    # ------------------------------------------------------------------ Set up the engine
    ckpt_dir = out_dir / "ckpt"
    micro = micro_batch_size(cfg, dist.world())  # before the model is built: a bad batch split fails at once
    engine, ema, null = _set_up_engine(ctx, cfg, build)
    # ------------------------------------------------------------------ Resume
    state = _resume(engine, ckpt_dir, ema, cfg, tag)
    start = int(state.get("step", 0))
    loader = MicroBatchLoader(data_dir, micro, cfg.seed, dist.rank(), dist.world(), cfg.workers, cfg.skip_bad,
                              state.get("loader"), grad_accum=cfg.grad_accum)  # at the checkpoint's stream position
    run = _Run(cfg, tag, engine, ema, loader, null, ckpt_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = out_dir / "metrics.jsonl"
    _trim_metrics(metrics, start)

    # ------------------------------------------------------------------ Train
    name = str(out_dir.relative_to(ctx.run_dir)) if out_dir.is_relative_to(ctx.run_dir) else tag
    purge = start + 1 if start else None  # TensorBoard then hides what a stopped run logged after its checkpoint
    with progress(f"train {tag}", total) as bar, open_tracker(ctx.run_dir, ctx.cfg.run, name, purge_step=purge) as tracker:
        bar.update(completed=start)
        speed = _Throughput(start, cfg.global_batch)
        for step in range(start, total):
            # ---------------------------------------------------------- One optimizer step
            done = step + 1
            loss_sum, norm = _optimizer_step(run, step)
            _check_finite(run, done, loss_sum, norm)
            if ema is not None and engine.was_step_applied():  # fp16: not when the loss scaler skipped it
                ema.update()
            # ---------------------------------------------------------- Report status
            if done % cfg.log_every == 0 or done == total:
                _report_status(run, done, loss_sum, norm, speed, metrics, bar, tracker)
            # ---------------------------------------------------------- Save snapshot
            if done in save_steps:
                _export_weights(run, done, export)
            saved = done in save_steps or _crossed_checkpoint(cfg, step)
            if saved:
                run.save_checkpoint(done)
            # ---------------------------------------------------------- Stop on a signal (all ranks agree)
            if done < total and stop.agreed():
                _stop(run, done, saved)

    # ------------------------------------------------------------------ Done
    bad = run.bad_total()
    if dist.is_main():
        write_json(out_dir / "done.json", {"steps": save_steps, "bad_records": bad})
    log(f"train {tag}: weights at steps {save_steps} -> {export(save_steps[-1]).parent}")


@dataclasses.dataclass
class _Run:
    """What the phases of one training run share."""
    cfg: TrainConfig
    tag: str
    engine: Any
    ema: PartitionEMA | None
    loader: MicroBatchLoader
    null: int | None  # the null class of label dropout; None without it
    ckpt_dir: pathlib.Path

    def bad_total(self) -> int:  # collective
        return int(dist.all_reduce_sum(torch.tensor([self.loader.bad], dtype=torch.float64)).item())

    def save_checkpoint(self, step: int) -> None:
        train_state.save(self.engine, self.ckpt_dir, step, {"loader": self.loader.state(self.bad_total())}, self.ema,
                         self.cfg.keep_last)


def _set_up_engine(ctx: RunContext, cfg: TrainConfig,
                   build: Callable[[], torch.nn.Module]) -> tuple[Any, PartitionEMA | None, int | None]:
    """(the DeepSpeed engine around build()'s model, its EMA or None, the null class of label
    dropout or None)."""
    model = build()
    if cfg.activation_checkpointing:
        ctx.spec.enable_activation_checkpointing(model)
    null = ctx.spec.null_class(ctx.model_args()) if cfg.label_dropout > 0 else None
    engine = initialize(ctx.spec, model, cfg, dist.world())
    ema = PartitionEMA(engine, cfg.ema_decay) if cfg.ema_decay > 0 else None
    return engine, ema, null


def _resume(engine, ckpt_dir: pathlib.Path, ema: PartitionEMA | None, cfg: TrainConfig, tag: str) -> dict:
    """Weights, optimizer and EMA from the newest checkpoint in ckpt_dir; its trainer state ({} when
    there is none: a fresh run)."""
    state = train_state.resume(engine, ckpt_dir, ema) or {}
    start, world = int(state.get("step", 0)), dist.world()
    if start:
        how = "" if state.get("world", world) == world else f", re-partitioned from {state['world']} to {world} rank(s)"
        log(f"train {tag}: resuming from step {start} ({start * cfg.global_batch} images seen{how})")
    return state


def _optimizer_step(run: _Run, step: int) -> tuple[float, float | None]:
    """One optimizer step over grad_accum micro-batches: (the summed loss, the gradient norm or None)."""
    cfg, engine = run.cfg, run.engine
    loss_sum, norm = 0.0, None
    for k in range(cfg.grad_accum):
        batch = run.loader.next()
        offset = batch.pop("__offset__")
        if run.null is not None:  # noise follows the sample's place in the step, not the rank
            batch = drop_labels(batch, cfg.label_dropout, run.null,
                                rng.StepNoise((cfg.seed, "labels", step), cfg.global_batch, offset))
        loss = engine(batch, rng.StepNoise((cfg.seed, "loss", step), cfg.global_batch, offset))
        engine.backward(loss)
        if k == cfg.grad_accum - 1:
            norm = _grad_norm_before_step(engine)
        engine.step()
        loss_sum += loss.item()
    norm = engine.get_global_grad_norm() if norm is None else norm
    return loss_sum, None if norm is None else float(norm)


def _check_finite(run: _Run, done: int, loss_sum: float, norm: float | None) -> None:
    """Guards (collective): a non-finite loss or gradient norm on any rank ends the run, on every rank."""
    cfg, tag = run.cfg, run.tag
    if dist.any_flag(not math.isfinite(loss_sum)):
        raise NeonError(f"train {tag}: non-finite loss at step {done}; last good checkpoint kept in {run.ckpt_dir}")
    # fp16 overflows are the loss scaler's business (DeepSpeed skips the step); not so in fp32/bf16
    if dist.any_flag(norm is not None and not math.isfinite(norm) and cfg.dtype != "fp16"):
        raise NeonError(f"train {tag}: non-finite gradient norm at step {done}; last good checkpoint kept "
                        f"in {run.ckpt_dir}")


class _Throughput:
    """Images per second between two status reports."""

    def __init__(self, step: int, global_batch: int):
        self.tick, self.step, self.global_batch = time.perf_counter(), step, global_batch

    def since_last(self, step: int) -> float:
        now = time.perf_counter()
        speed = (step - self.step) * self.global_batch / max(now - self.tick, 1e-9)
        self.tick, self.step = now, step
        return speed


def _report_status(run: _Run, done: int, loss_sum: float, norm: float | None, throughput: _Throughput,
                   metrics: pathlib.Path, bar, tracker: Tracker) -> None:
    """A line of metrics.jsonl and the tracker's curves (rank 0), the progress bar (collective)."""
    cfg = run.cfg
    mean = dist.all_reduce_sum(torch.tensor([loss_sum / cfg.grad_accum], dtype=torch.float64)).item() / dist.world()
    bad = run.bad_total()
    speed = throughput.since_last(done)
    lr = run.engine.get_lr()[0]
    if dist.is_main():
        row = {"step": done, "images": done * cfg.global_batch, "loss": mean, "lr": lr, "grad_norm": norm,
               "images_per_s": round(speed, 1), "bad_records": bad}
        with disk_errors(metrics), open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        tracker.scalars("train", {k: row[k] for k in ("loss", "lr", "grad_norm", "images_per_s")}, done)
    bar.update(completed=done, info=f"loss {mean:.5f}  lr {lr:.2e}  {speed:,.0f} img/s"
                                     + (f"  bad {bad}" if bad else ""))


def _export_weights(run: _Run, done: int, export: Callable[[int], pathlib.Path]) -> None:
    """theta at a save step as fp32 safetensors (the EMA when on): every rank takes part in each
    tensor's gather; rank 0 streams them to the file one at a time (never a whole model in memory)."""
    ema = run.ema
    metadata = {"step": done, "sampler": run.tag, "weights": "ema" if ema else "model"}
    with ema.swapped_in() if ema is not None else contextlib.nullcontext():
        tensors = fp32_tensors(run.engine)
        if not dist.is_main():
            for _ in tensors:  # the gathers are collective
                pass
            return
        layout = [(name, TensorMeta(shape, dtype)) for name, shape, dtype in fp32_layout(run.engine)]
        with atomic_path(export(done)) as tmp:
            writer = StreamingSafetensorsWriter(tmp, layout, metadata)
            for name, value in tensors:
                writer.write(name, value)
            writer.close()


def _crossed_checkpoint(cfg: TrainConfig, step: int) -> bool:
    """Whether step -> step + 1 crosses a multiple of ckpt_every_images images."""
    every = cfg.ckpt_every_images
    return every > 0 and ((step + 1) * cfg.global_batch) // every > (step * cfg.global_batch) // every


def _stop(run: _Run, done: int, saved: bool) -> None:
    """End on a stop signal, with a checkpoint at this step (the rerun resumes exactly here)."""
    if not saved:
        run.save_checkpoint(done)
    raise stop.Stopped(stop.message(f"train {run.tag}", f"checkpoint at step {done} ({done * run.cfg.global_batch} "
                                                        f"images) in {run.ckpt_dir}"))


def run(ctx: RunContext) -> None:
    stage = StageDir(ctx.run_dir / "train", ctx.fingerprint("train"), "train")
    if stage.is_done():
        log("train: complete, skipped")
        return
    stage.prepare()
    for settings in ctx.cfg.synth.samplers:
        finetune(ctx, settings)
    stage.mark_done()
