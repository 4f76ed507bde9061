"""Kills at fixed system calls (strace's fault injection makes them deterministic): a kill at a
rename or an unlink during `neon run`, `neon merge --overwrite` and `neon consolidate --overwrite`
leaves either the old or the new complete output, and the rerun finishes with nothing left behind.
These tests kill a run at a spread of points; `make bench-kills` (NEON_KILL_POINTS=all) at every one."""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import ROOT, TOY, neon, small_overrides

# strace counts each system call on its own (`when=N` is the N-th call of that name), so kill
# points are (name, N) for every name a command uses
CALLS = ("rename", "renameat", "renameat2", "unlink", "unlinkat", "rmdir")


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-qq", "-o", os.devnull, "-e", "trace=getpid", "-e", "inject=getpid:error=EPERM",
                            "true"], capture_output=True)
    return probe.returncode == 0


pytestmark = [pytest.mark.skipif(not _strace_works(), reason="strace is absent or cannot inject faults here"),
              pytest.mark.slow]  # neon runs killed at many points: `pytest -m 'not slow'` skips them


def killed_at(call: str, n: int, *args: str) -> subprocess.CompletedProcess:
    """`neon ARGS` killed (SIGKILL) at its n-th system call `call` (one of CALLS)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = ["strace", "-f", "-qq", "-o", os.devnull, "-e", f"trace={call}",
           "-e", f"inject={call}:signal=KILL:when={n}", sys.executable, "-m", "neon_scale.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def leftovers(root: pathlib.Path) -> list[str]:
    """Temporary names anywhere under root: ours (`.X.*.tmp`, `.X.partial-*`, `.X.old-*`) and the
    safetensors library's (`.tmpXXXXXX`)."""
    return sorted(str(p) for p in root.rglob(".*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")
                  or ".partial-" in p.name or ".old-" in p.name)


def assert_complete_files(root: pathlib.Path) -> None:
    """Every safetensors and JSON file that exists under root (temporaries aside) is whole."""
    for p in root.rglob("*"):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix == ".safetensors":
            load_file(str(p))
        elif p.suffix == ".json":
            json.loads(p.read_text())


# ------------------------------------------------------------------------------- merge / consolidate

@pytest.fixture
def two_checkpoints(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(1000, generator=gen), "b": torch.randn(10, generator=gen)}
    synth = {k: v + 0.1 for k, v in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(synth, str(tmp_path / "self.safetensors"))
    return tmp_path


def _state(d: pathlib.Path) -> dict:
    return {str(p.relative_to(d)): load_file(str(p)) for p in sorted(d.rglob("*.safetensors"))}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[f].keys() == b[f].keys() and all(torch.equal(a[f][k], b[f][k]) for k in a[f])
                                        for f in a)


def kill_at_every_point(call: str, out: pathlib.Path, write_new: list[str], write_old: list[str]) -> int:
    """Kill `neon WRITE_NEW` (which replaces OUT) at its 1st, 2nd, ... `call` until it runs
    through. After each kill OUT must be the old or the new complete output; the rerun must give
    the new one and leave no temporaries. Returns the number of kill points."""
    assert neon(*write_new).returncode == 0
    new = _state(out)
    assert neon(*write_old).returncode == 0
    old = _state(out)
    assert not _same(old, new)
    n = 1
    while True:
        proc = killed_at(call, n, *write_new)
        if proc.returncode == 0:  # fewer than n such calls: every kill point was tried
            break
        assert proc.returncode in (137, -9), proc.stderr
        now = _state(out)
        assert _same(now, old) or _same(now, new), f"kill at {call} {n}: OUT is neither the old nor the new output"
        rerun = neon(*write_new)
        assert rerun.returncode == 0, rerun.stderr
        assert leftovers(out.parent) == [] and _same(_state(out), new)
        assert neon(*write_old).returncode == 0 and _same(_state(out), old)
        n += 1
    assert _same(_state(out), new) and leftovers(out.parent) == []
    return n - 1


@pytest.mark.parametrize("call", ["renameat2", "unlinkat", "rmdir"])  # what the swap and the clean-up use
def test_merge_overwrite_killed_at_every_rename_and_unlink(two_checkpoints, call):
    d = two_checkpoints
    inputs = [str(d / "base.safetensors"), str(d / "self.safetensors")]
    out = d / "out"
    points = kill_at_every_point(call, out, ["merge", *inputs, "--w", "2", "-o", str(out), "--overwrite"],
                                 ["merge", *inputs, "--w", "1", "-o", str(out), "--overwrite"])
    assert points >= 1


@pytest.mark.parametrize("call", ["renameat2", "unlinkat", "rmdir"] if os.environ.get("NEON_KILL_POINTS") == "all"
                         else ["renameat2"])
def test_consolidate_overwrite_killed_at_every_point(tmp_path, call):
    """In make test the swap only: the clean-up after it is merge's (the same staged_output)."""
    args = ["--config", str(TOY), "--run-dir", str(tmp_path / "run"),
            *small_overrides("synth.samplers=[{zeta: 1.1}]", "train.save_steps=[12]", "train.keep_last=3")]
    assert neon("run", "--stage", "base", "--stage", "synth", "--stage", "train", *args).returncode == 0
    ckpt = str(tmp_path / "run" / "train" / "zeta_1.1" / "ckpt")
    out = tmp_path / "cons"
    points = kill_at_every_point(call, out, ["consolidate", ckpt, "-o", str(out), "--overwrite"],
                                 ["consolidate", ckpt, "--tag", "step000006", "-o", str(out), "--overwrite"])
    assert points >= 1


# ------------------------------------------------------------------------------------- neon run

RUN_ARGS = ["--config", str(TOY), *small_overrides("synth.samplers=[{zeta: 1.1}]")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    proc = neon("run", "--run-dir", str(run_dir), *RUN_ARGS)
    assert proc.returncode == 0, proc.stderr
    return run_dir


def _results(run_dir: pathlib.Path) -> tuple:
    summary = json.loads((run_dir / "sweep" / "summary.json").read_text())
    thetas = {p.name: load_file(str(p)) for p in sorted((run_dir / "train").rglob("theta_s-*.safetensors"))}
    return summary, thetas


def count_calls(*args: str) -> dict[str, int]:
    """How many of each of CALLS an uninterrupted `neon ARGS` makes (in a scratch run directory)."""
    import collections
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        log = pathlib.Path(scratch) / "strace.log"
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        cmd = ["strace", "-f", "-qq", "-o", str(log), "-e", f"trace={','.join(CALLS)}", sys.executable, "-m",
               "neon_scale.cli", *args, "--run-dir", str(pathlib.Path(scratch) / "run")]
        subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, check=True, timeout=900)
        name = re.compile(rf"^(?:\[pid +\d+\] |\d+ +)?({'|'.join(CALLS)})\(")  # not signals, not resumptions
        return collections.Counter(m[1] for line in log.read_text().splitlines() if (m := name.match(line)))


def kill_points() -> list[tuple[str, int]]:
    if os.environ.get("NEON_KILL_POINTS") == "all" and _strace_works():
        counts = count_calls("run", *RUN_ARGS)
        return [(call, n) for call in CALLS for n in range(1, counts.get(call, 0) + 1)]
    # mid-train, the safetensors library's rename of the base weights, mid-sweep; every point: make bench-kills
    return [("rename", 20), ("renameat", 1), ("unlink", 40)]


@pytest.mark.slow
@pytest.mark.parametrize("call, n", kill_points())
def test_run_killed_at_a_rename_or_unlink_resumes_to_the_same_result(reference, tmp_path, call, n):
    run_dir = tmp_path / "run"
    proc = killed_at(call, n, "run", "--run-dir", str(run_dir), *RUN_ARGS)
    assert proc.returncode in (137, -9), f"no kill at {call} {n}: {proc.stderr[-2000:]}"
    assert_complete_files(run_dir)
    rerun = neon("run", "--run-dir", str(run_dir), *RUN_ARGS)
    assert rerun.returncode == 0, rerun.stderr
    assert leftovers(run_dir) == []
    (summary, thetas), (ref_summary, ref_thetas) = _results(run_dir), _results(reference)
    assert summary == ref_summary
    assert thetas.keys() == ref_thetas.keys()
    for name in thetas:
        assert all(torch.equal(thetas[name][k], ref_thetas[name][k]) for k in thetas[name]), name
