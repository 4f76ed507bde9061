"""Rank / world helpers over torch.distributed (gloo on CPU, nccl on GPU).

`neon run` started by hand is a world of one; under `deepspeed`/`torchrun` the launcher's
environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) is used. DeepSpeed's own `init_distributed`
sets up the process group so that its engines and our collectives share it.
"""
from __future__ import annotations

import os
import socket
import warnings

import torch
import torch.distributed as tdist


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else int(os.environ.get("RANK", 0))


def world() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed JIT-builds a shared-memory comm op (50-100 s) on every CPU init; gloo needs none."""
    import sys

    import deepspeed.comm.torch  # noqa: F401  (the package attribute shadows the submodule)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def init() -> None:
    """Initialise the process group once (a world of one when no launcher set one up)."""
    if tdist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # DeepSpeed still calls the collectives torch 2.13 renamed; the warning is not ours to fix.
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
                            category=FutureWarning)
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        _skip_deepspeed_shm_build()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


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
    import sys

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
