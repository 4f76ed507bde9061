"""Stage `sweep` (merge + eval + selection): for every fine-tune checkpoint, evaluate
theta_r + w (theta_r - theta_s) over (w, guidance) with the selection rule of neon_scale.sweep.
The merge is done in place on the live model by neon_scale.merge.inplace (Delta kept per tensor).

Every evaluated point (its metric, n, jackknife standard error and replicates: stages/evaluate.py)
is appended to sweep/results.jsonl (rewritten atomically), which doubles as the cache that makes
a killed sweep resume where it stopped; the features of a checkpoint's samples stay in
sweep/features/ until the checkpoint is done (a race's larger n reuses them). w = 0 is the base
model: evaluated once per n and shared by all checkpoints. Outputs: results.jsonl, summary.json
(per checkpoint: w = 0 and the best point at the same n with standard errors, FD-infinity and
the paired difference, the samples drawn, a race's rounds), best/ (the merged model of the overall best point,
with its provenance: the entry naming it has `best_model`), fid_vs_w.png (bands of +-1 standard
error), and for image models samples.png (a row per class at w = 0 and at each checkpoint's best w, same noise).

Curves (rank 0, neon_scale.tracking, `<run>/tb/sweep`): every evaluated point of the selection
under `<checkpoint>/<metric>` (`.../g=<guidance>` with a guidance sweep) at step round(w x 1000),
cached points included so a resumed sweep draws the whole curve; per sampler setting, the
summary numbers at step = fine-tune steps; and the fid_vs_w figure.

Image models are measured with the backbone of `eval.features` against reference statistics
(stages/metric.py prepares both). `sweep.repeats` > 0 re-evaluates w = 0 and the best w, each at
its best guidance, with that many fresh evaluation seeds (not the one the selection used, so the
selection's luck does not bias them): mean, standard error, and the paired difference.
"""
from __future__ import annotations

import functools
import json
import math
import pathlib
import shlex
import shutil
import textwrap
import time

import torch
from rich.markup import escape
from rich.table import Table

from .. import dist, rng
from ..console import console, log, progress
from ..io import atomic_path, load_state_dict, write_json, write_text
from ..merge.inplace import Extrapolator, module_slots
from ..merge.merge_files import input_provenance, merge_checkpoints
from ..merge.open import open_source
from ..metrics.backbones import METRIC_NAMES, load_backbone
from ..metrics.uncertainty import paired_se
from ..selection import race, search
from ..tracking import Tracker, open_tracker
from .evaluate import Estimate, FeatureStore, SampleMetric, chunk_counts, evaluate
from .plan import duration, new_samples, sweep_images, sweep_points
from . import metric as metric_stage
from .common import RunContext, StageDir, sampler_tag

# TensorBoard steps are integers: a sweep point is drawn at step round(w x W_STEP_SCALE), so
# w = -0.75 is step -750 (w values closer than 1e-3 would share a step).
W_STEP_SCALE = 1000


class PointStore:
    """Evaluated points, keyed by what the metric depends on; persisted as JSON lines."""

    def __init__(self, path):
        self.path = path
        self.rows: dict[tuple, dict] = {}
        self.estimates: dict[tuple, Estimate] = {}
        lines = []
        if dist.is_main() and path.is_file():
            lines = path.read_text().splitlines()
        for line in dist.broadcast_object(lines):
            try:
                self.add(json.loads(line), persist=False)
            except (json.JSONDecodeError, KeyError):
                continue

    @staticmethod
    def eval_key(row) -> tuple:
        source = "base" if row["w"] == 0 else row["checkpoint"]
        return source, row["w"], row.get("guidance"), row["n"], row.get("seed")

    @staticmethod
    def point_id(row) -> str:
        """What a point's samples depend on besides the eval settings: its FeatureStore name."""
        source, w, g, _n, seed = PointStore.eval_key(row)
        return json.dumps([source, w, g, seed])

    def cached(self, row) -> Estimate | None:
        return self.estimates.get(self.eval_key(row))

    def add(self, row: dict, persist: bool = True) -> None:
        key = (row["checkpoint"], row["w"], row.get("guidance"), row["n"], row.get("seed"))
        if key in self.rows:
            return
        reps = row["replicates"]  # KeyError: a row of an older version (no standard error), evaluated again
        self.rows[key] = row
        self.estimates[self.eval_key(row)] = Estimate(row["metric"], row["n"], None if reps is None else tuple(reps),
                                                      row.get("metric_inf"))
        if persist and dist.is_main():
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows.values()))


def _plot(summary: list[dict], store: PointStore, path, metric_name: str, tracker: Tracker) -> None:
    import matplotlib  # lazy: slow to import, and only rank 0 draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2))
    for s in summary:
        # per w: the best over guidance, each point at the largest n it reached (a race's dropped
        # points at a small n, with wide bands); repeats (own seeds) and final_n (larger n) are not on it
        by_w: dict[float, tuple] = {}
        for (ckpt, w, _g, n, seed), row in store.rows.items():
            if ckpt == s["checkpoint"] and n <= s["n"] and seed is None:
                cand = (-n, row["metric"], row.get("se"))
                by_w[w] = min(cand, by_w.get(w, cand))
        ws = sorted(by_w)
        ys = [by_w[w][1] for w in ws]
        ses = [by_w[w][2] if by_w[w][2] is not None else 0.0 for w in ws]
        line, = ax.plot(ws, ys, marker="o", ms=3, label=f"{s['checkpoint']}: {_chosen(s)}")
        ax.fill_between(ws, [y - e for y, e in zip(ys, ses)], [y + e for y, e in zip(ys, ses)],
                        color=line.get_color(), alpha=0.2, lw=0)
        ax.plot([s["best_w"]], [s["best_metric"]], marker="*", ms=12, color=line.get_color(), mec="black", mew=0.5)
    if summary:  # the overall best point, named where it is
        top = min(summary, key=lambda s: s["best_metric"])
        ax.annotate(f"best: {top['checkpoint']}\n{_chosen(top)}", (top["best_w"], top["best_metric"]),
                    xytext=(14, 22), textcoords="offset points", fontsize=7, arrowprops={"arrowstyle": "->", "lw": 0.6},
                    bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "gray", "alpha": 0.85})
    ax.set_yscale("log")
    ax.set_xlabel("w  (theta_neon = theta_r + w (theta_r - theta_s))")
    ax.set_ylabel(f"{_metric_label(metric_name)}\nbest over guidance; log scale, lower is better", fontsize=8)
    modes = "/".join(sorted({str(s.get("mode", "")) for s in summary} - {""}))
    ns = ", ".join(f"{n:,}" for n in sorted({s["n"] for s in summary}))
    ax.set_title(f"{path.parent.parent.name}: Neon sweep, {metric_name} vs w per fine-tune checkpoint ({modes}, "
                 f"n = {ns} samples)\nstar: each checkpoint's chosen point; band: ± 1 standard error", fontsize=9)
    ax.axvline(0.0, color="gray", lw=0.5)
    ax.legend(fontsize=7, title=f"checkpoint: chosen point, {metric_name}", title_fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    tracker.figure("fid_vs_w", fig, 0)
    plt.close(fig)


def _samples_picture(panels: list[tuple[str, torch.Tensor]], num_classes: int, per_class: int, path) -> None:
    """One panel per (title, uint8 images [num_classes * per_class, C, H, W] in class-major order):
    a row per class."""
    import matplotlib  # lazy: slow to import, and only rank 0 draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels) * per_class / 8 + 0.5, 2.4 * num_classes / 8 + 0.6))
    for ax, (title, images) in zip(list(getattr(axes, "flat", [axes])), panels):
        c, h, w = images.shape[1:]
        grid = images.reshape(num_classes, per_class, c, h, w).permute(0, 3, 1, 4, 2).reshape(num_classes * h,
                                                                                          per_class * w, c)
        ax.imshow(grid.squeeze(-1).numpy() if c == 1 else grid.numpy(), cmap="gray" if c == 1 else None,
                  interpolation="nearest", vmin=0, vmax=255)
        ax.set_title("\n".join(textwrap.wrap(title, 26)), fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([h * (i + 0.5) for i in range(num_classes)], [str(i) for i in range(num_classes)], fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    plt.close(fig)


def _mean_se(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return {"mean": mean, "se": sd / math.sqrt(n), "values": values}


def _pm(value: float, se: float | None) -> str:
    """'1.31 ± 0.01': a value and its standard error (none known: the value alone)."""
    return f"{value:.4g}" if se is None or not math.isfinite(se) else f"{value:.4g} ± {se:.2g}"


# What each metric measures (the plot's y axis, the summary's title): METRIC_NAMES' and the toy's
_METRIC_LABELS = {"fid": "FID (Inception features)", "fd_dinov2": "FD (DINOv2 features)",
                  "fd_classifier": "FD (classifier features)",
                  "fd": "FD (Frechet distance of the raw samples to the true Gaussian)"}


def _metric_label(metric_name: str) -> str:
    return _METRIC_LABELS.get(metric_name, metric_name)


def _point(w: float, g) -> str:
    """A sweep point as the tables write it: 'w' or 'w (g guidance)'."""
    return str(w) if g is None else f"{w} (g {g})"


def _chosen(s: dict) -> str:
    """A summary entry's chosen point and its metric: 'w = 0.35 (g 2.5): 1.31 ± 0.01'."""
    return f"w = {_point(s['best_w'], s.get('best_guidance'))}: {_pm(s['best_metric'], s.get('best_se'))}"


def print_summary(summary: list[dict], metric_name: str) -> None:
    """The console table: each checkpoint's w = 0 and best point, value ± standard error (jackknife
    over the point's samples; with sweep.repeats, over the repeat seeds), the difference and how
    many standard errors it is (z; |z| < 2 is no evidence of a difference)."""
    if not dist.is_main():
        return
    repeats = all("repeats" in s for s in summary) and summary
    how = (f"± standard error over {summary[0]['repeats']['seeds']} evaluation seeds" if repeats
           else "± jackknife standard error")
    table = Table(title=f"Neon sweep ({_metric_label(metric_name)}, lower is better; {how})")
    cols = ["checkpoint", "w=0", "best w", f"{metric_name} @ w=0", f"best {metric_name}", "ratio", "difference", "z",
            "n", "images"]
    for col in cols:  # fold: in a narrow terminal a long cell (a checkpoint's name) wraps, never cut to '…'
        table.add_column(col, justify="left" if col == "checkpoint" else "right", overflow="fold")

    for s in summary:
        if repeats:
            r = s["repeats"]
            m0, mb, d = (_pm(r[k]["mean"], r[k]["se"]) for k in ("w0", "best", "diff"))
            ratio, diff = r["best"]["mean"] / r["w0"]["mean"], r["diff"]
        else:
            m0, mb = _pm(s["metric_w0"], s.get("se_w0")), _pm(s["best_metric"], s.get("best_se"))
            diff = s.get("diff") or {"mean": s["best_metric"] - s["metric_w0"], "se": None}
            ratio, d = s["best_metric"] / s["metric_w0"], _pm(diff["mean"], diff["se"])
        z = f"{diff['mean'] / diff['se']:+.1f}" if diff["se"] else "-"
        table.add_row(escape(s["checkpoint"]), _point(0.0, s.get("guidance_w0")),
                      _point(s["best_w"], s.get("best_guidance")), m0, mb, f"{ratio:.3f}", d, z, str(s["n"]),
                      str(s.get("images", "-")))
    console.print(table)


def eval_sampler_at(cfg, g) -> dict:
    """The evaluation sampler's settings at guidance g (sweep.guidance_key; unchanged without one)."""
    sampler = dict(cfg.eval.sampler)
    if cfg.sweep.guidance_key is not None:
        sampler[cfg.sweep.guidance_key] = g
    return sampler


def _metric_name(ctx: RunContext) -> str:
    return METRIC_NAMES[ctx.cfg.eval.features] if ctx.spec.makes_images else ctx.spec.metric_name


def _curve_point(tracker: Tracker, row: dict, metric_name: str) -> None:
    """One point of the sweep curve: `<checkpoint>/<metric>[/g=<guidance>]` at step round(w x 1000)."""
    key = metric_name if "guidance" not in row else f"{metric_name}/g={row['guidance']}"
    tracker.scalars(row["checkpoint"], {key: row["metric"]}, round(row["w"] * W_STEP_SCALE))


def _summary_scalars(tracker: Tracker, entry: dict, metric_name: str) -> None:
    """A checkpoint's summary under `summary/<sampler>/...` at step = its fine-tune steps: with
    several save_steps, these are curves of the outcome against fine-tune length."""
    m = metric_name
    values = {"best_w": entry["best_w"], f"best_{m}": entry["best_metric"], f"{m}_w0": entry["metric_w0"],
              f"{m}_ratio": entry["best_metric"] / entry["metric_w0"] if entry["metric_w0"] else None,
              "best_guidance": entry.get("best_guidance"), f"final_{m}": entry.get("final_metric"),
              "points": entry["points"], f"best_{m}_se": entry.get("best_se"), f"{m}_w0_se": entry.get("se_w0"),
              "diff": entry["diff"]["mean"], "diff_se": entry["diff"]["se"], "images": entry["images"]}
    if "repeats" in entry:
        r = entry["repeats"]
        values.update({f"repeats/{m}_w0": r["w0"]["mean"], f"repeats/best_{m}": r["best"]["mean"],
                       "repeats/diff": r["diff"]["mean"], "repeats/diff_se": r["diff"]["se"]})
    tracker.scalars(f"summary/{sampler_tag(entry['sampler'])}", values, entry["steps"])


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg
    metric_name = _metric_name(ctx)
    stage = StageDir(ctx.run_dir / "sweep", ctx.fingerprint("sweep"), "sweep")
    summary_path = stage.path / "summary.json"
    if stage.is_done():
        log("sweep: complete, skipped")
        print_summary(json.loads(summary_path.read_text()), metric_name)
        return
    # fresh: the cache re-logs every point, so a killed run's events would only draw them twice.
    # `with`: the event file is flushed and closed on every way out (errors, stop signals).
    with open_tracker(ctx.run_dir, cfg.run, "sweep", config=cfg.to_dict(), fresh=True) as tracker:
        _sweep(ctx, stage, metric_name, tracker)


def _sweep(ctx: RunContext, stage: StageDir, metric_name: str, tracker: Tracker) -> None:
    # ------------------------------------------------------------------ Metric
    sample_metric = build_sample_metric(ctx)
    # ------------------------------------------------------------------ Point cache
    # keyed by what a point depends on: a change of the selection rule alone keeps the points
    stage.prepare(keep_fingerprint=ctx.points_fingerprint())
    store = PointStore(stage.path / "results.jsonl")
    base_state = load_state_dict(ctx.base_weights())
    model = ctx.load_model(ctx.base_weights())
    features = FeatureStore(stage.path / "features")  # rank 0's; emptied as checkpoints finish
    points = _Points(ctx, sample_metric, model, store, features, tracker, metric_name)
    summary, pictures = [], []
    checkpoints = ctx.checkpoints()
    # ------------------------------------------------------------------ Sweep each checkpoint
    with progress("sweep", len(checkpoints)) as bar:
        for ckpt in checkpoints:
            # theta_r and Delta kept per tensor: each w is one pass over the weights, not a reload;
            # Delta written over the loaded theta_s, the previous checkpoint's freed first: the
            # model, theta_r and one Delta in memory, never more
            extrapolator = None
            extrapolator = Extrapolator(module_slots(model, base_state, load_state_dict(ckpt["path"]), consume=True))
            entry = _sweep_checkpoint(ctx, points, ckpt, extrapolator)
            if ctx.spec.makes_images and ctx.cfg.sweep.samples_png and dist.is_main():  # now: one Delta at a time
                _add_panels(pictures, ctx, model, extrapolator, ckpt, entry)
            summary.append(entry)
            _summary_scalars(tracker, entry, metric_name)
            bar.update(info=f"{ckpt['name']}: best w {entry['best_w']} ({entry['best_metric']:.4f})")
    # ------------------------------------------------------------------ The best model
    if dist.is_main():
        _write_best(ctx, stage, summary, checkpoints, metric_name)
    # ------------------------------------------------------------------ Report
    _write_report(ctx, stage, summary, store, pictures, metric_name, tracker)
    if dist.is_main():
        shutil.rmtree(features.root, ignore_errors=True)  # results.jsonl keeps every point's metric and replicates
    stage.mark_done()
    print_summary(summary, metric_name)


BEST = "best"  # sweep/best/: the merged model of the overall best point


def overall_best(summary: list[dict]) -> tuple[dict, str]:
    """The entry of the overall best checkpoint and what it was compared by: final_metric when
    every entry has one (the same final_n), else best_metric when every entry is at the same n,
    else (a race stops at different n) the paired difference to w = 0 at each entry's own n: FD's
    bias at small n is large, but shared by both points of a difference."""
    if all("final_metric" in e for e in summary):
        return min(summary, key=lambda e: e["final_metric"]), "final_metric"
    if len({e["n"] for e in summary}) == 1:
        return min(summary, key=lambda e: e["best_metric"]), "best_metric"
    return min(summary, key=lambda e: e["diff"]["mean"]), "diff"


def _write_best(ctx: RunContext, stage: StageDir, summary: list[dict], checkpoints: list[dict],
                metric_name: str) -> None:
    """sweep/best/: theta_r + w (theta_r - theta_s) of the overall best point, merged from the files
    the sweep scored (base/model.safetensors and the exported theta_s: the EMA when train.ema_decay
    > 0), with its provenance; the entry gains `best_model`: its folder and the command that remakes it,
    both relative to the run directory."""
    entry, compared_by = overall_best(summary)
    ckpt = next(c for c in checkpoints if c["name"] == entry["checkpoint"])
    out = stage.path / BEST
    sw = ctx.cfg.sweep
    provenance = {"run_dir": str(ctx.run_dir.resolve()), "config_fingerprint": ctx.fingerprint("sweep"),
                  "checkpoint": entry["checkpoint"], "theta_s_step": entry["steps"], "sampler": entry["sampler"],
                  "metric": metric_name, "value": entry["best_metric"], "se": entry["best_se"], "n": entry["n"],
                  "selection": sw.mode, "compared_by": compared_by}
    if sw.guidance_key is not None:
        provenance["guidance"] = {sw.guidance_key: entry.get("best_guidance")}
    if "final_metric" in entry:
        provenance.update(final_n=entry["final_n"], final_value=entry["final_metric"], final_se=entry["final_se"])
    with open_source(ctx.base_weights()) as base, open_source(ckpt["path"]) as theta_s:
        record = {**input_provenance(ctx.base_weights(), ckpt["path"]), **provenance}
        merge_checkpoints(base, theta_s, [entry["best_w"]], out, overwrite=True, provenance=record)
    # paths relative to the run directory (summary.json stays valid when the run is moved or copied)
    home = ctx.run_dir.resolve()
    rel = [str(pathlib.Path(x).resolve().relative_to(home)) for x in (ctx.base_weights(), ckpt["path"], out)]
    command = shlex.join(["neon", "merge", rel[0], rel[1], "--w", f"{entry['best_w']:g}", "-o", rel[2], "--overwrite"])
    entry["best_model"] = {"path": rel[2], "compared_by": compared_by, "command": f"cd RUN_DIR && {command}"}
    log(f"sweep: best model (w = {entry['best_w']:g} on {entry['checkpoint']}) -> {out}")


def build_sample_metric(ctx: RunContext) -> SampleMetric:
    """What the sweep measures points with (public: tests and benches evaluate points outside it).
    Image models: the backbone of `eval.features` against the reference statistics (stages/metric.py
    prepares both); other models: their own features and reference."""
    if not ctx.spec.makes_images:
        return SampleMetric(ctx.spec)
    ev = ctx.cfg.eval
    weights, ref, _info = metric_stage.prepare(ctx)
    return SampleMetric(ctx.spec, load_backbone(ev.features, weights, batch_size=ev.batch_size), ref, ctx.model_args())


def _point_row(ckpt: dict, w: float, g, n: int, seed: int | None, guidance_key: str | None) -> dict:
    """A point's record in results.jsonl, less what its evaluation gives (guidance and seed only
    where they apply)."""
    row = {"checkpoint": ckpt["name"], "steps": ckpt["steps"], "sampler": ckpt["sampler"], "w": w, "n": n}
    if guidance_key is not None:
        row["guidance"] = g
    if seed is not None:
        row["seed"] = seed
    return row


class _Points:
    """A sweep point's Estimate: read from the cache or evaluated, then persisted and (the
    selection's points at eval.n) drawn on the curve. Evaluated features stay in `features` until
    their checkpoint is done (`forget`), so a larger n reuses the samples of a smaller one."""

    def __init__(self, ctx: RunContext, sample_metric: SampleMetric, model: torch.nn.Module, store: PointStore,
                 features: FeatureStore, tracker: Tracker, metric_name: str):
        self.ctx, self.sample_metric, self.model, self.store = ctx, sample_metric, model, store
        self.features, self.tracker, self.metric_name = features, tracker, metric_name
        self.drawn: set[tuple] = set()  # curve points already logged (final_n may repeat one; repeats are not on it)

    def estimate(self, ckpt: dict, extrapolator: Extrapolator, w: float, g, n: int, seed: int | None = None) -> Estimate:
        cfg = self.ctx.cfg
        row = _point_row(ckpt, w, g, n, seed, cfg.sweep.guidance_key)
        eval_sampler = eval_sampler_at(cfg, g)
        est = self.store.cached(row)
        if est is None:
            extrapolator.set_w(w)
            ev = cfg.eval
            begun = self.lines.begin(row)
            est = evaluate(self.sample_metric, self.model, self.ctx.spec.parse_sampler(eval_sampler), n,
                           ev.seed if seed is None else seed, ev.chunk, self.features, PointStore.point_id(row))
            self.lines.end(row, est, begun)
        else:
            self.lines.meet(row)  # read from results.jsonl: no line, counted as done
        self.store.add({**row, "eval_sampler": eval_sampler, "metric_name": self.metric_name, "metric": est.metric,
                        "se": est.se, "metric_inf": est.infinity,
                        "replicates": None if est.replicates is None else list(est.replicates)})
        if n == cfg.eval.n and seed is None:  # the selection's points only
            self._draw(row, g, est.metric)
        return est

    def metric(self, ckpt: dict, extrapolator: Extrapolator, w: float, g, n: int, seed: int | None = None) -> float:
        return self.estimate(ckpt, extrapolator, w, g, n, seed).metric

    @functools.cached_property
    def lines(self) -> _PointLines:
        return _PointLines(self.ctx, self.features, self.metric_name)

    def forget(self, ckpt: dict) -> None:
        """Drop the features of a finished checkpoint's points (w = 0, shared, stays until the end)."""
        if dist.is_main():
            for row in self.store.rows.values():
                if row["checkpoint"] == ckpt["name"] and row["w"] != 0:
                    self.features.drop(PointStore.point_id(row))

    def _draw(self, row: dict, g, metric: float) -> None:
        point = (row["checkpoint"], row["w"], g)
        if point not in self.drawn:
            self.drawn.add(point)
            _curve_point(self.tracker, {**row, "metric": metric}, self.metric_name)


class _PointLines:
    """Rank 0's line per evaluated point: checkpoint, w, guidance, n, the metric ± its standard error,
    the images/s of that evaluation, and an eta over the images the plan (stages/plan.py) says the
    sweep samples: exact for grid (which also numbers the selection's points, 'point k/K'), the plan's
    range for early_stop and race ('point k', 'evaluation k' of a race: a point at each n; the eta a
    range). Points read from results.jsonl (a resumed sweep) print nothing: they count as done."""

    def __init__(self, ctx: RunContext, features: FeatureStore, metric_name: str):
        cfg, checkpoints = ctx.cfg, len(ctx.checkpoints())
        pts = sweep_points(cfg)
        self.cfg, self.features, self.metric_name = cfg, features, metric_name
        self.planned = sweep_images(cfg, pts, checkpoints)
        self.total = pts.w0 + checkpoints * (pts.grid - pts.w0) if pts.mode == "grid" else None
        self.rounds = set(pts.rounds)  # a race's n per round
        self.met: set[tuple] = set()  # eval keys met (read or evaluated)
        self.have: dict[str, int] = {}  # point id -> the largest n met (its chunks are reused)
        self.points = 0  # the selection's points met
        self.done = 0  # the planned images of the points met (counted as sweep_images counts them)
        self.sampled, self.seconds = 0, 0.0  # images this process sampled, and the time their evaluations took

    def meet(self, row: dict) -> str:
        """Count a point met for the first time; its label: 'point k[/K]', 'final_n' or 'repeat'."""
        key = PointStore.eval_key(row)
        if key in self.met:
            return "again"
        self.met.add(key)
        point, n, sw = PointStore.point_id(row), row["n"], self.cfg.sweep
        self.done += new_samples(self.have.get(point, 0), n, self.cfg.eval.chunk)
        self.have[point] = max(self.have.get(point, 0), n)
        if "seed" in row:
            return "repeat"
        if sw.final_n and n == sw.final_n and n != self.cfg.eval.n and n not in self.rounds:
            return "final_n"
        self.points += 1  # a race's point at each of its n
        noun = "evaluation" if self.rounds else "point"
        return f"{noun} {self.points}" + (f"/{self.total}" if self.total else "")

    def begin(self, row: dict) -> tuple[int, float] | None:
        """Before an evaluation (rank 0; None elsewhere): the images it samples (its chunks not in the
        feature store) and the time."""
        if not dist.is_main():
            return None
        point = PointStore.point_id(row)
        counts = chunk_counts(row["n"], self.cfg.eval.chunk)
        return sum(c for i, c in enumerate(counts) if not self.features.has(point, i, c)), time.perf_counter()

    def end(self, row: dict, est: Estimate, begun: tuple[int, float] | None) -> None:
        if begun is None:
            return
        new, start = begun
        seconds = time.perf_counter() - start
        label = self.meet(row)
        self.sampled, self.seconds = self.sampled + new, self.seconds + seconds
        where = f"w={row['w']:g}" + (f" {self.cfg.sweep.guidance_key}={row['guidance']}" if "guidance" in row else "")
        rate = new / max(seconds, 1e-9)
        speed = (f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}") + " images/s" if new else "samples reused"
        log(escape(f"sweep: {row['checkpoint']} {where} n={row['n']}: {self.metric_name} {_pm(est.metric, est.se)} "
                   f"({speed}, {duration(seconds)}); {label}{self._eta()}"))

    def _eta(self) -> str:
        """', eta 3.1 h' over the planned images left at this process's images/s ('eta 1 h to 4 h': the
        plan's range); nothing before a rate is known or past the plan's count."""
        if not self.sampled or self.done > self.planned.high:
            return ""
        rate = self.sampled / max(self.seconds, 1e-9)
        low, high = (max(0, x - self.done) / rate for x in (self.planned.low, self.planned.high))
        if high - low <= 0.005 * high:
            return f", eta {duration(high)}"
        return f", eta up to {duration(high)}" if low == 0 else f", eta {duration(low)} to {duration(high)}"


def _select(ctx: RunContext, estimate_at) -> tuple[tuple, Estimate, dict, dict]:
    """The selection rule of sweep.mode over `estimate_at(w, g, n)`: (best point, its estimate,
    point -> estimate at the selection's n, what the entry records of the selection)."""
    sw, ev = ctx.cfg.sweep, ctx.cfg.eval
    if sw.mode == "race":
        best, best_est, seen, rounds = race(estimate_at, sw.w_grid(), sw.guidance, sw.race.n0, ev.n, sw.race.z,
                                            sw.tol, sw.refine_w, sw.refine_guidance, sw.race.futility)
        return best, best_est, seen, {"rounds": rounds}
    n = ev.n
    best, _metric, seen = search(lambda w, g: estimate_at(w, g, n).metric, sw.w_grid(), sw.guidance, mode=sw.mode,
                                 tol=sw.tol, refine_w=sw.refine_w, refine_guidance=sw.refine_guidance)
    return best, estimate_at(*best, n), {p: estimate_at(*p, n) for p in seen}, {}


def _sweep_checkpoint(ctx: RunContext, points: _Points, ckpt: dict, extrapolator: Extrapolator) -> dict:
    """One checkpoint's summary entry: the selection rule's best point and the best at w = 0 (at
    the same n, with the standard error of their difference), with the final_n re-evaluation and
    the repeats when asked for."""
    sw, ev = ctx.cfg.sweep, ctx.cfg.eval
    estimate_at = functools.partial(points.estimate, ckpt, extrapolator)
    (bw, bg), best, seen, selection = _select(ctx, estimate_at)
    # w = 0 at its best guidance (among those it was evaluated with, at the largest n), then at the winner's n
    (_, g0), _ = min(((k, e) for k, e in seen.items() if k[0] == 0.0), key=lambda ke: (-ke[1].n, ke[1].metric))
    zero = estimate_at(0.0, g0, best.n)
    # samples the selection drew: each point at the largest n it reached (a larger n reuses the
    # smaller's samples); w = 0 counted in every checkpoint although it is sampled once
    reached = {p: e.n for p, e in seen.items()}
    reached[(0.0, g0)] = max(reached.get((0.0, g0), 0), zero.n)
    entry = {"checkpoint": ckpt["name"], "steps": ckpt["steps"], "sampler": ckpt["sampler"],
             "metric_w0": zero.metric, "se_w0": zero.se, "best_w": bw, "best_metric": best.metric, "best_se": best.se,
             "diff": {"mean": best.metric - zero.metric, "se": paired_se(best.replicates, zero.replicates)},
             "inf_w0": zero.infinity, "best_inf": best.infinity,
             "n": best.n, "points": len(seen), "images": sum(reached.values()), "mode": sw.mode, **selection}
    if sw.guidance_key is not None:
        entry["best_guidance"], entry["guidance_w0"] = bg, g0
    if sw.final_n:
        final = estimate_at(bw, bg, sw.final_n)
        entry.update(final_n=sw.final_n, final_metric=final.metric, final_se=final.se, final_inf=final.infinity)
    if sw.repeats:
        entry["repeats"] = _repeats(functools.partial(points.metric, ckpt, extrapolator), sw.repeats, ev, (0.0, g0),
                                    (bw, bg))
    points.forget(ckpt)
    return entry


def _repeats(metric_at, repeats: int, ev, zero: tuple, best: tuple) -> dict:
    """Error bars: w = 0 and the best w, each at its (w, guidance), with `repeats` fresh evaluation
    seeds (not the selection's: its luck would bias them); mean, standard error, paired difference."""
    seeds = [rng.seed_of(ev.seed, "repeat", r) for r in range(repeats)]
    at_zero = [metric_at(*zero, n=ev.n, seed=sd) for sd in seeds]
    at_best = [metric_at(*best, n=ev.n, seed=sd) for sd in seeds]
    return {"seeds": len(seeds), "w0": _mean_se(at_zero), "best": _mean_se(at_best),
            "diff": _mean_se([b - z for b, z in zip(at_best, at_zero)])}


def _add_panels(pictures: list, ctx: RunContext, model, extrapolator: Extrapolator, ckpt: dict, entry: dict) -> None:
    """samples.png's panels: w = 0 (once, first) and this checkpoint's best w."""
    if not pictures:
        pictures.append(_panel(ctx, model, extrapolator, 0.0, entry.get("guidance_w0"), "w = 0"))
    bw = entry["best_w"]
    pictures.append(_panel(ctx, model, extrapolator, bw, entry.get("best_guidance"), f"{ckpt['name']}: best w = {bw}"))


def _write_report(ctx: RunContext, stage: StageDir, summary: list[dict], store: PointStore, pictures: list,
                  metric_name: str, tracker: Tracker) -> None:
    """samples.png, summary.json and fid_vs_w.png (rank 0)."""
    if dist.is_main():
        if pictures:
            _samples_picture(pictures, _picture_classes(ctx), PER_CLASS, stage.path / "samples.png")
        write_json(stage.path / "summary.json", summary)
        _plot(summary, store, stage.path / "fid_vs_w.png", metric_name, tracker)


PER_CLASS = 8  # samples per class row of samples.png


PICTURE_CLASSES = 10  # rows of samples.png at most (the first classes): ImageNet's 1000 x 8 would cost an evaluation


def _num_classes(ctx: RunContext) -> int:
    return ctx.spec.null_class(ctx.model_args()) or 1


def _picture_classes(ctx: RunContext) -> int:
    return min(_num_classes(ctx), PICTURE_CLASSES)


@torch.no_grad()
def _panel(ctx: RunContext, model, extrapolator, w: float, g, title: str) -> tuple[str, torch.Tensor]:
    """(title, images) for samples.png: PER_CLASS samples of each of the first PICTURE_CLASSES classes at
    (w, guidance), class-major, always from the same noise."""
    cfg = ctx.cfg
    num_classes = _picture_classes(ctx)
    n = num_classes * PER_CLASS
    extrapolator.set_w(w)
    if cfg.sweep.guidance_key is not None:
        title += f", {cfg.sweep.guidance_key} {g}"
    gen, sampler = rng.generator(cfg.eval.seed, "picture"), ctx.spec.parse_sampler(eval_sampler_at(cfg, g))
    if num_classes == _num_classes(ctx):
        images = ctx.spec.images(ctx.spec.sample(model, n, gen, sampler), ctx.model_args()).cpu()
    else:  # the first PICTURE_CLASSES classes only (labels are i mod num_classes): sampled and decoded by row
        images = torch.cat([ctx.spec.images(ctx.spec.sample(model, num_classes, gen, sampler), ctx.model_args()).cpu()
                            for _ in range(PER_CLASS)])
    # sample i has class i mod num_classes: reorder to a row per class
    return title, images.reshape(PER_CLASS, num_classes, *images.shape[1:]).transpose(0, 1).reshape(n, *images.shape[1:])
