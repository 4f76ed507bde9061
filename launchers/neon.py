"""Entry for `deepspeed launchers/neon.py --config ...` (and torchrun, and srun): the `neon` command
with `run` implied. Each rank runs the same stages; the launcher's environment gives rank and world
(under srun, Slurm's task variables: neon_scale/dist.py).

  DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/neon.py --config configs/toy2d.yaml
  srun --ntasks-per-node 4 --kill-on-bad-exit=1 python launchers/neon.py --config configs/toy2d.yaml
  deepspeed launchers/neon.py --config configs/toy2d.yaml --stage sweep
  torchrun --nproc-per-node 8 launchers/neon.py fid samples/ --ref ref.npz --weights inception.pth
"""
import sys

from neon_scale.cli import COMMANDS, main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] not in COMMANDS:
        argv = ["run", *argv]
    main(argv)
