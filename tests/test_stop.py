"""Stop, save, resume: SIGTERM to ONE rank of a 2-rank run (as Slurm's can reach one node first)
during base, synth, train and sweep. Every rank stops at the same point with one line and exit
status 3; rerunning resumes, and the outputs equal those of an uninterrupted run (theta_s
bit-identical)."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from neon_scale.data.shards import read_shard
from neon_scale.errors import EXIT_STOPPED

from .conftest import LAUNCHER, ROOT, TOY, launch_ranks, signal_when, small_overrides, wait_ranks

pytestmark = pytest.mark.slow  # whole runs on 2 ranks: `pytest -m 'not slow'` skips them

# The small toy with stages long enough to be caught in the middle (a few seconds each).
ARGS = ["run", "--config", str(TOY), *small_overrides("base.steps=1000", "synth.n=2000", "synth.batch_size=50",
                                                      "train.save_steps=[6,40]", "synth.samplers=[{zeta: 1.1}]")]


def run_to_end(run_dir, log_dir):
    codes, logs = wait_ranks(launch_ranks([*ARGS, "--run-dir", str(run_dir)], 2, log_dir), log_dir)
    assert codes == [0, 0], logs
    return logs


def stop_in(run_dir, log_dir, marker, rank):
    """Start the run on 2 ranks, send SIGTERM to `rank` once `marker` exists, wait for both."""
    procs = launch_ranks([*ARGS, "--run-dir", str(run_dir)], 2, log_dir)
    signal_when(procs, marker, rank, signal.SIGTERM)
    return wait_ranks(procs, log_dir)


def shard_columns(set_dir):
    return [read_shard(p)[0] for p in sorted(set_dir.glob("shard-*.tar"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    run_to_end(d / "run", d)
    return d / "run"


def test_sigterm_to_one_rank_in_each_stage_stops_all_and_resumes_to_the_same_outputs(reference, tmp_path):
    run_dir = tmp_path / "run"
    stops = [("base", run_dir / "base" / "FINGERPRINT", 0),   # rank 0 trains the toy's base alone
             ("synth", run_dir / "synth" / "FINGERPRINT", 1),
             ("train", run_dir / "train" / "zeta_1.1" / "metrics.jsonl", 1),
             ("sweep", run_dir / "sweep" / "results.jsonl", 0)]
    for stage, marker, rank in stops:
        codes, logs = stop_in(run_dir, tmp_path, marker, rank)
        assert codes == [EXIT_STOPPED, EXIT_STOPPED], (stage, logs)
        for r, log in enumerate(logs):
            lines = [ln for ln in log.splitlines() if "stopped by" in ln]
            assert len(lines) == 1 and f"[rank {r}]" in lines[0] and "resumable" in lines[0], (stage, log)
            assert f"during {stage}" in lines[0] or (stage == "sweep" and "evaluation" in lines[0]), lines[0]
            assert "Traceback" not in log
        signalled = next(ln for ln in logs[rank].splitlines() if "stopped by" in ln)
        assert "stopped by SIGTERM" in signalled
        assert not (run_dir / "sweep" / "done.json").exists()
    run_to_end(run_dir, tmp_path)
    # theta_s bit-identical; the synthetic set, the sweep's points and its choice equal
    for step in (6, 40):
        name = f"train/zeta_1.1/theta_s-step{step:06d}.safetensors"
        a, b = load_file(run_dir / name), load_file(reference / name)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), name
    for got, want in zip(shard_columns(run_dir / "synth" / "zeta_1.1"), shard_columns(reference / "synth" / "zeta_1.1"),
                         strict=True):
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in got)
    rows = [json.loads(ln) for ln in (run_dir / "sweep" / "results.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(ln) for ln in (reference / "sweep" / "results.jsonl").read_text().splitlines()]
    assert rows == ref_rows
    assert json.loads((run_dir / "sweep" / "summary.json").read_text()) == \
        json.loads((reference / "sweep" / "summary.json").read_text())
    # the train metrics read like an uninterrupted run's: every logged step once
    steps = [json.loads(ln)["step"] for ln in (run_dir / "train" / "zeta_1.1" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 40


def test_stop_signals_empty_means_the_signal_kills_as_before(tmp_path):
    """run.stop_signals=[]: no handler, SIGTERM ends the process at once (status -15), nothing saved
    beyond the periodic checkpoints."""
    proc = subprocess.Popen([sys.executable, str(LAUNCHER), *ARGS, "--run-dir", str(tmp_path / "run"),
                             "--set", "run.stop_signals=[]"], cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    signal_when([proc], tmp_path / "run" / "base" / "FINGERPRINT", 0, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM and "stopped by" not in out
