"""Sampler-step throughput: the fused guidance + step kernel (kernels/cfg_step.py, Triton) vs the
unfused torch reference (kernels/sampling_reference.py: guidance, x0, mean, variance, noise as
separate element-wise ops), in steps/s on the same inputs, every number measured in this run.

Cases (x has B rows, the model output 2B rows [cond; uncond], as the samplers call them):
- DiT-XL/2 256px: x [B, 4, 32, 32] fp32, model_out [2B, 8, 32, 32], B in --dit-batches; DDPM
  (learned variance, with noise) and DDIM (eta = 1, with noise); guided_channels 3 as DiT.
- DiT-XL/2 512px (the bigger latent): x [B, 4, 64, 64], model_out [2B, 8, 64, 64].
- xAR Euler-Maruyama: x [B, 64, 16] float64 (the official sampler's state), velocity
  [2B, 64, 16] float64 and bf16, with noise.
The MB column is what one fused step must move (x, the cond model output, the guided uncond
channels, noise, the result); GB/s is that over the fused step's time.
Without CUDA the Triton kernels cannot run natively (the interpreter is no speed measure): the
reference timings on the CPU are printed, and the fused columns only with a GPU, where the
result is also checked against the reference on the GPU (max |diff|).

  python bench/sampling.py [--dit-batches 32,256] [--big-batch 64] [--xar-batches 32,256] [--seconds 0.5]
                           [--threads N]
"""
import argparse
import os
import platform
import sys
import time

import torch
import triton
from machine import cpu_model  # bench/machine.py (bench/ is on the path of a bench script)
from neon_scale.kernels import cfg_step
from neon_scale.kernels import sampling_reference as ref

DDPM = dict(guided_channels=3, sqrt_recip_ac=1.0526, sqrt_recipm1_ac=0.3293, mean_coef1=0.1412, mean_coef2=0.8571,
            log_var_min=-5.21, log_var_max=-4.87)
DDIM = dict(guided_channels=3, sqrt_recip_ac=1.0526, sqrt_recipm1_ac=0.3293, sqrt_ac_prev=0.9512, dir_coef=0.2841,
            sigma=0.0913)
EM = dict(t=0.52, dt=-0.0194)


def steps_per_s(fn, device: torch.device, seconds: float) -> float:
    """Best of 3 rounds of as many calls as fill `seconds`, synchronised on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < 0.05 or n < 3:  # calibrate
        fn()
        n += 1
    sync()
    per = (time.perf_counter() - start) / n
    iters = max(3, int(seconds / 3 / per))
    best = float("inf")
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / iters)
    return 1.0 / best


def dit_case(name, b, hw, kind, device):
    gen = torch.Generator(device=device).manual_seed(b)
    x = torch.randn(b, 4, hw, hw, generator=gen, device=device)
    out = torch.randn(2 * b, 8, hw, hw, generator=gen, device=device)
    out[:, 4:].tanh_()
    noise = torch.randn(b, 4, hw, hw, generator=gen, device=device)
    coefs = DDPM if kind == "ddpm" else DDIM
    fused_fn = cfg_step.ddpm_step if kind == "ddpm" else cfg_step.ddim_step
    ref_fn = ref.ddpm_step if kind == "ddpm" else ref.ddim_step
    el = x.numel()
    # x, cond eps (+ variance for DDPM), 3 of 4 uncond eps channels (+ nothing of its variance), noise, result
    nbytes = 4 * el * (1 + (2 if kind == "ddpm" else 1) + 0.75 + 1 + 1)
    return (f"{name} {kind.upper()} B={b}", f"x {list(x.shape)}, out {list(out.shape)}", nbytes,
            lambda: ref_fn(x, out, noise, scale=4.0, **coefs),
            lambda: fused_fn(x, out, noise, scale=4.0, use_triton=True, **coefs))


def xar_case(b, v_dtype, device):
    gen = torch.Generator(device=device).manual_seed(b)
    x = torch.randn(b, 64, 16, generator=gen, device=device, dtype=torch.float64)
    v = torch.randn(2 * b, 64, 16, generator=gen, device=device, dtype=torch.float64).to(v_dtype)
    noise = torch.randn(b, 64, 16, generator=gen, device=device, dtype=torch.float64)
    el = x.numel()
    nbytes = 8 * el * 3 + v.element_size() * 2 * el
    vname = {torch.float64: "fp64", torch.bfloat16: "bf16"}[v_dtype]
    return (f"xAR EM B={b} v {vname}", f"x {list(x.shape)} fp64, v {list(v.shape)}", nbytes,
            lambda: ref.em_step(x, v, noise, scale=3.0, **EM),
            lambda: cfg_step.em_step(x, v, noise, scale=3.0, use_triton=True, **EM))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit-batches", default="32,256")
    p.add_argument("--big-batch", type=int, default=64, help="B of the 512px (64x64 latent) case; 0: skip")
    p.add_argument("--xar-batches", default="32,256")
    p.add_argument("--seconds", type=float, default=0.5, help="timed seconds per measurement (best of 3 rounds)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); on a busy "
                   "machine 1 avoids OpenMP threads waiting on each other")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    device = torch.device("cuda" if cuda else "cpu")
    print(f"command: python {' '.join(sys.argv)}")
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"cpu: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load average {load}")
    print(f"gpu: {torch.cuda.get_device_name() if cuda else 'none (CUDA not available)'}")
    print(f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}")
    if not cuda:
        print("no CUDA: the fused Triton kernels cannot run natively; reference (torch, CPU) timings only")
    print(f"device: {device}, guidance scale 4.0 (DiT) / 3.0 (xAR), steps/s = 1 / (best time of one step)\n")

    cases = []
    for b in (int(s) for s in args.dit_batches.split(",") if s):
        for kind in ("ddpm", "ddim"):
            cases.append(dit_case("DiT-XL/2 256px", b, 32, kind, device))
    if args.big_batch:
        for kind in ("ddpm", "ddim"):
            cases.append(dit_case("DiT-XL/2 512px", args.big_batch, 64, kind, device))
    for b in (int(s) for s in args.xar_batches.split(",") if s):
        for v_dtype in (torch.float64, torch.bfloat16):
            cases.append(xar_case(b, v_dtype, device))

    head = f"{'case':<28}{'shapes':<42}{'MB':>7}{'ref steps/s':>13}"
    if cuda:
        head += f"{'fused steps/s':>15}{'speedup':>9}{'fused GB/s':>12}{'max |diff|':>12}"
    print(head)
    for name, shapes, nbytes, ref_step, fused_step in cases:
        ref_rate = steps_per_s(ref_step, device, args.seconds)
        line = f"{name:<28}{shapes:<42}{nbytes / 1e6:>7.1f}{ref_rate:>13,.0f}"
        if cuda:
            fused_rate = steps_per_s(fused_step, device, args.seconds)
            diff = (fused_step().double() - ref_step().double()).abs().max().item()
            line += f"{fused_rate:>15,.0f}{fused_rate / ref_rate:>8.2f}x{nbytes * fused_rate / 1e9:>12.0f}{diff:>12.3g}"
        print(line, flush=True)
    if cuda:
        print("\nmax |diff|: fused vs reference on the GPU, same inputs (torch divides by a scalar via its reciprocal "
              "and its exp rounds differently; the kernels do the reference's operations in its order)")


if __name__ == "__main__":
    main()
