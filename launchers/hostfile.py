"""Turn a Slurm allocation into the one command that starts launchers/neon.py on every GPU.

  python launchers/hostfile.py -- --config configs/toy2d.yaml --set train.lr=1e-5
  python launchers/hostfile.py --dry-run --env-file job.env -- --config configs/toy2d.yaml
  NEON_LAUNCHER=deepspeed python launchers/hostfile.py --dry-run -- --config configs/toy2d.yaml

Run it once per job, on the batch host (launchers/slurm/*.sbatch do). Two launchers:
  srun       (default) `srun --kill-on-bad-exit=1 python launchers/neon.py ARGS`: one task per
             GPU as the job asked for (--ntasks-per-node), no ssh; each task finds its rank,
             the world and rank 0's host in Slurm's variables (neon_scale.dist).
  deepspeed  `deepspeed` from this node: one node -> `--num_gpus N`; several -> a hostfile
             (`host slots=N`, N = GPUs per node) and `--launcher pdsh` (ssh between the nodes).
--launcher, else NEON_LAUNCHER, picks one. The command replaces this process (its exit status is
the launcher's); --dry-run prints the hostfile (deepspeed) and the command instead. --env-file
reads KEY=VALUE lines in place of the environment, to see what a given allocation would run.
Errors print one line and exit 2.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

try:
    from neon_scale.slurm import expand_nodelist, job_port
except ImportError:  # run as a file from a checkout whose package is not installed: use the checkout's
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from neon_scale.slurm import expand_nodelist, job_port

SCRIPT = "launchers/neon.py"
LAUNCHERS = ("srun", "deepspeed")
LAUNCHER_ENV = "NEON_LAUNCHER"
# srun: --kill-on-bad-exit=1 ends the other tasks (SIGTERM, then SIGKILL after KillWait) when one
# exits non-zero, as torchrun and deepspeed do; otherwise the peers of a failed rank wait in a
# collective until NEON_DIST_TIMEOUT. Ranks stopping resumably all exit 3 at the same point, and
# the SIGTERM only reaches their stop handler, so srun still returns 3 (it returns the highest exit
# status, or 128 + the highest signal when a task was killed by one).
SRUN = ["srun", "--kill-on-bad-exit=1"]
# deepspeed, several nodes: `--launcher pdsh`, from reading deepspeed/launcher/{runner,multinode_runner}.py.
# pdsh is the only backend that starts `deepspeed.launcher.launch` on every node, and that is
# what gives each rank RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT. DeepSpeed's
# `slurm` backend (srun -n <all GPUs>) does not fit an allocation of one task per node, and
# `openmpi` (mpirun) starts the script bare. --master_addr (the first node) spares DeepSpeed its
# `ssh <node> hostname -I` probe; its ssh check is kept (no --no_ssh_check): pdsh needs ssh to
# the job's nodes (pam_slurm_adopt allows it), and without ssh the check fails early and clearly.
# One node: `deepspeed --num_gpus N --master_port P`, no hostfile, no ssh. Either way GPUs
# [0, N) of each node are used: with ConstrainDevices=yes (usual) a job sees only its own GPUs.
LAUNCHER = "pdsh"
# Master port: MASTER_PORT if set, else neon_scale.slurm.job_port (20000 + SLURM_JOB_ID % 10000,
# the rule neon_scale.dist applies in srun's tasks). Without either, torch's default.
DEFAULT_PORT = 29500


def _count(env: Mapping[str, str], key: str) -> int:
    """A positive GPU count from `4`, `gpu:4`, `a100:8`, `gpu:a100:8` (comma lists are summed)."""
    try:
        total = sum(int(part.rsplit(":", 1)[-1]) for part in env[key].split(","))
    except ValueError:
        raise ValueError(f"{key}={env[key]!r} is not a GPU count (expected e.g. 4, gpu:4)") from None
    if total < 1:
        raise ValueError(f"{key}={env[key]!r}: need at least one GPU per node")
    return total


def gpus_per_node(env: Mapping[str, str]) -> int:
    """GPUs (DeepSpeed slots) on each node of the job; 1 when Slurm names none (a CPU job)."""
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if env.get(key, "").strip():
            return _count(env, key)
    for key in ("SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        ids = [x for x in env.get(key, "").split(",") if x.strip()]
        if ids:
            return len(ids)
    return 1


def master_port(env: Mapping[str, str]) -> int:
    """MASTER_PORT, else derived from SLURM_JOB_ID (each array task has its own job id)."""
    if env.get("MASTER_PORT", "").strip():
        value = env["MASTER_PORT"].strip()
        if not value.isdigit() or not 1 <= int(value) <= 65535:
            raise ValueError(f"MASTER_PORT={value!r} is not a port (1-65535)")
        return int(value)
    if env.get("SLURM_JOB_ID", "").strip():
        return job_port(env["SLURM_JOB_ID"])
    return DEFAULT_PORT


def job_nodes(env: Mapping[str, str]) -> list[str]:
    if not env.get("SLURM_JOB_NODELIST", "").strip():
        raise ValueError("SLURM_JOB_NODELIST is not set: run inside an sbatch/salloc allocation "
                         "(or pass --env-file)")
    return expand_nodelist(env["SLURM_JOB_NODELIST"])


def write_hostfile(nodes: Sequence[str], slots: int, path: str | os.PathLike) -> Path:
    """Write `host slots=N` lines atomically: a temp file in the same folder, then os.replace."""
    if not nodes or slots < 1:
        raise ValueError(f"hostfile needs at least one node and one slot, got {list(nodes)}, {slots}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a hostfile is not secret
        with os.fdopen(fd, "w") as f:
            f.writelines(f"{node} slots={slots}\n" for node in nodes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def launcher_name(env: Mapping[str, str], chosen: str | None = None) -> str:
    """--launcher, else NEON_LAUNCHER, else srun."""
    name = chosen or env.get(LAUNCHER_ENV, "").strip() or "srun"
    if name not in LAUNCHERS:
        raise ValueError(f"{LAUNCHER_ENV}={name!r}: choose {' or '.join(LAUNCHERS)}")
    return name


def launch_command(env: Mapping[str, str], script_args: Sequence[str],
                   hostfile_path: str | os.PathLike, port: int | None = None, launcher: str = "srun") -> list[str]:
    """The one command for this job (see SRUN and LAUNCHER for the choices)."""
    nodes = job_nodes(env)
    if launcher == "srun":  # every task runs the script; neon_scale.dist reads Slurm's variables
        return [*SRUN, "python", SCRIPT, *script_args]
    port = master_port(env) if port is None else port
    if len(nodes) == 1:
        head = ["deepspeed", "--num_gpus", str(gpus_per_node(env)), "--master_port", str(port)]
    else:
        head = ["deepspeed", "--hostfile", str(hostfile_path), "--master_addr", nodes[0],
                "--master_port", str(port), "--launcher", LAUNCHER]
    return [*head, SCRIPT, *script_args]


def read_env_file(path: str | os.PathLike) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments are skipped, values are taken as written."""
    env = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        env[key.strip()] = value.strip()
    return env


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, script_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        prog="launchers/hostfile.py",
        usage="%(prog)s [--dry-run] [--launcher srun|deepspeed] [--hostfile PATH] [--env-file FILE] -- ARGS",
        description="Run launchers/neon.py ARGS on every GPU of this Slurm job (srun, or deepspeed with a hostfile).")
    parser.add_argument("--dry-run", action="store_true", help="print the hostfile and the command, run nothing")
    parser.add_argument("--launcher", choices=LAUNCHERS, help=f"default: ${LAUNCHER_ENV}, else srun")
    parser.add_argument("--hostfile", help="deepspeed: where to write it (default: logs/hostfile-<SLURM_JOB_ID>)")
    parser.add_argument("--env-file", help="read KEY=VALUE lines instead of the environment")
    args = parser.parse_args(own)
    try:
        env = read_env_file(args.env_file) if args.env_file else dict(os.environ)
        launcher = launcher_name(env, args.launcher)
        nodes = job_nodes(env)
        hostfile = args.hostfile or f"logs/hostfile-{env.get('SLURM_JOB_ID', 'local')}"
        cmd = launch_command(env, script_args, hostfile, launcher=launcher)
        uses_hostfile = launcher == "deepspeed" and len(nodes) > 1
        slots = gpus_per_node(env)
        if args.dry_run:
            if launcher == "srun":
                tasks = env.get("SLURM_NTASKS", "").strip() or "?"
                print(f"# each task: RANK=SLURM_PROCID, WORLD_SIZE=SLURM_STEP_NUM_TASKS ({tasks}), "
                      f"LOCAL_RANK=SLURM_LOCALID, MASTER_ADDR={env.get('MASTER_ADDR', '').strip() or nodes[0]}, "
                      f"MASTER_PORT={master_port(env)}")
            for node in nodes if uses_hostfile else []:
                print(f"{node} slots={slots}")
            print(shlex.join(cmd))
            return 0
        if shutil.which(cmd[0]) is None:
            hint = ("run inside an sbatch/salloc allocation" if cmd[0] == "srun"
                    else "activate the environment neon_scale is installed in, or set NEON_ENV")
            raise ValueError(f"{cmd[0]!r} is not on PATH ({hint})")
        if uses_hostfile:
            write_hostfile(nodes, slots, hostfile)
        print(f"+ {shlex.join(cmd)}", flush=True)
        os.execvp(cmd[0], cmd)  # does not return
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
