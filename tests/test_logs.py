"""What a log shows (issue 17): progress without a terminal (no line for a short job; at most one
per LINE_INTERVAL_S), the sweep's line per evaluated point (images/s, eta over the plan), its plot
(the chosen points marked, the best named, a title, an explained y label), and tables complete when
stdout is piped (the sweep summary and `neon merge`'s, whatever COLUMNS says), `nan` explained."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from neon_scale import console as console_mod
from neon_scale.console import console, progress
from neon_scale.stages.evaluate import Estimate, FeatureStore
from neon_scale.stages.plan import load_plan_config
from neon_scale.stages.sweep import PointStore, _plot, _point_row, _PointLines, print_summary

from .conftest import ROOT, TOY

LONG = ["cfg=2.3,num_steps=4/step-1000", "cfg=2.3,num_steps=4/step-2000"]  # cut to 'cfg=2.3,num_steps=4/step…'
COLUMNS = ["checkpoint", "w=0", "best w", "fid @ w=0", "best fid", "ratio", "difference", "z", "n", "images"]


def _entry(name: str, best_w: float, best: float) -> dict:
    return {"checkpoint": name, "steps": 1000, "sampler": {"cfg": 2.3}, "metric_w0": 3.2345, "se_w0": 0.0123,
            "best_w": best_w, "best_metric": best, "best_se": 0.011, "diff": {"mean": best - 3.2345, "se": 0.004},
            "n": 10000, "points": 9, "images": 90000, "mode": "early_stop", "best_guidance": 2.5, "guidance_w0": 1.5}


SUMMARY = [_entry(LONG[0], 0.35, 3.1111), _entry(LONG[1], 0.5, 3.0222)]


def _piped_env(columns):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns is not None:
        env["COLUMNS"] = columns
    return dict(env, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")


def _assert_summary_whole(out: str):
    assert "…" not in out, out
    header = next(ln for ln in out.splitlines() if "checkpoint" in ln)
    for col in COLUMNS:
        assert col in header, header
    for name, best in zip(LONG, ("3.111 ± 0.011", "3.022 ± 0.011")):
        row = next(ln for ln in out.splitlines() if name in ln)  # one line per row, the name whole
        assert "0.0 (g 1.5)" in row and best in row and "90000" in row, row


# ------------------------------------------------------------------------------ progress lines

def test_a_short_job_prints_no_progress_line():
    with console.capture() as cap:
        with progress("merge", 1000) as bar:
            for _ in range(100):
                bar.update(advance=10)
    assert cap.get() == ""


def test_progress_lines_at_most_one_per_interval(monkeypatch):
    clock = types.SimpleNamespace(t=0.0)
    monkeypatch.setattr(console_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock.t))
    with console.capture() as cap:
        with progress("train", 10) as bar:
            for _ in range(10):  # 3 s per step: deciles at 3, 6, ... 30 s
                clock.t += 3.0
                bar.update(info="loss 0.1")
    lines = cap.get().splitlines()
    # 12 s (the first decile 10 s after the start), 24 s, and the end (a line was printed before)
    assert [ln.split(" (")[0] for ln in lines] == ["train: 4/10", "train: 8/10", "train: 10/10"], lines
    assert "eta 18 s" in lines[0] and lines[0].endswith("loss 0.1")


# ------------------------------------------------------------------------------ the sweep's lines

def _lines(*overrides):
    cfg, _ = load_plan_config(str(TOY), ["eval.n=4000", "eval.chunk=1000", *overrides])
    ctx = types.SimpleNamespace(cfg=cfg, checkpoints=lambda: [{}, {}])
    return cfg, _PointLines(ctx, FeatureStore(None), "fd")


def _evaluate(lines, cfg, ckpt, w, n=4000, seed=None):
    row = _point_row({"name": ckpt, "steps": 6, "sampler": {}}, w, None, n, seed, cfg.sweep.guidance_key)
    begun = lines.begin(row)
    with console.capture() as cap:
        lines.end(row, Estimate(0.0421, n, tuple(0.0421 + 0.001 * (i % 3) for i in range(4))), begun)
    return cap.get().strip()


def test_a_line_per_evaluated_grid_point_with_eta_over_the_planned_points():
    cfg, lines = _lines("sweep.mode=grid")
    # 17 w per checkpoint, w = 0 shared by the 2 checkpoints: 1 + 2 x 16 points
    first = _evaluate(lines, cfg, "zeta_1.1/step-6", 0.0)
    assert first.startswith("sweep: zeta_1.1/step-6 w=0 n=4000: fd 0.0421 ± ")
    assert "images/s" in first and first.endswith(", eta " + first.split(", eta ")[-1]) and "point 1/33" in first
    assert "point 2/33" in _evaluate(lines, cfg, "zeta_1.1/step-6", 0.25)
    with console.capture() as cap:  # read from results.jsonl (a resumed sweep): silent, counted
        lines.meet(_point_row({"name": "zeta_1.1/step-12", "steps": 12, "sampler": {}}, 0.0, None, 4000, None, None))
        lines.meet(_point_row({"name": "zeta_1.1/step-12", "steps": 12, "sampler": {}}, 0.25, None, 4000, None, None))
    assert cap.get() == ""
    last = _evaluate(lines, cfg, "zeta_1.1/step-12", 0.5)
    assert "point 4/33" in last and " to " not in last.split("eta")[-1]  # grid: one eta, not a range


def test_early_stop_and_race_lines_give_the_plans_range():
    cfg, lines = _lines()
    line = _evaluate(lines, cfg, "zeta_1.1/step-6", 0.0)
    assert "point 1," in line and " to " in line.split("eta")[-1]
    cfg, lines = _lines("sweep.mode=race", "sweep.race.n0=1000")
    assert "evaluation 1," in _evaluate(lines, cfg, "zeta_1.1/step-6", 0.0, n=1000)
    again = _evaluate(lines, cfg, "zeta_1.1/step-6", 0.0, n=2000)  # the race's next round
    assert "evaluation 2," in again and "images/s" in again
    assert "repeat" in _evaluate(lines, cfg, "zeta_1.1/step-6", 0.0, seed=7)


# ------------------------------------------------------------------------------ the plot

def test_plot_marks_and_names_the_best_point_with_a_title_and_an_explained_axis(tmp_path):
    store = PointStore(tmp_path / "results.jsonl")
    for e in SUMMARY:
        for w, m in ((0.0, 3.2345), (0.35, 3.1111), (0.5, 3.0222), (1.0, 3.5)):
            store.add({"checkpoint": e["checkpoint"], "w": w, "guidance": 2.5, "n": 10000, "metric": m,
                       "se": 0.01, "replicates": None}, persist=False)
    figures = []
    tracker = types.SimpleNamespace(figure=lambda tag, fig, step: figures.append(fig))
    path = tmp_path / "myrun" / "sweep" / "fid_vs_w.png"
    path.parent.mkdir(parents=True)
    _plot(SUMMARY, store, path, "fid", tracker)
    assert path.stat().st_size > 10_000
    ax = figures[0].axes[0]
    assert "myrun" in ax.get_title() and "fid" in ax.get_title() and "n = 10,000" in ax.get_title()
    assert "FID (Inception features)" in ax.get_ylabel() and "lower is better" in ax.get_ylabel()
    notes = [t.get_text() for t in ax.texts]
    assert any(t.startswith(f"best: {LONG[1]}\nw = 0.5 (g 2.5): 3.022") for t in notes), notes
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [f"{LONG[0]}: w = 0.35 (g 2.5): 3.111 ± 0.011", f"{LONG[1]}: w = 0.5 (g 2.5): 3.022 ± 0.011"]
    stars = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
    assert [(ln.get_xdata()[0], ln.get_ydata()[0]) for ln in stars] == [(0.35, 3.1111), (0.5, 3.0222)]


# ------------------------------------------------------------------------------ tables in a log

def test_summary_table_is_whole_in_process():
    with console.capture() as cap:  # pytest's stdout is no terminal
        print_summary(SUMMARY, "fid")
    _assert_summary_whole(cap.get())


@pytest.mark.slow  # a fresh process (over 2 s here)
@pytest.mark.parametrize("columns", [None, "80"])
def test_summary_table_is_whole_when_piped(columns):
    code = ("import json, sys; from neon_scale.stages.sweep import print_summary; "
            "print_summary(json.loads(sys.argv[1]), 'fid')")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(SUMMARY)], cwd=ROOT, env=_piped_env(columns),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    _assert_summary_whole(proc.stdout)


MODULE = "transformer_blocks_with_a_long_name_that_a_narrow_table_would_cut"


@pytest.mark.slow  # a neon command in a fresh process (over 2 s here)
@pytest.mark.parametrize("columns", [None, "80"])
def test_merge_output_piped_is_whole_and_explains_nan(tmp_path, columns):
    gen = torch.Generator().manual_seed(0)
    base = {f"{MODULE}.0.weight": torch.randn(64, 64, generator=gen),
            "final_layer.linear.weight": torch.zeros(8, 64),  # DiT: zero-initialised
            "mask.causal": torch.tensor([[0.0, float("-inf")], [0.0, 0.0]])}  # xAR: -inf, the rest 0
    synth = {k: v + 0.01 * torch.randn(v.shape, generator=gen) if k != "mask.causal" else v.clone()
             for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(synth, str(tmp_path / "synth.safetensors"))
    proc = subprocess.run([sys.executable, "-m", "neon_scale.cli", "merge", str(tmp_path / "base.safetensors"),
                           str(tmp_path / "synth.safetensors"), "--w", "1", "-o", str(tmp_path / "out")], cwd=ROOT,
                          env=_piped_env(columns), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert not [ln for ln in out.splitlines() if ln.startswith("merge:")], out  # a sub-second job: no progress line
    assert "…" not in out and "nan" not in out, out
    rows = {ln.split()[1]: ln for ln in out.splitlines() if ln.startswith("│")}
    assert set(rows) == {MODULE, "final_layer", "mask"}, out
    assert "n/a" in rows["final_layer"] and "zero-initialised" in rows["final_layer"]
    assert "n/a" in rows["mask"] and "1 non-finite base elements" in rows["mask"]
    assert "kept as in theta_r" in rows["mask"]
    assert "e-" in rows[MODULE] and "n/a" not in rows[MODULE]
    assert f"w = 1 -> {tmp_path / 'out'}" in out
