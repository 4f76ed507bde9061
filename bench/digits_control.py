"""Controls for the digits experiment (configs/digits_dit.yaml): is the gain from w > 0 Neon's
(stepping away from self-training on a mode-seeking S), or would stepping away from *any* short
fine-tune do the same?

For a finished run directory, theta_r is also fine-tuned on the REAL training split (the same
trainer and settings as the fine-tune on S), and every theta_s of the run plus this real-data
control is swept over the same (w, cfg) grid with the run's metric and evaluation noise. Per
w, the best metric over cfg is printed. Neon's account predicts: the mode-seeking S gives its
minimum at w > 0; a fine-tune on real data does not (its best w is <= 0 or the curve is flat).

  python bench/digits_control.py runs/digits_dit [--w -1,-0.5,0,0.5,1] [--cfg 1,1.5,2,3]
"""
import argparse
import json
import pathlib
import time

from neon_scale import dist
from neon_scale.config import load_config
from neon_scale.io import load_state_dict
from neon_scale.merge.inplace import Extrapolator, module_slots
from neon_scale.metrics.backbones import load_backbone
from neon_scale.stages.evaluate import SampleMetric, evaluate
from neon_scale.stages import metric as metric_stage
from neon_scale.stages.common import RunContext
from neon_scale.stages.train import run_trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--w", default="-1,-0.5,0,0.25,0.5,0.75,1,1.5")
    parser.add_argument("--cfg", default="1,1.5,2,2.5,3,4")
    args = parser.parse_args()
    run = pathlib.Path(args.run_dir)
    cfg = load_config(str(run / "config.yaml"), [f"run_dir={run}"])
    ctx = RunContext.from_config(cfg)
    dist.init()

    # ---------------------------------------------------------------- Fine-tune on real data
    out = run / "control" / "real"
    start = time.perf_counter()
    run_trainer(ctx, cfg.train, lambda: ctx.load_model(ctx.base_weights()).train(), run / "base" / "real", out,
                "real data", lambda step: out / f"theta_real-step{step:06d}.safetensors")
    steps = max(cfg.train.save_steps)
    thetas = {"real data (control)": out / f"theta_real-step{steps:06d}.safetensors"}
    for ckpt in ctx.checkpoints():
        thetas[ckpt["name"]] = ckpt["path"]

    # ---------------------------------------------------------------- Sweep every theta
    weights, ref, _ = metric_stage.prepare(ctx)
    ev = cfg.eval
    metric = SampleMetric(ctx.spec, load_backbone(ev.features, weights, batch_size=ev.batch_size), ref,
                          ctx.model_args())
    base = load_state_dict(ctx.base_weights())
    model = ctx.load_model(ctx.base_weights())
    ws = [float(v) for v in args.w.split(",")]
    cfgs = [float(v) for v in args.cfg.split(",")]
    results = {}
    for name, path in thetas.items():
        extrapolator = Extrapolator(module_slots(model, base, load_state_dict(path)))
        curve = {}
        for w in ws:
            extrapolator.set_w(w)
            values = {g: evaluate(metric, model, ctx.spec.parse_sampler({**ev.sampler, "cfg": g}), ev.n, ev.seed,
                                  ev.chunk).metric for g in cfgs}
            g = min(values, key=values.get)
            curve[w] = (values[g], g)
        results[name] = curve
        best = min(curve, key=lambda w: curve[w][0])
        print(f"{name}: best w {best} (cfg {curve[best][1]}): {curve[best][0]:.2f}; w = 0: {curve[0.0][0]:.2f}"
              if 0.0 in curve else f"{name}: best w {best}", flush=True)
    if dist.is_main():
        print(f"\n{'theta_s from':<36}" + "".join(f"{'w=' + str(w):>14}" for w in ws))
        for name, curve in results.items():
            print(f"{name:<36}" + "".join(f"{curve[w][0]:>8.2f} g{curve[w][1]:<4}" for w in ws))
        (run / "control" / "results.json").write_text(json.dumps(
            {name: {str(w): v for w, v in curve.items()} for name, curve in results.items()}, indent=1))
        print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
