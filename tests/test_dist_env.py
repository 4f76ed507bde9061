"""A launcher environment that cannot form a process group: one line naming what is missing or
wrong, exit 2; a rendezvous whose peer never comes: a logged wait, then one line after
NEON_DIST_TIMEOUT seconds instead of a silent hang (neon_scale.dist.init)."""
import socket
import time

import pytest

from neon_scale import dist
from neon_scale.errors import NeonError

from .conftest import TOY, neon, small_overrides

LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                 "SLURM_LOCALID", "NEON_DIST_TIMEOUT")
PEER = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.fixture
def clean_env(monkeypatch):
    """The test process's own launcher variables must not leak into the `neon` it starts."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(run_dir, env, timeout=60):
    return neon("train", "--config", str(TOY), "--run-dir", str(run_dir), *small_overrides(), env_extra=env,
                timeout=timeout)


def error_line(proc) -> str:
    """The one `error:` line, last on stderr; exit 2, no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "mpi4py" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr
    return errors[0]


# ---- through the real command -------------------------------------------------------------------

def test_world_of_two_without_master_addr_names_it(clean_env, run_dir):
    proc = train(run_dir, {"RANK": "1", "WORLD_SIZE": "2"})
    line = error_line(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln]
    assert lines == [line], proc.stderr
    for needle in ("launcher environment", "WORLD_SIZE=2 needs MASTER_ADDR, MASTER_PORT (not set)", "torchrun",
                   "deepspeed", "srun"):
        assert needle in line, line
    assert not run_dir.exists()


@pytest.mark.parametrize("env, needle", [
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
    ({"RANK": "-1", "WORLD_SIZE": "2", **PEER}, "RANK=-1 is negative"),
    ({"NEON_DIST_TIMEOUT": "soon"}, "NEON_DIST_TIMEOUT='soon': must be a positive number of seconds"),
])
def test_inconsistent_environment_is_one_line(clean_env, run_dir, env, needle):
    line = error_line(train(run_dir, env))
    assert needle in line, line
    assert not run_dir.exists()


@pytest.mark.parametrize("rank", [1, 0])  # 1: no server to reach; 0: serves, but the peer never joins
def test_missing_peer_times_out_with_one_line(clean_env, run_dir, rank):
    port = free_port()
    start = time.monotonic()
    proc = train(run_dir, {"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(port), "NEON_DIST_TIMEOUT": "5"})
    assert time.monotonic() - start < 60
    where = f"127.0.0.1:{port}"
    assert f"rank {rank}: waiting for the process group of 2 ranks at {where} (timeout 5 s" in proc.stderr
    line = error_line(proc)
    assert (f"rank {rank}: the process group of 2 ranks did not form within 5 s at {where} "
            f"(are all ranks started? NEON_DIST_TIMEOUT sets the wait)") in line, line
    assert not run_dir.exists()


# ---- the checks themselves, in process ----------------------------------------------------------

def test_no_launcher_is_a_world_of_one():
    env = {"MASTER_ADDR": "elsewhere"}
    dist.check_launcher_env(env)
    assert env["RANK"] == "0" and env["LOCAL_RANK"] == "0" and env["WORLD_SIZE"] == "1"
    assert env["MASTER_ADDR"] == "127.0.0.1" and 1 <= int(env["MASTER_PORT"]) <= 65535


def test_world_size_one_fills_in_the_rest():
    env = {"WORLD_SIZE": "1", "MASTER_PORT": " 29511 "}
    dist.check_launcher_env(env)
    assert env == {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": "29511"}


@pytest.mark.parametrize("extra, cuda, local", [
    ({}, 0, "3"),
    ({"LOCAL_WORLD_SIZE": "2"}, 0, "1"),
    ({"SLURM_LOCALID": "0"}, 0, "0"),
    ({}, 2, "1"),
    ({"LOCAL_RANK": "1"}, 0, "1"),
])
def test_local_rank_defaults(extra, cuda, local):
    env = {"RANK": "3", "WORLD_SIZE": "4", **PEER, **extra}
    dist.check_launcher_env(env, cuda_devices=cuda)
    assert env["LOCAL_RANK"] == local


@pytest.mark.parametrize("env, needles", [
    ({"WORLD_SIZE": "2"}, ["WORLD_SIZE=2 needs RANK, MASTER_ADDR, MASTER_PORT (not set)"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": ""}, ["needs MASTER_PORT (not set)"]),
    ({"RANK": "0"}, ["RANK=0 is set but WORLD_SIZE is not"]),
    ({"RANK": "0", "WORLD_SIZE": "-2"}, ["WORLD_SIZE=-2 must be at least 1"]),
    ({"RANK": "0", "WORLD_SIZE": "two", **PEER}, ["WORLD_SIZE='two' is not an integer"]),
    ({"RANK": "2", "WORLD_SIZE": "2", **PEER}, ["RANK=2 is not below WORLD_SIZE=2"]),
    ({"RANK": "-1", "WORLD_SIZE": "2", **PEER}, ["RANK=-1 is negative"]),
    ({"RANK": "1.0", "WORLD_SIZE": "2", **PEER}, ["RANK='1.0' is not an integer"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, ["MASTER_PORT=70000 is not a port"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "0"}, ["MASTER_PORT=0 is not a port"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "http"}, ["MASTER_PORT='http' is not an"]),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "-1", **PEER}, ["LOCAL_RANK=-1 is negative"]),
    ({"RANK": "5", "WORLD_SIZE": "2", "MASTER_PORT": "x"},  # every problem at once
     ["needs MASTER_ADDR (not set)", "RANK=5 is not below WORLD_SIZE=2", "MASTER_PORT='x' is not an integer"]),
])
def test_bad_launcher_environment(env, needles):
    with pytest.raises(NeonError) as info:
        dist.check_launcher_env(dict(env))
    msg = str(info.value)
    assert msg.startswith("launcher environment: ") and "\n" not in msg and "torchrun" in msg, msg
    for needle in needles:
        assert needle in msg, msg


def test_local_rank_beyond_the_gpus():
    with pytest.raises(NeonError, match=r"LOCAL_RANK=2 but this host has 2 GPU\(s\)"):
        dist.check_launcher_env({"RANK": "2", "WORLD_SIZE": "4", "LOCAL_RANK": "2", **PEER}, cuda_devices=2)


def test_master_addr_that_does_not_resolve():
    with pytest.raises(NeonError, match=r"MASTER_ADDR='no-such-host.invalid' does not resolve"):
        dist.check_launcher_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "no-such-host.invalid",
                                 "MASTER_PORT": "29500"})


@pytest.mark.parametrize("raw, seconds", [(None, 1800.0), ("", 1800.0), ("5", 5.0), (" 0.5 ", 0.5), ("3600", 3600.0)])
def test_timeout_seconds(raw, seconds):
    assert dist.timeout_seconds({} if raw is None else {"NEON_DIST_TIMEOUT": raw}) == seconds


@pytest.mark.parametrize("raw", ["abc", "0", "-3", "nan", "inf", "1e12", "5s"])
def test_timeout_must_be_a_positive_number(raw):
    with pytest.raises(NeonError, match="NEON_DIST_TIMEOUT=.*must be a positive number of seconds"):
        dist.timeout_seconds({"NEON_DIST_TIMEOUT": raw})
