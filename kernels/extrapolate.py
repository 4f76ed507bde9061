"""Fused Neon merge kernel: out = base + w (base - synth), fp32 arithmetic, base kept where it is
not finite (NaN/±inf), cast to the output dtype on store. Runs on CUDA, or on CPU tensors under
TRITON_INTERPRET=1 (tests).

`extrapolate_many(bases, synths, w, outs=None)` is the multi-tensor apply: one launch per
(base, synth, out) dtype combination covers every tensor of that combination. Contract:
- dtypes: fp32 / fp16 / bf16, mixed freely between base, synth and out (ValueError otherwise);
  the arithmetic is always fp32 (the interpreter mishandles bf16 arithmetic, so loads go
  straight to fp32).
- shapes must match pairwise (ValueError naming the index and both shapes); all tensors on one
  device; any sizes, 0 and 1 included.
- outs=None gives new contiguous tensors like the bases; outs may be the bases themselves
  (in place, same storage returned). An out must be each base itself or not overlap any input.
- non-contiguous inputs are made contiguous first (a copy); a non-contiguous out is computed into
  a contiguous buffer and written back with `copy_`, so the returned tensors are the given outs.
`extrapolate(base, synth, w, out=None)` is the one-tensor call of the same kernel.
`extrapolate_reference` (kernels/reference.py, re-exported here) is the pure-torch twin the tests
compare against and the production path without CUDA.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import TL_DTYPES, check_dtypes, contiguous
from .reference import extrapolate_reference  # noqa: F401  (the kernel's torch twin, re-exported)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# elements per program: on an H200 (bench/RESULTS.md, 8 x 16M-element tensors) 512 x 4 warps was the
# best of blocks 256..4096 x 1..8 warps for fp32 (4.0 TB/s, copy 4.2) and bf16 in place (3.2 TB/s)
MERGE_BLOCK = 512


@triton.jit
def _extrapolate_many_kernel(table, n_tensors, w, BASE_T: tl.constexpr, SYNTH_T: tl.constexpr, OUT_T: tl.constexpr,
                             SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr):
    # `table` holds 5 int64 columns of n_tensors rows each: first block, numel, base, synth and out
    # addresses. One program = one block of one tensor: its tensor is the last row whose first
    # block is <= the program's (binary search; the table is O(tensors), not O(blocks), so a call
    # builds and copies a few KB on the host whatever the model size).
    pid = tl.program_id(0).to(tl.int64)
    lo = pid * 0
    hi = lo + n_tensors
    for _ in tl.static_range(SEARCH_STEPS):  # invariant: first[lo] <= pid < first[hi] (first[n] = inf)
        mid = (lo + hi) // 2
        go_right = tl.load(table + mid) <= pid
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    offs = (pid - tl.load(table + lo)) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.load(table + n_tensors + lo)
    base_ptr = tl.load(table + 2 * n_tensors + lo).to(tl.pointer_type(BASE_T))
    synth_ptr = tl.load(table + 3 * n_tensors + lo).to(tl.pointer_type(SYNTH_T))
    out_ptr = tl.load(table + 4 * n_tensors + lo).to(tl.pointer_type(OUT_T))
    # Loads go through fp32 (the interpreter mishandles bf16 arithmetic).
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(synth_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = b + w * (b - s)
    finite = (b == b) & (tl.abs(b) < float("inf"))
    out = tl.where(finite, out, b)
    tl.store(out_ptr + offs, out.to(OUT_T), mask=mask)


def _launch_group(bases, synths, outs, w: float, block: int, num_warps: int) -> None:
    """One launch over contiguous same-device tensors sharing a (base, synth, out) dtype triple."""
    rows = [(b, s, o) for b, s, o in zip(bases, synths, outs) if b.numel()]  # no blocks: not in the search
    if not rows:
        return
    counts = [-(-b.numel() // block) for b, _s, _o in rows]
    first = [0]
    for c in counts[:-1]:
        first.append(first[-1] + c)
    columns = [first, [b.numel() for b, _s, _o in rows]] + [[t.data_ptr() for t in col] for col in zip(*rows)]
    table = torch.tensor(columns, dtype=torch.int64).reshape(-1).to(rows[0][0].device)
    n = len(rows)
    _extrapolate_many_kernel[(sum(counts),)](
        table, n, float(w), BASE_T=TL_DTYPES[rows[0][0].dtype], SYNTH_T=TL_DTYPES[rows[0][1].dtype],
        OUT_T=TL_DTYPES[rows[0][2].dtype], SEARCH_STEPS=max(1, (n - 1).bit_length()), BLOCK=block,
        num_warps=num_warps)


def extrapolate_many(bases: list[torch.Tensor], synths: list[torch.Tensor], w: float,
                     outs: list[torch.Tensor] | None = None, block: int = MERGE_BLOCK, num_warps: int = 4
                     ) -> list[torch.Tensor]:
    """out_i = base_i + w (base_i - synth_i) for every i, one kernel launch per dtype triple.
    `block` (elements per program, a power of 2) and `num_warps`: the launch configuration, tuning
    knobs that bench/gpu_check.py measures."""
    if block < 16 or block & (block - 1):
        raise ValueError(f"block {block}: a power of 2, at least 16")
    bases, synths = list(bases), list(synths)
    if len(synths) != len(bases) or (outs is not None and len(outs) != len(bases)):
        n_outs = "" if outs is None else f", {len(outs)} outs"
        raise ValueError(f"length mismatch: {len(bases)} bases, {len(synths)} synths{n_outs}")
    if outs is None:
        outs = [torch.empty_like(b, memory_format=torch.contiguous_format) for b in bases]
    outs = list(outs)
    for i, (b, s, o) in enumerate(zip(bases, synths, outs)):
        if b.shape != s.shape or b.shape != o.shape:
            raise ValueError(f"shape mismatch at index {i}: base {tuple(b.shape)} vs "
                             f"synth {tuple(s.shape)} vs out {tuple(o.shape)}")
        for name, x in (("base", b), ("synth", s), ("out", o)):
            check_dtypes(f"index {i}: ", DTYPES, "fp32/fp16/bf16", **{name: x})
            if x.device != bases[0].device:
                raise ValueError(f"index {i}: {name} on {x.device}, expected {bases[0].device}")

    groups: dict[tuple, list[int]] = {}
    for i, (b, s, o) in enumerate(zip(bases, synths, outs)):
        groups.setdefault((b.dtype, s.dtype, o.dtype), []).append(i)
    write_back = []
    for idx in groups.values():
        b_c = contiguous(*(bases[i] for i in idx))
        s_c = contiguous(*(synths[i] for i in idx))
        o_c = [outs[i] if outs[i].is_contiguous()
               else torch.empty_like(outs[i], memory_format=torch.contiguous_format) for i in idx]
        write_back += [(outs[i], o) for i, o in zip(idx, o_c) if o is not outs[i]]
        _launch_group(b_c, s_c, o_c, w, block, num_warps)
    for o, buf in write_back:
        o.copy_(buf)
    return outs


def extrapolate(base: torch.Tensor, synth: torch.Tensor, w: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor through `extrapolate_many` (same contract)."""
    if base.shape != synth.shape:
        raise ValueError(f"shape mismatch: {tuple(base.shape)} vs {tuple(synth.shape)}")
    return extrapolate_many([base], [synth], w, None if out is None else [out])[0]
