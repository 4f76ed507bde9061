"""sweep.mode = race through the real commands: a race killed in the middle resumes to the same
decision and the same numbers, and 2 ranks reach exactly what 1 rank reaches."""
import json
import shutil
import subprocess
import sys

import pytest

from .conftest import LAUNCHER, ROOT, TOY, kill_when, neon, small_overrides, torchrun

pytestmark = pytest.mark.slow  # whole sweeps, a kill and a 2-rank run

# several rounds on the small toy: a wide z (and no futility stop) keeps the 4 points (w = 0 always in) racing
# to eval.n (250 -> 2000)
RACE = ["sweep.mode=race", "sweep.race.n0=250", "sweep.race.z=50", "sweep.race.futility=false", "eval.n=2000",
        "eval.chunk=250",
        "sweep.w_min=1.0", "sweep.w_max=2.0", "sweep.w_step=0.5", "sweep.refine_w=0"]


def outputs(run_dir):
    rows = [json.loads(x) for x in (run_dir / "sweep" / "results.jsonl").read_text().splitlines()]
    return rows, json.loads((run_dir / "sweep" / "summary.json").read_text())


@pytest.fixture(scope="module")
def raced(small_toy_run, tmp_path_factory):
    """The small toy's run with its sweep raced from scratch on 1 rank."""
    src, _ = small_toy_run
    run_dir = tmp_path_factory.mktemp("race") / "run"
    shutil.copytree(src, run_dir, ignore=shutil.ignore_patterns("sweep", "tb"))
    proc = neon("sweep", "--config", str(TOY), "--run-dir", str(run_dir), *small_overrides(*RACE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def fresh_copy(raced, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(raced, run_dir, ignore=shutil.ignore_patterns("sweep", "tb"))
    return run_dir


def test_race_records_rounds_images_and_standard_errors(raced):
    rows, summary = outputs(raced)
    assert not (raced / "sweep" / "features").exists()  # the samples' features are gone once done
    for e in summary:
        assert [r["n"] for r in e["rounds"]] == [250, 500, 1000, 2000] and e["mode"] == "race"
        assert e["n"] == 2000 and e["images"] == 4 * 2000  # w 1, 1.5, 2 and w = 0 (always in the grid)
        assert e["best_se"] > 0 and e["se_w0"] > 0 and 0 < e["diff"]["se"] < e["se_w0"]
        mine = {(r["w"], r["n"]) for r in rows if r["checkpoint"] == e["checkpoint"] or r["w"] == 0}
        assert {(1.0, 250), (2.0, 2000), (0.0, 2000)} <= mine
    assert all(len(r["replicates"]) == 20 and r["se"] > 0 for r in rows)
    # FD-infinity of every point (2 features: n >= 16 suffices); at n = 2000 FD's 1/n bias is far
    # under its noise, so the extrapolation stays within a few standard errors of the value
    assert all(isinstance(r["metric_inf"], float) for r in rows)
    assert all(abs(r["metric_inf"] - r["metric"]) < 5 * r["se"] for r in rows if r["n"] == 2000)
    assert all(isinstance(e["best_inf"], float) and isinstance(e["inf_w0"], float) for e in summary)


def test_race_killed_midway_resumes_to_the_same_decision(raced, tmp_path):
    run_dir = fresh_copy(raced, tmp_path)
    results = run_dir / "sweep" / "results.jsonl"
    cmd = [sys.executable, "-m", "neon_scale.cli", "sweep", "--config", str(TOY), "--run-dir", str(run_dir),
           *small_overrides(*RACE)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # in the second checkpoint's race, after its first round
    kill_when(proc, lambda: results.is_file() and len(results.read_text().splitlines()) >= 14)
    assert not (run_dir / "sweep" / "done.json").exists()
    assert list((run_dir / "sweep" / "features").rglob("chunk-*.safetensors"))  # samples kept for the resume
    proc = neon("sweep", "--config", str(TOY), "--run-dir", str(run_dir), *small_overrides(*RACE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert outputs(run_dir) == outputs(raced)


def test_two_ranks_race_to_exactly_what_one_rank_reaches(raced, tmp_path):
    run_dir = fresh_copy(raced, tmp_path)
    proc = torchrun(LAUNCHER, "sweep", "--config", str(TOY), "--run-dir", str(run_dir), *small_overrides(*RACE))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert outputs(run_dir) == outputs(raced)  # bit for bit: the chunks' moments are summed in chunk order
