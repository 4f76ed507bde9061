"""Selection rules compared: the samples each draws and the final metric of the point it picks.

For each config, the stages up to `train` are made once (or an existing run directory is reused
with --run CONFIG=DIR: only its base, synth, train and metric folders are read); then for each eval
seed the sweep runs with each mode (race, early_stop, grid) in a copy of that run directory. Every
selected point is then re-evaluated at --final-n samples with one fresh seed shared by all picks
(common random numbers: the difference between two modes' picks is paired, with its jackknife
standard error), so the selection's own luck does not flatter any rule.

Then `neon diagnose` on the same run: its predicted sign of w per sampler setting beside the
picks. Printed per config: for each seed and mode, the samples the selection drew (summary.json's
`images`, summed over checkpoints) and each checkpoint's pick with its final metric; then the
ratios race/early_stop and grid/early_stop of samples, and race's final metric minus
early_stop's, in standard errors. The JSON goes to --out.

    python bench/selection.py                                  # toy2d and digits_dit, 5 seeds
    python bench/selection.py --configs configs/toy2d.yaml --seeds 0,1 --modes race,early_stop
    python bench/selection.py --run configs/digits_dit.yaml=runs/digits_dit-seed0

Each config gets its own eval settings for the comparison (--set CONFIG=KEY=VALUE, repeatable):
the defaults below make race's first round small (eval.chunk = race.n0).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from neon_scale.config import load_config  # noqa: E402
from neon_scale.io import load_state_dict  # noqa: E402
from neon_scale.merge.inplace import Extrapolator, module_slots  # noqa: E402
from neon_scale.stages import sweep as sweep_stage  # noqa: E402
from neon_scale.stages.common import RunContext  # noqa: E402
from neon_scale.stages.evaluate import FeatureStore, evaluate  # noqa: E402
from neon_scale.metrics.uncertainty import paired_se  # noqa: E402

DEFAULT_SETTINGS = {
    "configs/toy2d.yaml": ["eval.chunk=5000", "sweep.race.n0=5000"],
    # n0 = eval.n / 80: at 125 the first round alone (90 points) was 27% of early_stop's samples
    "configs/digits_dit.yaml": ["eval.chunk=25", "sweep.race.n0=25", "sweep.repeats=0"],
}
# the picks' final evaluation, when --final-n is not given: eval.n, or 5 x eval.n where one evaluation
# at eval.n is too noisy to rank the picks (the authors' 50k after a 10k sweep)
DEFAULT_FINAL_N = {"configs/digits_dit.yaml": 10000}
FINAL_SEED = 987654321  # not an eval seed of any sweep here


def neon(*args: str) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", COLUMNS="200")
    proc = subprocess.run([sys.executable, "-m", "neon_scale.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"neon {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def sweep_once(config: str, base_run: pathlib.Path, work: pathlib.Path, overrides: list[str], seed: int,
               mode: str) -> tuple[list[dict], float]:
    run_dir = work / f"seed{seed}-{mode}"
    if not run_dir.exists():  # else: finished (skipped) or killed (the sweep resumes)
        shutil.copytree(base_run, run_dir, ignore=shutil.ignore_patterns("sweep", "tb", "control", "diagnose"))
    t0 = time.perf_counter()
    neon("sweep", "--config", config, "--run-dir", str(run_dir), *sets(overrides + [f"eval.seed={seed}",
                                                                                     f"sweep.mode={mode}"]))
    return json.loads((run_dir / "sweep" / "summary.json").read_text()), time.perf_counter() - t0


def final_metrics(config: str, run_dir: pathlib.Path, overrides: list[str], picks: set, final_n: int) -> dict:
    """Each (checkpoint, w, guidance) picked by some rule, evaluated at final_n with FINAL_SEED."""
    cfg = load_config(config, overrides + [f"run_dir={run_dir}"])
    ctx = RunContext.from_config(cfg)
    metric = sweep_stage.build_sample_metric(ctx)
    base_state = load_state_dict(ctx.base_weights())
    model = ctx.load_model(ctx.base_weights())
    out = {}
    for ckpt in ctx.checkpoints():
        mine = sorted((p for p in picks if p[0] == ckpt["name"]), key=str)
        if not mine:
            continue
        extrapolator = Extrapolator(module_slots(model, base_state, load_state_dict(ckpt["path"])))
        for name, w, g in mine:
            extrapolator.set_w(w)
            sampler = ctx.spec.parse_sampler(sweep_stage.eval_sampler_at(cfg, g))
            out[(name, w, g)] = evaluate(metric, model, sampler, final_n, FINAL_SEED, cfg.eval.chunk,
                                         FeatureStore(None), "final")
            print(f"  final {name} w={w} g={g}: {out[(name, w, g)].metric:.4f} +- {out[(name, w, g)].se:.2g}",
                  flush=True)
    return out


def bench_config(config: str, run: pathlib.Path | None, work: pathlib.Path, overrides: list[str], seeds: list[int],
                 modes: list[str], final_n: int | None) -> dict:
    name = pathlib.Path(config).stem
    base_run = run or work / "base"
    if run is None:
        neon("run", "--config", config, "--run-dir", str(base_run), "--stage", "base", "--stage", "synth",
             "--stage", "train", *sets(overrides))
    results = {}
    for seed in seeds:
        for mode in modes:
            summary, secs = sweep_once(config, base_run, work, overrides, seed, mode)
            results[(seed, mode)] = summary
            print(f"{name} seed {seed} {mode}: {sum(e['images'] for e in summary)} samples, {secs:.0f} s; picks "
                  + ", ".join(f"{e['checkpoint']} w={e['best_w']} g={e.get('best_guidance')}" for e in summary),
                  flush=True)
    picks = {(e["checkpoint"], e["best_w"], e.get("best_guidance")) for s in results.values() for e in s}
    cfg_n = load_config(config, overrides).eval.n
    final = final_metrics(config, base_run, overrides, picks, final_n or cfg_n)
    rows = []
    for (seed, mode), summary in results.items():
        for e in summary:
            f = final[(e["checkpoint"], e["best_w"], e.get("best_guidance"))]
            rows.append({"seed": seed, "mode": mode, "checkpoint": e["checkpoint"], "sampler": e.get("sampler"),
                         "best_w": e["best_w"],
                         "best_guidance": e.get("best_guidance"), "images": e["images"], "points": e["points"],
                         "final_metric": f.metric, "final_se": f.se, "final_replicates": f.replicates})
    return {"config": config, "final_n": final_n or cfg_n, "overrides": overrides, "rows": rows,
            "diagnose": diagnose(config, base_run, overrides)}


def diagnose(config: str, run_dir: pathlib.Path, overrides: list[str]) -> list[dict]:
    """`neon diagnose` on the run (reused when its diagnose.json is there): per sampler setting."""
    out = run_dir / "diagnose" / "diagnose.json"
    if not out.is_file():
        neon("diagnose", "--config", config, "--run-dir", str(run_dir), *sets(overrides))
    return [{k: d.get(k) for k in ("sampler_tag", "cos", "ci95", "predicted_w_sign", "bootstrap_fraction",
                                   "after_train", "sampler")} for d in json.loads(out.read_text())["settings"]]


def report(result: dict) -> None:
    rows, name = result["rows"], pathlib.Path(result["config"]).stem
    modes = sorted({r["mode"] for r in rows})
    print(f"\n## {name}: final metric at n = {result['final_n']} (fresh seed, shared by every pick)")
    print("| seed | checkpoint | " + " | ".join(f"{m}: samples, pick, final" for m in modes) + " | race - early_stop (z) |")
    print("|---|---|" + "---|" * (len(modes) + 1))
    by = {(r["seed"], r["mode"], r["checkpoint"]): r for r in rows}
    ckpts = dict.fromkeys(r["checkpoint"] for r in rows)  # in the order the sweeps met them
    for seed in sorted({r["seed"] for r in rows}):
        for ckpt in ckpts:
            cells = []
            for m in modes:
                r = by.get((seed, m, ckpt))
                g = "" if r is None or r["best_guidance"] is None else f" g {r['best_guidance']}"
                cells.append("-" if r is None else f"{r['images']}, w {r['best_w']}{g}, {r['final_metric']:.4g} "
                                                   f"± {r['final_se']:.2g}")
            diff = "-"
            a, b = by.get((seed, "race", ckpt)), by.get((seed, "early_stop", ckpt))
            if a and b:
                d, se = a["final_metric"] - b["final_metric"], paired_se(a["final_replicates"], b["final_replicates"])
                diff = f"{d:+.3g} ({d / se:+.1f})" if se else f"{d:+.3g} (same point)"
            print(f"| {seed} | {ckpt} | " + " | ".join(cells) + f" | {diff} |")
    print(f"\n`neon diagnose` on {name} vs the best w each rule picked (all seeds, every checkpoint of the setting)")
    print("| sampler | cos | 95% interval | predicted w | bootstrap agrees | best w picked | after train: "
          "cos(g_r, theta_r - theta_s) |")
    print("|---|---:|---|---|---:|---|---|")
    for d in result["diagnose"]:
        picked = sorted({r["best_w"] for r in rows if (r.get("sampler") is not None and r["sampler"] == d.get("sampler"))
                         or r["checkpoint"].startswith(d["sampler_tag"] + "/")})  # (a run dir of version 0.1.0: tag)
        lo, hi = d["ci95"]
        print(f"| {d['sampler_tag']} | {d['cos']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | "
              f"{'w > 0' if d['predicted_w_sign'] > 0 else 'w < 0'} | {d['bootstrap_fraction']:.3f} | {picked} | "
              + (", ".join(f"{a['cos_real']:+.3f}" for a in d.get("after_train") or []) or "-") + " |")
    if "race" in modes and "early_stop" in modes:
        print("\n| seed | early_stop samples | race samples | race / early_stop | race's pick = early_stop's | "
              "race - early_stop at the final n, in point se of early_stop's pick (paired z) |")
        print("|---|---:|---:|---:|---|---|")
        for seed in sorted({r["seed"] for r in rows}):
            pairs = [(by[(seed, "race", c)], by[(seed, "early_stop", c)]) for c in ckpts
                     if (seed, "race", c) in by and (seed, "early_stop", c) in by]
            a, b = sum(r["images"] for r, _ in pairs), sum(e["images"] for _, e in pairs)
            same = sum((r["best_w"], r["best_guidance"]) == (e["best_w"], e["best_guidance"]) for r, e in pairs)
            diffs = []
            for r, e in pairs:
                d, se = r["final_metric"] - e["final_metric"], paired_se(r["final_replicates"], e["final_replicates"])
                diffs.append("0" if not se else f"{d:+.3g} = {d / e['final_se']:+.2f} se ({d / se:+.1f})")
            print(f"| {seed} | {b:,} | {a:,} | {a / b:.3f} | {same}/{len(pairs)} | {', '.join(diffs)} |")
    total = {m: sum(r["images"] for r in rows if r["mode"] == m) for m in modes}
    if "early_stop" in total:
        print("\nsamples drawn, all seeds: " + ", ".join(f"{m} {total[m]} ({total[m] / total['early_stop']:.3f} x "
                                                         f"early_stop)" for m in modes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="configs/toy2d.yaml,configs/digits_dit.yaml")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="eval seeds (each a whole sweep per mode)")
    parser.add_argument("--modes", default="race,early_stop,grid")
    parser.add_argument("--run", action="append", default=[], metavar="CONFIG=DIR",
                        help="reuse DIR's base/synth/train/metric for CONFIG instead of making them")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="CONFIG=KEY=VALUE",
                        help="an override for CONFIG's runs (replaces the defaults given for it)")
    parser.add_argument("--final-n", type=int, default=None,
                        help="samples of the final evaluation (default: DEFAULT_FINAL_N, else eval.n)")
    parser.add_argument("--work", default="runs/bench-selection")
    parser.add_argument("--out", default="bench/selection.json")
    parser.add_argument("--report", metavar="JSON", help="print the tables of a saved --out file and exit")
    args = parser.parse_args()
    if args.report:
        for result in json.loads(pathlib.Path(args.report).read_text()):
            report(result)
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    runs = dict(r.split("=", 1) for r in args.run)
    given: dict[str, list[str]] = {}
    for s in args.sets:
        cfg, kv = s.split("=", 1)
        given.setdefault(cfg, []).append(kv)
    out = []
    for config in args.configs.split(","):
        overrides = given.get(config, DEFAULT_SETTINGS.get(config, []))
        work = ROOT / args.work / pathlib.Path(config).stem
        run = pathlib.Path(runs[config]).resolve() if config in runs else None
        result = bench_config(config, run, work, overrides, [int(s) for s in args.seeds.split(",")],
                              args.modes.split(","), args.final_n or DEFAULT_FINAL_N.get(config))
        report(result)
        out.append(result)
        pathlib.Path(args.out).write_text(json.dumps(out, indent=1, default=list))


if __name__ == "__main__":
    main()
