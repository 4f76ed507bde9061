"""Turn a Slurm allocation into one `deepspeed` command for launchers/neon.py.

  python launchers/hostfile.py -- --config configs/toy2d.yaml --set train.lr=1e-5
  python launchers/hostfile.py --dry-run --env-file job.env -- --config configs/toy2d.yaml

Run it once per job, on the batch host (launchers/slurm/*.sbatch do): it writes the DeepSpeed
hostfile (`host slots=N`, N = GPUs per node) and execs the command; --dry-run prints both
instead. --env-file reads KEY=VALUE lines in place of the environment, to see what a given
allocation would run. Errors print one line and exit 2.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

SCRIPT = "launchers/neon.py"
# Several nodes: `--launcher pdsh`, from reading deepspeed/launcher/{runner,multinode_runner}.py.
# pdsh is the only backend that starts `deepspeed.launcher.launch` on every node, and that is
# what gives each rank RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (neon_scale.dist
# needs them). `slurm` (srun -n <all GPUs>) and `openmpi` (mpirun) start the script bare, so
# every rank would quietly run as a world of one, and srun -n <all GPUs> does not fit an
# allocation of one task per node anyway. --master_addr (the first node) spares DeepSpeed its
# `ssh <node> hostname -I` probe; its ssh check is kept (no --no_ssh_check): pdsh needs ssh to
# the job's nodes (pam_slurm_adopt allows it), and without ssh the check fails early and clearly.
# One node: `deepspeed --num_gpus N --master_port P`, no hostfile, no ssh. Either way GPUs
# [0, N) of each node are used: with ConstrainDevices=yes (usual) a job sees only its own GPUs.
LAUNCHER = "pdsh"
# Master port: MASTER_PORT if set, else 20000 + SLURM_JOB_ID % 10000, below Linux's ephemeral
# ports (32768+); two jobs on one node collide only if their ids differ by a multiple of 10000.
# Without either, torch's default.
DEFAULT_PORT = 29500

_NUMBER = re.compile(r"[0-9]+")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets; check that brackets are balanced and not nested."""
    items, start, inside = [], 0, False
    for i, ch in enumerate(text):
        if ch == "[":
            if inside:
                raise ValueError(f"bad node list {text!r}: nested '['")
            inside = True
        elif ch == "]":
            if not inside:
                raise ValueError(f"bad node list {text!r}: ']' without '['")
            inside = False
        elif ch == "," and not inside:
            items.append(text[start:i])
            start = i + 1
    if inside:
        raise ValueError(f"bad node list {text!r}: '[' without ']'")
    items.append(text[start:])
    return items


def _expand_brackets(body: str, text: str) -> list[str]:
    """`01-03,07` -> 01 02 03 07 (a range keeps the width of its first number)."""
    out = []
    for part in body.split(","):
        lo, dash, hi = part.partition("-")
        if not _NUMBER.fullmatch(lo) or (dash and not _NUMBER.fullmatch(hi)):
            raise ValueError(f"bad node list {text!r}: bad range {part!r} in [{body}]")
        if not dash:
            out.append(lo)
        elif int(hi) < int(lo):
            raise ValueError(f"bad node list {text!r}: reversed range {part!r}")
        else:
            out += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + 1)]
    return out


def expand_nodelist(text: str) -> list[str]:
    """Expand Slurm node-list syntax like `scontrol show hostnames`, in order.

    `gpu[01-03,07]` -> gpu01 gpu02 gpu03 gpu07; `rack[1-2]-gpu[1-2]` -> rack1-gpu1 rack1-gpu2
    rack2-gpu1 rack2-gpu2; `a,b[1-2]` -> a b1 b2.
    """
    if not text.strip():
        raise ValueError(f"bad node list {text!r}: empty")
    nodes = []
    for item in _split_top_level(text.strip()):
        if not item.strip() or re.search(r"\s", item.strip()):
            raise ValueError(f"bad node list {text!r}: empty or blank-containing name {item!r}")
        # split() with a group alternates literal text and bracket bodies: a, 01-03, b, 1-2, ""
        pieces = re.split(r"\[([^\]]*)\]", item.strip())
        choices = [[p] if i % 2 == 0 else _expand_brackets(p, text) for i, p in enumerate(pieces)]
        nodes += ["".join(combo) for combo in itertools.product(*choices)]
    return nodes


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
    key = "MASTER_PORT" if env.get("MASTER_PORT", "").strip() else "SLURM_JOB_ID"
    if not env.get(key, "").strip():
        return DEFAULT_PORT
    value = env[key].strip()
    if not _NUMBER.fullmatch(value):
        raise ValueError(f"{key}={value!r} is not a number")
    port = int(value) if key == "MASTER_PORT" else 20000 + int(value) % 10000
    if not 1 <= port <= 65535:
        raise ValueError(f"MASTER_PORT={value!r} is not a port (1-65535)")
    return port


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


def launch_command(env: Mapping[str, str], script_args: Sequence[str],
                   hostfile_path: str | os.PathLike, port: int | None = None) -> list[str]:
    """The one `deepspeed` command for this job (see LAUNCHER for the choices)."""
    nodes = job_nodes(env)
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
        prog="launchers/hostfile.py", usage="%(prog)s [--dry-run] [--hostfile PATH] [--env-file FILE] -- ARGS",
        description="Write the DeepSpeed hostfile for this Slurm job and run launchers/neon.py ARGS.")
    parser.add_argument("--dry-run", action="store_true", help="print the hostfile and the command, run nothing")
    parser.add_argument("--hostfile", help="where to write it (default: logs/hostfile-<SLURM_JOB_ID>)")
    parser.add_argument("--env-file", help="read KEY=VALUE lines instead of the environment")
    args = parser.parse_args(own)
    try:
        env = read_env_file(args.env_file) if args.env_file else dict(os.environ)
        nodes = job_nodes(env)
        slots = gpus_per_node(env)
        hostfile = args.hostfile or f"logs/hostfile-{env.get('SLURM_JOB_ID', 'local')}"
        cmd = launch_command(env, script_args, hostfile)
        uses_hostfile = len(nodes) > 1
        if args.dry_run:
            for node in nodes if uses_hostfile else []:
                print(f"{node} slots={slots}")
            print(shlex.join(cmd))
            return 0
        if shutil.which(cmd[0]) is None:
            raise ValueError(f"{cmd[0]!r} is not on PATH (activate the .venv)")
        if uses_hostfile:
            write_hostfile(nodes, slots, hostfile)
        print(f"+ {shlex.join(cmd)}", flush=True)
        os.execvp(cmd[0], cmd)  # does not return
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
