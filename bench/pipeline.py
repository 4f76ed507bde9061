"""Wall time of each stage of a run (default: the default config, in a fresh run directory),
then of the same command again (every stage skipped).

  python bench/pipeline.py [--config configs/toy2d.yaml] [--set k=v ...]
"""
import argparse
import os
import platform
import tempfile
import time

import torch

from neon_scale import dist, pipeline
from neon_scale.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/toy2d.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    run_dir = tempfile.mkdtemp(prefix="neon-bench-")
    cfg = load_config(args.config, [*args.overrides, f"run_dir={run_dir}"])
    dist.init()
    start = time.perf_counter()
    first = pipeline.run(cfg)
    total = time.perf_counter() - start
    start = time.perf_counter()
    second = pipeline.run(cfg)
    rerun = time.perf_counter() - start
    if dist.is_main():
        print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, {dist.world()} rank(s)")
        print(f"{'stage':<8}{'first run [s]':>15}{'share':>8}{'re-run [s]':>12}")
        for name, seconds in first.items():
            print(f"{name:<8}{seconds:>15.1f}{seconds / total:>8.0%}{second[name]:>12.2f}")
        print(f"{'total':<8}{total:>15.1f}{'':>8}{rerun:>12.2f}")
    dist.shutdown()


if __name__ == "__main__":
    main()
