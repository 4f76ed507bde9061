"""Entry for `deepspeed launchers/neon.py --config ...` (and torchrun): the `neon` command with
`run` implied. Each rank runs the same stages; DeepSpeed's environment gives rank and world.

  DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/neon.py --config configs/toy2d.yaml
  deepspeed launchers/neon.py --config configs/toy2d.yaml --stage sweep
"""
import sys

from neon_scale.cli import STAGE_HELP, main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] not in STAGE_HELP:
        argv = ["run", *argv]
    main(argv)
