"""Stage `sweep` (merge + eval + selection): for every fine-tune checkpoint, evaluate
theta_r + w (theta_r - theta_s) over (w, guidance) with the selection rule of neon_scale.sweep.
The merge is done in place on the live model by neon_scale.merge.inplace (Delta kept per tensor).

Every evaluated point is appended to sweep/results.jsonl (rewritten atomically), which doubles as
the cache that makes a killed sweep resume where it stopped. w = 0 is the base model: evaluated
once and shared by all checkpoints. Outputs: results.jsonl, summary.json, fid_vs_w.png.
"""
from __future__ import annotations

import json

from rich.table import Table

from .. import dist
from ..console import console, log, progress
from ..io import atomic_path, load_state_dict, write_json, write_text
from ..merge.inplace import Extrapolator, module_slots
from ..metrics.sample_eval import SampleMetric, evaluate
from ..sweep import search
from .common import RunContext, StageDir


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
        return source, row["w"], row.get("guidance"), row["n"]

    def cached(self, row) -> float | None:
        return self.metrics.get(self.eval_key(row))

    def add(self, row: dict, persist: bool = True) -> None:
        key = (row["checkpoint"], row["w"], row.get("guidance"), row["n"])
        if key in self.rows:
            return
        self.rows[key] = row
        self.metrics[self.eval_key(row)] = row["metric"]
        if persist and dist.is_main():
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows.values()))


def _plot(summary: list[dict], store: PointStore, path, metric_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in summary:
        by_w: dict[float, float] = {}
        for (ckpt, w, _g, n), row in store.rows.items():
            if ckpt == s["checkpoint"] and n == s["n"]:
                by_w[w] = min(row["metric"], by_w.get(w, float("inf")))
        ws = sorted(by_w)
        ax.plot(ws, [by_w[w] for w in ws], marker="o", ms=3, label=s["checkpoint"])
    ax.set_yscale("log")
    ax.set_xlabel("w  (theta_r + w (theta_r - theta_s))")
    ax.set_ylabel(metric_name)
    ax.axvline(0.0, color="gray", lw=0.5)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def print_summary(summary: list[dict], metric_name: str) -> None:
    if not dist.is_main():
        return
    table = Table(title=f"Neon sweep ({metric_name}, lower is better)")
    for col in ("checkpoint", "steps", f"{metric_name} @ w=0", "best w", f"best {metric_name}", "ratio"):
        table.add_column(col, justify="left" if col == "checkpoint" else "right")
    for s in summary:
        best = s["best_w"] if s.get("best_guidance") is None else f"{s['best_w']} (g={s['best_guidance']})"
        table.add_row(s["checkpoint"], str(s["steps"]), f"{s['metric_w0']:.4f}", str(best),
                      f"{s['best_metric']:.4f}", f"{s['best_metric'] / s['metric_w0']:.3f}")
    console.print(table)


def run(ctx: RunContext) -> None:
    cfg = ctx.cfg
    stage = StageDir(ctx.run_dir / "sweep", ctx.fingerprint("sweep"), "sweep")
    summary_path = stage.path / "summary.json"
    if stage.is_done():
        log("sweep: complete, skipped")
        print_summary(json.loads(summary_path.read_text()), ctx.spec.metric_name)
        return
    stage.prepare(keep_fingerprint=ctx.fingerprint("eval"))
    store = PointStore(stage.path / "results.jsonl")
    base_state = load_state_dict(ctx.base_weights())
    model = ctx.load_model(ctx.base_weights())
    sw, ev = cfg.sweep, cfg.eval
    sample_metric = SampleMetric(ctx.spec, ev, ctx.model_args())
    summary = []
    checkpoints = ctx.checkpoints()
    with progress("sweep", len(checkpoints)) as bar:
        for ckpt in checkpoints:
            # theta_r and Delta kept per tensor: each w is one pass over the weights, not a reload
            extrapolator = Extrapolator(module_slots(model, base_state, load_state_dict(ckpt["path"])))

            def metric_at(w, g, n=ev.n, ckpt=ckpt, extrapolator=extrapolator):
                row = {"checkpoint": ckpt["name"], "steps": ckpt["steps"], "sampler": ckpt["sampler"], "w": w, "n": n}
                eval_sampler = dict(ev.sampler)
                if sw.guidance_key is not None:
                    row["guidance"] = g
                    eval_sampler[sw.guidance_key] = g
                metric = store.cached(row)
                if metric is None:
                    extrapolator.set_w(w)
                    metric = evaluate(sample_metric, model, ctx.spec.parse_sampler(eval_sampler), n, ev.seed, ev.chunk)
                store.add({**row, "eval_sampler": eval_sampler, "metric_name": ctx.spec.metric_name, "metric": metric})
                return metric

            (bw, bg), best, seen = search(metric_at, sw.w_grid(), sw.guidance, mode=sw.mode, tol=sw.tol,
                                          refine_w=sw.refine_w, refine_guidance=sw.refine_guidance)
            entry = {"checkpoint": ckpt["name"], "steps": ckpt["steps"], "sampler": ckpt["sampler"],
                     "metric_w0": min(m for (w, _g), m in seen.items() if w == 0.0),
                     "best_w": bw, "best_metric": best, "n": ev.n, "points": len(seen)}
            if sw.guidance_key is not None:
                entry["best_guidance"] = bg
            if sw.final_n:
                entry["final_n"] = sw.final_n
                entry["final_metric"] = metric_at(bw, bg, n=sw.final_n)
            summary.append(entry)
            bar.update(info=f"{ckpt['name']}: best w {bw} ({best:.4f})")
    if dist.is_main():
        write_json(summary_path, summary)
        _plot(summary, store, stage.path / "fid_vs_w.png", ctx.spec.metric_name)
    stage.mark_done()
    print_summary(summary, ctx.spec.metric_name)
