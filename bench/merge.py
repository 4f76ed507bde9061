"""Merge throughput and memory, every number measured in this run.

(a) in memory: GB/s of the production merge (neon_scale.merge.extrapolate.extrapolate_tensor)
    vs torch.lerp vs the naive (1 + w) a - w b vs a plain copy of the same bytes (bytes read +
    written; the merges read 2 tensors and write 1, the copy reads 1 and writes 1).
(b) on disk: two checkpoints of --size-gb each (safetensors, --tensors equal fp32 tensors):
    wall time and peak RSS of `neon merge` vs the naive load-both / merge / save, and 4 values
    of w in one call vs 4 calls. Peak RSS bound: 2 x the largest tensor + 300 MB.

  python bench/merge.py [--size-gb 2] [--tensors 16] [--dir /tmp/neon-bench-merge]
"""
import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import torch

MAKE = """
import sys, torch
from safetensors.torch import save_file
path, seed, numel, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
gen = torch.Generator().manual_seed(seed)
save_file({f"blocks.{i}.weight": torch.randn(numel, generator=gen) for i in range(n)}, path)
"""

NAIVE = """
import sys, torch
from safetensors.torch import load_file, save_file
base, synth, out, w = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
a, b = load_file(base), load_file(synth)
save_file({k: (1 + w) * a[k] - w * b[k] for k in a}, out)
"""


def _best_time(fn, repeat=3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def in_memory(n: int) -> None:
    from neon_scale.merge.extrapolate import extrapolate_tensor

    a, b = torch.randn(n), torch.randn(n)
    out = torch.empty(n)
    w = 1.5
    gb = a.numel() * a.element_size() / 1e9
    rows = {
        "copy (out.copy_(a))": (_best_time(lambda: out.copy_(a)), 2 * gb),
        "neon (extrapolate_tensor)": (_best_time(lambda: extrapolate_tensor(a, b, w)), 3 * gb),
        "torch.lerp(a, b, -w)": (_best_time(lambda: torch.lerp(a, b, -w)), 3 * gb),
        "naive (1+w)*a - w*b": (_best_time(lambda: (1 + w) * a - w * b), 3 * gb),
    }
    copy_rate = rows["copy (out.copy_(a))"][1] / rows["copy (out.copy_(a))"][0]
    print(f"\n(a) in memory: {n:,} fp32 elements per tensor ({gb:.2f} GB), {torch.get_num_threads()} threads")
    print(f"{'method':<28}{'time [s]':>10}{'GB/s':>8}{'vs copy':>9}")
    for name, (t, moved) in rows.items():
        print(f"{name:<28}{t:>10.3f}{moved / t:>8.2f}{moved / t / copy_rate:>9.2f}")


def _run(cmd: list[str]) -> tuple[float, float]:
    """Wall time [s] and peak RSS [MB] of one child process (dirty pages of earlier runs are
    flushed first, so that no run pays for another's writes)."""
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def on_disk(size_gb: float, n_tensors: int, root: str) -> None:
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(dir=root)
    try:
        numel = int(size_gb * 1e9 / 4 / n_tensors)
        # Written by a child: a forked child's ru_maxrss includes its parent's resident memory,
        # so the parent must stay small for the RSS figures below to be the children's own.
        for name, seed in (("base", 0), ("synth", 1)):
            _run([sys.executable, "-c", MAKE, os.path.join(work, f"{name}.safetensors"), str(seed), str(numel), str(n_tensors)])
        base, synth = os.path.join(work, "base.safetensors"), os.path.join(work, "synth.safetensors")
        neon = [sys.executable, "-m", "neon_scale.cli", "merge", base, synth]
        largest_mb = numel * 4 / 2**20
        rows = {}
        rows["naive load-both/merge/save"] = _run([sys.executable, "-c", NAIVE, base, synth, os.path.join(work, "naive.safetensors"), "1.5"])
        rows["neon merge, 1 w"] = _run([*neon, "--w", "1.5", "-o", os.path.join(work, "one")])
        rows["neon merge, 4 w in one call"] = _run([*neon, *sum((["--w", str(w)] for w in (0.5, 1.0, 1.5, 2.0)), []),
                                                   "-o", os.path.join(work, "four")])
        calls = [_run([*neon, "--w", str(w), "-o", os.path.join(work, f"sep{w}")]) for w in (0.5, 1.0, 1.5, 2.0)]
        rows["neon merge, 4 separate calls"] = (sum(c[0] for c in calls), max(c[1] for c in calls))
        bound = 2 * largest_mb + 300
        print(f"\n(b) on disk: 2 checkpoints of {size_gb:g} GB ({n_tensors} fp32 tensors of {largest_mb:.0f} MB) in {root}")
        print(f"{'run':<32}{'wall [s]':>10}{'peak RSS [MB]':>15}{'vs naive time':>15}")
        naive_t = rows["naive load-both/merge/save"][0]
        for name, (t, rss) in rows.items():
            print(f"{name:<32}{t:>10.2f}{rss:>15.0f}{t / naive_t:>15.2f}")
        one, four = rows["neon merge, 1 w"][0], rows["neon merge, 4 w in one call"][0]
        print(f"peak RSS bound (2 x largest tensor + 300 MB): {bound:.0f} MB")
        print(f"4 w in one call / 1 w: {four / one:.2f}x (goal < 2x); 4 separate calls / one call of 4: "
              f"{rows['neon merge, 4 separate calls'][0] / four:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--elements", type=int, default=64_000_000, help="elements per tensor for (a)")
    parser.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "neon-bench-merge"))
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    on_disk(args.size_gb, args.tensors, args.dir)  # first: the parent must be small when it forks
    in_memory(args.elements)


if __name__ == "__main__":
    main()
