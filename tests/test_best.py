"""The sweep's product: sweep/best/ holds the merged model of the overall best point with its
provenance, its metric is the sweep's, the recorded command remakes it; `neon merge --ema --step`
reads a DeepSpeed directory's EMA at a save step as the sweep scored it."""
import json
import pathlib
import shlex
import shutil

import pytest
import torch
from safetensors import safe_open

from neon_scale.config import load_config
from neon_scale.io import load_state_dict
from neon_scale.stages import sweep as sweep_stage
from neon_scale.stages.common import RunContext
from neon_scale.stages.evaluate import evaluate

from .conftest import SMALL, TOY, assert_one_line_error, neon

pytestmark = pytest.mark.slow  # reads the small toy run (every stage)


def summary_of(run_dir: pathlib.Path) -> list[dict]:
    return json.loads((run_dir / "sweep" / "summary.json").read_text())


def test_best_model_carries_its_provenance_and_reproduces_the_sweeps_metric(small_toy_run):
    run_dir, _ = small_toy_run
    summary = summary_of(run_dir)
    named = [e for e in summary if "best_model" in e]
    assert len(named) == 1
    entry = named[0]
    best_dir = run_dir / "sweep" / "best"
    assert run_dir / entry["best_model"]["path"] == best_dir
    # the overall best: no final_n here and every checkpoint at eval.n, so by best_metric
    assert entry["best_model"]["compared_by"] == "best_metric"
    assert entry["best_metric"] == min(e["best_metric"] for e in summary)

    provenance = json.loads((best_dir / "provenance.json").read_text())
    with safe_open(str(best_dir / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["neon_provenance"]) == provenance
    theta_s = run_dir / "train" / entry["checkpoint"].split("/")[0] / f"theta_s-step{entry['steps']:06d}.safetensors"
    assert provenance["w"] == entry["best_w"] and provenance["theta_s"] == str(theta_s.resolve())
    assert provenance["base"] == str((run_dir / "base" / "model.safetensors").resolve())
    assert len(provenance["base_sha256"]) == 64 and len(provenance["theta_s_sha256"]) == 64
    assert provenance["theta_s_step"] == entry["steps"] and provenance["sampler"] == entry["sampler"]
    assert (provenance["metric"], provenance["value"], provenance["se"], provenance["n"]) == (
        "fd", entry["best_metric"], entry["best_se"], entry["n"])

    assert best_model_metric(TOY, SMALL, run_dir, entry) == pytest.approx(entry["best_metric"], rel=1e-9, abs=0)


def best_model_metric(config, overrides: list[str], run_dir: pathlib.Path, entry: dict) -> float:
    """sweep/best/ loaded as a model and evaluated as the sweep evaluated its point (its metric,
    sampler and guidance, n, seed and chunks: the same samples)."""
    cfg = load_config(str(config), [*overrides, f"run_dir={run_dir}"])
    ctx = RunContext.from_config(cfg)
    model = ctx.load_model(run_dir / "sweep" / "best" / "model.safetensors")
    sampler = ctx.spec.parse_sampler(sweep_stage.eval_sampler_at(cfg, entry.get("best_guidance")))
    metric = sweep_stage.build_sample_metric(ctx)
    return evaluate(metric, model, sampler, entry["n"], cfg.eval.seed, cfg.eval.chunk).metric


def test_the_recorded_command_remakes_the_best_model(small_toy_run, tmp_path):
    run_dir, _ = small_toy_run
    entry = next(e for e in summary_of(run_dir) if "best_model" in e)
    cd, command = entry["best_model"]["command"].split(" && ")
    assert cd == "cd RUN_DIR"
    argv = shlex.split(command)
    assert argv[:2] == ["neon", "merge"]
    out = tmp_path / "again"
    argv[argv.index("-o") + 1] = str(out)
    proc = neon(*argv[1:], cwd=run_dir)
    assert proc.returncode == 0, proc.stderr
    best = load_state_dict(run_dir / "sweep" / "best" / "model.safetensors")
    again = load_state_dict(out / "model.safetensors")
    assert best.keys() == again.keys() and all(torch.equal(best[k], again[k]) for k in best)


def test_merge_ema_at_a_step_of_a_deepspeed_dir_is_the_exported_theta_s(small_toy_run, tmp_path):
    src, _ = small_toy_run
    run_dir = tmp_path / "run"  # the small run's base and synthetic set, fine-tuned again with an EMA
    shutil.copytree(src, run_dir, ignore=shutil.ignore_patterns("train", "sweep", "tb"))
    proc = neon("train", "--config", str(TOY), "--run-dir", str(run_dir),
                *[a for item in [*SMALL, "train.ema_decay=0.5"] for a in ("--set", item)])
    assert proc.returncode == 0, proc.stderr
    sampler_dir = next(p for p in (run_dir / "train").iterdir() if p.is_dir())
    step = max(int(p.name.removeprefix("step")) for p in (sampler_dir / "ckpt").glob("step*"))
    exported = sampler_dir / f"theta_s-step{step:06d}.safetensors"
    assert exported.is_file()  # the last save step keeps its DeepSpeed tag
    base = run_dir / "base" / "model.safetensors"
    from_ds, from_file = tmp_path / "ds", tmp_path / "file"
    proc = neon("merge", str(base), str(sampler_dir / "ckpt"), "--ema", "--step", str(step), "--w", "0.75",
                "-o", str(from_ds))
    assert proc.returncode == 0, proc.stderr
    assert neon("merge", str(base), str(exported), "--w", "0.75", "-o", str(from_file)).returncode == 0
    a, b = load_state_dict(from_ds / "model.safetensors"), load_state_dict(from_file / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    provenance = json.loads((from_ds / "provenance.json").read_text())
    assert provenance["theta_s_weights"] == "ema" and provenance["theta_s_tag"] == f"step{step:06d}"
    # the master weights are another model: --ema matters
    master = tmp_path / "master"
    assert neon("merge", str(base), str(sampler_dir / "ckpt"), "--step", str(step), "--w", "0.75",
                "-o", str(master)).returncode == 0
    c = load_state_dict(master / "model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_merge_ema_and_step_errors(small_toy_run, tmp_path):
    run_dir, _ = small_toy_run
    base = run_dir / "base" / "model.safetensors"
    proc = neon("merge", str(base), str(base), "--ema", "--w", "1", "-o", str(tmp_path / "x"))
    assert_one_line_error(proc, "--ema reads a DeepSpeed checkpoint directory", exit_code=2)
    sampler_dir = next(p for p in (run_dir / "train").iterdir() if p.is_dir())
    proc = neon("merge", str(base), str(sampler_dir / "ckpt"), "--ema", "--w", "1", "-o", str(tmp_path / "z"))
    assert_one_line_error(proc, "no EMA partition", "train.ema_decay", exit_code=2)  # the toy trains without one
    proc = neon("merge", str(base), str(sampler_dir / "ckpt"), "--step", "3", "--tag", "step000003", "--w", "1",
                "-o", str(tmp_path / "y"))
    assert_one_line_error(proc, "--step 3", "drop --self-tag/--tag", exit_code=2)
    assert not any((tmp_path / name).exists() for name in "xyz")


def test_overall_best_compares_like_with_like():
    entries = [{"final_metric": 2.0, "best_metric": 1.0, "n": 100, "diff": {"mean": -1.0}},
               {"final_metric": 1.5, "best_metric": 3.0, "n": 200, "diff": {"mean": -0.5}}]
    assert sweep_stage.overall_best(entries) == (entries[1], "final_metric")
    for e in entries:
        del e["final_metric"]
    assert sweep_stage.overall_best(entries) == (entries[0], "diff")  # different n: by the paired difference
    entries[1]["n"] = 100
    assert sweep_stage.overall_best(entries) == (entries[0], "best_metric")


def test_a_copied_run_reruns_its_sweep_to_the_same_best(small_toy_run, tmp_path):
    """Resume: the sweep killed after best/ was written (done.json absent) redoes best/ from the
    cached points, byte for byte."""
    src, _ = small_toy_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir, ignore=shutil.ignore_patterns("tb"))
    (run_dir / "sweep" / "done.json").unlink()
    best = run_dir / "sweep" / "best"
    before = load_state_dict(best / "model.safetensors"), json.loads((best / "provenance.json").read_text())
    proc = neon("sweep", "--config", str(TOY), "--run-dir", str(run_dir),
                *[a for item in SMALL for a in ("--set", item)])
    assert proc.returncode == 0, proc.stderr
    after = load_state_dict(best / "model.safetensors"), json.loads((best / "provenance.json").read_text())
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    paths = ("run_dir", "base", "theta_s")  # the copy's own paths; hashes, w, metric and the rest are equal
    assert {k: v for k, v in before[1].items() if k not in paths} == {k: v for k, v in after[1].items()
                                                                      if k not in paths}
    assert after[1]["run_dir"] == str(run_dir.resolve())
