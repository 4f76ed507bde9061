"""One writer per run directory and per merge/consolidate output (neon_scale/lock.py), with real
processes: a second writer fails at once naming the holder, a SIGKILLed holder never blocks, a
half-written holder record is "holder unknown", and several ranks agree on the outcome."""
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from neon_scale.io import remove_stale
from neon_scale.lock import Locked, describe_holder, hold, lock_path_for

from .conftest import LAUNCHER, ROOT, TOY, assert_one_line_error, kill, neon, small_overrides, torchrun

# holds the lock on argv[1] until a line arrives on stdin (then releases it normally); a fork
# child started inside with argv[3] == "fork" sleeps on, to show it does not keep the lock
HOLDER = """
import os, sys, time
from neon_scale.lock import hold
with hold(sys.argv[1], sys.argv[2]):
    child = 0
    if len(sys.argv) > 3 and sys.argv[3] == "fork":
        child = os.fork()
        if child == 0:
            time.sleep(120)
            os._exit(0)
    print("held", child, flush=True)
    sys.stdin.readline()
"""

SINCE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


class Holder:
    """A real process holding the lock on `path` (released by `release`, or killed)."""

    def __init__(self, path: pathlib.Path, *extra: str, env_extra=None):
        env = dict(os.environ, **(env_extra or {}))
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), "helper", *extra], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        assert line[:1] == ["held"], self.proc.stderr.read()
        self.child = int(line[1])  # its fork child's pid, or 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def release(self) -> None:
        self.proc.communicate("\n", timeout=30)
        assert self.proc.returncode == 0

    def kill(self) -> None:
        kill(self.proc, children=False)  # its fork child, if any, lives on

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.kill()


def holder_text(pid: int, job: str | None = None) -> str:
    return f"pid {pid} on host {re.escape(socket.gethostname())}" + (f" \\(Slurm job {job}\\)" if job else "") + \
        f", since {SINCE}"


# ------------------------------------------------------------------------------------------- unit

@pytest.mark.slow  # neon commands or lock holders in fresh processes (2-10 s)
def test_second_holder_fails_at_once_naming_the_holder(tmp_path):
    path = tmp_path / ".lock"
    with Holder(path, env_extra={"SLURM_JOB_ID": "567"}) as holder:
        start = time.monotonic()
        with pytest.raises(Locked) as e:
            with hold(path, "runs/x"):
                pytest.fail("a second holder got the lock")
        assert time.monotonic() - start < 1.0  # at once, not after a wait
        msg = str(e.value)
        assert re.fullmatch(f"runs/x is in use by {holder_text(holder.pid, '567')}; wait for it to finish or stop it",
                            msg), msg
        info = json.loads(path.read_text())
        assert info["pid"] == holder.pid and info["slurm_job"] == "567" and info["host"] == socket.gethostname()
        holder.release()
    assert not path.exists()  # removed on release
    with hold(path, "runs/x"):  # free again
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists() and list(tmp_path.iterdir()) == []  # no temporaries either


def test_a_sigkilled_holder_does_not_block(tmp_path):
    path = tmp_path / ".lock"
    with Holder(path) as holder:
        holder.kill()
    assert json.loads(path.read_text())["pid"] == holder.pid  # its record is still there: stale, not binding
    start = time.monotonic()
    with hold(path, "runs/x"):
        assert time.monotonic() - start < 1.0
        assert json.loads(path.read_text())["pid"] == os.getpid()  # taken over, record rewritten whole
    assert not path.exists()


def test_a_forked_child_of_a_killed_holder_does_not_keep_the_lock(tmp_path):
    """DataLoader workers are forked while the lock is held; they must not outlive it as holders."""
    path = tmp_path / ".lock"
    with Holder(path, "fork") as holder:
        holder.kill()
        try:
            os.kill(holder.child, 0)  # the child lives on
            with hold(path, "runs/x"):
                pass
        finally:
            os.kill(holder.child, signal.SIGKILL)


@pytest.mark.slow  # neon commands or lock holders in fresh processes (2-10 s)
def test_half_written_holder_record_is_holder_unknown(tmp_path):
    path = tmp_path / ".lock"
    with Holder(path) as holder:
        path.write_text('{"host": "h", "pi')  # what a reader sees between the holder's lock and its write
        with pytest.raises(Locked, match=r"^runs/x is in use by another process \(holder unknown\); wait for it"):
            with hold(path, "runs/x"):
                pass
        holder.release()
    path.write_bytes(b"\xff\x00garbage")  # free, with a garbage record: taken and rewritten
    with hold(path, "runs/x"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    for raw in (b"", b"{}", b"[1]", b'{"pid": "x", "host": "h", "since": "s"}', b"\xff"):
        assert describe_holder(raw) == "holder unknown", raw
    assert describe_holder(b'{"pid": 7, "host": "h", "since": "t", "slurm_job": null}') == "pid 7 on host h, since t"


CONTENDER = """
import os, sys, time
from neon_scale.lock import Locked, hold
path, inside, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
got = overlaps = 0
deadline = time.monotonic() + 60
while got < n and time.monotonic() < deadline:
    try:
        with hold(path, "x"):
            try:
                os.close(os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                overlaps += 1
            else:
                time.sleep(0.0005)
                os.unlink(inside)
                got += 1
    except Locked:
        pass
print(got, overlaps)
"""


@pytest.mark.slow  # neon commands or lock holders in fresh processes (2-10 s)
def test_contending_processes_never_hold_at_once(tmp_path):
    """Acquire/release loops in 3 processes: the unlink on release races with others' open+flock
    (an old inode locked after the unlink); the inode re-check must keep the holder unique."""
    path, inside = tmp_path / ".lock", tmp_path / "inside"
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(path), str(inside), "300"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) for _ in range(3)]
    results = [tuple(map(int, p.communicate(timeout=120)[0].split())) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sum(overlaps for _, overlaps in results) == 0, results
    assert all(got == 300 for got, _ in results), results
    assert not path.exists()


def test_remove_stale_never_deletes_a_lock(tmp_path):
    old = time.time() - 3600  # older than this process: what remove_stale treats as a killed run's
    for name in (".lock", ".out.lock", ".out.partial-x.lock", ".out.partial-abc"):
        (tmp_path / name).write_text("x")
        os.utime(tmp_path / name, (old, old))
    assert remove_stale(tmp_path) == 1
    assert remove_stale(tmp_path, recursive=False, of="out") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", ".out.lock", ".out.partial-x.lock"]


# ----------------------------------------------------------------------------- merge / consolidate

@pytest.fixture
def pair(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(100, generator=gen), "b": torch.randn(10, generator=gen)}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file({k: v + 0.1 for k, v in base.items()}, str(tmp_path / "self.safetensors"))
    return tmp_path


def _snapshot(d: pathlib.Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_ino, p.read_bytes()) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.mark.slow  # neon commands or lock holders in fresh processes (2-10 s)
def test_merge_on_a_locked_out_fails_naming_the_holder_and_leaves_out_alone(pair):
    d = pair
    inputs = [str(d / "base.safetensors"), str(d / "self.safetensors")]
    out = d / "out"
    proc = neon("merge", *inputs, "--w", "1", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in d.iterdir()) == ["base.safetensors", "out", "self.safetensors"]  # no lock left
    before = _snapshot(out)

    with Holder(lock_path_for(out)) as holder:  # the first writer, as far as the lock can tell
        start = time.monotonic()
        proc = neon("merge", *inputs, "--w", "2", "-o", str(out), "--overwrite")
        elapsed = time.monotonic() - start
        assert proc.returncode == 2
        assert_one_line_error(proc, f"{out} is in use by pid {holder.pid} on host {socket.gethostname()}",
                              "wait for it to finish or stop it", exit_code=2)
        assert elapsed < 20, elapsed
        assert _snapshot(out) == before  # same files, same inodes: not swapped, not touched
        assert sorted(p.name for p in d.iterdir()) == [".out.lock", "base.safetensors", "out", "self.safetensors"]
        holder.release()

    proc = neon("merge", *inputs, "--w", "2", "-o", str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert _snapshot(out) != before
    assert sorted(p.name for p in d.iterdir()) == ["base.safetensors", "out", "self.safetensors"]


@pytest.mark.slow  # neon commands or lock holders in fresh processes (2-10 s)
def test_a_failed_merge_leaves_no_lock_and_no_folders(pair):
    d = pair
    save_file({"a": torch.zeros(3)}, str(d / "other.safetensors"))  # shape mismatch: stops before writing
    proc = neon("merge", str(d / "base.safetensors"), str(d / "other.safetensors"), "--w", "1",
                "-o", str(d / "new" / "sub" / "out"))
    assert proc.returncode == 2, proc.stderr
    assert sorted(p.name for p in d.iterdir()) == ["base.safetensors", "other.safetensors", "self.safetensors"]


@pytest.mark.slow  # neon commands or lock holders in fresh processes (2-10 s)
def test_consolidate_on_a_locked_out_fails_naming_the_holder(tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / "step000001").mkdir(parents=True)
    (ckpt / "latest").write_text("step000001")  # a checkpoint in name only: the lock comes before reading
    out = tmp_path / "cons"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous output")
    before = _snapshot(out)
    with Holder(lock_path_for(out)) as holder:
        proc = neon("consolidate", str(ckpt), "-o", str(out), "--overwrite")
        assert proc.returncode == 2
        assert_one_line_error(proc, f"{out} is in use by pid {holder.pid} on host {socket.gethostname()}", exit_code=2)
        assert _snapshot(out) == before
        holder.release()
    # free: consolidate runs (and fails on the empty checkpoint), and leaves neither lock nor partial
    proc = neon("consolidate", str(ckpt), "-o", str(out), "--overwrite")
    assert proc.returncode == 2 and "is in use" not in proc.stderr, proc.stderr
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "cons"]


# -------------------------------------------------------------------------------------- neon run

def run_args(run_dir: pathlib.Path, *extra: str) -> list[str]:
    return ["--config", str(TOY), "--run-dir", str(run_dir), *small_overrides(*extra)]


def _start(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    return subprocess.Popen([sys.executable, "-m", "neon_scale.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_holder(proc: subprocess.Popen, lock: pathlib.Path, timeout=300) -> None:
    """Until `proc` holds `lock` (its record is in the file)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if json.loads(lock.read_text())["pid"] == proc.pid:
                return
        except (FileNotFoundError, ValueError, KeyError):
            pass
        if proc.poll() is not None:
            pytest.fail(f"the first run ended before it held the lock: {proc.communicate()[1][-2000:]}")
        time.sleep(0.05)
    kill(proc)
    pytest.fail("the first run never took the lock")


STEPS = "base.steps=100"  # a short base stage: the lock, not the training, is under test


@pytest.mark.slow  # three `neon base` runs (about 40 s)
def test_second_run_on_a_busy_run_dir_fails_at_once_and_the_first_is_unharmed(tmp_path):
    busy, alone = tmp_path / "busy", tmp_path / "alone"
    first = _start("base", *run_args(busy, STEPS))
    try:
        _wait_for_holder(first, busy / ".lock")
        # paused while the second tries, so that it is surely mid-run (on a loaded machine the
        # second's start-up can take longer than the whole first run)
        first.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        second = neon("base", *run_args(busy, STEPS))
        elapsed = time.monotonic() - start
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            kill(first)
    assert second.returncode == 2
    assert_one_line_error(second, f"{busy} is in use by pid {first.pid} on host {socket.gethostname()}", exit_code=2)
    assert elapsed < 20, elapsed
    assert first.returncode == 0, err
    assert not (busy / ".lock").exists()

    # a holder killed with SIGKILL does not block: its run dir runs (and gives the same result)
    killed = _start("base", *run_args(alone, STEPS))
    _wait_for_holder(killed, alone / ".lock")
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert (alone / ".lock").exists()  # the dead holder's stale record stays
    proc = neon("base", *run_args(alone, STEPS))
    assert proc.returncode == 0, proc.stderr
    assert not (alone / ".lock").exists()
    a, b = load_file(str(busy / "base" / "model.safetensors")), load_file(str(alone / "base" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # 2 ranks through torchrun
def test_two_ranks_on_a_locked_run_dir_both_fail_with_the_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with Holder(run_dir / ".lock") as holder:
        start = time.monotonic()
        proc = torchrun(LAUNCHER, "base", *run_args(run_dir), timeout=300)
        elapsed = time.monotonic() - start
        assert proc.returncode != 0 and elapsed < 120, elapsed  # refused, not hung until a timeout
        text = proc.stdout + proc.stderr
        for rank in (0, 1):
            assert f"error: [rank {rank}] {run_dir} is in use by pid {holder.pid} on host" in text, text[-3000:]
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # nothing written in the run dir
        holder.release()
