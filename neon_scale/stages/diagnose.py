"""`neon diagnose`: predict the sign of Neon's best w from the base model alone (after the base
and synth stages, before any fine-tune or sweep).

Why it works (the paper's argument, to first order): fine-tuning on S moves
theta_s ~ theta_r - eta g_s, so theta_neon = theta_r + w (theta_r - theta_s) ~ theta_r + w eta g_s
and the loss on real data changes by ~ w eta <g_s, g_r>, where g_s and g_r are the mean gradients of
the training loss (spec.loss) on S and on real data at theta_r. Anti-aligned gradients (cos < 0)
predict w > 0; aligned ones predict w < 0.

Method. Each set is cut into K equal batches; each batch's mean gradient is one row of a [K, P]
float32 matrix (kept on the CPU). Where the loss draws noise (diffusion timesteps and noise), each
record's loss is averaged over R draws: with one draw the noise swamps the small gradient of a model
near its optimum (measured on the toy diffusion: intervals of +-0.3 around 0 at R = 1). The toys'
real side takes REAL_FACTOR x R times as many fresh samples instead, which also averages over the
data. The point estimate is the cosine of the two means. Everything
else comes from the Gram matrices (K x K dot products): a bootstrap that resamples batches with
replacement on each side (each resample is a few K x K products), and a noise-corrected cosine that
divides by unbiased estimates of the squared norms of the expected gradients (sum over pairs of
different batches) instead of the noisy norms, so its size does not shrink with fewer samples.
(Resampling adds noise to the means, so the percentile interval of the raw cosine sits a little
closer to 0 than the point: conservative for the sign, which is the sign of the means' dot product.)
The two sides get independent loss noise (diffusion timesteps and noise) on purpose: shared noise
would put the same noise-driven component into both means and bias their dot product upwards.

After the train stage the table also checks the premise: the cosine of the real gradient with the
fine-tune's actual displacement theta_r - theta_s (`after_train`), the first-order change of the real
loss along the direction Neon extrapolates. On the digits it is about 0 (+0.010, -0.015) while the
Frechet distance improves by a third at w = +0.25: there the gain is not a first-order loss change,
and the prediction before the fine-tune cannot be trusted (bench/RESULTS.md).
"""
from __future__ import annotations

import math
import pathlib
import time

import numpy as np
import torch
from rich.table import Table

from .. import dist, rng
from ..config import Config
from ..console import console, log, progress
from ..data.real import load_real
from ..data.shards import MANIFEST, manifest_schema, read_shard, read_shards
from ..errors import NeonError
from ..io import load_state_dict, read_json, write_json
from ..lock import hold_on_rank0
from ..pipeline import LOCK_NAME
from .common import RunContext, StageDir, sampler_tag
from .train import drop_labels

Batch = dict[str, torch.Tensor]
# Fresh real samples (the toys) per row of one synthetic set: the real side is shared by every
# setting, and its gradient (the model is near its optimum on real data) is the small, noisy one.
# Measured on the toy diffusion, 4 seeds: 16k real rows left 2 of 4 intervals on 0, 64k none.
REAL_FACTOR = 4


# ------------------------------------------------------------------------------------------ data

def read_set(set_dir: pathlib.Path, n: int | None) -> Batch:
    """The first n records of a shard set with a manifest (all of them when n is None), reading only
    the shards needed."""
    manifest = read_json(set_dir / MANIFEST)
    schema = manifest_schema(set_dir, manifest)
    parts, have = [], 0
    for shard in manifest["shards"]:
        if n is not None and have >= n:
            break
        columns, count, _ = read_shard(set_dir / shard["name"], int(shard["count"]), schema=schema)
        parts.append(columns)
        have += count
    return {k: torch.from_numpy(np.concatenate([p[k] for p in parts])[:n]) for k in (schema or {})}


def _as_inputs(ctx: RunContext, data: Batch, where: str) -> Batch:
    """Records as the loss reads them: `x` as is (decoded images dropped), or uint8 images converted
    like the base's training data."""
    if "x" in data:
        return {k: v for k, v in data.items() if k != "image"}
    if "image" not in data:
        raise NeonError(f"{where}: records need the network input `x` (.npy) or an image (.png), "
                        f"found {sorted(data)}")
    if not (ctx.spec.makes_images and ctx.spec.pixel_space(ctx.model_args())):
        raise NeonError(f"{where}: images would need the model's VAE encoder to become training inputs; give "
                        f"shards of the network's input `x` instead (the synth stage's layout)")
    out = ctx.spec.from_images(data["image"], ctx.model_args())
    return {**out, "cls": data["cls"]} if "cls" in data else out


def real_source(ctx: RunContext, path: str | None) -> str:
    """Which real data the diagnosis uses, first found: `path`, the config's data.source, the model's
    own real distribution (the toys). Raises (one line) when there is none."""
    if path is not None:
        if not pathlib.Path(path).exists():
            raise NeonError(f"--real {path}: no such file or folder")
        return "path"
    if ctx.cfg.data.source is not None:
        return "data.source"
    if ctx.spec.has_real_data:
        return "model"
    raise NeonError(f"neon diagnose: no real data for model {ctx.cfg.model.name!r}: give --real PATH (image folder "
                    f"or shards) or set data.source")


def real_data(ctx: RunContext, path: str | None, n: int | None, fresh: int, seed: int) -> tuple[Batch, str]:
    """(at most n real records, where they came from). data.source gives its held-out split: theta_r
    was fitted to the training split, whose gradient measures the optimizer's leftovers, not the
    generalization error Neon corrects. The toys' true distribution gives `fresh` new samples."""
    kind = real_source(ctx, path)
    if kind == "path":
        p = pathlib.Path(path)
        if (p / MANIFEST).is_file():  # a set in the synth stage's layout (base/real/ too)
            return _as_inputs(ctx, read_set(p, n), path), f"{path} (shards)"
        tars = [p] if p.suffix == ".tar" else sorted(q for q in p.iterdir() if q.suffix == ".tar") if p.is_dir() else []
        if tars:
            return _as_inputs(ctx, {k: v[:n] for k, v in read_shards(tars).items()}, path), f"{path} (shards)"
        real = load_real(path)  # a folder of class folders (it names what is missing)
        return _as_inputs(ctx, {"image": real.images[:n], "cls": real.labels[:n]}, path), f"{path} (images)"
    if kind == "data.source":
        data = ctx.cfg.data
        real = load_real(data.source)
        train_idx, held = real.split(data.holdout, data.seed)
        idx, split = (held, "held-out split") if len(held) else (train_idx, "training split: no held-out images")
        images = {"image": real.images[idx[:n]], "cls": real.labels[idx[:n]]}
        return _as_inputs(ctx, images, data.source), f"data.source {data.source} ({split})"
    return ctx.spec.real_data(fresh, rng.generator(seed, "diagnose", "real")), "the model's true distribution"


# ------------------------------------------------------------------------------------------ gradients

def loss_is_random(ctx: RunContext, model: torch.nn.Module, data: Batch) -> bool:
    """Whether the loss draws noise (diffusion timesteps and noise, flow times): two noise streams
    on the same records give different losses. Repeating a record only helps where it does."""
    few = {k: v[:8] for k, v in data.items()}
    with torch.no_grad():
        a, b = (float(ctx.spec.loss(model, few, rng.StepNoise(("probe", i), len(few["x"]), 0))) for i in (0, 1))
    return a != b


def batch_gradients(ctx: RunContext, model: torch.nn.Module, data: Batch, k: int, repeats: int, keys: tuple,
                    micro: int, label_dropout: float, desc: str) -> torch.Tensor:
    """[k, P] float32 on the CPU: row i is the mean loss gradient over batch i, the records
    [i m, (i + 1) m) (m = len // k) each taken `repeats` times with its own loss noise (and label
    dropout, as the fine-tune applies it), in passes of at most `micro` rows. A row's noise follows
    its place in its batch, not the passes."""
    params = [p for p in model.parameters() if p.requires_grad]
    m = len(next(iter(data.values()))) // k
    size = m * repeats  # rows of a batch: record i m + q // repeats at row q
    null = ctx.spec.null_class(ctx.model_args()) if label_dropout > 0 else None
    out = torch.zeros(k, sum(p.numel() for p in params))
    with progress(desc, k) as bar:
        for i in range(k):
            for off in range(0, size, micro):
                hi = min(off + micro, size)
                take = i * m + torch.arange(off, hi) // repeats
                chunk = {name: v[take] for name, v in data.items()}
                if null is not None:
                    chunk = drop_labels(chunk, label_dropout, null, rng.StepNoise((*keys, i, "labels"), size, off))
                loss = ctx.spec.loss(model, chunk, rng.StepNoise((*keys, i), size, off)) * ((hi - off) / size)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                out[i] += torch.cat([(torch.zeros_like(p) if g is None else g).detach().flatten().float().cpu()
                                     for p, g in zip(params, grads)])
            bar.update()
    return out


# ------------------------------------------------------------------------------------------ statistics

def gram_cosine(gss: torch.Tensor, grr: torch.Tensor, gsr: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor) -> torch.Tensor:
    """cos(a @ S, b @ R) for each row of the batch weights a [B, Ks] and b [B, Kr], from the Gram
    matrices S S^T, R R^T and S R^T alone: a resample costs K x K work, not K x P."""
    dot = ((a @ gsr) * b).sum(1)
    return dot / (((a @ gss) * a).sum(1) * ((b @ grr) * b).sum(1)).clamp_min(1e-300).sqrt()


def cosine_stats(synth: torch.Tensor, real: torch.Tensor, resamples: int, seed: int) -> dict:
    """The cosine of the two sets' mean gradients (rows: batch gradients), its bootstrap over batches
    (percentile 95 % interval), the predicted sign of w (-sign(cos)), the fraction of resamples
    agreeing with it, and the noise-corrected cosine."""
    s, r = synth.double(), real.double()
    gss, grr, gsr = s @ s.T, r @ r.T, s @ r.T  # all the rest needs
    ones = [torch.ones(1, len(g), dtype=torch.float64) for g in (s, r)]
    point = float(gram_cosine(gss, grr, gsr, *ones))
    gen = torch.Generator().manual_seed(rng.seed_of(seed, "bootstrap"))
    counts = []  # how often each batch is drawn, per resample: batches with replacement, each side on its own
    for k in (len(s), len(r)):
        idx = torch.randint(0, k, (resamples, k), generator=gen)
        ones_ = torch.ones(resamples, k, dtype=torch.float64)
        counts.append(torch.zeros(resamples, k, dtype=torch.float64).scatter_add_(1, idx, ones_))
    boot = gram_cosine(gss, grr, gsr, *counts)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    sign = -1 if point > 0 else 1 if point < 0 else 0

    def signal(g: torch.Tensor) -> float:  # unbiased ||E[batch gradient]||^2: pairs of different batches only
        return float((g.sum() - g.diagonal().sum()) / (len(g) * (len(g) - 1)))

    ss, sr = signal(gss), signal(grr)
    return {"cos": point, "ci95": [lo, hi], "predicted_w_sign": sign,
            "bootstrap_fraction": float((torch.sign(-boot) == sign).double().mean()) if sign else 0.0,
            "interval_excludes_zero": lo > 0 or hi < 0,
            "cos_noise_corrected": float(gsr.mean()) / math.sqrt(ss * sr) if ss > 0 and sr > 0 else None,
            "grad_norm_synth": math.sqrt(float(gss.mean())), "grad_norm_real": math.sqrt(float(grr.mean()))}


def displacement_cosines(model: torch.nn.Module, theta_s: dict[str, torch.Tensor], g_synth: torch.Tensor,
                         g_real: torch.Tensor) -> dict:
    """After a fine-tune: the cosines of the two mean gradients with the direction Neon extrapolates
    along, theta_r - theta_s (the fine-tune's real displacement, not its first-order model -eta g_s).
    cos(g_r, theta_r - theta_s) < 0: moving that way (w > 0) lowers the real loss, to first order;
    near 0: the real loss does not see the displacement and no gradient alignment can predict w."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]  # batch_gradients' order
    base = dict(model.named_parameters())
    d = torch.cat([(base[k].detach().cpu().double() - theta_s[k].double()).flatten() for k in names])  # rows: CPU

    def cos(g: torch.Tensor) -> float:
        m = g.double().mean(0)
        return float(m @ d / (m.norm() * d.norm()).clamp_min(1e-300))
    return {"cos_real": cos(g_real), "cos_synth": cos(g_synth)}


# ------------------------------------------------------------------------------------------ the command

def _check_inputs(ctx: RunContext) -> None:
    if dist.world() > 1:
        raise NeonError("neon diagnose runs on one rank: start it without a launcher")
    for stage, what in (("base", "theta_r"), ("synth", "the synthetic sets")):
        if not StageDir(ctx.run_dir / stage, ctx.fingerprint(stage), stage).is_done():
            raise NeonError(f"neon diagnose needs {what} of this config in {ctx.run_dir / stage}: run "
                            f"`neon run --stage base --stage synth` with the same --config/--set first")


def _print_table(result: dict) -> None:
    table = Table(title=f"Neon diagnose: cosine of the synthetic and real loss gradients at theta_r "
                        f"(real: {result['real']['source']})")
    for col in ("sampler", "cos", "95% interval", "cos, noise removed", "predicted w", "bootstrap agrees",
                "n synth / n real", "s", "after train: cos(g_r, theta_r - theta_s)"):
        table.add_column(col, justify="left" if col == "sampler" else "right")
    for row in result["settings"]:
        lo, hi = row["ci95"]
        sure = "" if row["interval_excludes_zero"] else " (interval includes 0)"
        corrected = "n/a" if row["cos_noise_corrected"] is None else f"{row['cos_noise_corrected']:+.3f}"
        table.add_row(row["sampler_tag"], f"{row['cos']:+.4f}", f"[{lo:+.4f}, {hi:+.4f}]", corrected,
                      {1: "w > 0", -1: "w < 0", 0: "?"}[row["predicted_w_sign"]] + sure,
                      f"{row['bootstrap_fraction']:.3f}", f"{row['n_synth']} / {row['n_real']}",
                      f"{row['seconds']:.1f}",
                      ", ".join(f"{a['cos_real']:+.3f}" for a in row.get("after_train", [])) or "-")
    console.print(table)


def diagnose(cfg: Config, real: str | None = None, n: int | None = None, batches: int = 32, resamples: int = 1000,
             seed: int = 0, repeats: int = 16, micro_batch: int | None = None) -> dict:
    """Run the diagnosis for every synth.samplers setting; print the table, write
    <run>/diagnose/diagnose.json (atomically) and return its content."""
    for name, value, low in (("--batches", batches, 2), ("--bootstrap", resamples, 1), ("--repeats", repeats, 1),
                             ("--n", n, batches), ("--micro-batch", micro_batch, 1)):
        if value is not None and value < low:
            raise NeonError(f"neon diagnose: {name} must be at least {low}, got {value}")
    ctx = RunContext.from_config(cfg)
    # ------------------------------------------------------------------ Inputs (nothing written before)
    real_source(ctx, real)
    _check_inputs(ctx)
    synth_n = min(cfg.synth.n, n or cfg.synth.n)
    if synth_n < batches:
        raise NeonError(f"neon diagnose: synth.n = {cfg.synth.n} samples per set, fewer than --batches {batches}")
    micro = micro_batch or max(cfg.train.global_batch // cfg.train.grad_accum, 1)
    p_drop = cfg.train.label_dropout
    with hold_on_rank0(ctx.run_dir / LOCK_NAME, str(ctx.run_dir)):
        torch.manual_seed(rng.seed_of(seed, "diagnose"))  # modules that draw from the global generator
        model = ctx.load_model(ctx.base_weights()).train()  # as the fine-tune computes its loss
        first = ctx.synth_dir(cfg.synth.samplers[0])
        # a loss without noise (the AR toy) gains nothing from repeats
        probe = _as_inputs(ctx, read_set(first, 8), str(first))
        reps = repeats if p_drop > 0 or loss_is_random(ctx, model, probe) else 1
        # the toys' real side: fresh samples instead of repeats (new data in every row)
        real_set, source = real_data(ctx, real, n, REAL_FACTOR * synth_n * reps, seed)
        real_reps = 1 if real_source(ctx, real) == "model" else reps
        n_real = len(next(iter(real_set.values())))
        if n_real < batches:
            raise NeonError(f"neon diagnose: {n_real} real samples in {source}, fewer than --batches {batches}")
        n_real = n_real // batches * batches  # what equal batches use
        log(f"[bold]neon diagnose[/] {cfg.name}: run dir {ctx.run_dir}; real data: {source}, {n_real} records; "
            f"{batches} batches per set, each record's loss averaged over {reps} noise draw(s)")
        # ---------------------------------------------------------- Real gradients (once, shared)
        start = time.perf_counter()
        g_real = batch_gradients(ctx, model, real_set, batches, real_reps, (seed, "diagnose", "real"), micro, p_drop,
                                 "diagnose: real gradients")
        real_seconds = time.perf_counter() - start
        # ---------------------------------------------------------- Each synthetic set
        train_done = StageDir(ctx.run_dir / "train", ctx.fingerprint("train"), "train").is_done()
        rows = []
        for settings in cfg.synth.samplers:
            start = time.perf_counter()
            tag, set_dir = sampler_tag(settings), ctx.synth_dir(settings)
            synth = _as_inputs(ctx, read_set(set_dir, synth_n), str(set_dir))
            g_synth = batch_gradients(ctx, model, synth, batches, reps, (seed, "diagnose", "synth"), micro, p_drop,
                                      f"diagnose {tag}")
            stats = cosine_stats(g_synth, g_real, resamples, seed)
            trained = [c for c in ctx.checkpoints() if c["sampler"] == dict(settings) and train_done and
                       c["path"].is_file()]  # a finished fine-tune: the premise checked after the fact
            after = [{"checkpoint": c["name"], **displacement_cosines(model, load_state_dict(c["path"]), g_synth,
                                                                      g_real)} for c in trained]
            rows.append({"sampler": dict(settings), "sampler_tag": tag, **stats, "after_train": after,
                         "n_synth": len(next(iter(synth.values()))) // batches * batches, "n_real": n_real,
                         "seconds": time.perf_counter() - start})
            del g_synth, synth
        # ---------------------------------------------------------- Report
        result = {"config": cfg.name, "run_dir": str(ctx.run_dir), "synth_fingerprint": ctx.fingerprint("synth"),
                  "real": {"source": source, "n": n_real, "repeats": real_reps, "seconds": real_seconds},
                  "batches": batches, "bootstrap": resamples, "repeats": reps, "seed": seed, "label_dropout": p_drop,
                  "params": g_real.shape[1], "settings": rows}
        write_json(ctx.run_dir / "diagnose" / "diagnose.json", result)
        _print_table(result)
        log(f"wrote {ctx.run_dir / 'diagnose' / 'diagnose.json'}")
    return result
