"""Ranks started by Slurm without ssh, pdsh or a launcher of ours: processes given what srun gives
its tasks (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_JOB_NODELIST, ...) and no RANK/WORLD_SIZE form
one world; a task whose peers never come, and a process mpirun started, stop with one line; the
batch script launchers/slurm/neon.sbatch runs them through srun and requeues the job on status 3.
Slurm itself is faked by an `srun` that starts the tasks on this host and an `scontrol` that
records what it was asked."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from .conftest import LAUNCHER, ROOT, TOY, kill, small_overrides, torchrun

SBATCH = ROOT / "launchers" / "slurm" / "neon.sbatch"
RUN_TIMEOUT = 600

FAKE_SRUN = f"""#!{sys.executable}
# srun inside an allocation, on this host: record the options and the command, then start
# SLURM_NTASKS copies of the command with what srun gives each task, wait for all, and return the
# highest status (srun's rule). FAKE_SRUN_EXIT=N: start nothing, return N.
import os, subprocess, sys
args = sys.argv[1:]
options = []
while args and args[0].startswith("-"):
    options.append(args.pop(0))
with open(os.environ["FAKE_SRUN_LOG"], "a") as log:
    log.write(" ".join(options + args) + "\\n")
if os.environ.get("FAKE_SRUN_EXIT"):
    sys.exit(int(os.environ["FAKE_SRUN_EXIT"]))
n = int(os.environ["SLURM_NTASKS"])
step = dict(SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS=str(n), SLURM_STEP_NODELIST=os.environ["SLURM_JOB_NODELIST"])
tasks = [subprocess.Popen(args, env=dict(os.environ, **step, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)))
         for i in range(n)]
sys.exit(max(task.wait() for task in tasks))
"""
FAKE_SCONTROL = '#!/bin/sh\necho "$@" >> "$FAKE_SCONTROL_LOG"\n'


def clean_env(**extra) -> dict:
    """This process's environment without any launcher's, Slurm's or MPI's variables."""
    launcher = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "NEON_LAUNCHER",
                "NEON_DIST_TIMEOUT", "OMP_NUM_THREADS")
    env = {k: v for k, v in os.environ.items()
           if k not in launcher and not k.startswith(("SLURM_", "OMPI_", "PMI_", "TORCHELASTIC_"))}
    return {**env, "PYTHONUNBUFFERED": "1", "COLUMNS": "200", **extra}


def free_job_id() -> str:
    """A job id whose port (20000 + id % 10000) is free now, so that MASTER_PORT comes from the rule."""
    for port in range(20000 + os.getpid() % 5000, 30000):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        return str(7_000_000 + (port - 20000))  # an id of realistic size: 7000000 % 10000 == 0
    raise RuntimeError("no free port in 20000-29999")


def srun_task(i: int, n: int, job_id: str, step_vars: bool = True, **extra) -> dict:
    """What srun gives task i of an n-task step on this host (one node, localhost); without
    `step_vars`, only the job's task variables (SLURM_PROCID/NTASKS/LOCALID/JOB_NODELIST)."""
    env = clean_env(SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NTASKS=str(n), SLURM_STEP_NUM_TASKS=str(n),
                    SLURM_STEP_ID="0", SLURM_STEP_NODELIST="localhost", SLURM_JOB_NODELIST="localhost",
                    SLURM_JOB_ID=job_id, SLURM_NODEID="0", SLURM_CPUS_PER_TASK="1", OMP_NUM_THREADS="1", **extra)
    if not step_vars:
        for name in ("SLURM_STEP_NUM_TASKS", "SLURM_STEP_ID", "SLURM_STEP_NODELIST"):
            del env[name]
    return env


def neon_run(run_dir) -> list[str]:
    return [sys.executable, str(LAUNCHER), "run", "--config", str(TOY), "--run-dir", str(run_dir), *small_overrides()]


def start_tasks(envs, run_dir, logs):
    """Start one `launchers/neon.py run` per environment, output to files (no pipe to fill)."""
    logs.mkdir(exist_ok=True)
    procs = []
    for i, env in enumerate(envs):
        with open(logs / f"task{i}.out", "w") as out, open(logs / f"task{i}.err", "w") as err:
            procs.append(subprocess.Popen(neon_run(run_dir), cwd=ROOT, env=env, stdout=out, stderr=err))
    return procs


def wait_all(procs, timeout):
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:  # a hung rank must not outlive the test
            if p.poll() is None:
                kill(p)


def summary(run_dir):
    return json.loads((run_dir / "sweep" / "summary.json").read_text())


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def torchrun_summary(tmp_path_factory):
    """The reference: the same small run on 2 ranks started by torchrun."""
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    proc = torchrun(LAUNCHER, "--config", str(TOY), "--run-dir", str(run_dir), *small_overrides(), timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return summary(run_dir)


def fake_slurm_bin(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL, "nvidia-smi": "#!/bin/sh\nexit 9\n"}.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def run_sbatch(tmp_path, *args, **extra):
    """`bash neon.sbatch ARGS` as Slurm would run the batch script of a 1-node, 2-task job."""
    bin_dir = tmp_path / "bin" if (tmp_path / "bin").exists() else fake_slurm_bin(tmp_path)
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=free_job_id(),
                    SLURM_JOB_NODELIST="localhost", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_NNODES="1",
                    SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_CPUS_PER_TASK="1", SLURM_SUBMIT_DIR=str(ROOT),
                    FAKE_SRUN_LOG=str(tmp_path / "srun.log"), FAKE_SCONTROL_LOG=str(tmp_path / "scontrol.log"),
                    NEON_ENV=sys.prefix, **extra)  # this venv, activated by the script as a user's NEON_ENV would be
    proc = subprocess.run(["bash", str(SBATCH), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)
    return proc, env["SLURM_JOB_ID"]


# ---- (a) two srun tasks are one world of 2 ranks ------------------------------------------------

@pytest.mark.slow  # needs the torchrun reference run
@pytest.mark.parametrize("step_vars", [pytest.param(True, marks=pytest.mark.slow), False])
def test_two_srun_tasks_form_one_world_like_torchrun(tmp_path, torchrun_summary, step_vars):
    """With srun's step variables, and with only the job's task variables (SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID, SLURM_JOB_NODELIST): a whole toy run on 2 ranks, about 30 s here."""
    run_dir, job_id = tmp_path / "run", free_job_id()
    procs = start_tasks([srun_task(i, 2, job_id, step_vars) for i in range(2)], run_dir, tmp_path / "logs")
    codes = wait_all(procs, RUN_TIMEOUT)
    out = [(tmp_path / "logs" / f"task{i}.out").read_text() + (tmp_path / "logs" / f"task{i}.err").read_text()
           for i in range(2)]
    assert codes == [0, 0], out[0][-3000:] + out[1][-3000:]
    port = 20000 + int(job_id) % 10000
    for rank in range(2):
        assert f"rank {rank}: waiting for the process group of 2 ranks at localhost:{port}" in out[rank]
    assert "2 rank(s)" in out[0] and "1 rank(s)" not in out[0] + out[1]
    assert summary(run_dir) == torchrun_summary


# ---- (b) a task whose peer never starts --------------------------------------------------------

@pytest.mark.slow  # waits 10 s for a peer that never starts
def test_lone_srun_task_times_out_with_one_line(tmp_path):
    run_dir, job_id = tmp_path / "run", free_job_id()
    start = time.monotonic()
    procs = start_tasks([srun_task(0, 2, job_id, NEON_DIST_TIMEOUT="10")], run_dir, tmp_path / "logs")
    (code,) = wait_all(procs, 120)
    took = time.monotonic() - start
    err = (tmp_path / "logs" / "task0.err").read_text()
    out = (tmp_path / "logs" / "task0.out").read_text()
    assert code == 2, out + err
    assert took < 90, took  # 10 s of waiting plus start-up, not a world of one running the toy
    port = 20000 + int(job_id) % 10000
    (line,) = error_lines(err)
    assert (f"rank 0: the process group of 2 ranks did not form within 10 s at localhost:{port} "
            f"(are all ranks started? NEON_DIST_TIMEOUT sets the wait)") in line, err
    assert "rank(s)" not in out + err and not run_dir.exists()  # never ran as a world of one


@pytest.mark.slow  # waits 10 s for a peer that never starts
def test_batch_script_waits_then_says_to_use_srun(tmp_path):
    """`python launchers/neon.py` straight in the batch script of a 2-task job looks like task 0 of
    a Slurm without step variables: it never runs as a world of one; it waits for its peer and ends
    with one line that says to start the ranks with srun."""
    run_dir = tmp_path / "run"
    env = srun_task(0, 2, free_job_id(), step_vars=False, NEON_DIST_TIMEOUT="10")
    proc = subprocess.run(neon_run(run_dir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = error_lines(proc.stderr)
    assert "did not form within 10 s" in line and "if this is the job's batch script (one process), start the " \
                                                   "ranks with srun" in line, line
    assert "rank(s)" not in proc.stdout + proc.stderr and not run_dir.exists()


# ---- (c) started by mpirun ---------------------------------------------------------------------

@pytest.mark.slow  # a neon command in a fresh process (over 2 s each here)
@pytest.mark.parametrize("mpi", [{"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"},
                                 {"PMI_SIZE": "2", "PMI_RANK": "0"}])
def test_mpirun_copies_stop_with_one_line_and_write_nothing(tmp_path, mpi):
    run_dir = tmp_path / "run"
    proc = subprocess.run(neon_run(run_dir), cwd=ROOT, env=clean_env(**mpi), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    name = next(iter(mpi))
    assert f"started by mpirun/PMI as one of 2 processes ({name}=2) without RANK/WORLD_SIZE" in line, line
    assert "srun" in line and "torchrun" in line and "deepspeed" in line
    assert not run_dir.exists()


# ---- (d) the batch script: srun by default, requeue on status 3 --------------------------------

@pytest.mark.slow  # a whole run on 2 ranks
def test_sbatch_runs_every_task_through_srun(tmp_path, torchrun_summary):
    run_dir = tmp_path / "run"
    proc, job_id = run_sbatch(tmp_path, "--run-dir", str(run_dir), *small_overrides())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "srun.log").read_text().splitlines() == [
        " ".join(["--kill-on-bad-exit=1", "python", "launchers/neon.py", "--config", "configs/toy2d.yaml",
                  "--run-dir", str(run_dir), *small_overrides()])]
    assert "2 rank(s)" in proc.stdout and "rank 1: waiting for the process group of 2 ranks" in proc.stderr
    assert summary(run_dir) == torchrun_summary
    assert not (tmp_path / "scontrol.log").exists() and "requeue" not in proc.stdout


def test_sbatch_requeues_the_job_when_srun_returns_3(tmp_path):
    proc, job_id = run_sbatch(tmp_path, "--run-dir", str(tmp_path / "run"), FAKE_SRUN_EXIT="3")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert (tmp_path / "scontrol.log").read_text() == f"requeue {job_id}\n"
    assert f"neon stopped resumably (exit status 3): requeueing job {job_id}" in proc.stdout


@pytest.mark.parametrize("status", [1, 137])  # a failed rank; a rank killed (srun: 128 + signal)
def test_sbatch_passes_other_statuses_through_without_requeue(tmp_path, status):
    proc, _ = run_sbatch(tmp_path, "--run-dir", str(tmp_path / "run"), FAKE_SRUN_EXIT=str(status))
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert not (tmp_path / "scontrol.log").exists() and "requeue" not in proc.stdout
    assert (tmp_path / "srun.log").exists()  # srun did run


def test_sbatch_reports_a_failed_requeue(tmp_path):
    bin_dir = fake_slurm_bin(tmp_path)
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "scontrol: error: Job is not requeueable" >&2\nexit 1\n')
    proc, job_id = run_sbatch(tmp_path, FAKE_SRUN_EXIT="3")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"error: scontrol requeue {job_id} failed; resubmit this script to resume" in proc.stderr
