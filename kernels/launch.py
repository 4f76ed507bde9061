"""The launch set-up every kernel wrapper shares (extrapolate.py, cfg_step.py):

- `use_kernel`: the kernel or its torch reference (None: the kernel iff the tensor is on CUDA; True:
  the kernel, which takes CPU tensors only under TRITON_INTERPRET=1; False: the reference);
- `check_dtypes`: the dtypes a kernel loads and stores, a ValueError naming the tensor otherwise;
- `contiguous`: the kernels index flat memory, so inputs are made contiguous (a copy when not);
- `blocks` / `row_grid` / `launch`: one program per BLOCK elements, no launch for an empty grid.
"""
from __future__ import annotations

import os

import torch
import triton.language as tl

BLOCK = 1024  # elements per program, every kernel
TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
             torch.float64: tl.float64}


def use_kernel(x: torch.Tensor, use_triton: bool | None) -> bool:
    if use_triton is None:
        return x.is_cuda
    if use_triton and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("use_triton=True needs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)")
    return bool(use_triton)


def check_dtypes(where: str, allowed, names: str, **tensors: torch.Tensor | None) -> None:
    """`where` prefixes the message ("ddpm_step: ", "index 3: "); `names` lists the allowed dtypes."""
    for what, t in tensors.items():
        if t is not None and t.dtype not in allowed:
            raise ValueError(f"{where}{what} dtype {t.dtype} not supported ({names})")


def contiguous(*tensors: torch.Tensor | None) -> tuple:
    return tuple(None if t is None else t.contiguous() for t in tensors)


def blocks(numel):
    """Programs for `numel` elements (an int, or an int64 tensor of counts)."""
    return (numel + BLOCK - 1) // BLOCK


def row_grid(rows: int, row_numel: int) -> tuple[int, int]:
    """(programs per row, programs in all) for rows of `row_numel` elements."""
    nblk = blocks(row_numel)
    return nblk, rows * nblk


def launch(kernel, total: int, *args, **meta) -> None:
    """`kernel` over `total` programs of BLOCK elements; nothing for an empty grid."""
    if total:
        kernel[(total,)](*args, BLOCK=BLOCK, **meta)
