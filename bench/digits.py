"""Neon on real images over several base seeds: configs/digits_dit.yaml run once per seed (a
fresh base each time: its initialisation, data order and noise), then one table of what the
issue asks for: per seed and sampler setting, the metric at w = 0 (its best cfg) and at the best
w (its best cfg), each the mean +- standard error over the repeat seeds, and their paired
difference in standard errors. Finished runs are reused (every stage is skipped).

  python bench/digits.py [--seeds 0,1,2] [--root runs] [--set key=value ...]
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--root", default="runs")
    parser.add_argument("--config", default="configs/digits_dit.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        run_dir = pathlib.Path(args.root) / f"digits_dit-seed{seed}"
        cmd = [sys.executable, "-m", "neon_scale.cli", "run", "--config", args.config, "--run-dir", str(run_dir),
               "--set", f"base.seed={seed}"] + [x for o in args.overrides for x in ("--set", o)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, COLUMNS="200"))
        if proc.returncode:
            sys.exit(f"seed {seed}: neon run failed ({proc.returncode})")
        minutes = (time.perf_counter() - start) / 60
        metric_info = json.loads((ROOT / run_dir / "metric" / "done.json").read_text())
        for s in json.loads((ROOT / run_dir / "sweep" / "summary.json").read_text()):
            rows.append((seed, minutes, metric_info.get("heldout_accuracy"), s))
    print("\n| seed | S sampled with | metric at w = 0 (cfg) | best w (cfg) | metric at best w | difference | "
          "difference / se |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for seed, minutes, _acc, s in rows:
        r = s["repeats"]
        w0, best, diff = r["w0"], r["best"], r["diff"]
        print(f"| {seed} | {s['checkpoint'].split('/')[0]} | {w0['mean']:.2f} +- {w0['se']:.2f} (cfg "
              f"{s['guidance_w0']}) | {s['best_w']:+g} (cfg {s['best_guidance']}) | {best['mean']:.2f} +- "
              f"{best['se']:.2f} | {diff['mean']:+.2f} +- {diff['se']:.2f} | "
              f"{diff['mean'] / diff['se']:+.1f} |")
    accs = sorted({round(a, 4) for _, _, a, _ in rows if a is not None})
    times = {seed: minutes for seed, minutes, _, _ in rows}
    print("wall time of each run this time (min; ~0 when every stage was reused): "
          + ", ".join(f"seed {k}: {v:.1f}" for k, v in times.items()))
    print(f"\n{rows[0][3]['repeats']['seeds']} repeat evaluation seeds per point, n = {rows[0][3]['n']} samples each; "
          f"classifier held-out accuracy {accs}")


if __name__ == "__main__":
    main()
