"""Is the jackknife standard error right at small n? Against the spread over evaluation seeds.

For a few merged points of a run (theta_r + w (theta_r - theta_s) at guidance g, one fine-tune
checkpoint), each point is evaluated with S evaluation seeds at n = n_1 < n_2 < ... (the larger n
reusing the smaller's chunks, as the sweep does). Per n it prints, for each point, the standard
deviation of the metric over the seeds beside the root-mean-square jackknife se (their ratio: 1 is
calibrated, above 1 conservative), and the same for the paired difference of each point to the
first (the quantity a race decides on). On the digits' classifier features (ReLU outputs) the
distance is far from linear in the samples at small n, and the jackknife overstates the noise
there (bench/RESULTS.md); on Gaussian features it does not. Where n has 8 samples per feature
dimension, also the mean and SD of FD-infinity over the seeds: unlike FD it should not fall with n.

    python bench/calibration.py --config configs/digits_dit.yaml --run runs/digits_dit-seed0
    python bench/calibration.py --config configs/digits_dit.yaml --run runs/digits_dit-seed0 \\
        --points 0.25:1.5,0.5:2.0,-1.5:4.0 --seeds 40 --n 25,50,100,200
    python bench/calibration.py --config configs/digits_dit.yaml --run runs/digits_dit-seed0 \\
        --points 0:1.0,0.25:1.5 --seeds 8 --n 1000,2000,5000,10000 --chunk 500     # FD-infinity
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from neon_scale.config import load_config  # noqa: E402
from neon_scale.io import load_state_dict  # noqa: E402
from neon_scale.merge.inplace import Extrapolator, module_slots  # noqa: E402
from neon_scale.metrics.uncertainty import paired_se  # noqa: E402
from neon_scale.stages import sweep as sweep_stage  # noqa: E402
from neon_scale.stages.common import RunContext  # noqa: E402
from neon_scale.stages.evaluate import FeatureStore, evaluate  # noqa: E402

SEED0 = 1000  # evaluation seeds SEED0 .. SEED0 + S - 1: none of a sweep's defaults



def rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--run", required=True, help="a run directory with the base, train and metric stages done")
    parser.add_argument("--checkpoint", type=int, default=0, help="which fine-tune checkpoint (index)")
    parser.add_argument("--points", default="0.25:1.5,0.5:2.0,-1.5:4.0", help="w:guidance,... (the first is the "
                                                                              "reference of the differences)")
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--n", default="25,50,100,200")
    parser.add_argument("--chunk", type=int, default=25)
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args()
    sizes = [int(n) for n in args.n.split(",")]
    points = [tuple(float(v) for v in p.split(":")) for p in args.points.split(",")]
    cfg = load_config(args.config, [f"run_dir={args.run}", f"eval.chunk={args.chunk}"])
    ctx = RunContext.from_config(cfg)
    metric = sweep_stage.build_sample_metric(ctx)
    model = ctx.load_model(ctx.base_weights())
    ckpt = ctx.checkpoints()[args.checkpoint]
    extrapolator = Extrapolator(module_slots(model, load_state_dict(ctx.base_weights()), load_state_dict(ckpt["path"])))
    print(f"{args.config} {ckpt['name']}: {metric.dim} features, {args.seeds} seeds, n = {sizes}", flush=True)
    est = {}  # (point, seed, n) -> Estimate
    for point in points:
        extrapolator.set_w(point[0])
        sampler = ctx.spec.parse_sampler(sweep_stage.eval_sampler_at(cfg, point[1] if len(point) > 1 else None))
        for s in range(args.seeds):
            store = FeatureStore(None)  # shared by the sizes: a larger n reuses the smaller's chunks
            for n in sizes:
                est[(point, s, n)] = evaluate(metric, model, sampler, n, SEED0 + s, args.chunk, store, "p")
        print(f"  sampled w={point[0]} g={point[1:]}", flush=True)
    rows = []
    print("| n | point | mean | SD over seeds | RMS jackknife se | ratio | mean FD-infinity | its SD |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        for point in points:
            values = [est[(point, s, n)].metric for s in range(args.seeds)]
            spread, se = statistics.stdev(values), rms([est[(point, s, n)].se for s in range(args.seeds)])
            rows.append({"n": n, "point": point, "mean": sum(values) / len(values), "sd": spread, "se": se})
            inf = [est[(point, s, n)].infinity for s in range(args.seeds)]
            inf_cols = "- | -"  # FD-infinity needs 8 samples per feature dimension
            if None not in inf:
                rows[-1].update(inf_mean=sum(inf) / len(inf), inf_sd=statistics.stdev(inf))
                inf_cols = f"{rows[-1]['inf_mean']:.2f} | {rows[-1]['inf_sd']:.3g}"
            print(f"| {n} | w {point[0]}, g {point[1:]} | {rows[-1]['mean']:.2f} | {spread:.3g} | {se:.3g} | "
                  f"{se / spread:.2f} | {inf_cols} |")
        ref = points[0]
        for point in points[1:]:
            pairs = [(est[(point, s, n)], est[(ref, s, n)]) for s in range(args.seeds)]
            diffs = [a.metric - b.metric for a, b in pairs]
            spread, se = statistics.stdev(diffs), rms([paired_se(a.replicates, b.replicates) for a, b in pairs])
            rows.append({"n": n, "point": point, "minus": ref, "mean": sum(diffs) / len(diffs), "sd": spread, "se": se})
            print(f"| {n} | w {point[0]}, g {point[1:]} minus the first | {rows[-1]['mean']:.2f} | {spread:.3g} | "
                  f"{se:.3g} | {se / spread:.2f} |", flush=True)
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"config": args.config, "checkpoint": ckpt["name"],
                                                      "seeds": args.seeds, "dim": metric.dim, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
