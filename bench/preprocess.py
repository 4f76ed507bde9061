"""FID pre-processing speed: torch-fidelity's resize + normalise vs our compiled op vs our fallback.

64 random 256x256 uint8 images (NCHW) -> float32 [64, 3, 299, 299], on CPU, best of 5. The
torch-fidelity path starts from uint8 as its InceptionV3 forward does: `x.to(float32)`,
interpolate_bilinear_2d_like_tensorflow1x(..., (299, 299), align_corners=False), (x - 128) / 128.

  python bench/preprocess.py [--n 64] [--hw 256] [--repeat 5]
"""
import argparse
import platform
import time

import torch
from torch_fidelity.interpolate_compat_tensorflow import (
    interpolate_bilinear_2d_like_tensorflow1x,
)

from neon_scale.metrics import preprocess as P


def torch_fidelity(x: torch.Tensor) -> torch.Tensor:
    y = interpolate_bilinear_2d_like_tensorflow1x(x.to(torch.float32), size=(299, 299), align_corners=False)
    return (y - 128) / 128


def best_ms(fn, x, repeat: int) -> float:
    fn(x)  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--hw", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if not P.have_compiled_op():
        raise SystemExit("neon_scale._fid_ops is not built: `make install` first")
    x = torch.randint(0, 256, (args.n, 3, args.hw, args.hw), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    ref = torch_fidelity(x)
    cases = {
        "torch-fidelity (uint8 -> float, resize, normalise)": torch_fidelity,
        "compiled op, NCHW out": lambda t: P.preprocess(t),
        "compiled op, channels_last out": lambda t: P.preprocess(t, channels_last_out=True),
        "fallback (pure torch)": lambda t: P.preprocess_reference(t),
    }
    print(f"{args.n} x 3 x {args.hw} x {args.hw} uint8 -> 299 x 299 float32, best of {args.repeat}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    base = None
    for name, fn in cases.items():
        err = (fn(x) - ref).abs().max().item()
        ms = best_ms(fn, x, args.repeat)
        base = base or ms
        print(f"  {name:<52} {ms:9.1f} ms   x{base / ms:6.2f} vs torch-fidelity   max|err| {err:.1e}")


if __name__ == "__main__":
    main()
