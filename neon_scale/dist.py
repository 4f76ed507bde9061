"""Rank / world helpers over torch.distributed (gloo on CPU, nccl on GPU).

Who says how many ranks there are, in this order (check_launcher_env):
1. a launcher's RANK/WORLD_SIZE (torchrun, deepspeed, or exported by hand), with MASTER_ADDR,
   MASTER_PORT and LOCAL_RANK; a missing or inconsistent variable is a one-line error, not
   DeepSpeed's fallback to MPI discovery.
2. Slurm, when this process is one task of an srun step of several: RANK = SLURM_PROCID,
   WORLD_SIZE = SLURM_STEP_NUM_TASKS, LOCAL_RANK = SLURM_LOCALID (0 when the task sees a single
   GPU: srun bound one to it), MASTER_ADDR = the first host of SLURM_STEP_NODELIST (else
   SLURM_JOB_NODELIST), MASTER_PORT = 20000 + SLURM_JOB_ID % 10000 (neon_scale.slurm.job_port);
   an exported MASTER_ADDR or MASTER_PORT wins.
   Step or batch script: Slurm sets SLURM_STEP_NUM_TASKS (and SLURM_STEP_NODELIST) only in the
   tasks srun launches (srun(1) OUTPUT ENVIRONMENT VARIABLES; src/common/env.c env_array_for_step),
   while a job's batch script gets SLURM_PROCID=0 and SLURM_NTASKS = the allocation's task count
   (sbatch(1); env_array_for_batch_job) although it is one process. So SLURM_PROCID with
   SLURM_NTASKS > 1 but no SLURM_STEP_NUM_TASKS is either the batch script or a task of a Slurm
   (or a hand-made environment) without step variables: a task with SLURM_PROCID > 0 cannot be the
   batch script and joins; SLURM_PROCID=0 joins too, never runs as a world of one, and its
   waiting line and rendezvous timeout say to start the ranks with srun if it is the batch script.
   SLURM_STEP_ID is not the test: slurmstepd may set it for the batch step too. `srun -n 1`
   (SLURM_STEP_NUM_TASKS=1) and salloc's shell (no SLURM_PROCID) are worlds of one.
3. otherwise a world of one on this host, unless the process was started as one of several by
   mpirun or a PMI launcher (OMPI_COMM_WORLD_SIZE or PMI_SIZE > 1, and not an srun step of that
   size): an error, since the copies would each run alone and write the same run directory.
DeepSpeed's own `init_distributed` sets up the process group so that its engines and our
collectives share it. NEON_DIST_TIMEOUT (seconds, default 1800 as in torch) bounds how long ranks
wait for each other: for all of them to join (then a one-line error naming MASTER_ADDR:MASTER_PORT)
and in every collective after that.
"""
from __future__ import annotations

import datetime
import math
import os
import re
import socket
import sys
import warnings
from collections.abc import Mapping, MutableMapping

import torch
import torch.distributed as tdist

from . import slurm
from .errors import NeonError

TIMEOUT_ENV = "NEON_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0  # torch's default process-group timeout
_MAX_TIMEOUT_S = 365 * 24 * 3600.0
_LAUNCHERS = ("start the ranks with srun (one task per GPU), torchrun or deepspeed, which set the ranks, or export "
              "RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT yourself; for a world of one unset RANK and WORLD_SIZE")
_SCHEDULER_HINT = ("start one process per task with srun (launchers/slurm/neon.sbatch does; `srun -n 1` for a world "
                   "of one), or use torchrun or deepspeed, or export RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
_MPI_SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")  # Open MPI's mpirun; MPICH/Intel MPI (hydra) and PMI launchers


def _env_int(name: str, default: int) -> int:
    """An integer environment variable, `default` when unset or not an integer (checked in init())."""
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else _env_int("RANK", 0)


def world() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else _env_int("WORLD_SIZE", 1)


def is_main() -> bool:
    return rank() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed JIT-builds a shared-memory comm op (50-100 s) on every CPU init; gloo needs none."""
    import deepspeed.comm.torch  # noqa: F401  (the package attribute shadows the submodule)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


_LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _parse_int(env: Mapping[str, str], name: str, problems: list[str]) -> int | None:
    if not re.fullmatch(r"[+-]?[0-9]+", env[name]):
        problems.append(f"{name}={env[name]!r} is not an integer")
        return None
    return int(env[name])


def check_launcher_env(env: MutableMapping[str, str], cuda_devices: int = 0) -> None:
    """Check (and complete) the launcher's variables in `env` before DeepSpeed reads them.

    Neither RANK nor WORLD_SIZE set: a world of one on this host (MASTER_PORT a free one unless
    set). WORLD_SIZE > 1 needs RANK, MASTER_ADDR and MASTER_PORT; LOCAL_RANK defaults to
    SLURM_LOCALID, else RANK modulo LOCAL_WORLD_SIZE or the GPUs here, else RANK. Raises NeonError
    naming every missing or bad variable."""
    for name in _LAUNCHER_VARS:
        if name in env:
            env[name] = env[name].strip()
            if not env[name]:
                del env[name]  # `export RANK=` is as good as unset
    if "RANK" not in env and "WORLD_SIZE" not in env:
        scheduler_problems: list[str] = []
        _from_scheduler(env, scheduler_problems, cuda_devices)
        if scheduler_problems:
            raise NeonError(f"launcher environment: {'; '.join(scheduler_problems)}; {_SCHEDULER_HINT}")
    if "RANK" not in env and "WORLD_SIZE" not in env:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    problems: list[str] = []
    world_size = None
    if "WORLD_SIZE" not in env:
        problems.append(f"RANK={env['RANK']} is set but WORLD_SIZE is not")
    else:
        world_size = _parse_int(env, "WORLD_SIZE", problems)
        if world_size is not None and world_size < 1:
            problems.append(f"WORLD_SIZE={world_size} must be at least 1")
            world_size = None
    if world_size == 1:  # a world of one needs no launcher: fill in what is missing
        env.setdefault("RANK", "0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in env:
            env["MASTER_PORT"] = str(_free_port())
    elif world_size is not None:
        missing = [n for n in ("RANK", "MASTER_ADDR", "MASTER_PORT") if n not in env]
        if missing:
            problems.append(f"WORLD_SIZE={world_size} needs {', '.join(missing)} (not set)")
    rank_ = _parse_int(env, "RANK", problems) if "RANK" in env else None
    if rank_ is not None and rank_ < 0:
        problems.append(f"RANK={rank_} is negative")
    elif rank_ is not None and world_size is not None and rank_ >= world_size:
        problems.append(f"RANK={rank_} is not below WORLD_SIZE={world_size}")
    if "MASTER_PORT" in env:
        port = _parse_int(env, "MASTER_PORT", problems)
        if port is not None and not 1 <= port <= 65535:
            problems.append(f"MASTER_PORT={port} is not a port (1-65535)")
    if "LOCAL_RANK" in env:
        local = _parse_int(env, "LOCAL_RANK", problems)
        if local is not None and local < 0:
            problems.append(f"LOCAL_RANK={local} is negative")
        elif local is not None and cuda_devices and local >= cuda_devices:
            problems.append(f"LOCAL_RANK={local} but this host has {cuda_devices} GPU(s)")
    elif rank_ is not None and rank_ >= 0:
        env["LOCAL_RANK"] = str(_default_local_rank(env, rank_, cuda_devices))
    if problems:
        raise NeonError(f"launcher environment: {'; '.join(problems)}; {_LAUNCHERS}")
    if world_size > 1:
        try:
            socket.getaddrinfo(env["MASTER_ADDR"], int(env["MASTER_PORT"]), type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise NeonError(f"launcher environment: MASTER_ADDR={env['MASTER_ADDR']!r} does not resolve ({e}); "
                            f"it must name rank 0's host") from None


def _slurm_int(env: Mapping[str, str], name: str, problems: list[str]) -> int | None:
    raw = env.get(name, "").strip()
    if not raw.isdigit():
        problems.append(f"{name}={env.get(name, '')!r} is not a non-negative integer")
        return None
    return int(raw)


_rendezvous_hint = ""  # said while waiting for peers and when they never come


def _from_slurm(env: MutableMapping[str, str], problems: list[str], cuda_devices: int) -> int | None:
    """An srun task of several: fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT and
    return the step's task count. None when Slurm did not start this process as one task of
    several; what is wrong or missing goes to `problems` (see the module docstring for the rule)."""
    if not env.get("SLURM_PROCID", "").strip():
        return None
    in_step = bool(env.get("SLURM_STEP_NUM_TASKS", "").strip())
    count_name = "SLURM_STEP_NUM_TASKS" if in_step else "SLURM_NTASKS"
    if not env.get(count_name, "").strip():
        return None
    count = _slurm_int(env, count_name, problems)
    procid = _slurm_int(env, "SLURM_PROCID", problems)
    if count is None or count <= 1:
        return None
    global _rendezvous_hint
    if not in_step and procid == 0:  # the batch script, or task 0 of a Slurm that sets no step variables
        _rendezvous_hint = (f"; SLURM_NTASKS={count} without SLURM_STEP_NUM_TASKS: if this is the job's batch "
                            f"script (one process), start the ranks with srun")
    if procid is not None and procid >= count:
        problems.append(f"SLURM_PROCID={procid} is not below {count_name}={count}")
    who = f"Slurm task {env['SLURM_PROCID'].strip()} of {count}"
    local = _slurm_int(env, "SLURM_LOCALID", problems) if env.get("SLURM_LOCALID", "").strip() else None
    addr = env.get("MASTER_ADDR", "").strip()
    if not addr:
        key = next((k for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") if env.get(k, "").strip()), None)
        if key is None:
            problems.append(f"{who} but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST "
                            f"is set (they name rank 0's host; or set MASTER_ADDR)")
        else:
            try:
                addr = slurm.expand_nodelist(env[key])[0]
            except ValueError as e:
                problems.append(f"{key}: {e}")
    port = env.get("MASTER_PORT", "").strip()
    if not port:
        if not env.get("SLURM_JOB_ID", "").strip():
            problems.append(f"{who} but neither MASTER_PORT nor SLURM_JOB_ID is set "
                            f"(the port is 20000 + SLURM_JOB_ID % 10000)")
        else:
            try:
                port = str(slurm.job_port(env["SLURM_JOB_ID"]))
            except ValueError as e:
                problems.append(str(e))
    if problems:
        return None
    env.update(RANK=str(procid), WORLD_SIZE=str(count), MASTER_ADDR=addr, MASTER_PORT=port)
    if local is not None:  # Slurm's own id wins over a LOCAL_RANK left in the job's environment
        env["LOCAL_RANK"] = "0" if cuda_devices == 1 else str(local)  # one visible GPU: bound to this task
    elif cuda_devices == 1:
        env["LOCAL_RANK"] = "0"
    return count


def _from_scheduler(env: MutableMapping[str, str], problems: list[str], cuda_devices: int) -> None:
    """No launcher set RANK/WORLD_SIZE: take them from Slurm, and refuse to be a world of one when
    mpirun or a PMI launcher started this process as one of several."""
    step_tasks = _from_slurm(env, problems, cuda_devices)
    for name in _MPI_SIZES:
        raw = env.get(name, "").strip()
        if not raw:
            continue
        size = int(raw) if raw.isdigit() else None
        if size is None:
            problems.append(f"{name}={env[name]!r} is not an integer (started by mpirun/PMI?)")
        elif size > 1 and size != step_tasks:  # srun --mpi=pmi2 sets PMI_SIZE to its own task count
            inside = f" inside an srun step of {step_tasks} task(s)" if step_tasks else ""
            problems.append(f"started by mpirun/PMI as one of {size} processes ({name}={size}){inside} "
                            f"without RANK/WORLD_SIZE")


def _default_local_rank(env: Mapping[str, str], rank_: int, cuda_devices: int) -> int:
    local = env.get("SLURM_LOCALID", "").strip()
    if local.isdigit():
        return int(local)
    per_node = env.get("LOCAL_WORLD_SIZE", "").strip()
    if per_node.isdigit() and int(per_node) > 0:
        return rank_ % int(per_node)
    return rank_ % cuda_devices if cuda_devices else rank_


def timeout_seconds(env: Mapping[str, str]) -> float:
    """NEON_DIST_TIMEOUT in seconds (default 1800): how long ranks wait for each other."""
    raw = env.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 < value <= _MAX_TIMEOUT_S):
        raise NeonError(f"{TIMEOUT_ENV}={env.get(TIMEOUT_ENV)!r}: must be a positive number of seconds "
                        f"(at most {_MAX_TIMEOUT_S:.0f}; default {DEFAULT_TIMEOUT_S:.0f})")
    return value


# What torch 2.13 raises when a rendezvous times out (all RuntimeError subclasses, via DistError):
#   a rank != 0 with no server to reach:  DistNetworkError "The client socket has timed out after ..."
#   rank 0 with too few peers connecting: DistStoreError "Timed out after N seconds waiting for clients ..."
#   peers connected but one missing:      DistStoreError "wait timeout after N ms, keys: ..."
_TIMEOUT_MESSAGE = re.compile(r"timed out|timeout", re.IGNORECASE)


def init() -> None:
    """Initialise the process group once (a world of one when no launcher set one up).

    Raises NeonError when the launcher's environment is incomplete or inconsistent, and when
    the ranks do not all join within NEON_DIST_TIMEOUT seconds."""
    if tdist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    check_launcher_env(os.environ, torch.cuda.device_count() if cuda else 0)
    seconds = timeout_seconds(os.environ)
    # DeepSpeed still calls the collectives torch 2.13 renamed; the warning is not ours to fix.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
                            category=FutureWarning)
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_deepspeed_shm_build()
    import deepspeed  # seconds to import: only when a process group is formed

    rank_, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    if world_size > 1:  # every rank says so: a silent wait is what a missing peer looks like
        print(f"rank {rank_}: waiting for the process group of {world_size} ranks at {where} "
              f"(timeout {seconds:g} s, {TIMEOUT_ENV}){_rendezvous_hint}", file=sys.stderr, flush=True)
    try:
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False,
                                   timeout=datetime.timedelta(seconds=seconds))
    except (tdist.DistStoreError, tdist.DistNetworkError) as e:
        if _TIMEOUT_MESSAGE.search(str(e)):
            raise NeonError(f"rank {rank_}: the process group of {world_size} ranks did not form within "
                            f"{seconds:g} s at {where} (are all ranks started? {TIMEOUT_ENV} sets the wait)"
                            f"{_rendezvous_hint}") from e
        if "EADDRINUSE" in str(e) or "address already in use" in str(e):
            raise NeonError(f"rank {rank_}: cannot listen on MASTER_PORT={os.environ['MASTER_PORT']}: address "
                            f"already in use (another job or a leftover rank holds it; choose another "
                            f"MASTER_PORT)") from e
        raise
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def device() -> torch.device:
    """This rank's compute device: its GPU when CUDA is available, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()


def _comm_device() -> torch.device:
    """NCCL moves only CUDA tensors; gloo only CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        dev = _comm_device()
        if t.device == dev:
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        else:
            moved = t.to(dev)
            tdist.all_reduce(moved, op=tdist.ReduceOp.SUM)
            t.copy_(moved)
    return t


def any_flag(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank."""
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    return bool(all_reduce_sum(t).item() > 0)


def broadcast_object(obj, src: int = 0):
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        box = [obj]
        tdist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def finish() -> None:
    """End a multi-rank script: wait for every rank, then exit at once. Tearing down gloo's process
    group (or leaving it to interpreter finalization) races with the peer's teardown and now and
    then aborts a rank with SIGABRT ("terminate called without an active exception")."""
    barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def gather_rows(index: torch.Tensor, rows: torch.Tensor, dst: int = 0):
    """Rows held by each rank (with their global indices) -> all rows sorted by index on `dst`,
    None elsewhere. Ranks may hold different counts; tensors are padded to the largest."""
    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        order = torch.argsort(index)
        return index[order], rows[order]
    dev = _comm_device()
    counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world())]
    tdist.all_gather(counts, torch.tensor([index.numel()], dtype=torch.int64, device=dev))
    most = int(max(c.item() for c in counts))
    pad_index = torch.full((most,), -1, dtype=torch.int64, device=dev)
    pad_index[:index.numel()] = index
    pad_rows = torch.zeros((most, *rows.shape[1:]), dtype=rows.dtype, device=dev)
    pad_rows[:rows.shape[0]] = rows
    main = rank() == dst
    index_list = [torch.empty_like(pad_index) for _ in range(world())] if main else None
    rows_list = [torch.empty_like(pad_rows) for _ in range(world())] if main else None
    tdist.gather(pad_index, index_list, dst=dst)
    tdist.gather(pad_rows, rows_list, dst=dst)
    if not main:
        return None
    all_index = torch.cat([t[:int(c.item())] for t, c in zip(index_list, counts)]).cpu()
    all_rows = torch.cat([t[:int(c.item())] for t, c in zip(rows_list, counts)]).cpu()
    order = torch.argsort(all_index)
    return all_index[order], all_rows[order]
