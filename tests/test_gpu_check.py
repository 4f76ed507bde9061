"""bench/gpu_check.py in reference mode (the CPU twin of the GPU run), so the script that checks the
CUDA paths cannot rot on machines without a GPU: every check runs (real components, no mocks) and
passes, or is a speed row skipped with its reason; the table prints; a failing check is recorded
and the run goes on; bad arguments are one line and status 2."""
import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT, assert_one_line_error

SCRIPT = ROOT / "bench" / "gpu_check.py"
COLUMNS = ("check", "status", "measured", "reference/anchor", "ratio", "goal", "tolerance")


def gpu_check(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def check_names() -> list[str]:
    proc = gpu_check("--list")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


@pytest.mark.slow  # the whole reference run: about 20 s on 2 cores
def test_reference_mode_runs_every_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = gpu_check("--mode", "reference", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    names = check_names()
    assert [c["name"] for c in report["checks"]] == names
    assert report["complete"] is True and report["mode"] == "reference"
    assert report["machine"]["device"] == "cpu" and report["machine"]["triton_interpret"] is True
    assert 0 < report["wall_s"] < 300
    for c in report["checks"]:
        if c["kind"] == "speed":  # timed on the CPU: run, reported, not judged
            assert c["status"] == "skip" and "no GPU" in c["reason"], c
            assert c["value"] > 0 and c["anchor_value"] > 0, c
        else:
            assert c["status"] == "pass", c
            assert c["tolerance"] not in ("", "-"), c
    assert {"merge.fp32", "sampling.ddpm", "preprocess.op", "fid.features", "dit.bf16", "xar.fp16",
            "deepspeed.zero3", "nccl.collectives", "merge.speed_fp32", "fid.speed"} <= set(names)
    # the table: its header, a row per check, the closing count
    lines = proc.stdout.splitlines()
    header = next(ln for ln in lines if ln.startswith("check "))
    assert tuple(header.split()) == COLUMNS
    for name in names:
        assert any(ln.startswith(name + " ") and ("PASS" in ln or "SKIP" in ln) for ln in lines), name
    assert f"{len(names) - 8} pass, 0 fail, 0 error, 8 skip" in proc.stdout
    assert not [p.name for p in tmp_path.iterdir() if p.name != out.name]  # no temporary file left


@pytest.mark.slow  # Inception weights and a merge under the Triton interpreter: several seconds
def test_a_failing_check_is_recorded_and_the_run_goes_on(tmp_path):
    bad = tmp_path / "inception.pth"
    bad.write_bytes(b"not a weights file")
    out = tmp_path / "gpu_check.json"
    proc = gpu_check("--mode", "reference", "--only", "fid.features,merge.fp32", "--weights", str(bad),
                     "--out", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    assert list(checks) == ["fid.features", "merge.fp32"]  # the order --only gives
    assert checks["fid.features"]["status"] == "error"
    assert str(bad) in checks["fid.features"]["reason"] and "\n" not in checks["fid.features"]["reason"]
    assert checks["merge.fp32"]["status"] == "pass"
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "1 pass, 0 fail, 1 error, 0 skip" in proc.stdout


@pytest.mark.parametrize("args, needle", [
    (["--only", "merge.fp32,nope"], "'nope'"),
    (["--mode", "gpu"], "'gpu'"),
    (["--weights", "/nonexistent/inception.pth"], "/nonexistent/inception.pth"),
])
def test_bad_arguments_are_one_line(tmp_path, args, needle):
    proc = gpu_check(*args, "--out", str(tmp_path / "x.json"), timeout=120)
    assert_one_line_error(proc, needle, exit_code=2, warnings_ok=False)
    assert not (tmp_path / "x.json").exists()
