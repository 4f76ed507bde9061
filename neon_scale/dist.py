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


def barrier() -> None:
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
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
