"""`neon plan` / `neon run --dry-run`: the planned sweep against what the selection rules evaluate
(selection.search / selection.race with counting stubs), the lr against DeepSpeed's scheduler, the
xAR-L plan and its lr flag, and the commands (nothing written, one-line errors)."""
import math
import os
import subprocess
import sys

import pytest
import torch

from neon_scale.selection import race, search
from neon_scale.stages.plan import (check, check_lr, format_plan, load_plan_config, lr_at_step, make_plan, measure,
                                    new_samples, sweep_images, sweep_points, Rates)
from neon_scale.train.deepspeed_config import deepspeed_config

from .conftest import ROOT, TOY, assert_one_line_error, neon
from .test_sweep_rule import counting

XAR_L = ROOT / "configs" / "xar_l_in256.yaml"


def _search(cfg, fn):
    sw = cfg.sweep
    ev, calls = counting(fn)
    search(ev, sw.w_grid(), sw.guidance, mode=sw.mode, tol=sw.tol, refine_w=sw.refine_w,
           refine_guidance=sw.refine_guidance)
    assert len(calls) == len(set(calls))
    return len(calls)


# ------------------------------------------------------------------------------ the sweep's points

@pytest.mark.parametrize("config,overrides", [(TOY, []), (XAR_L, []), (TOY, ["sweep.w_step=0.1"])])
def test_grid_points_are_exactly_those_the_grid_mode_evaluates(config, overrides):
    cfg, _ = load_plan_config(str(config), ["sweep.mode=grid", *overrides])
    pts = sweep_points(cfg)
    evaluated = _search(cfg, lambda w, g: (w - 0.7) ** 2 + (0 if g is None else (g - 3) ** 2))
    assert pts.low == pts.high == evaluated
    assert evaluated == len(cfg.sweep.w_grid()) * max(1, len(cfg.sweep.guidance))


def _surfaces():
    """Smooth made-up metric surfaces: bowls with their minimum anywhere (inside, on an edge, at w = 0,
    off the grid), flat ones (nothing stops early), monotone ones (everything stops at once)."""
    out = [lambda w, g: 1.0, lambda w, g: abs(w) + (0 if g is None else g), lambda w, g: -w]
    for w_star in (-1.7, -0.4, 0.0, 0.33, 1.1, 1.9, 2.6, 5.0):
        for g_star in (1.0, 2.9, 3.3, 9.0):
            for scale in (0.05, 1.0):
                out.append(lambda w, g, a=w_star, b=g_star, s=scale: s * (w - a) ** 2 + 0.3 * s * (
                    0 if g is None else (g - b) ** 2) + 2.0)
    return out


@pytest.mark.parametrize("config", [TOY, XAR_L, ROOT / "configs" / "dit_xl2_in256.yaml"])
def test_early_stop_points_fall_inside_the_planned_range(config):
    cfg, _ = load_plan_config(str(config))
    assert cfg.sweep.mode == "early_stop"
    pts = sweep_points(cfg)
    counts = [_search(cfg, f) for f in _surfaces()]
    assert all(pts.low <= n <= pts.high for n in counts), (pts, sorted(counts))
    assert pts.low in counts  # the lower bound is reached (a surface rising away from w = 0)
    if config == XAR_L:  # the figures: 84 coarse points and the refine grid at most
        assert (pts.grid, pts.low, pts.high) == (84, 9, 92)


class _Est:
    def __init__(self, metric, n, reps):
        self.metric, self.n, self.replicates = metric, n, reps


@pytest.mark.parametrize("drop", [False, True])
def test_race_images_fall_inside_the_planned_range(drop):
    cfg, _ = load_plan_config(str(XAR_L), ["sweep.mode=race", "sweep.race.n0=640"])
    sw = cfg.sweep
    pts = sweep_points(cfg)
    assert pts.rounds == [640, 1280, 2560, 5120, 10000]
    reached = {}

    def estimate(w, g, n):
        reached[(w, g)] = max(reached.get((w, g), 0), n)
        m = (w - 1.3) ** 2 + (g - 3.0) ** 2
        # constant replicate differences (standard error 0): every worse point drops in round one;
        # no replicates: no point ever drops, all run to eval.n
        return _Est(m, n, tuple(m + 0.01 * i for i in range(8)) if drop else None)

    race(estimate, sw.w_grid(), sw.guidance, sw.race.n0, cfg.eval.n, sw.race.z, sw.tol, sw.refine_w,
         sw.refine_guidance)
    assert pts.low <= len(reached) <= pts.high
    images = sweep_images(cfg, pts, 1)
    sampled = sum(reached.values()) + new_samples(max(reached.values()), sw.final_n, cfg.eval.chunk)
    assert images.low <= sampled <= images.high
    if not drop:
        assert max(reached.values()) == cfg.eval.n


def test_grid_images_count_w0_once_and_reuse_chunks_for_final_n():
    cfg, _ = load_plan_config(str(XAR_L), ["sweep.mode=grid"])
    pts = sweep_points(cfg)
    # the sweep's cache: w = 0 is the base model, shared by all checkpoints (stages/sweep.PointStore)
    keys = {("base" if w == 0 else c, w, g) for c in range(5) for w in cfg.sweep.w_grid() for g in cfg.sweep.guidance}
    images = sweep_images(cfg, pts, 5)
    final = 5 * (50000 - 156 * 64)  # the first 156 full chunks of 64 of the 10k evaluation are reused
    assert images.low == images.high == len(keys) * 10000 + final
    assert new_samples(10000, 10000, 64) == 0 and new_samples(0, 100, 64) == 100


# ------------------------------------------------------------------------------ the lr

@pytest.mark.parametrize("kind", ["linear", "log", "none", "decay"])
def test_lr_at_step_is_deepspeeds(kind):
    from deepspeed.runtime.lr_schedules import WarmupDecayLR, WarmupLR

    cfg, _ = load_plan_config(str(TOY), [f"train.warmup_steps={0 if kind == 'none' else 10}", "train.lr=1e-3"])
    ds = deepspeed_config(cfg.train, 1)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=cfg.train.lr)
    sched = None
    if kind == "log":
        ds["scheduler"]["params"]["warmup_type"] = "log"
    if kind == "decay":
        ds["scheduler"] = {"type": "WarmupDecayLR", "params": {**ds["scheduler"]["params"], "total_num_steps": 30}}
    if "scheduler" in ds:
        cls = WarmupDecayLR if kind == "decay" else WarmupLR
        sched = cls(opt, **ds["scheduler"]["params"])
    for step in range(1, 40):  # the engine: optimizer step at the current lr, then scheduler.step()
        assert lr_at_step(ds, step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-18), step
        if sched is not None:
            sched.step()


def test_the_xar_l_plan_flags_its_lr_and_a_finished_warmup_does_not():
    cfg, missing = load_plan_config(str(XAR_L))
    assert any(m.startswith("'base.weights' = ") for m in missing)
    flag = check_lr(cfg.train, "train")
    assert flag and "lr at the last step (4885) is 4.17e-09" in flag and "2.4 orders of magnitude below" in flag
    assert flag in check(cfg)
    assert lr_at_step(deepspeed_config(cfg.train, 1), 4885) == pytest.approx(1e-6 * 4883 / 1171875)
    done, _ = load_plan_config(str(XAR_L), ["train.warmup_steps=977"])
    assert check_lr(done.train, "train") is None and check(done) == []


def test_check_flags_grids_beyond_bounds():
    cfg, _ = load_plan_config(str(XAR_L), ["sweep.guidance=[0.0, 0.2, 0.4]", "sweep.w_max=2.7",
                                           "sweep.final_n=5000", "train.warmup_steps=0"])
    flags = "\n".join(check(cfg))
    assert "cfg = -0.1, which the sampler rejects" in flags
    assert "w_max = 2.7 is not on the grid" in flags and "last point is 2.6" in flags
    assert "final_n = 5000 is below eval.n" in flags
    big, _ = load_plan_config(str(XAR_L), ["sweep.w_step=0.001", "sweep.w_max=9.8", "sweep.guidance=[2, 3]"])
    assert any("beyond the bound of 10,000" in f for f in check(big))


# ------------------------------------------------------------------------------ the plan

def test_toy_plan_work_and_time():
    cfg, missing = load_plan_config(str(TOY), ["sweep.mode=grid"])
    plan = make_plan(cfg, Rates(sample=1e5, train=1e6), missing)
    assert missing == [] and plan.flags == []
    work = {w.what.split(" (")[0]: w for st in plan.stages for w in st.work}
    assert work["samples to synthesize"].low == 2000
    assert work["optimizer steps"].low == 500 and work["training samples"].low == 500 * 1000
    assert work["points per checkpoint"].low == work["points per checkpoint"].high == 17
    n = 100000
    assert work["samples drawn by the rule"].low == n * (1 + 4 * 16)  # w = 0 once, 4 checkpoints
    low, high, untimed = plan.seconds()
    assert untimed == [] and low == high == pytest.approx((2000 + n * 65) / 1e5 + (10000 * 1000 + 500_000) / 1e6)
    text = format_plan(plan)
    assert "check: nothing looks wrong" in text and "[" in text  # no markup eaten


def test_measure_gives_throughputs_on_the_toy():
    cfg, _ = load_plan_config(str(TOY))
    rates = measure(cfg, batches=1)
    assert rates.sample > 0 and rates.train > 0 and math.isfinite(rates.sample) and "measured" in rates.how


# ------------------------------------------------------------------------------ the commands

def _plain_env():
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # no terminal, no width: a pipe
    return dict(env, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def test_neon_plan_on_xar_l_prints_work_time_and_the_lr_flag():
    proc = subprocess.run([sys.executable, "-m", "neon_scale.cli", "plan", "--config", str(XAR_L),
                           "--images-per-s", "40", "--train-images-per-s", "300"], cwd=ROOT, env=_plain_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("images to synthesize", "30,000 images  12.5 min", "1,250,560 images  1.2 h",
                   "9 to 92 points", "270,000 to 4,320,000 images", "total", "time: 4.6 h to 1.4 d",
                   "'base.weights' = '/path/to/xAR-L.pth': file not found"):
        assert needle in out, out
    flag = next(ln for ln in out.splitlines() if "orders of magnitude below" in ln)
    assert flag.rstrip().endswith("0.42% of the warmup)") and len(flag) > 120  # one line, not cut at 80 columns


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = neon("run", "--config", str(TOY), "--dry-run", "--run-dir", str(run_dir), "--images-per-s", "1e6")
    assert proc.returncode == 0, proc.stderr
    assert "samples to synthesize" in proc.stdout and f"run dir {run_dir}" in proc.stdout
    assert not run_dir.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,needle", [
    (["--set", "sweep.mode=nope"], "sweep.mode"),
    (["--images-per-s", "-3"], "--images-per-s"),
    (["--set", "train.global_batch=1000", "--set", "train.grad_accum=3"], "grad_accum"),
])
def test_bad_plan_input_is_one_line_exit_2(args, needle):
    assert_one_line_error(neon("plan", "--config", str(TOY), *args), needle)
