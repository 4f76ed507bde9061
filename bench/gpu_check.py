"""Every CUDA path of neon_scale checked and timed in one run: one JSON, one table.

Why: the CPU development machines cannot run CUDA, so the GPU paths (Triton kernels, the csrc CUDA
op, low-precision sampling, ZeRO-3 on a GPU, NCCL) are otherwise only ever run by users. This
script checks each against its CPU or torch reference with a stated tolerance, and times each
speed-critical one against its anchor measured in the same run, in a few minutes on one GPU:

accuracy (status pass / fail against the stated tolerance)
  merge.*          Triton merge kernel (kernels.extrapolate / extrapolate_many): fp32/bf16/fp16,
                   in place and out of place, multi-tensor with mixed dtypes and odd sizes, against
                   the float64 formula rounded to the output dtype (non-finite bases kept)
  sampling.*       the fused guidance + step kernels (kernels.cfg_step ddpm/ddim/em_step,
                   use_triton=True) against their torch reference (use_triton=False), same device
  preprocess.op    the csrc FID pre-processing op: CUDA vs CPU, bit-identical
  fid.features     neon's Inception features vs torch-fidelity's on the same images and device
  dit.* / xar.*    DiT-XL/2 and xAR-L sampling (our samplers) in bf16/fp16 against fp32
  deepspeed.zero3  one ZeRO-3 step (neon_scale.train.deepspeed_engine) against torch's AdamW
  nccl.collectives all_reduce / all_gather / reduce_scatter / broadcast on 2+ GPUs
speed (ratio to the anchor; status fail when a stated goal is missed)
  merge.speed_*    merge GB/s vs a device-to-device copy of the same bytes (goal >= 0.9)
  sampling.*_speed fused step vs the unfused torch step
  fid.speed        images/s of neon's extractor vs torch-fidelity's (goal >= 3x)
  dit.speed / xar.speed   images/s in bf16 with our samplers vs fp32

Modes. cuda: everything on the GPU at real sizes (DiT-XL/2, xAR-L with random weights).
reference: the same checks through the same code with device=cpu at tiny sizes (Triton under its
interpreter, DeepSpeed on gloo, the collectives on 2 gloo processes) in under 2 minutes; speed
rows then run their timing code but are "skip" (a CPU says nothing about GPU speed). auto: cuda
when torch sees a GPU. In reference mode the script hides the GPUs and sets TRITON_INTERPRET=1
itself, before triton is imported; with --mode cuda a TRITON_INTERPRET=1 environment is an error.

Every check is isolated: an exception is recorded as status "error" with its one-line message and
the run goes on; the JSON is rewritten atomically after every check, so a killed run leaves what
it had. Exit status: 0 all pass/skip, 1 some fail/error, 2 bad arguments.

  python bench/gpu_check.py [--mode auto|reference|cuda] [--out gpu_check.json] [--only NAME[,NAME]]
                            [--quick] [--weights INCEPTION.pth] [--list]
  bash tools/gpu_check.sh        # on a GPU machine without network (wheels from tools/gpu_wheels.sh)
"""
from __future__ import annotations

import os
import sys


def _requested_mode(argv: list[str]) -> str:
    """--mode's value as given ("auto" when absent; argparse judges the value later)."""
    for i, arg in enumerate(argv):
        if arg == "--mode" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--mode="):
            return arg.split("=", 1)[1]
    return "auto"


# Reference mode is fixed before torch and triton are imported: hidden GPUs send every component
# (dist, DeepSpeed, the samplers) down its CPU path, and Triton picks its interpreter at import.
if __name__ == "__main__" and _requested_mode(sys.argv[1:]) == "reference":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
import torch  # noqa: E402

_INTERPRET_ENV = os.environ.get("TRITON_INTERPRET")  # as the caller set it (checked in main)
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from typing import Callable  # noqa: E402

import triton  # noqa: E402

import neon_scale  # noqa: E402
from neon_scale.kernels import cfg_step  # noqa: E402
from neon_scale.kernels.extrapolate import MERGE_BLOCK, extrapolate, extrapolate_many  # noqa: E402
from neon_scale.kernels.launch import BLOCK  # noqa: E402
from neon_scale.metrics import preprocess as fid_preprocess  # noqa: E402
from neon_scale.models.dit import DiT, dit_config  # noqa: E402
from neon_scale.models.xar import XAR, xar_config  # noqa: E402
from neon_scale.models.xar_sampler import sample_xar  # noqa: E402
from neon_scale.sampling import diffusion  # noqa: E402

STATUSES = ("pass", "fail", "error", "skip")
NO_GPU_TIMING = "no GPU: the timing path ran at tiny size on the CPU; its goal is not judged"
FP32_EPS = torch.finfo(torch.float32).eps


class Skip(Exception):
    """A check that does not apply here; the message is the reason."""


# ------------------------------------------------------------------------------ sizes and context

@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes of one mode. cuda: real model dimensions, timings on hundreds of MB;
    reference: tiny, so the interpreter and the CPU finish in seconds."""
    merge_numel: int            # elements per tensor of the merge accuracy checks
    merge_speed: tuple          # (tensors, elements each) of the merge timing
    dit_step: tuple             # (B, latent side) of the sampling-step accuracy checks
    dit_step_speed: tuple       # (B, latent side) of the step timing
    em_step: int                # B of the EM step checks (x [B, 64, 16])
    em_step_speed: int
    fid: tuple                  # (images, side, batch) for features and timing
    calib_batches: int          # batch-norm calibration of the random Inception weights
    dit: dict                   # DiT constructor arguments
    dit_run: tuple              # (batch, DDPM steps) of the accuracy comparison
    dit_speed: tuple            # (batch, DDPM steps) of the images/s timing
    xar: dict                   # XAR constructor arguments
    xar_run: tuple              # (batch, EM steps per cell)
    xar_speed: tuple
    zero3: dict                 # DiT (pixel space) arguments of the ZeRO-3 step
    warmup: int
    reps: int


def sizes_for(cuda: bool, quick: bool) -> Sizes:
    if not cuda:
        return Sizes(merge_numel=3000, merge_speed=(2, 4096), dit_step=(2, 6), dit_step_speed=(2, 8), em_step=2,
                     em_step_speed=2, fid=(4, 64, 4), calib_batches=1,
                     dit=dict(dit_config("S/2"), depth=2, hidden_size=64, num_heads=2, input_size=8, num_classes=10),
                     dit_run=(2, 4), dit_speed=(2, 2),
                     xar=dict(xar_config("B"), img_size=64, encoder_embed_dim=32, decoder_embed_dim=32,
                              encoder_depth=1, decoder_depth=1, encoder_num_heads=2, decoder_num_heads=2,
                              class_num=10),
                     xar_run=(2, 3), xar_speed=(2, 2),
                     zero3=dict(image_size=8, depth=2, hidden_size=32, num_heads=2, batch=4),
                     warmup=1, reps=2)
    q = 2 if quick else 1
    return Sizes(merge_numel=(1 << 22) // q, merge_speed=(8, (1 << 24) // q), dit_step=(16, 32),
                 dit_step_speed=(256 // q, 32), em_step=16, em_step_speed=256 // q, fid=(512 // q, 256, 128),
                 calib_batches=2, dit=dict(dit_config("XL/2"), input_size=32, num_classes=1000),
                 dit_run=(8, 10 // q), dit_speed=(32 // q, 10 // q),
                 xar=dict(xar_config("L"), img_size=256, class_num=1000),
                 xar_run=(4, 4), xar_speed=(16 // q, 8 // q),
                 zero3=dict(image_size=32, depth=4, hidden_size=384, num_heads=6, batch=8),
                 warmup=3 // q, reps=10 // q)


class Context:
    """What the checks share: the device, the sizes, a scratch folder, and results computed once
    (the fp32 sampling references, the Inception weights) that several checks compare against."""

    def __init__(self, device: torch.device, quick: bool, weights: str | None, scratch: str):
        self.device = device
        self.cuda = device.type == "cuda"
        self.sizes = sizes_for(self.cuda, quick)
        self.weights = weights
        self.scratch = scratch
        self._memo: dict[str, tuple[bool, object]] = {}

    def memo(self, key: str, make: Callable[[], object]):
        """make() once; a failure is kept and raised again to every check that needs it."""
        if key not in self._memo:
            try:
                self._memo[key] = (True, make())
            except Exception as e:  # noqa: BLE001  (re-raised below, to each caller)
                self._memo[key] = (False, e)
        ok, value = self._memo[key]
        if not ok:
            raise value
        return value

    def forget(self, prefix: str) -> None:
        """Drop cached results (models on the GPU) no later check needs."""
        for key in [k for k in self._memo if k.startswith(prefix)]:
            del self._memo[key]

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(self.device).manual_seed(seed)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


# ----------------------------------------------------------------------------------- helpers

def time_ms(ctx: Context, fn: Callable[[], object], warmup: int | None = None, reps: int | None = None) -> float:
    """Median milliseconds of fn() after `warmup` calls (Triton compiles, cuDNN picks algorithms).
    On the GPU: CUDA events around each call, calls back to back as triton's do_bench runs them
    (host work overlaps the previous call's kernels; a call whose host work is slower than its
    kernels shows it); on the CPU: the wall clock."""
    warmup = ctx.sizes.warmup if warmup is None else warmup
    reps = ctx.sizes.reps if reps is None else reps
    for _ in range(warmup):
        fn()
    ctx.sync()
    if ctx.cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(ctx.device)
        return statistics.median(start.elapsed_time(end) for start, end in events)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def worst_ratio(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> float:
    """max |got - want| / (atol + rtol |want|) over all elements (<= 1: within tolerance); NaN
    where exactly one side is NaN counts as infinitely wrong."""
    got, want = got.double(), want.double()
    if got.shape != want.shape:
        raise ValueError(f"shape {tuple(got.shape)} vs reference {tuple(want.shape)}")
    if got.numel() == 0:
        return 0.0
    both_nan = got.isnan() & want.isnan()
    err = (got - want).abs().where(~both_nan, torch.zeros((), dtype=torch.float64, device=got.device))
    ratio = err / (atol + rtol * want.abs())
    return float(ratio.nan_to_num(nan=math.inf).max())


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, float64."""
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-300))


def accuracy(worst: float, *, measured: str, anchor: str, tolerance: str, **details) -> dict:
    """A check's result from its worst error in units of its tolerance (<= 1 passes)."""
    return dict(kind="accuracy", status="pass" if worst <= 1.0 else "fail", measured=measured, value=worst,
                anchor=anchor, tolerance=tolerance, details=details)


def speed(ctx: Context, value: float, anchor_value: float, *, unit: str, anchor: str, goal: float | None,
          **details) -> dict:
    """A timing result: the ratio value / anchor_value (higher is better for both); judged
    against `goal` on a GPU only."""
    ratio = value / anchor_value if anchor_value else math.nan
    if not ctx.cuda:
        status, reason = "skip", NO_GPU_TIMING
    else:
        status = "pass" if goal is None or ratio >= goal else "fail"
        reason = ""
    return dict(kind="speed", status=status, reason=reason, measured=f"{value:,.4g} {unit}", value=value,
                anchor=f"{anchor} {anchor_value:,.4g} {unit}", anchor_value=anchor_value, ratio=ratio,
                goal="-" if goal is None else f">= {goal:g}x", details=details)


def randomize_zero_init(model: torch.nn.Module, seed: int, std: float = 0.02) -> torch.nn.Module:
    """Give the parameters that the official initialisations zero (DiT's adaLN and output layers,
    every bias) small random values, so that a random network's output depends on all of them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


# --------------------------------------------------------------------------------- merge kernel

MERGE_W = 1.5


def merge_bound(base: torch.Tensor, synth: torch.Tensor, w: float, out_dtype: torch.dtype):
    """(the float64 result of base + w (base - synth), base kept where not finite; the error the
    kernel may make: its three fp32 roundings, then one ulp of the output dtype (the interpreter
    truncates to bf16), then the output dtype's subnormal spacing)."""
    b, s = base.double(), synth.double()
    diff = w * (b - s)
    ref = torch.where(torch.isfinite(b), b + diff, b)
    fin = torch.finfo(out_dtype)
    bound = fin.eps * ref.abs() + 2 * FP32_EPS * (diff.abs() + b.abs() + ref.abs()) + fin.tiny * fin.eps
    return ref, bound


def merge_error(out: torch.Tensor, base: torch.Tensor, synth: torch.Tensor, w: float) -> float:
    """Worst |out - float64 result| / bound over finite bases; a non-finite base not kept is inf."""
    ref, bound = merge_bound(base, synth, w, out.dtype)
    got = out.double()
    finite = torch.isfinite(base)
    kept = (got[~finite] == ref[~finite]) | (got[~finite].isnan() & ref[~finite].isnan())
    if not bool(kept.all()):
        return math.inf
    if not bool(finite.any()):
        return 0.0
    return float(((got - ref).abs()[finite] / bound[finite]).max())


def merge_inputs(ctx: Context, numel: int, dtype: torch.dtype, seed: int, nonfinite: bool = True):
    """(base, synth): synth = base + small noise, as a fine-tune's weights are; the first three
    base elements NaN, +inf, -inf when `nonfinite`."""
    gen = ctx.generator(seed)
    base = torch.randn(numel, generator=gen, device=ctx.device)
    synth = base + 0.01 * torch.randn(numel, generator=gen, device=ctx.device)
    if nonfinite and numel >= 3:
        base[:3] = torch.tensor([math.nan, math.inf, -math.inf], device=ctx.device)
    return base.to(dtype), synth.to(dtype)


MERGE_TOL = "fp32 arithmetic (3 roundings) + 1 ulp of the out dtype, vs float64"


def check_merge_dtype(ctx: Context, dtype: torch.dtype) -> dict:
    base, synth = merge_inputs(ctx, ctx.sizes.merge_numel, dtype, seed=1)
    out = extrapolate(base, synth, MERGE_W)
    ctx.sync()
    worst = merge_error(out, base, synth, MERGE_W)
    return accuracy(worst, measured=f"err/tol {worst:.3g}", anchor="float64 formula", tolerance=MERGE_TOL,
                    numel=base.numel(), w=MERGE_W, nonfinite_bases=3)


def check_merge_inplace(ctx: Context) -> dict:
    """outs = bases: every dtype in place in one call; the same storage comes back."""
    pairs = [merge_inputs(ctx, ctx.sizes.merge_numel + k, dt, seed=10 + k)
             for k, dt in enumerate((torch.float32, torch.bfloat16, torch.float16))]
    bases = [b for b, _ in pairs]
    before = [b.clone() for b in bases]
    outs = extrapolate_many(bases, [s for _, s in pairs], MERGE_W, outs=bases)
    ctx.sync()
    if any(o.data_ptr() != b.data_ptr() for o, b in zip(outs, bases)):
        raise AssertionError("in-place merge returned new storage")
    worst = max(merge_error(o, b0, s, MERGE_W) for o, b0, (_, s) in zip(outs, before, pairs))
    return accuracy(worst, measured=f"err/tol {worst:.3g}", anchor="float64 formula", tolerance=MERGE_TOL,
                    dtypes="fp32, bf16, fp16 in one call")


def check_merge_many(ctx: Context) -> dict:
    """Multi-tensor: mixed (base, synth, out) dtype triples, sizes around the block size and 0/1,
    a non-contiguous base and out (written back in place)."""
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    triples = [(f32, f32, f32), (f32, bf16, f16), (bf16, f32, f32), (f16, f16, bf16), (bf16, bf16, bf16)]
    sizes = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, ctx.sizes.merge_numel]
    bases, synths, outs = [], [], []
    for k, (size, (bt, st, ot)) in enumerate((s, t) for s in sizes for t in triples):
        b, s = merge_inputs(ctx, size, f32, seed=100 + k, nonfinite=size > BLOCK)
        bases.append(b.to(bt))
        synths.append(s.to(st))
        outs.append(torch.empty(size, dtype=ot, device=ctx.device))
    # one non-contiguous base and out: a transposed [n, 2] view
    n = BLOCK + 3
    b, s = merge_inputs(ctx, 2 * n, f32, seed=7)
    bases.append(b.view(2, n).t())
    synths.append(s.view(2, n).t().contiguous())
    strided_out = torch.empty(2, n, device=ctx.device).t()
    outs.append(strided_out)
    got = extrapolate_many(bases, synths, MERGE_W, outs=outs)
    ctx.sync()
    if got[-1] is not strided_out:
        raise AssertionError("the non-contiguous out was not returned")
    worst = max(merge_error(o, b, s, MERGE_W) for o, b, s in zip(got, bases, synths))
    return accuracy(worst, measured=f"err/tol {worst:.3g}", anchor="float64 formula", tolerance=MERGE_TOL,
                    tensors=len(bases), dtype_triples=len(triples), sizes=sizes + ["non-contiguous"])


MERGE_LAUNCHES = [(b, w) for b in (256, 512, 1024, 2048, 4096) for w in (1, 2, 4, 8)]  # (block, num_warps)


def check_merge_speed(ctx: Context, dtype: torch.dtype, inplace: bool) -> dict:
    """GB/s of extrapolate_many (read base + synth, write out) vs a device-to-device copy of one
    buffer as large as all the bases (read + write), in the same run."""
    count, numel = ctx.sizes.merge_speed
    pairs = [merge_inputs(ctx, numel, dtype, seed=200 + k, nonfinite=False) for k in range(count)]
    bases, synths = [b for b, _ in pairs], [s for _, s in pairs]
    outs = bases if inplace else [torch.empty_like(b) for b in bases]
    moved = 3 * sum(b.numel() * b.element_size() for b in bases)
    merge_ms = time_ms(ctx, lambda: extrapolate_many(bases, synths, MERGE_W, outs=outs))
    # elements per program, beside the default: the data to choose it from (kernels/extrapolate.py)
    by_block = {(block, warps): moved / time_ms(ctx, lambda: extrapolate_many(
        bases, synths, MERGE_W, outs=outs, block=block, num_warps=warps)) / 1e6 for block, warps in MERGE_LAUNCHES}
    src = torch.empty(count * numel, dtype=dtype, device=ctx.device)
    dst = torch.empty_like(src)
    copy_ms = time_ms(ctx, lambda: dst.copy_(src))
    copied = 2 * src.numel() * src.element_size()
    merge_gbs, copy_gbs = moved / merge_ms / 1e6, copied / copy_ms / 1e6
    return speed(ctx, merge_gbs, copy_gbs, unit="GB/s", anchor="copy", goal=0.9, tensors=count,
                 elements_each=numel, dtype=str(dtype).removeprefix("torch."), inplace=inplace,
                 bytes_per_call=moved, merge_ms=merge_ms, copy_ms=copy_ms, block=MERGE_BLOCK,
                 gb_per_s_by_block_and_warps={f"{b}x{w}": round(v, 1) for (b, w), v in by_block.items()})


# ----------------------------------------------------------------------------- sampling kernels

DDPM = dict(guided_channels=3, sqrt_recip_ac=1.0526, sqrt_recipm1_ac=0.3293, mean_coef1=0.1412, mean_coef2=0.8571,
            log_var_min=-5.21, log_var_max=-4.87)
DDIM = dict(guided_channels=3, sqrt_recip_ac=1.0526, sqrt_recipm1_ac=0.3293, sqrt_ac_prev=0.9512, dir_coef=0.2841,
            sigma=0.0913)
EM = dict(t=0.52, dt=-0.0194)


def step_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) of a fused step vs the torch step: fp32 up to torch's own roundings (it divides by a
    scalar through its reciprocal, its exp differs); fp16/bf16 one ulp of the result; fp64 1e-12."""
    if dtype == torch.float64:
        return 1e-12, 1e-12
    if dtype == torch.float32:
        return 1e-5, 1e-5
    eps = torch.finfo(dtype).eps
    return eps, eps


STEP_TOL = "fp32 1e-5 abs+rel; fp16/bf16 1 ulp; fp64 1e-12"


def dit_step_inputs(ctx: Context, b: int, side: int, dtype: torch.dtype, seed: int):
    """x [B, 4, s, s], model_out [2B, 8, s, s] ([cond; uncond], variance values in [-1, 1]), noise."""
    gen = ctx.generator(seed)
    x = torch.randn(b, 4, side, side, generator=gen, device=ctx.device)
    out = torch.randn(2 * b, 8, side, side, generator=gen, device=ctx.device)
    out[:, 4:].tanh_()
    noise = torch.randn(b, 4, side, side, generator=gen, device=ctx.device)
    return x.to(dtype), out.to(dtype), noise.to(dtype)


def compare_steps(ctx: Context, cases: list[tuple[str, torch.dtype, Callable[[bool], torch.Tensor]]]):
    """Each case: (label, result dtype, call(use_triton) -> result); fused vs reference."""
    worst, per_case = 0.0, {}
    for label, dtype, call in cases:
        fused, reference = call(True), call(False)
        ctx.sync()
        if fused.dtype != reference.dtype or fused.shape != reference.shape:
            raise AssertionError(f"{label}: fused {fused.dtype} {tuple(fused.shape)} vs reference "
                                 f"{reference.dtype} {tuple(reference.shape)}")
        atol, rtol = step_tolerance(dtype)
        per_case[label] = worst_ratio(fused, reference, atol, rtol)
        worst = max(worst, per_case[label])
    return accuracy(worst, measured=f"err/tol {worst:.3g}", anchor="torch step (use_triton=False)",
                    tolerance=STEP_TOL, cases=per_case)


def check_ddpm(ctx: Context) -> dict:
    b, side = ctx.sizes.dit_step
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        x, out, noise = dit_step_inputs(ctx, b, side, dtype, seed=20)
        name = str(dtype).removeprefix("torch.")
        cases += [
            (f"{name} guided", dtype, lambda t, x=x, out=out, n=noise: cfg_step.ddpm_step(
                x, out, n, scale=4.0, use_triton=t, **DDPM)),
            (f"{name} unguided", dtype, lambda t, x=x, out=out, n=noise: cfg_step.ddpm_step(
                x, out[:b], n, scale=None, use_triton=t, **DDPM)),
            (f"{name} last step", dtype, lambda t, x=x, out=out: cfg_step.ddpm_step(
                x, out, None, scale=4.0, use_triton=t, **DDPM)),
        ]
    return compare_steps(ctx, cases)


def check_ddim(ctx: Context) -> dict:
    b, side = ctx.sizes.dit_step
    cases = []
    for dtype in (torch.float32, torch.float16):
        x, out, noise = dit_step_inputs(ctx, b, side, dtype, seed=21)
        name = str(dtype).removeprefix("torch.")
        cases += [
            (f"{name} eta>0", dtype, lambda t, x=x, out=out, n=noise: cfg_step.ddim_step(
                x, out, n, scale=4.0, use_triton=t, **DDIM)),
            (f"{name} eps only, sigma 0", dtype, lambda t, x=x, out=out: cfg_step.ddim_step(
                x, out[:, :4], None, scale=4.0, use_triton=t, **dict(DDIM, sigma=0.0))),
        ]
    return compare_steps(ctx, cases)


def em_inputs(ctx: Context, b: int, x_dtype: torch.dtype, v_dtype: torch.dtype, seed: int):
    gen = ctx.generator(seed)
    x = torch.randn(b, 64, 16, generator=gen, device=ctx.device, dtype=torch.float64).to(x_dtype)
    v = torch.randn(2 * b, 64, 16, generator=gen, device=ctx.device, dtype=torch.float64).to(v_dtype)
    noise = torch.randn(b, 64, 16, generator=gen, device=ctx.device, dtype=torch.float64).to(x_dtype)
    return x, v, noise


def check_em(ctx: Context) -> dict:
    b = ctx.sizes.em_step
    cases = []
    for x_dt, v_dt in ((torch.float64, torch.bfloat16), (torch.float64, torch.float64), (torch.float32, torch.float16)):
        x, v, noise = em_inputs(ctx, b, x_dt, v_dt, seed=22)
        name = f"x {str(x_dt).removeprefix('torch.')} v {str(v_dt).removeprefix('torch.')}"
        cases += [
            (f"{name} guided", x_dt, lambda t, x=x, v=v, n=noise: cfg_step.em_step(
                x, v, n, scale=3.0, use_triton=t, **EM)),
            (f"{name} unguided last step", x_dt, lambda t, x=x, v=v: cfg_step.em_step(
                x, v[:b], None, scale=None, use_triton=t, **EM)),
        ]
    return compare_steps(ctx, cases)


def step_speed(ctx: Context, call: Callable[[bool], torch.Tensor], **details) -> dict:
    fused_ms = time_ms(ctx, lambda: call(True))
    torch_ms = time_ms(ctx, lambda: call(False))
    return speed(ctx, 1e3 / fused_ms, 1e3 / torch_ms, unit="steps/s", anchor="unfused", goal=1.0, **details)


def check_ddpm_speed(ctx: Context) -> dict:
    b, side = ctx.sizes.dit_step_speed
    x, out, noise = dit_step_inputs(ctx, b, side, torch.float32, seed=30)
    return step_speed(ctx, lambda t: cfg_step.ddpm_step(x, out, noise, scale=4.0, use_triton=t, **DDPM),
                      x=list(x.shape), model_out=list(out.shape))


def check_ddim_speed(ctx: Context) -> dict:
    b, side = ctx.sizes.dit_step_speed
    x, out, noise = dit_step_inputs(ctx, b, side, torch.float32, seed=31)
    return step_speed(ctx, lambda t: cfg_step.ddim_step(x, out, noise, scale=4.0, use_triton=t, **DDIM),
                      x=list(x.shape), model_out=list(out.shape))


def check_em_speed(ctx: Context) -> dict:
    x, v, noise = em_inputs(ctx, ctx.sizes.em_step_speed, torch.float64, torch.bfloat16, seed=32)
    return step_speed(ctx, lambda t: cfg_step.em_step(x, v, noise, scale=3.0, use_triton=t, **EM),
                      x=f"{list(x.shape)} float64", velocity=f"{list(v.shape)} bfloat16")


# ------------------------------------------------------------------------- FID pre-processing op

def random_images(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """uint8 [n, 3, h, w] on the CPU: upsampled low-resolution noise plus pixel noise (image-like)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=gen)
    up = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    return (up * 230 + torch.rand(n, 3, h, w, generator=gen) * 25).clamp(0, 255).to(torch.uint8)


def check_preprocess(ctx: Context) -> dict:
    """CUDA op vs CPU op (reference mode: the CPU op vs its pure-torch twin), bit for bit, over
    NCHW / NHWC / a non-contiguous view and both output memory formats."""
    if not fid_preprocess.have_compiled_op():
        raise Skip("csrc op not built (neon_scale._fid_ops missing)")
    if ctx.cuda:
        import neon_scale._fid_ops as ops  # the extension (built by setup.py) says what it was built with

        if not ops.with_cuda:
            raise Skip("csrc CUDA op not built (neon_scale._fid_ops has no CUDA path)")
    n, side = (16, 256) if ctx.cuda else (3, 40)
    images = random_images(n, side, side + 13, seed=3)
    on_device = images.to(ctx.device)
    # (input from the images, layout, channels_last_out); views are taken on each device, so the
    # op reads the non-contiguous input in place there too
    cases = {
        "nchw": (lambda x: x, "nchw", False),
        "nhwc": (lambda x: x.permute(0, 2, 3, 1).contiguous(), "nhwc", False),
        "nchw view, channels_last out": (lambda x: x[:, :, 1:-2, ::2], "nchw", True),
        "nhwc view": (lambda x: x.permute(0, 2, 3, 1)[:, ::3], "nhwc", False),
    }
    differing = 0
    for view, layout, cl in cases.values():
        x = view(images)
        want = fid_preprocess.preprocess(x, layout=layout, channels_last_out=cl) if ctx.cuda else \
            fid_preprocess.preprocess_reference(x, layout=layout, channels_last_out=cl)
        got = fid_preprocess.preprocess(view(on_device), layout=layout, channels_last_out=cl)
        ctx.sync()
        if not got.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format):
            raise AssertionError(f"output memory format not as asked (channels_last_out={cl})")
        differing += int((got.cpu() != want).sum())
    anchor = "CPU op" if ctx.cuda else "pure-torch reference (no GPU)"
    return accuracy(math.inf if differing else 0.0, measured=f"{differing} elements differ", anchor=anchor,
                    tolerance="bit-identical", cases=list(cases), images=n)


# ------------------------------------------------------------------------------------------ FID

def inception_weights(ctx: Context) -> str:
    """--weights, else random weights with calibrated batch norms (speed and agreement do not
    depend on the values; made on the CPU once per run)."""
    from neon_scale.metrics.inception import random_inception_weights  # imports torch-fidelity

    if ctx.weights:
        return ctx.weights

    def make() -> str:
        path = os.path.join(ctx.scratch, "inception-random.pth")
        random_inception_weights(path, seed=0, calib_batches=ctx.sizes.calib_batches)
        return path

    return ctx.memo("inception.weights", make)


def fid_extractors(ctx: Context):
    """(neon's InceptionFeatures, torch-fidelity's FeatureExtractorInceptionV3), one weights file."""
    # imported here: without torch-fidelity only the FID checks fail
    from neon_scale.metrics.features import InceptionFeatures
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    def make():
        weights = inception_weights(ctx)
        batch = ctx.sizes.fid[2]
        ours = InceptionFeatures(weights, device=ctx.device, batch_size=batch)
        theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                             feature_extractor_weights_path=weights).to(ctx.device).eval()
        return ours, theirs

    return ctx.memo("fid.extractors", make)


@torch.no_grad()
def fidelity_features(theirs, images: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch-fidelity's (2048 pool, logits_unbiased) of uint8 NCHW images, batch by batch, on the CPU."""
    pools, logits = [], []
    for chunk in images.split(batch):
        pool, logit = theirs(chunk)
        pools.append(pool.cpu())
        logits.append(logit.cpu())
    return torch.cat(pools), torch.cat(logits)


def fid_images(ctx: Context) -> torch.Tensor:
    n, side, _ = ctx.sizes.fid
    return ctx.memo("fid.images", lambda: random_images(n, side, side, seed=5).to(ctx.device))


FEATURE_RTOL = 1e-4


def check_fid_features(ctx: Context) -> dict:
    """Same images, same device, fp32 without TF32 on both sides: pool features and logits agree to
    1e-4 of their largest magnitude (folded batch norms and channels-last change the rounding)."""
    ours, theirs = fid_extractors(ctx)
    images = fid_images(ctx)[: max(ctx.sizes.fid[2] // 2, 2)]
    pool, logits = ours(images)
    with exact_fp32():  # torch's default runs cuDNN convolutions in TF32
        ref_pool, ref_logits = fidelity_features(theirs, images, ctx.sizes.fid[2])
    worst = max(float((pool - ref_pool).abs().max() / (FEATURE_RTOL * ref_pool.abs().max())),
                float((logits - ref_logits).abs().max() / (FEATURE_RTOL * ref_logits.abs().max())))
    return accuracy(worst, measured=f"err/tol {worst:.3g}", anchor="torch-fidelity features",
                    tolerance=f"max|diff| <= {FEATURE_RTOL:g} x max|ref| (pool, logits)", images=len(images),
                    weights="given" if ctx.weights else "random, calibrated")


@contextlib.contextmanager
def cudnn_tf32(enabled: bool):
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def check_fid_speed(ctx: Context) -> dict:
    """Images/s of neon's extractor (csrc op + folded channels-last network, fp32 without TF32)
    vs torch-fidelity's as it runs by default (cuDNN TF32 on), on the same images already on the
    device, features copied back to the CPU by both."""
    ours, theirs = fid_extractors(ctx)
    images = fid_images(ctx)
    batch = ctx.sizes.fid[2]
    reps = max(ctx.sizes.reps // 3, 1)
    ours_ms = time_ms(ctx, lambda: ours(images), warmup=1, reps=reps)
    with cudnn_tf32(True):
        theirs_ms = time_ms(ctx, lambda: fidelity_features(theirs, images, batch), warmup=1, reps=reps)
    with exact_fp32():  # the same numerics as ours: an aside for reading the ratio
        exact_ms = time_ms(ctx, lambda: fidelity_features(theirs, images, batch), warmup=1, reps=reps)
    n = len(images)
    return speed(ctx, 1e3 * n / ours_ms, 1e3 * n / theirs_ms, unit="images/s", anchor="torch-fidelity", goal=3.0,
                 images=n, side=ctx.sizes.fid[1], batch=batch, ours="fp32, TF32 off",
                 torch_fidelity="its default: cuDNN TF32 on",
                 torch_fidelity_tf32_off_images_per_s=1e3 * n / exact_ms)


# ------------------------------------------------------------------------------ DiT and xAR

@contextlib.contextmanager
def exact_fp32():
    """TF32 off (matmuls and convolutions): the fp32 references are fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def build_on_device(ctx: Context, make: Callable[[], torch.nn.Module], seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    with ctx.device:  # initialised where it runs: seconds, not a minute, for XL-size models
        model = make()
    return randomize_zero_init(model, seed).to(ctx.device).eval()


def dit_model(ctx: Context) -> DiT:
    return ctx.memo("dit.model", lambda: build_on_device(ctx, lambda: DiT(**ctx.sizes.dit), seed=0))


DIT_CFG = 4.0


def dit_sample(ctx: Context, batch: int, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Our DiT sampler (DDPM, learned variance, CFG 4.0, the fused step), the network under
    autocast to `dtype` (fp32: none, TF32 off), fixed noise."""
    model = dit_model(ctx)
    gen = ctx.generator(1)
    side = model.x_embedder.input_size
    noise = torch.randn(batch, model.in_channels, side, side, generator=gen, device=ctx.device)
    labels = torch.arange(batch, device=ctx.device) % model.num_classes
    precision = exact_fp32() if dtype == torch.float32 else torch.autocast(ctx.device.type, dtype=dtype)
    with precision:
        return diffusion.sample(model, noise, labels, gen, method="ddpm", steps=steps, cfg=DIT_CFG,
                                null_class=model.num_classes, guided_channels=3, use_triton=True)


SAMPLE_TOL = {torch.bfloat16: 0.05, torch.float16: 0.01}


def check_dit_precision(ctx: Context, dtype: torch.dtype) -> dict:
    batch, steps = ctx.sizes.dit_run
    want = ctx.memo("dit.fp32", lambda: dit_sample(ctx, batch, steps, torch.float32))
    got = dit_sample(ctx, batch, steps, dtype)
    err = rel_l2(got, want)
    tol = SAMPLE_TOL[dtype]
    return accuracy(err / tol, measured=f"rel L2 {err:.3g}", anchor="fp32 sampler (no TF32)",
                    tolerance=f"rel L2 of final latents <= {tol:g}", arch=dit_arch(ctx), batch=batch,
                    ddpm_steps=steps, cfg=DIT_CFG, rel_l2=err, precision=f"autocast {dtype}")


def dit_arch(ctx: Context) -> str:
    d = ctx.sizes.dit
    return f"depth {d['depth']}, width {d['hidden_size']}, patch {d['patch_size']}, latent {d['input_size']}"


def check_dit_speed(ctx: Context) -> dict:
    batch, steps = ctx.sizes.dit_speed
    reps = 2 if ctx.cuda else 1
    fast = time_ms(ctx, lambda: dit_sample(ctx, batch, steps, torch.bfloat16), warmup=1, reps=reps)
    slow = time_ms(ctx, lambda: dit_sample(ctx, batch, steps, torch.float32), warmup=1, reps=reps)
    return speed(ctx, 1e3 * batch / fast, 1e3 * batch / slow, unit="images/s", anchor="fp32", goal=None,
                 arch=dit_arch(ctx), batch=batch, ddpm_steps=steps, cfg=DIT_CFG,
                 note="images/s at these steps; x steps/250 for the official 250-step DDPM")


def xar_model(ctx: Context, dtype: torch.dtype) -> XAR:
    """The xAR network with its weights in `dtype` (the fp32 one cast: the same values)."""
    fp32 = ctx.memo("xar.model", lambda: build_on_device(ctx, lambda: XAR(**ctx.sizes.xar), seed=0))
    if dtype == torch.float32:
        return fp32
    return ctx.memo(f"xar.model.{dtype}", lambda: copy.deepcopy(fp32).to(dtype))


XAR_CFG = 2.3


def xar_precision(ctx: Context, dtype: torch.dtype) -> tuple[torch.dtype, bool]:
    """(weights dtype, amp) of a run: fp32 is exact; bf16 runs bf16 weights; fp16 on CUDA is the
    official rule (fp32 weights under fp16 autocast, amp=True); the sampler's autocast is CUDA-only,
    so on the CPU fp16 runs fp16 weights."""
    if dtype == torch.float16 and ctx.cuda:
        return torch.float32, True
    return dtype, False


def xar_sample(ctx: Context, batch: int, steps: int, dtype: torch.dtype) -> torch.Tensor:
    weights, amp = xar_precision(ctx, dtype)
    model = xar_model(ctx, weights)
    labels = torch.arange(batch, device=ctx.device) % model.num_classes
    with exact_fp32() if dtype == torch.float32 else contextlib.nullcontext():
        return sample_xar(model, labels, ctx.generator(2), num_steps=steps, cfg=XAR_CFG, amp=amp)


def xar_arch(ctx: Context) -> str:
    x = ctx.sizes.xar
    return f"depth {x['encoder_depth']}+{x['decoder_depth']}, width {x['encoder_embed_dim']}, img {x['img_size']}"


def check_xar_precision(ctx: Context, dtype: torch.dtype) -> dict:
    batch, steps = ctx.sizes.xar_run
    want = ctx.memo("xar.fp32", lambda: xar_sample(ctx, batch, steps, torch.float32))
    got = xar_sample(ctx, batch, steps, dtype)
    err = rel_l2(got, want)
    tol = SAMPLE_TOL[dtype]
    weights, amp = xar_precision(ctx, dtype)
    return accuracy(err / tol, measured=f"rel L2 {err:.3g}", anchor="fp32 sampler (no TF32)",
                    tolerance=f"rel L2 of final latents <= {tol:g}", arch=xar_arch(ctx), batch=batch,
                    em_steps=steps, cfg=XAR_CFG, rel_l2=err,
                    precision=f"{weights} weights" + (", fp16 autocast" if amp else ""))


def check_xar_speed(ctx: Context) -> dict:
    batch, steps = ctx.sizes.xar_speed
    reps = 2 if ctx.cuda else 1
    fast = time_ms(ctx, lambda: xar_sample(ctx, batch, steps, torch.bfloat16), warmup=1, reps=reps)
    slow = time_ms(ctx, lambda: xar_sample(ctx, batch, steps, torch.float32), warmup=1, reps=reps)
    return speed(ctx, 1e3 * batch / fast, 1e3 * batch / slow, unit="images/s", anchor="fp32", goal=None,
                 arch=xar_arch(ctx), batch=batch, em_steps_per_cell=steps, cfg=XAR_CFG,
                 note="latents only (no VAE decode); images/s at these steps")


# ---------------------------------------------------------------------------------- DeepSpeed

ZERO3_LR = 1e-3


# Adam's first update is lr g / (|g| + eps) (+ weight decay), about lr sign(g): where g is a sum that
# cancels to fp32's rounding level it follows every rounding. On the H200 the engine's and the plain
# model's backward passes sum in different orders (cuBLAS/cuDNN pick kernels per layout): gradients
# equal to 1e-8 in L2 and the loss to the bit, yet the two steps differed by 4% in L2 (one weight by
# 0.21 lr). So the check is split where each part is well conditioned: the engine's gradients
# against the plain model's (L2), and the engine's step against torch's AdamW applied to the
# engine's own gradients; the plain model's step is reported beside them.
GRAD_TOL, STEP_TOL_REL = 1e-6, 1e-5


def check_zero3(ctx: Context) -> dict:
    """One optimizer step of the project's DeepSpeed engine (ZeRO-3, fp32, torch's AdamW) on a
    small pixel-space DiT against plain torch on a copy of the model: the loss, the gradients
    (gathered from the partitions) and the step (torch's AdamW on the engine's gradients) agree."""
    from neon_scale import dist  # imported here: the DeepSpeed stack fails this check only
    from neon_scale.config import TrainConfig
    from neon_scale.specs.dit import DiTArgs, DiTSpec
    from neon_scale.train.deepspeed_engine import full_fp32_state_dict, initialize

    z = ctx.sizes.zero3
    dist.init()  # a world of one: nccl on a GPU, gloo on the CPU
    spec = DiTSpec()
    args = DiTArgs(arch="S/2", image_size=z["image_size"], channels=3, depth=z["depth"], hidden_size=z["hidden_size"],
                   num_heads=z["num_heads"], num_classes=10, vae="none")
    torch.manual_seed(0)
    model = randomize_zero_init(spec.build(args), seed=0)
    reference = copy.deepcopy(model).to(ctx.device)
    cfg = TrainConfig(global_batch=z["batch"], zero_stage=3, lr=ZERO3_LR, betas=[0.9, 0.999], weight_decay=0.01,
                      dtype="fp32")
    gen = torch.Generator().manual_seed(3)
    batch = {"x": torch.rand(z["batch"], 3, z["image_size"], z["image_size"], generator=gen) * 2 - 1,
             "cls": torch.arange(z["batch"]) % 10}
    before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with exact_fp32():
        engine = initialize(spec, model, cfg, world=1)
        loss = engine(batch, torch.Generator().manual_seed(4))
        engine.backward(loss)
        from deepspeed.utils import safe_get_full_grad
        ds_grads = {n: safe_get_full_grad(q) for n, q in engine.module.model.named_parameters() if q.requires_grad}
        ds_grads = {n: g.detach().double().cpu() for n, g in ds_grads.items() if g is not None}
        engine.step()
        got = full_fp32_state_dict(engine)

        opt = torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=ZERO3_LR,
                                betas=(0.9, 0.999), weight_decay=0.01)
        ref_loss = spec.loss(reference, batch, torch.Generator().manual_seed(4))
        ref_loss.backward()
        ref_grads = {n: q.grad.detach().double().cpu() for n, q in reference.named_parameters() if q.grad is not None}
        opt.step()
    ctx.sync()
    want = {k: v.detach().cpu() for k, v in reference.state_dict().items()}
    if set(got) != set(want):
        raise AssertionError(f"state dict keys differ: {sorted(set(got) ^ set(want))[:3]}")
    # weights move by about lr in one Adam step: their difference is judged against 1e-3 lr
    moved = max(float((want[k] - before[k]).abs().max()) for k in want if want[k].numel())
    if not moved > 0.5 * ZERO3_LR:  # a step that changed nothing would compare equal too
        raise AssertionError(f"the reference step moved the weights by at most {moved:.3g} (lr {ZERO3_LR:g})")
    # torch's AdamW on the engine's own gradients, from the same weights, on the same device
    mine = {n: before[n].to(ctx.device).float().requires_grad_(True) for n in ds_grads}
    for n, q in mine.items():
        q.grad = ds_grads[n].float().to(ctx.device)
    with exact_fp32():
        torch.optim.AdamW(list(mine.values()), lr=ZERO3_LR, betas=(0.9, 0.999), weight_decay=0.01).step()
    ctx.sync()
    keys = [k for k in want if want[k].numel()]
    own = {k: (mine[k].detach().cpu() if k in mine else before[k]).double() for k in keys}
    step = {k: own[k] - before[k].double() for k in keys}

    def rel(a: dict, b: dict, ref: dict) -> float:
        num = sum(float(torch.sum((a[k].double() - b[k].double()) ** 2)) for k in ref)
        return math.sqrt(num / max(sum(float(torch.sum(ref[k] ** 2)) for k in ref), 1e-300))

    step_rel = rel(got, own, step)  # the engine's step vs AdamW on its gradients
    # where they differ (the H200 run: 4% of the step, gradients equal): how many weights, how large their gradients
    off = {k: (got[k].double() - own[k]).abs() > 1e-3 * ZERO3_LR for k in ds_grads}
    off_grads = torch.cat([ds_grads[k][off[k]].abs().reshape(-1) for k in ds_grads] or [torch.zeros(0)])
    all_grads = torch.cat([ds_grads[k].abs().reshape(-1) for k in ds_grads])
    basic = getattr(engine, "basic_optimizer", None)
    plain_rel = rel(got, want, step)  # vs the plain model's step (its own gradients): information
    common = {n: ref_grads[n] for n in ref_grads if n in ds_grads}
    if len(common) != len(ref_grads):
        raise AssertionError(f"DeepSpeed gave gradients for {len(common)} of {len(ref_grads)} parameters")
    grad_rel = rel(ds_grads, ref_grads, common)
    loss, ref_loss = loss.item(), ref_loss.item()
    loss_err = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
    worst = max(grad_rel / GRAD_TOL, step_rel / STEP_TOL_REL, loss_err / 1e-5)
    return accuracy(worst, measured=f"grads {grad_rel:.2g}, step {step_rel:.2g} (vs the plain model's step "
                                    f"{plain_rel:.2g}), loss {loss_err:.2g}",
                    anchor="torch backward + AdamW", tolerance=f"grads {GRAD_TOL:g}, step {STEP_TOL_REL:g} (relative "
                                                               f"L2); loss 1e-5",
                    loss=loss, reference_loss=ref_loss, max_step=moved, grad_rel=grad_rel, step_rel=step_rel,
                    plain_step_rel=plain_rel, parameters=sum(v.numel() for v in want.values()),
                    optimizer=type(engine.optimizer).__name__, basic_optimizer=type(basic).__name__,
                    basic_optimizer_defaults={k: str(v) for k, v in getattr(basic, "defaults", {}).items()},
                    weights_off=int(off_grads.numel()),
                    median_abs_grad_off=float(off_grads.median()) if off_grads.numel() else None,
                    median_abs_grad=float(all_grads.median()),
                    backend=torch.distributed.get_backend() if torch.distributed.is_initialized() else None)


# ------------------------------------------------------------------------------------- NCCL

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collectives_worker(rank: int, world: int, port: int, backend: str) -> None:
    """One rank (torch.multiprocessing): every collective the project uses, fp32 and bf16, exact
    small-integer results."""
    import torch.distributed as tdist

    # torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor; older torch has only these
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated",
                            category=FutureWarning)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    tdist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = 4096
        for dtype in (torch.float32, torch.bfloat16):
            mine = torch.full((n,), rank + 1.0, dtype=dtype, device=device)
            total = mine.clone()
            tdist.all_reduce(total)
            _expect(total, world * (world + 1) / 2, f"all_reduce {dtype}")
            gathered = torch.empty(world * n, dtype=dtype, device=device)
            tdist.all_gather_into_tensor(gathered, mine)
            _expect(gathered.view(world, n), torch.arange(1, world + 1, device=device)[:, None], f"all_gather {dtype}")
            parts = torch.arange(world, dtype=dtype, device=device).repeat_interleave(n) + rank
            piece = torch.empty(n, dtype=dtype, device=device)
            tdist.reduce_scatter_tensor(piece, parts)
            _expect(piece, world * rank + world * (world - 1) / 2, f"reduce_scatter {dtype}")
            sent = torch.full((n,), 7.0 if rank == 0 else -1.0, dtype=dtype, device=device)
            tdist.broadcast(sent, src=0)
            _expect(sent, 7.0, f"broadcast {dtype}")
        tdist.barrier()
    finally:
        tdist.destroy_process_group()


def _expect(got: torch.Tensor, want, what: str) -> None:
    want = torch.as_tensor(want, dtype=torch.float64, device=got.device)
    if not bool((got.double() == want).all()):
        raise AssertionError(f"{what}: wrong result (got {got.flatten()[:4].tolist()}...)")


def check_nccl(ctx: Context) -> dict:
    """NCCL with every GPU (2 or more); in reference mode the same worker on 2 gloo CPU processes."""
    import torch.multiprocessing as mp

    if ctx.cuda:
        world = torch.cuda.device_count()
        if world < 2:
            raise Skip(f"nccl: {world} GPU (needs 2 or more)")
        backend = "nccl"
    else:
        world, backend = 2, "gloo"
    started = mp.start_processes(collectives_worker, args=(world, free_port(), backend), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 300
    while not started.join(timeout=5):
        if time.monotonic() > deadline:
            for p in started.processes:
                p.kill()
            raise TimeoutError(f"{backend} collectives on {world} ranks did not finish in 300 s")
    anchor = "exact integers" if ctx.cuda else "exact integers (gloo, no GPU)"
    return accuracy(0.0, measured=f"{world} ranks, {backend} ok", anchor=anchor, tolerance="exact",
                    collectives="all_reduce, all_gather_into_tensor, reduce_scatter_tensor, broadcast",
                    dtypes="fp32, bf16", world=world, backend=backend)


# ---------------------------------------------------------------------------------- the registry

f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
# name -> check, in run order: accuracy first (what a short run must leave), then the timings.
CHECKS: dict[str, Callable[[Context], dict]] = {
    "merge.fp32": lambda c: check_merge_dtype(c, f32),
    "merge.bf16": lambda c: check_merge_dtype(c, bf16),
    "merge.fp16": lambda c: check_merge_dtype(c, f16),
    "merge.inplace": check_merge_inplace,
    "merge.many": check_merge_many,
    "sampling.ddpm": check_ddpm,
    "sampling.ddim": check_ddim,
    "sampling.em": check_em,
    "preprocess.op": check_preprocess,
    "fid.features": check_fid_features,
    "dit.bf16": lambda c: check_dit_precision(c, bf16),
    "dit.fp16": lambda c: check_dit_precision(c, f16),
    "xar.bf16": lambda c: check_xar_precision(c, bf16),
    "xar.fp16": lambda c: check_xar_precision(c, f16),
    "deepspeed.zero3": check_zero3,
    "nccl.collectives": check_nccl,
    "merge.speed_fp32": lambda c: check_merge_speed(c, f32, inplace=False),
    "merge.speed_bf16_inplace": lambda c: check_merge_speed(c, bf16, inplace=True),
    "sampling.ddpm_speed": check_ddpm_speed,
    "sampling.ddim_speed": check_ddim_speed,
    "sampling.em_speed": check_em_speed,
    "fid.speed": check_fid_speed,
    "dit.speed": check_dit_speed,
    "xar.speed": check_xar_speed,
}
# cached models no later check needs: dropped after the last check of their group
RELEASE_AFTER = {"dit.speed": "dit.", "xar.speed": "xar.", "fid.speed": "fid."}


def select(only: str | None) -> list[str]:
    """--only: names or groups (the part before the dot), in the order given; ValueError naming an
    unknown one."""
    if not only:
        return list(CHECKS)
    chosen: list[str] = []
    for item in (s.strip() for s in only.split(",")):
        if not item:
            continue
        names = [item] if item in CHECKS else [n for n in CHECKS if n.split(".")[0] == item]
        if not names:
            groups = sorted({n.split(".")[0] for n in CHECKS})
            raise ValueError(f"--only: unknown check {item!r} (groups: {', '.join(groups)}; --list shows every name)")
        chosen += [n for n in names if n not in chosen]
    return chosen


def run_check(ctx: Context, name: str) -> dict:
    """One check, isolated: its row, whatever it raised."""
    start = time.perf_counter()
    try:
        row = CHECKS[name](ctx)
    except Skip as e:
        row = dict(status="skip", reason=str(e))
    except Exception as e:  # noqa: BLE001  (recorded; the run goes on)
        lines = str(e).strip().splitlines()
        row = dict(status="error", reason=f"{type(e).__name__}: {lines[0] if lines else ''}".strip().rstrip(":"))
    if ctx.cuda and row.get("status") == "error":
        with contextlib.suppress(Exception):  # a sticky CUDA error raises here again: it is recorded
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
    fields = dict(name=name, kind="speed" if "speed" in name else "accuracy", status="error", measured="",
                  value=None, anchor="", anchor_value=None, ratio=None, goal="-", tolerance="-", reason="",
                  details={})
    fields.update(row, seconds=round(time.perf_counter() - start, 3))
    if fields["status"] == "skip" and not fields["reason"]:
        fields["reason"] = "skipped"
    return fields


# ------------------------------------------------------------------------------------- output

def machine_info(device: torch.device) -> dict:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    cuda = device.type == "cuda"
    ops = "missing"
    if fid_preprocess.have_compiled_op():
        import neon_scale._fid_ops as compiled

        ops = "cpu+cuda" if compiled.with_cuda else "cpu"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": triton.__version__, "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "deepspeed": version("deepspeed"), "torch_fidelity": version("torch-fidelity"), "fid_op": ops,
        "neon_scale": os.path.dirname(neon_scale.__file__),
    }


def plain(value):
    """`value` with non-finite floats as strings ("inf", "nan"): strict JSON for any reader."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def write_json(path: str, payload: dict) -> None:
    """Atomically: a temporary file beside `path`, then one rename."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(plain(payload), f, indent=1, default=str, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


COLUMNS = ("check", "status", "measured", "reference/anchor", "ratio", "goal", "tolerance")


def table(rows: list[dict]) -> str:
    """Plain text, fixed columns (readable in a log), then the reasons of skips and errors."""
    cells = [COLUMNS]
    for r in rows:
        ratio = "-" if r["ratio"] is None or (isinstance(r["ratio"], float) and math.isnan(r["ratio"])) \
            else f"{r['ratio']:.2f}x"
        cells.append((r["name"], r["status"].upper(), r["measured"] or "-", r["anchor"] or "-", ratio,
                      r["goal"] or "-", r["tolerance"] or "-"))
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    by_reason: dict[str, list[str]] = {}  # one line per reason: the speed rows of a CPU run share one
    for r in rows:
        if r["reason"]:
            by_reason.setdefault(r["reason"], []).append(r["name"])
    notes = [f"  {', '.join(names)}: {reason}" for reason, names in by_reason.items()]
    return "\n".join(lines + (["notes:"] + notes if notes else []))


# --------------------------------------------------------------------------------------- main

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--mode", default="auto", help="auto | reference | cuda (auto: cuda when torch sees a GPU)")
    p.add_argument("--out", default="gpu_check.json", help="the JSON, rewritten after every check")
    p.add_argument("--only", help="comma-separated check names or groups (merge, sampling, ...), run in that order")
    p.add_argument("--quick", action="store_true", help="smaller GPU sizes and fewer repetitions")
    p.add_argument("--weights", help="torch-fidelity's Inception weights file (default: random weights)")
    p.add_argument("--list", action="store_true", help="print the check names and exit")
    return p.parse_args(argv)


def usage_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.list:
        print("\n".join(CHECKS))
        return 0
    if args.mode not in ("auto", "reference", "cuda"):
        usage_error(f"--mode: {args.mode!r} is not one of auto, reference, cuda")
    try:
        names = select(args.only)
    except ValueError as e:
        usage_error(str(e))
    if args.weights and not os.path.isfile(args.weights):
        usage_error(f"--weights: {args.weights}: no such file")
    cuda = torch.cuda.is_available() and args.mode != "reference"
    if args.mode == "cuda" and not torch.cuda.is_available():
        usage_error(f"--mode cuda: torch {torch.__version__} sees no GPU (--mode reference runs on the CPU)")
    if cuda and _INTERPRET_ENV == "1":
        usage_error("--mode cuda: TRITON_INTERPRET=1 is set; unset it (the interpreter cannot run CUDA kernels)")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    started = time.perf_counter()
    payload = {"mode": "cuda" if cuda else "reference", "quick": args.quick, "argv": sys.argv,
               "machine": machine_info(device), "checks": [], "wall_s": 0.0, "complete": False}
    machine = payload["machine"]
    print(f"gpu_check: {payload['mode']} mode on {machine['device']}; torch {torch.__version__}, triton "
          f"{triton.__version__}, cuda {torch.version.cuda}; csrc op {machine['fid_op']}; neon_scale from "
          f"{machine['neon_scale']}; {len(names)} checks -> {args.out}", flush=True)
    with tempfile.TemporaryDirectory(prefix="neon-gpu-check-") as scratch:
        ctx = Context(device, args.quick, args.weights, scratch)
        for name in names:
            row = run_check(ctx, name)
            payload["checks"].append(row)
            payload["wall_s"] = round(time.perf_counter() - started, 2)
            write_json(args.out, payload)
            note = f" ({row['reason']})" if row["reason"] else ""
            print(f"[{payload['wall_s']:7.1f}s] {name:<26} {row['status']:<5} {row['measured']}{note}", flush=True)
            if name in RELEASE_AFTER:
                ctx.forget(RELEASE_AFTER[name])
    payload["complete"] = True
    payload["wall_s"] = round(time.perf_counter() - started, 2)
    write_json(args.out, payload)
    print()
    print(table(payload["checks"]))
    counts = {s: sum(r["status"] == s for r in payload["checks"]) for s in STATUSES}
    print(f"\n{', '.join(f'{v} {k}' for k, v in counts.items())}; wall time {payload['wall_s']:.1f} s; "
          f"JSON: {args.out}", flush=True)
    return 1 if counts["fail"] or counts["error"] else 0


if __name__ == "__main__":
    sys.exit(main())
