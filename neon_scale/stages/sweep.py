"""Stage `sweep` (merge + eval + selection): for every fine-tune checkpoint, evaluate
theta_r + w (theta_r - theta_s) over (w, guidance) with the selection rule of neon_scale.sweep.
The merge is done in place on the live model by neon_scale.merge.inplace (Delta kept per tensor).

Every evaluated point is appended to sweep/results.jsonl (rewritten atomically), which doubles as
the cache that makes a killed sweep resume where it stopped. w = 0 is the base model: evaluated
once and shared by all checkpoints. Outputs: results.jsonl, summary.json, fid_vs_w.png, and for
image models samples.png (a row per class at w = 0 and at each checkpoint's best w, same noise).

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
import textwrap

import torch
from rich.table import Table

from .. import dist, rng
from ..console import console, log, progress
from ..io import atomic_path, load_state_dict, write_json, write_text
from ..merge.inplace import Extrapolator, module_slots
from ..metrics.backbones import METRIC_NAMES, load_backbone
from ..selection import search
from ..tracking import Tracker, open_tracker
from .evaluate import SampleMetric, evaluate
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
        self.metrics: dict[tuple, float] = {}
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

    def cached(self, row) -> float | None:
        return self.metrics.get(self.eval_key(row))

    def add(self, row: dict, persist: bool = True) -> None:
        key = (row["checkpoint"], row["w"], row.get("guidance"), row["n"], row.get("seed"))
        if key in self.rows:
            return
        self.rows[key] = row
        self.metrics[self.eval_key(row)] = row["metric"]
        if persist and dist.is_main():
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows.values()))


def _plot(summary: list[dict], store: PointStore, path, metric_name: str, tracker: Tracker) -> None:
    import matplotlib  # lazy: slow to import, and only rank 0 draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summary:
        by_w: dict[float, float] = {}
        for (ckpt, w, _g, n, seed), row in store.rows.items():
            if ckpt == s["checkpoint"] and n == s["n"] and seed is None:
                by_w[w] = min(row["metric"], by_w.get(w, float("inf")))
        ws = sorted(by_w)
        line, = ax.plot(ws, [by_w[w] for w in ws], marker="o", ms=3, label=s["checkpoint"])
        ax.plot([s["best_w"]], [s["best_metric"]], marker="*", ms=12, color=line.get_color(), mec="black", mew=0.5)
    ax.set_yscale("log")
    ax.set_xlabel("w  (theta_neon = theta_r + w (theta_r - theta_s))")
    ax.set_ylabel(f"{metric_name} (best over guidance; lower is better)")
    ax.set_title(f"Neon sweep: {metric_name} vs w per fine-tune checkpoint (star: chosen point)", fontsize=9)
    ax.axvline(0.0, color="gray", lw=0.5)
    ax.legend(fontsize=8)
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


def print_summary(summary: list[dict], metric_name: str) -> None:
    if not dist.is_main():
        return
    repeats = all("repeats" in s for s in summary) and summary
    table = Table(title=f"Neon sweep ({metric_name}, lower is better" +
                  (f"; repeats: mean +- standard error over {summary[0]['repeats']['seeds']} evaluation seeds)"
                   if repeats else ")"))
    cols = ["checkpoint", "w=0", "best w", f"{metric_name} @ w=0", f"best {metric_name}", "ratio"]
    if repeats:
        cols += ["difference (repeats)", "z"]
    for col in cols:
        table.add_column(col, justify="left" if col == "checkpoint" else "right")

    def point(w, g):
        return str(w) if g is None else f"{w} (g {g})"

    for s in summary:
        if repeats:
            r = s["repeats"]
            m0, mb = f"{r['w0']['mean']:.4g} +- {r['w0']['se']:.2g}", f"{r['best']['mean']:.4g} +- {r['best']['se']:.2g}"
            ratio = r["best"]["mean"] / r["w0"]["mean"]
        else:
            m0, mb, ratio = f"{s['metric_w0']:.4g}", f"{s['best_metric']:.4g}", s["best_metric"] / s["metric_w0"]
        row = [s["checkpoint"], point(0.0, s.get("guidance_w0")), point(s["best_w"], s.get("best_guidance")), m0, mb,
               f"{ratio:.3f}"]
        if repeats:
            d = s["repeats"]["diff"]
            row += [f"{d['mean']:+.4g} +- {d['se']:.2g}", f"{d['mean'] / d['se']:+.1f}" if d["se"] > 0 else "-"]
        table.add_row(*row)
    console.print(table)


def _eval_sampler(cfg, g) -> dict:
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
              "points": entry["points"]}
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
    sample_metric = _sample_metric(ctx)
    # ------------------------------------------------------------------ Point cache
    # keyed by what a point depends on: a change of the selection rule alone keeps the points
    stage.prepare(keep_fingerprint=ctx.points_fingerprint())
    store = PointStore(stage.path / "results.jsonl")
    base_state = load_state_dict(ctx.base_weights())
    model = ctx.load_model(ctx.base_weights())
    points = _Points(ctx, sample_metric, model, store, tracker, metric_name)
    summary, pictures = [], []
    checkpoints = ctx.checkpoints()
    # ------------------------------------------------------------------ Sweep each checkpoint
    with progress("sweep", len(checkpoints)) as bar:
        for ckpt in checkpoints:
            # theta_r and Delta kept per tensor: each w is one pass over the weights, not a reload
            extrapolator = Extrapolator(module_slots(model, base_state, load_state_dict(ckpt["path"])))
            entry = _sweep_checkpoint(ctx, points, ckpt, extrapolator)
            if ctx.spec.makes_images and dist.is_main():  # drawn now: each Delta is held only in its turn
                _add_panels(pictures, ctx, model, extrapolator, ckpt, entry)
            summary.append(entry)
            _summary_scalars(tracker, entry, metric_name)
            bar.update(info=f"{ckpt['name']}: best w {entry['best_w']} ({entry['best_metric']:.4f})")
    # ------------------------------------------------------------------ Report
    _write_report(ctx, stage, summary, store, pictures, metric_name, tracker)
    stage.mark_done()
    print_summary(summary, metric_name)


def _sample_metric(ctx: RunContext) -> SampleMetric:
    """Image models: the backbone of `eval.features` against the reference statistics (stages/metric.py
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
    """The metric at a sweep point: read from the cache or evaluated, then persisted and (the
    selection's points) drawn on the curve."""

    def __init__(self, ctx: RunContext, sample_metric: SampleMetric, model: torch.nn.Module, store: PointStore,
                 tracker: Tracker, metric_name: str):
        self.ctx, self.sample_metric, self.model, self.store = ctx, sample_metric, model, store
        self.tracker, self.metric_name = tracker, metric_name
        self.drawn: set[tuple] = set()  # curve points already logged (final_n may repeat one; repeats are not on it)

    def metric(self, ckpt: dict, extrapolator: Extrapolator, w: float, g, n: int, seed: int | None = None) -> float:
        cfg = self.ctx.cfg
        row = _point_row(ckpt, w, g, n, seed, cfg.sweep.guidance_key)
        eval_sampler = _eval_sampler(cfg, g)
        metric = self.store.cached(row)
        if metric is None:
            metric = self._evaluate(extrapolator, w, eval_sampler, n, seed)
        self.store.add({**row, "eval_sampler": eval_sampler, "metric_name": self.metric_name, "metric": metric})
        if n == cfg.eval.n and seed is None:  # the selection's points only
            self._draw(row, g, metric)
        return metric

    def _evaluate(self, extrapolator: Extrapolator, w: float, eval_sampler: dict, n: int, seed: int | None) -> float:
        ev = self.ctx.cfg.eval
        extrapolator.set_w(w)
        return evaluate(self.sample_metric, self.model, self.ctx.spec.parse_sampler(eval_sampler), n,
                        ev.seed if seed is None else seed, ev.chunk)

    def _draw(self, row: dict, g, metric: float) -> None:
        point = (row["checkpoint"], row["w"], g)
        if point not in self.drawn:
            self.drawn.add(point)
            _curve_point(self.tracker, {**row, "metric": metric}, self.metric_name)


def _sweep_checkpoint(ctx: RunContext, points: _Points, ckpt: dict, extrapolator: Extrapolator) -> dict:
    """One checkpoint's summary entry: the selection rule's best point and the best at w = 0, with
    the final_n re-evaluation and the repeats when asked for."""
    sw, ev = ctx.cfg.sweep, ctx.cfg.eval
    metric_at = functools.partial(points.metric, ckpt, extrapolator)
    (bw, bg), best, seen = search(functools.partial(metric_at, n=ev.n), sw.w_grid(), sw.guidance, mode=sw.mode,
                                  tol=sw.tol, refine_w=sw.refine_w, refine_guidance=sw.refine_guidance)
    (_, g0), m0 = min(((k, m) for k, m in seen.items() if k[0] == 0.0), key=lambda km: km[1])
    entry = {"checkpoint": ckpt["name"], "steps": ckpt["steps"], "sampler": ckpt["sampler"],
             "metric_w0": m0, "best_w": bw, "best_metric": best, "n": ev.n, "points": len(seen)}
    if sw.guidance_key is not None:
        entry["best_guidance"], entry["guidance_w0"] = bg, g0
    if sw.final_n:
        entry["final_n"] = sw.final_n
        entry["final_metric"] = metric_at(bw, bg, n=sw.final_n)
    if sw.repeats:
        entry["repeats"] = _repeats(metric_at, sw.repeats, ev, (0.0, g0), (bw, bg))
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
            _samples_picture(pictures, _num_classes(ctx), PER_CLASS, stage.path / "samples.png")
        write_json(stage.path / "summary.json", summary)
        _plot(summary, store, stage.path / "fid_vs_w.png", metric_name, tracker)


PER_CLASS = 8  # samples per class row of samples.png


def _num_classes(ctx: RunContext) -> int:
    return ctx.spec.null_class(ctx.model_args()) or 1


@torch.no_grad()
def _panel(ctx: RunContext, model, extrapolator, w: float, g, title: str) -> tuple[str, torch.Tensor]:
    """(title, images) for samples.png: PER_CLASS samples of every class at (w, guidance), class-major,
    always from the same noise."""
    cfg = ctx.cfg
    num_classes = _num_classes(ctx)
    n = num_classes * PER_CLASS
    extrapolator.set_w(w)
    if cfg.sweep.guidance_key is not None:
        title += f", {cfg.sweep.guidance_key} {g}"
    samples = ctx.spec.sample(model, n, rng.generator(cfg.eval.seed, "picture"),
                              ctx.spec.parse_sampler(_eval_sampler(cfg, g)))
    images = ctx.spec.images(samples, ctx.model_args()).cpu()
    # sample i has class i mod num_classes: reorder to a row per class
    return title, images.reshape(PER_CLASS, num_classes, *images.shape[1:]).transpose(0, 1).reshape(n, *images.shape[1:])
