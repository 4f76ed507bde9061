"""A launcher environment that cannot form a process group: one line naming what is missing or
wrong, exit 2; a rendezvous whose peer never comes: a logged wait, then one line after
NEON_DIST_TIMEOUT seconds instead of a silent hang (neon_scale.dist.init)."""
import os
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
    """The test process's own launcher variables (torchrun's, Slurm's, MPI's) must not leak into the
    `neon` it starts."""
    for name in [*LAUNCHER_VARS, *(n for n in os.environ if n.startswith(("SLURM_", "OMPI_", "PMI_")))]:
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

@pytest.mark.slow  # separate processes waiting for peers (10-25 s)
def test_world_of_two_without_master_addr_names_it(clean_env, run_dir):
    proc = train(run_dir, {"RANK": "1", "WORLD_SIZE": "2"})
    line = error_line(proc)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "[WARNING]" not in ln]
    assert lines == [line], proc.stderr
    for needle in ("launcher environment", "WORLD_SIZE=2 needs MASTER_ADDR, MASTER_PORT (not set)", "torchrun",
                   "deepspeed", "srun"):
        assert needle in line, line
    assert not run_dir.exists()


@pytest.mark.slow  # separate processes waiting for peers (10-25 s)
@pytest.mark.parametrize("env, needle", [
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
    ({"RANK": "-1", "WORLD_SIZE": "2", **PEER}, "RANK=-1 is negative"),
    ({"NEON_DIST_TIMEOUT": "soon"}, "NEON_DIST_TIMEOUT='soon': must be a positive number of seconds"),
])
def test_inconsistent_environment_is_one_line(clean_env, run_dir, env, needle):
    line = error_line(train(run_dir, env))
    assert needle in line, line
    assert not run_dir.exists()


@pytest.mark.slow  # separate processes waiting for peers (10-25 s)
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
    assert_launcher_error(env, needles, "torchrun")


def assert_launcher_error(env, needles, hint):
    """check_launcher_env refuses `env` with one line holding every needle and the launcher hint."""
    with pytest.raises(NeonError) as info:
        dist.check_launcher_env(dict(env))
    msg = str(info.value)
    assert msg.startswith("launcher environment: ") and "\n" not in msg and hint in msg, msg
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


# ---- Slurm: an srun task of several forms the world; the batch script and mpirun do not ---------

# What srun gives task 1 of a 2-task step on one node (SLURM_STEP_* exist only inside a step).
SRUN_TASK = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
             "SLURM_STEP_ID": "0", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "4321"}
# What sbatch gives the batch script of a job of --ntasks=8: one process, yet SLURM_PROCID and SLURM_NTASKS
# (and no SLURM_STEP_*: from these variables alone it is indistinguishable from task 0 of 8).
BATCH_SHELL = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "8", "SLURM_NPROCS": "8",
               "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "4321", "ENVIRONMENT": "BATCH"}


@pytest.mark.parametrize("extra, cuda, expect", [
    ({}, 0, {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "localhost", "MASTER_PORT": "24321"}),
    # the step's own node list and task count come first
    ({"SLURM_STEP_NODELIST": "localhost,no-such-host.invalid", "SLURM_JOB_NODELIST": "no-such-host.invalid",
      "SLURM_STEP_NUM_TASKS": "3", "SLURM_NTASKS": "8"}, 0, {"WORLD_SIZE": "3", "MASTER_ADDR": "localhost"}),
    ({"SLURM_JOB_NODELIST": "localhost,gpu[02-04]"}, 0, {"MASTER_ADDR": "localhost"}),
    # what the user exported wins
    ({"MASTER_PORT": "31000", "MASTER_ADDR": "127.0.0.1"}, 0, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "31000"}),
    ({"SLURM_JOB_ID": "123456789"}, 0, {"MASTER_PORT": "26789"}),
    # the task's GPU: SLURM_LOCALID; the only one it sees when srun bound one GPU per task
    ({}, 2, {"LOCAL_RANK": "1"}),
    ({}, 1, {"LOCAL_RANK": "0"}),
    ({"LOCAL_RANK": "0"}, 4, {"LOCAL_RANK": "1"}),  # Slurm's id over a LOCAL_RANK left in the job's env
    # srun --mpi=pmi2 gives its tasks PMI_SIZE = the step's size: the same world
    ({"PMI_SIZE": "2", "PMI_RANK": "1"}, 0, {"RANK": "1", "WORLD_SIZE": "2"}),
])
def test_srun_task_of_several(extra, cuda, expect):
    env = {**SRUN_TASK, **extra}
    dist.check_launcher_env(env, cuda_devices=cuda)
    assert {k: env[k] for k in expect} == expect


@pytest.mark.parametrize("env", [
    {**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"},  # srun -n 1
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "gpu01"},  # batch script of a 1-task job
    {"SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[01-02]"},  # salloc's shell: no task id
    {"OMPI_COMM_WORLD_SIZE": "1", "PMI_SIZE": "1"},
])
def test_one_slurm_or_mpi_task_is_a_world_of_one(env):
    env = dict(env)
    dist.check_launcher_env(env)
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "1" and env["MASTER_ADDR"] == "127.0.0.1"


def test_a_launcher_wins_over_slurm_and_mpi():
    env = {**SRUN_TASK, "OMPI_COMM_WORLD_SIZE": "8", "RANK": "3", "WORLD_SIZE": "4", **PEER}
    dist.check_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == ("3", "4", "29500")


@pytest.mark.parametrize("env, needles", [
    ({**SRUN_TASK, "SLURM_JOB_NODELIST": ""}, ["Slurm task 1 of 2 but neither SLURM_STEP_NODELIST nor "
                                               "SLURM_JOB_NODELIST is set"]),
    ({**SRUN_TASK, "SLURM_JOB_NODELIST": "gpu[01-"}, ["SLURM_JOB_NODELIST: bad node list 'gpu[01-'"]),
    ({**SRUN_TASK, "SLURM_JOB_ID": ""}, ["neither MASTER_PORT nor SLURM_JOB_ID is set"]),
    ({**SRUN_TASK, "SLURM_JOB_ID": "12a"}, ["SLURM_JOB_ID='12a' is not a number"]),
    ({**SRUN_TASK, "SLURM_PROCID": "2"}, ["SLURM_PROCID=2 is not below SLURM_STEP_NUM_TASKS=2"]),
    ({**SRUN_TASK, "SLURM_PROCID": "one"}, ["SLURM_PROCID='one' is not a non-negative integer"]),
    ({**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "two"}, ["SLURM_STEP_NUM_TASKS='two' is not a non-negative integer"]),
    ({**SRUN_TASK, "SLURM_LOCALID": "-1"}, ["SLURM_LOCALID='-1' is not a non-negative integer"]),
    ({**SRUN_TASK, "SLURM_JOB_NODELIST": "", "SLURM_JOB_ID": ""},  # every problem at once
     ["SLURM_JOB_NODELIST is set", "nor SLURM_JOB_ID is set"]),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"},
     ["started by mpirun/PMI as one of 2 processes (OMPI_COMM_WORLD_SIZE=2) without RANK/WORLD_SIZE", "torchrun"]),
    ({"PMI_SIZE": "2", "PMI_RANK": "0"}, ["started by mpirun/PMI as one of 2 processes (PMI_SIZE=2)"]),
    ({"PMI_SIZE": "many"}, ["PMI_SIZE='many' is not an integer"]),
    # mpirun inside an allocation: its processes inherit the Slurm variables of its per-node daemons
    ({**SRUN_TASK, "OMPI_COMM_WORLD_SIZE": "8"}, ["one of 8 processes (OMPI_COMM_WORLD_SIZE=8) inside an srun step "
                                                  "of 2 task(s)"]),
])
def test_signs_of_several_tasks_without_a_world_are_one_line(env, needles):
    assert_launcher_error(env, needles, "srun")


def test_job_task_variables_without_step_variables_join_with_a_hint():
    """Only SLURM_PROCID/NTASKS/LOCALID/JOB_NODELIST (a hand-made or older environment, or the batch
    script itself): never a world of one; task 0 joins and its wait says what to do if it is the
    batch script."""
    env = dict(BATCH_SHELL)
    dist.check_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == ("0", "8", "localhost", "24321")
    assert "if this is the job's batch script (one process), start the ranks with srun" in dist._rendezvous_hint
    env = {**BATCH_SHELL, "SLURM_PROCID": "5", "SLURM_LOCALID": "5"}
    dist.check_launcher_env(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "5")
