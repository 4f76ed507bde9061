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

from .launch import BLOCK, TL_DTYPES, blocks, check_dtypes, contiguous, launch
from .reference import extrapolate_reference  # noqa: F401  (the kernel's torch twin, re-exported)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _extrapolate_many_kernel(base_tab, synth_tab, out_tab, blocks, w, BASE_T: tl.constexpr,
                             SYNTH_T: tl.constexpr, OUT_T: tl.constexpr, BLOCK: tl.constexpr):
    # One program = one work block: row `pid` of `blocks` is (tensor index, first element, numel).
    row = blocks + tl.program_id(0).to(tl.int64) * 3
    t = tl.load(row)
    offs = tl.load(row + 1) + tl.arange(0, BLOCK)
    mask = offs < tl.load(row + 2)
    base_ptr = tl.load(base_tab + t).to(tl.pointer_type(BASE_T))
    synth_ptr = tl.load(synth_tab + t).to(tl.pointer_type(SYNTH_T))
    out_ptr = tl.load(out_tab + t).to(tl.pointer_type(OUT_T))
    # Loads go through fp32 (the interpreter mishandles bf16 arithmetic).
    b = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(synth_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = b + w * (b - s)
    finite = (b == b) & (tl.abs(b) < float("inf"))
    out = tl.where(finite, out, b)
    tl.store(out_ptr + offs, out.to(OUT_T), mask=mask)


def _launch_group(bases, synths, outs, w: float) -> None:
    """One launch over contiguous same-device tensors sharing a (base, synth, out) dtype triple."""
    dev = bases[0].device
    numels = torch.tensor([b.numel() for b in bases], dtype=torch.int64)
    nblocks = blocks(numels)
    total = int(nblocks.sum())
    if total == 0:
        return
    which = torch.repeat_interleave(torch.arange(len(bases)), nblocks)
    first_block = torch.cumsum(nblocks, 0) - nblocks
    start = (torch.arange(total) - first_block[which]) * BLOCK
    block_rows = torch.stack([which, start, numels[which]], dim=1).contiguous().to(dev)

    def table(ts):
        return torch.tensor([x.data_ptr() for x in ts], dtype=torch.int64).to(dev)

    launch(_extrapolate_many_kernel, total, table(bases), table(synths), table(outs), block_rows, float(w),
           BASE_T=TL_DTYPES[bases[0].dtype], SYNTH_T=TL_DTYPES[synths[0].dtype], OUT_T=TL_DTYPES[outs[0].dtype])


def extrapolate_many(bases: list[torch.Tensor], synths: list[torch.Tensor], w: float,
                     outs: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """out_i = base_i + w (base_i - synth_i) for every i, one kernel launch per dtype triple."""
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
        _launch_group(b_c, s_c, o_c, w)
    for o, buf in write_back:
        o.copy_(buf)
    return outs


def extrapolate(base: torch.Tensor, synth: torch.Tensor, w: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor through `extrapolate_many` (same contract)."""
    if base.shape != synth.shape:
        raise ValueError(f"shape mismatch: {tuple(base.shape)} vs {tuple(synth.shape)}")
    return extrapolate_many([base], [synth], w, None if out is None else [out])[0]
