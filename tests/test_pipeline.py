"""The whole pipeline through the real `neon` command (1 rank): outputs, skip on re-run, and
resume after SIGKILL in the middle of `train` and of `sweep`."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from .conftest import ROOT, TOY, kill_when, neon, small_overrides

pytestmark = pytest.mark.slow  # whole runs of the toy and resumed kills: `pytest -m 'not slow'` skips them

KILL_CFG = ["train.save_steps=[6,300]", "train.ckpt_every_images=8000"]


def summary(run_dir):
    return json.loads((run_dir / "sweep" / "summary.json").read_text())


@pytest.fixture(scope="module")
def small_run(small_toy_run):
    return small_toy_run


def test_outputs(small_run):
    run_dir, proc = small_run
    rows = [json.loads(line) for line in (run_dir / "sweep" / "results.jsonl").read_text().splitlines()]
    s = summary(run_dir)
    assert [e["checkpoint"] for e in s] == ["zeta_1.1/step-6", "zeta_1.1/step-12", "zeta_0.9/step-6", "zeta_0.9/step-12"]
    for e in s:
        assert set(e) >= {"checkpoint", "steps", "sampler", "metric_w0", "best_w", "best_metric"}
        mine = [r for r in rows if r["checkpoint"] == e["checkpoint"]]
        assert {"checkpoint", "sampler", "w", "metric", "n"} <= set(mine[0])
        assert any(r["w"] == 0.0 for r in mine)
        assert e["best_metric"] == min(r["metric"] for r in mine) <= e["metric_w0"]
    w0 = {r["metric"] for r in rows if r["w"] == 0.0}
    assert len(w0) == 1  # the base model, evaluated once with the same noise
    assert (run_dir / "sweep" / "fid_vs_w.png").stat().st_size > 10_000
    assert "toy2d_diffusion" in (run_dir / "config.yaml").read_text()
    assert "Neon sweep" in proc.stdout and "best w" in proc.stdout
    theta = load_file(str(run_dir / "train" / "zeta_1.1" / "theta_s-step000012.safetensors"))
    base = load_file(str(run_dir / "base" / "model.safetensors"))
    assert set(theta) == set(base) and any((theta[k] != base[k]).any() for k in base)


def test_rerun_skips_every_finished_stage(small_run):
    run_dir, _ = small_run
    before = summary(run_dir)
    proc = neon("run", "--config", str(TOY), "--run-dir", str(run_dir), *small_overrides())
    assert proc.returncode == 0, proc.stderr
    for stage in ("base", "synth", "train", "sweep"):
        assert f"{stage}: complete, skipped" in proc.stdout
    assert summary(run_dir) == before and "Neon sweep" in proc.stdout


def test_changed_setting_redoes_only_the_stages_it_affects(small_run, tmp_path):
    src, _ = small_run
    run_dir = tmp_path / "copy"
    shutil.copytree(src, run_dir)
    before = [json.loads(x) for x in (run_dir / "sweep" / "results.jsonl").read_text().splitlines()]
    proc = neon("run", "--config", str(TOY), "--run-dir", str(run_dir), *small_overrides("sweep.refine_w=0.1"))
    assert proc.returncode == 0, proc.stderr
    for stage in ("base", "synth", "train"):
        assert f"{stage}: complete, skipped" in proc.stdout
    assert "sweep: complete, skipped" not in proc.stdout
    after = [json.loads(x) for x in (run_dir / "sweep" / "results.jsonl").read_text().splitlines()]
    assert after[: len(before)] == before and len(after) > len(before)  # evaluated points were reused
    proc = neon("run", "--config", str(TOY), "--run-dir", str(run_dir), *small_overrides("train.lr=2e-5"))
    assert proc.returncode == 0, proc.stderr
    assert "synth: complete, skipped" in proc.stdout and "train: complete, skipped" not in proc.stdout
    assert "was made with another config: clearing it" in proc.stdout


def _start(run_dir):
    args = [sys.executable, "-m", "neon_scale.cli", "run", "--config", str(TOY), "--run-dir", str(run_dir),
            *small_overrides(*KILL_CFG)]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def test_sigkill_in_train_and_in_sweep_then_resume_equals_uninterrupted(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    proc = neon("run", "--config", str(TOY), "--run-dir", str(ref_dir), *small_overrides(*KILL_CFG))
    assert proc.returncode == 0, proc.stderr

    train_dir = run_dir / "train" / "zeta_1.1"
    kill_when(_start(run_dir), lambda: (train_dir / "ckpt" / "latest").is_file()
               and not (train_dir / "theta_s-step000300.safetensors").exists())
    results = run_dir / "sweep" / "results.jsonl"
    kill_when(_start(run_dir), lambda: results.is_file() and len(results.read_text().splitlines()) >= 3)
    assert not (run_dir / "sweep" / "summary.json").exists()

    proc = neon("run", "--config", str(TOY), "--run-dir", str(run_dir), *small_overrides(*KILL_CFG))
    assert proc.returncode == 0, proc.stderr
    assert "train: complete, skipped" in proc.stdout
    assert summary(run_dir) == summary(ref_dir)
    for tag in ("zeta_1.1", "zeta_0.9"):
        for step in (6, 300):
            name = f"train/{tag}/theta_s-step{step:06d}.safetensors"
            a, b = load_file(str(ref_dir / name)), load_file(str(run_dir / name))
            assert all((a[k] == b[k]).all() for k in a), name  # bit-identical after resume
