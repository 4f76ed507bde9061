"""`neon plan` and `neon run --dry-run`: what a config will do, stage by stage, without running it.

`make_plan(cfg)` is a pure function of the config (it reads no run output and writes nothing):
per stage the work (images to synthesize, optimizer steps and training images, the sweep's points
per checkpoint, images sampled and feature extractions) and, given throughputs (`Rates`: stated,
or measured by `measure` on a few batches), the time. The sweep's work is exact for `grid` and a
range for the rules that stop early (`early_stop`, `race`; see `sweep_points`). `format_plan`
renders the plan as plain text (no markup, lines never cut), `check` lists what looks wrong: an lr
that ends far below its target (the lr DeepSpeed applies at the last step, `lr_at_step`), a grid
beyond the bound, a refine point the sampler rejects, w_max off the grid, final_n below eval.n.

Config files that do not exist yet (base.weights, the VAE, the backbone weights, the reference
statistics) do not stop a plan: `load_plan_config` validates everything else and names them.
"""
from __future__ import annotations

import contextlib
import math
import os
import pathlib
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import dist
from ..console import console
from ..data.real import load_real  # cached: the config's validation has already read data.source
from ..config import MAX_GRID, Config, TrainConfig, load_config, missing_files
from ..errors import NeonError
from ..specs.registry import get_spec
from ..train.deepspeed_config import deepspeed_config, micro_batch_size
from .common import RunContext, sampler_tag
from .evaluate import chunk_counts

LR_FLAG_RATIO = 0.01  # flag a run whose lr at the last step is below 1% of train.lr

# ----------------------------------------------------------------------------------- the config

def load_plan_config(path: str, overrides: list[str] = ()) -> tuple[Config, list[str]]:
    """(the validated config, one line per configured file that does not exist). Every other check
    of `load_config` applies (a bad config is the usual one-line NeonError)."""
    cfg = load_config(path, overrides, check_files=False)
    return cfg, missing_files(cfg)


# ----------------------------------------------------------------------------------- the lr

def lr_at_step(ds: dict, step: int) -> Optional[float]:
    """The lr DeepSpeed applies at optimizer step `step` (1-based) of a run with DeepSpeed config
    `ds` (train/deepspeed_config.py), as its engine does: the scheduler is built at iteration -1
    (lr = warmup_min_lr) and stepped after each optimizer step, so step s runs at iteration s - 2.
    WarmupLR (linear, log) and WarmupDecayLR; None for another scheduler (not computed)."""
    base = ds["optimizer"]["params"]["lr"]
    sched = ds.get("scheduler")
    if not sched:
        return base
    kind, p = sched.get("type"), sched.get("params", {})
    if kind not in ("WarmupLR", "WarmupDecayLR"):
        return None
    lo, hi = p.get("warmup_min_lr", 0.0), p.get("warmup_max_lr", base)
    warmup = max(2, int(p.get("warmup_num_steps", 1000)))
    it = step - 2
    if it < 0:
        return lo
    if it < warmup:
        gamma = math.log(it + 1) / math.log(warmup) if p.get("warmup_type", "log") == "log" else it / warmup
    elif kind == "WarmupDecayLR":
        total = int(p["total_num_steps"])
        gamma = max(0.0, (total - it) / max(1.0, total - warmup))
    else:
        gamma = 1.0
    return lo + (hi - lo) * gamma


def check_lr(t: TrainConfig, prefix: str) -> Optional[str]:
    """A flag when the lr at the last save step is below LR_FLAG_RATIO of `prefix`.lr."""
    last = max(t.save_steps)
    lr = lr_at_step(deepspeed_config(t, 1), last)
    if lr is None or t.lr <= 0 or lr >= LR_FLAG_RATIO * t.lr:
        return None
    orders = math.log10(t.lr / lr) if lr > 0 else math.inf
    why = (f"{prefix}.warmup_steps = {t.warmup_steps} and the run ends at step {last}, "
           f"{100 * last / t.warmup_steps:.2g}% of the warmup") if t.warmup_steps > last else "the schedule"
    return (f"{prefix}: lr at the last step ({last}) is {lr:.3g}, {orders:.1f} orders of magnitude below "
            f"{prefix}.lr = {t.lr:g} ({why})")


# ----------------------------------------------------------------------------------- the sweep

def _key(w: float, g) -> tuple:
    return round(w, 6), (None if g is None else round(g, 6))


def _refine(center: tuple, ws: list[float], gs: list, refine_w: float, refine_g: float) -> set:
    """The 3 x 3 refine grid around `center`, as selection's rule builds it (w kept in range; a zero
    half-width, or a single guidance value, collapses that axis)."""
    bw, bg = center
    dws = (-refine_w, 0.0, refine_w) if refine_w > 0 else (0.0,)
    dgs = (-refine_g, 0.0, refine_g) if refine_g > 0 and len(gs) > 1 else (0.0,)
    lo, hi = min(ws), max(ws)
    return {_key(bw + dw, None if bg is None else bg + dg) for dw in dws for dg in dgs
            if lo - 1e-9 <= bw + dw <= hi + 1e-9}


@dataclass
class SweepPoints:
    """Points per checkpoint of the selection rule: exact (low == high) for grid. `grid` is the
    coarse grid's size, `w0` its points at w = 0 (evaluated once, shared by the checkpoints);
    refine_*: points the refine grid adds beyond the coarse grid (refine_low_w: those off w = 0, which
    no other checkpoint can have sampled)."""
    mode: str
    low: int
    high: int
    grid: int
    w0: int
    coarse_low: int
    refine_low: int = 0
    refine_high: int = 0
    refine_low_w: int = 0
    rounds: list = field(default_factory=list)  # race: the n of each round


def sweep_points(cfg: Config) -> SweepPoints:
    """Bounds on the points the selection rule evaluates per checkpoint (neon_scale.selection):
    - grid: every (w, guidance), exactly;
    - early_stop: at least w = 0 and the first w of each direction, the guidance loop stopping after
      its second value (the first always sets the best), plus the fewest refine points any such walk
      leaves (`_early_stop_low`); at most the whole coarse grid and the largest refine grid off it;
    - race: the whole grid at round one, the refine grid's new points (racing from n0); how many
      reach which n is `sweep_images`' business."""
    sw = cfg.sweep
    ws, gs = sw.w_grid(), list(sw.guidance) or [None]
    grid = {_key(w, g) for w in ws for g in gs}
    w0 = sum(1 for k in grid if k[0] == 0.0)
    if sw.mode == "grid":
        return SweepPoints("grid", len(grid), len(grid), len(grid), w0, len(grid))
    refines = sw.refine_w > 0 or (sw.refine_guidance > 0 and len(gs) > 1)
    if not refines:
        r_low = r_high = r_low_w = 0
    elif len(grid) > 100_000:  # not enumerated (the plan flags the grid's size)
        r_low, r_high, r_low_w = 0, 8, 0
    else:
        new = [_refine(p, ws, gs, sw.refine_w, sw.refine_guidance) - grid for p in grid]
        r_low, r_high = min(map(len, new)), max(map(len, new))
        r_low_w = min(sum(1 for k in n if k[0] != 0.0) for n in new)
    if sw.mode == "race":
        n, rounds = min(sw.race.n0, cfg.eval.n), []
        while True:
            rounds.append(n)
            if n >= cfg.eval.n:
                break
            n = min(2 * n, cfg.eval.n)
        return SweepPoints("race", len(grid) + r_low, len(grid) + r_high, len(grid), w0, len(grid), r_low, r_high,
                           r_low_w, rounds)
    inner = min(2, len(gs))
    sides = int(any(w > 0 for w in ws)) + int(any(w < 0 for w in ws))
    coarse_low = inner * (1 + sides)
    low, low_w = (coarse_low, coarse_low) if not refines else \
        _early_stop_low(ws, gs, sw.refine_w, sw.refine_guidance, inner)
    return SweepPoints("early_stop", low, len(grid) + r_high, len(grid), w0, coarse_low, low - coarse_low, r_high,
                       low_w - coarse_low)


def _early_stop_low(ws: list[float], gs: list, refine_w: float, refine_g: float, inner: int) -> tuple[int, int]:
    """The fewest points early_stop can evaluate, with and without refine points at w = 0: over every
    walk (the first k+ w > 0 and k- w < 0, each at least one when its side has points; each w at least
    `inner` guidance values), the coarse points plus the fewest refine points off the walk's ws, around
    any point of it. Very large grids: the first step of each direction and no refine point (a bound)."""
    pos = [w for w in ws if w > 0]
    neg = [w for w in reversed(ws) if w < 0]
    ks_pos = range(1, len(pos) + 1) if pos else [0]
    ks_neg = range(1, len(neg) + 1) if neg else [0]
    if len(ks_pos) * len(ks_neg) * len(ws) * len(gs) > 200_000:
        n = inner * (1 + bool(pos) + bool(neg))
        return n, n
    best = best_w = math.inf
    for kp in ks_pos:
        for kn in ks_neg:
            walk = [0.0, *pos[:kp], *neg[:kn]]
            seen = {_key(w, g) for w in walk for g in gs}
            coarse = inner * len(walk)
            for p in seen:
                new = _refine(p, ws, gs, refine_w, refine_g) - seen
                best = min(best, coarse + len(new))
                best_w = min(best_w, coarse + sum(1 for k in new if k[0] != 0.0))
    return int(best), int(best_w)


def new_samples(have: int, want: int, chunk: int) -> int:
    """Samples a point evaluated at `have` draws anew for `want` (chunks of the same index and
    size are reused: stages/evaluate.py)."""
    reused = set(enumerate(chunk_counts(have, chunk))) if have else set()
    return sum(c for _i, c in set(enumerate(chunk_counts(want, chunk))) - reused)


@dataclass
class SweepImages:
    low: int
    high: int
    final: tuple = (0, 0)
    repeats: tuple = (0, 0)


def sweep_images(cfg: Config, pts: SweepPoints, checkpoints: int) -> SweepImages:
    """Images the sweep samples (each once: its features are kept until the checkpoint is done) over
    every checkpoint: the coarse w = 0 points once, the rest per checkpoint, a race's point at n
    costing n in all; final_n at each best point beyond the chunks it reuses; the repeats."""
    sw, ev, c = cfg.sweep, cfg.eval, checkpoints
    if pts.mode == "race":
        n_low, n_high = pts.rounds[0], pts.rounds[-1]
    else:
        n_low = n_high = ev.n
    if pts.mode == "grid":
        low = high = ev.n * (pts.w0 + c * (pts.grid - pts.w0))
    elif pts.mode == "race":
        low = n_low * (pts.w0 + c * (pts.grid - pts.w0 + pts.refine_low_w))
        high = n_high * (pts.w0 + c * (pts.grid - pts.w0 + pts.refine_high))
    else:
        inner = min(2, pts.w0)
        low = ev.n * (inner + c * (pts.coarse_low - inner + pts.refine_low_w))
        high = ev.n * (pts.w0 + c * (pts.grid - pts.w0 + pts.refine_high))
    final = (0, 0)
    if sw.final_n:
        final = (c * new_samples(n_high, sw.final_n, ev.chunk), c * new_samples(n_low, sw.final_n, ev.chunk))
    repeats = (sw.repeats * ev.n * (1 + c), sw.repeats * ev.n * 2 * c) if sw.repeats else (0, 0)
    return SweepImages(low + final[0] + repeats[0], high + final[1] + repeats[1], final, repeats)


# ----------------------------------------------------------------------------------- the plan

@dataclass
class Rates:
    """Throughputs, images (or samples) per second: `sample` (drawing images; in the sweep with
    their feature extraction), `train` (training images through forward, backward, step)."""
    sample: Optional[float] = None
    train: Optional[float] = None
    how: str = "stated"


@dataclass
class Work:
    what: str
    low: float
    high: float
    rate: Optional[str] = None  # "sample" | "train": the throughput that turns it into time
    unit: str = ""


@dataclass
class StagePlan:
    name: str
    work: list[Work] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, what: str, low, high=None, rate: Optional[str] = None, unit: str = "") -> None:
        self.work.append(Work(what, low, low if high is None else high, rate, unit))

    def seconds(self, rates: Rates) -> tuple[Optional[float], Optional[float]]:
        """(low, high) seconds; None where a needed throughput is not known (0 without timed work)."""
        low = high = 0.0
        for w in self.work:
            if w.rate is None:
                continue
            r = getattr(rates, w.rate)
            if not r:
                return None, None
            low, high = low + w.low / r, high + w.high / r
        return low, high


@dataclass
class Plan:
    name: str
    model: str
    run_dir: str
    stages: list[StagePlan]
    flags: list[str]
    missing: list[str]
    rates: Rates
    sampled: tuple = (0, 0)   # images sampled, all stages
    trained: tuple = (0, 0)   # training images, all stages

    def seconds(self) -> tuple[float, float, list[str]]:
        """(low, high) seconds of the stages whose throughputs are known, and the others' names."""
        parts = {s.name: s.seconds(self.rates) for s in self.stages}
        known = [p for p in parts.values() if p[0] is not None]
        return sum(p[0] for p in known), sum(p[1] for p in known), [n for n, p in parts.items() if p[0] is None]


def _base_stage(cfg: Config, spec) -> tuple[StagePlan, int]:
    st, trained = StagePlan("base"), 0
    b = cfg.base
    if b.weights:
        st.add(f"theta_r from base.weights ({b.weights}), checked and copied", 1, unit="file")
    elif b.random_init:
        st.add("theta_r: the model's random initialisation (base.random_init)", 1, unit="model")
    elif spec.makes_images:
        t = b.train
        steps = max(t.save_steps)
        trained = steps * t.global_batch
        st.add(f"optimizer steps on data.source ({cfg.data.source})", steps, unit="steps")
        st.add(f"training images (x global batch {t.global_batch})", trained, rate="train")
    else:
        batch = b.batch_size if b.batch_size and b.batch_size < b.n_real else b.n_real
        trained = b.steps * batch
        st.add(f"optimizer steps on {b.n_real} real samples (one rank, Adam)", b.steps, unit="steps")
        st.add(f"training samples (x batch {batch})", trained, rate="train")
    return st, trained


def _train_stage(cfg: Config) -> tuple[StagePlan, int]:
    t, sets = cfg.train, len(cfg.synth.samplers)
    st = StagePlan("train")
    steps = max(t.save_steps)
    images = steps * t.global_batch
    st.add(f"optimizer steps ({sets} set(s) x {steps:,})", sets * steps, unit="steps")
    st.add(f"training images (x global batch {t.global_batch}; {images / cfg.synth.n:.3g} passes over S)",
           sets * images, rate="train")
    st.add(f"theta_s exported (save_steps {sorted(set(t.save_steps))})", sets * len(set(t.save_steps)), unit="files")
    every = t.ckpt_every_images
    # the step that crosses k x ckpt_every_images images: the first s with s x global_batch >= k x every
    crossings = {-(-k * every // t.global_batch) for k in range(1, steps * t.global_batch // every + 1)} \
        if every else set()
    st.add("DeepSpeed checkpoints (every ckpt_every_images images and at the save steps)",
           sets * len(set(t.save_steps) | crossings), unit="saves")
    lr_last = lr_at_step(deepspeed_config(t, 1), steps)
    if lr_last is not None:
        st.notes.append(f"lr at the last step ({steps}): {lr_last:.3g} (train.lr {t.lr:g}, "
                        f"warmup_steps {t.warmup_steps})")
    return st, sets * images


def _sweep_stage(cfg: Config, spec) -> tuple[StagePlan, SweepImages]:
    sw, ev = cfg.sweep, cfg.eval
    st = StagePlan("sweep")
    ckpts = len(RunContext(cfg, spec, pathlib.Path(cfg.run_dir)).checkpoints())  # names only: nothing read
    pts = sweep_points(cfg)
    imgs = sweep_images(cfg, pts, ckpts)
    ws, gs = sw.w_grid(), list(sw.guidance) or [None]
    grid_txt = f"{len(ws)} w" + (f" x {len(gs)} {sw.guidance_key}" if sw.guidance_key else "")
    st.add(f"checkpoints ({len(cfg.synth.samplers)} set(s) x save_steps)", ckpts, unit="theta_s")
    rule = {"grid": "grid: every point", "early_stop": "early_stop: the authors' rule, 3x3 refine",
            "race": f"race: n0 {sw.race.n0}, rounds at n = {', '.join(map(str, pts.rounds))}"}[pts.mode]
    st.add(f"points per checkpoint ({grid_txt} = {pts.grid}; {rule})", pts.low, pts.high, unit="points")
    if pts.mode == "race":
        st.add("images per point (n0 to eval.n, doubling)", pts.rounds[0], pts.rounds[-1], unit="images")
    else:
        st.add("images per point (eval.n)", ev.n, unit="images")
    base_imgs = (imgs.low - imgs.final[0] - imgs.repeats[0], imgs.high - imgs.final[1] - imgs.repeats[1])
    st.add(f"images drawn by the rule (w = 0: {pts.w0} point(s), once)", *base_imgs, rate="sample")
    if sw.final_n:
        st.add(f"images drawn for final_n = {sw.final_n:,} at each best point (chunks reused)", *imgs.final,
               rate="sample")
    if sw.repeats:
        st.add(f"images drawn for {sw.repeats} repeats of w = 0 and the best w", *imgs.repeats, rate="sample")
    if spec.makes_images:
        st.add(f"feature extractions ({ev.features}; one per sampled image)", imgs.low, imgs.high, unit="images")
        if ev.ref_stats is None:
            real = load_real(cfg.data.source)
            train_idx, held_idx = real.split(cfg.data.holdout, cfg.data.seed)
            n_ref = {"train": len(train_idx), "holdout": len(held_idx), "all": len(real.labels)}[ev.ref_split]
            st.add(f"feature extractions for the reference statistics ({ev.ref_split} split of data.source)", n_ref,
                   unit="images")
        if ev.features == "classifier" and ev.classifier_weights is None:
            st.notes.append("the classifier is trained on data.source's training split first (not timed)")
    else:
        st.add(f"metric features ({spec.metric_name}: the samples themselves, closed-form reference)", imgs.low,
               imgs.high, unit="samples")
    st.add("Frechet distances computed", ckpts * pts.low, ckpts * pts.high, unit="metrics")
    return st, imgs


def make_plan(cfg: Config, rates: Optional[Rates] = None, missing: list[str] = ()) -> Plan:
    """The plan of every stage of `cfg` (pure: reads no run output, writes nothing)."""
    spec = get_spec(cfg.model.name)
    base, base_trained = _base_stage(cfg, spec)
    synth = StagePlan("synth")
    sets = len(cfg.synth.samplers)
    synth.add(f"images to synthesize ({sets} setting(s) x {cfg.synth.n:,}: "
              f"{', '.join(sampler_tag(s) for s in cfg.synth.samplers)})", sets * cfg.synth.n, rate="sample")
    synth.add(f"shards (shard_size {cfg.synth.shard_size})", sets * math.ceil(cfg.synth.n / cfg.synth.shard_size),
              unit="files")
    train, trained = _train_stage(cfg)
    sweep, imgs = _sweep_stage(cfg, spec)
    if not spec.makes_images:  # the toys draw points, not images
        for st in (base, synth, train, sweep):
            for w in st.work:
                w.what = w.what.replace("images", "samples")
                w.unit = w.unit or ("samples" if w.rate else "")
    sampled = (sets * cfg.synth.n + imgs.low, sets * cfg.synth.n + imgs.high)
    return Plan(cfg.name, cfg.model.name, cfg.run_dir, [base, synth, train, sweep], check(cfg), list(missing),
                rates or Rates(), sampled, (base_trained + trained,) * 2)


def check(cfg: Config) -> list[str]:
    """What looks wrong in a config that validation lets through."""
    flags = []
    for prefix, t in [("train", cfg.train)] + ([("base.train", cfg.base.train)] if cfg.base.train else []):
        flag = check_lr(t, prefix)
        if flag:
            flags.append(flag)
    sw, ev = cfg.sweep, cfg.eval
    ws, gs = sw.w_grid(), list(sw.guidance) or [None]
    if len(ws) * len(gs) > MAX_GRID:
        flags.append(f"sweep: {len(ws)} w x {len(gs)} guidance = {len(ws) * len(gs):,} points per checkpoint, "
                     f"beyond the bound of {MAX_GRID:,}")
    last = sw.w_min + math.floor((sw.w_max - sw.w_min) / sw.w_step + 1e-9) * sw.w_step
    if abs(last - sw.w_max) > 1e-6:
        flags.append(f"sweep: w_max = {sw.w_max:g} is not on the grid (w_min {sw.w_min:g} + k x w_step "
                     f"{sw.w_step:g}): its last point is {last:.6g}")
    if sw.guidance_key is not None and sw.refine_guidance > 0 and len(gs) > 1 and sw.mode != "grid":
        spec = get_spec(cfg.model.name)
        bad = []
        for g in sorted({round(g + d, 6) for g in gs for d in (-sw.refine_guidance, sw.refine_guidance)}):
            try:
                spec.parse_sampler({**ev.sampler, sw.guidance_key: g}, "", "refine")
            except NeonError:
                bad.append(g)
        if bad:
            flags.append(f"sweep: the refine grid (+-{sw.refine_guidance:g}) can reach {sw.guidance_key} = "
                         f"{', '.join(f'{g:g}' for g in bad)}, which the sampler rejects (the sweep would stop there)")
    if sw.final_n is not None and sw.final_n < ev.n:
        flags.append(f"sweep: final_n = {sw.final_n} is below eval.n = {ev.n}: the re-evaluation is the noisier one")
    return flags


# ----------------------------------------------------------------------------------- measuring

def measure(cfg: Config, batches: int = 2, max_batch: int = 64) -> Rates:
    """Throughputs on this machine (slow for large models on a CPU): the model as the config builds
    it, randomly initialised (weights do not change the time), `batches` timed sampling calls with
    eval.sampler (images decoded when the VAE file exists; features not extracted) and as many
    training steps (forward, backward, AdamW; bf16 autocast on a GPU when train.dtype is bf16) at
    batch min(synth.batch_size or the micro-batch, max_batch), each after one untimed warm-up."""
    spec, args = get_spec(cfg.model.name), cfg.model.parsed_args
    device = dist.device()
    torch.manual_seed(0)
    model = spec.build(args).to(device)
    sampler = spec.parse_sampler(cfg.eval.sampler)
    bs = max(2, min(cfg.synth.batch_size, cfg.eval.chunk, max_batch))
    decode = spec.makes_images and (getattr(args, "vae", "") in ("random", "none") or
                                   os.path.exists(getattr(args, "vae", "") or ""))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    gen = torch.Generator(device=device).manual_seed(0) if device.type == "cuda" else torch.Generator().manual_seed(0)
    model.eval()
    samples = None
    for i in range(batches + 1):
        if i == 1:
            sync()
            start = time.perf_counter()
        samples = spec.sample(model, bs, gen, sampler)
        if decode:
            spec.images(samples, args)
    sync()
    sample_rate = batches * bs / (time.perf_counter() - start)
    micro = max(2, min(micro_batch_size(cfg.train, 1), max_batch))
    reps = math.ceil(micro / bs)
    batch = {k: torch.cat([v] * reps)[:micro] for k, v in samples.items()}
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-12)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.train.dtype == "bf16" \
        else contextlib.nullcontext()
    for i in range(batches + 1):
        if i == 1:
            sync()
            start = time.perf_counter()
        with autocast:
            loss = spec.loss(model, batch, gen)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync()
    train_rate = batches * micro / (time.perf_counter() - start)
    how = (f"measured on {device.type}: {batches} sampling calls of {bs}" + ("" if decode or not spec.makes_images
                                                                            else " (not decoded: no VAE file)")
           + f", {batches} training steps of {micro}; random weights, one rank")
    return Rates(sample_rate, train_rate, how)


# ----------------------------------------------------------------------------------- text

def _num(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() or abs(x) >= 100 else f"{x:.3g}"


def duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s" if seconds >= 1 else f"{seconds:.2g} s"


def _span(low: Optional[float], high: Optional[float]) -> str:
    if low is None:
        return "?"
    return duration(low) if abs(high - low) <= 0.005 * max(high, 1e-9) else f"{duration(low)} to {duration(high)}"


def _rate_text(r: Optional[float], unit: str, option: str) -> str:
    return f"{r:,.4g} {unit}/s" if r else f"not given ({option} or --measure)"


def format_plan(plan: Plan) -> str:
    """Plain text (no markup, no terminal needed): a table per stage, the total, the flags."""
    r = plan.rates
    lines = [f"neon plan: {plan.name} (model {plan.model}), run dir {plan.run_dir}",
             f"throughput ({r.how}): sampling {_rate_text(r.sample, 'images', '--images-per-s')}, "
             f"training {_rate_text(r.train, 'images', '--train-images-per-s')}", ""]
    for st in plan.stages:
        low, high = st.seconds(r)
        timed = any(w.rate for w in st.work)
        lines.append(f"{st.name}" + (f"  (time: {_span(low, high)})" if timed else ""))
        rows = []
        for w in st.work:
            amount = _num(w.low) if w.low == w.high else f"{_num(w.low)} to {_num(w.high)}"
            t = ""
            if w.rate:
                rate = getattr(r, w.rate)
                t = _span(w.low / rate, w.high / rate) if rate else "?"
            rows.append((w.what, amount, w.unit or ("images" if w.rate else ""), t))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        for what, amount, unit, t in rows:
            lines.append(f"  {what.ljust(widths[0])}  {amount.rjust(widths[1])} {unit.ljust(widths[2])}  {t}".rstrip())
        lines += [f"  note: {n}" for n in st.notes]
        lines.append("")
    low, high, untimed = plan.seconds()
    lines.append("total")
    lines.append(f"  images sampled: {_num(plan.sampled[0])}" + ("" if plan.sampled[0] == plan.sampled[1] else
                                                                f" to {_num(plan.sampled[1])}")
                 + f"; training images: {_num(plan.trained[0])}")
    lines.append(f"  time: {_span(low, high)}" + (f" + {', '.join(untimed)} (not timed: give --images-per-s and "
                                                  f"--train-images-per-s, or --measure)" if untimed else ""))
    if plan.missing:
        lines.append("")
        lines.append("files the run needs that do not exist (the plan does not read them):")
        lines += [f"  {m}" for m in plan.missing]
    lines.append("")
    if plan.flags:
        lines.append("check:")
        lines += [f"  ! {f}" for f in plan.flags]
    else:
        lines.append("check: nothing looks wrong")
    return "\n".join(lines)


def run_plan(path: str, overrides: list[str] = (), images_per_s: Optional[float] = None,
             train_images_per_s: Optional[float] = None, do_measure: bool = False, batches: int = 2) -> Plan:
    """Load, plan and print (the `neon plan` and `neon run --dry-run` command); writes nothing."""
    for name, value in (("--images-per-s", images_per_s), ("--train-images-per-s", train_images_per_s)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise NeonError(f"{name} = {value}: must be a positive number")
    cfg, missing = load_plan_config(path, overrides)
    rates = Rates(images_per_s, train_images_per_s)
    if do_measure:
        measured = measure(cfg, batches)
        rates = Rates(images_per_s or measured.sample, train_images_per_s or measured.train, measured.how)
    plan = make_plan(cfg, rates, missing)
    console.print(format_plan(plan), markup=False, highlight=False, soft_wrap=True)
    return plan


__all__ = ["Plan", "Rates", "SweepPoints", "check", "check_lr", "format_plan", "load_plan_config", "lr_at_step",
           "make_plan", "measure", "new_samples", "run_plan", "sweep_images", "sweep_points"]
