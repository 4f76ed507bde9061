"""EMA of the fine-tuned weights, kept where the fp32 master weights live: each rank holds the EMA
of its own partition only (never a full copy under ZeRO), as flat fp32 tensors laid out exactly
like the optimizer's master partitions.

Because the layout is the optimizer's, the EMA is saved per rank next to the DeepSpeed checkpoint
(`ema-rank{r:05d}.safetensors`, keys `group{g}`) and read back by the same ZeRO reader that
consolidates the master weights (`neon consolidate --ema`). The authors merge the fine-tune's EMA,
started from the base weights with decay 0.9999.
"""
from __future__ import annotations

import contextlib
import pathlib

import torch

from .. import dist
from ..ckpt_files import ema_file
from ..errors import NeonError
from ..io import load_state_dict, save_state_dict


def master_partitions(engine) -> list[torch.Tensor]:
    """This rank's fp32 master weights as flat tensors, by optimizer group."""
    opt = engine.optimizer
    for attr in ("fp32_partitioned_groups_flat",      # ZeRO-3
                 "single_partition_of_fp32_groups",   # ZeRO-1/2
                 "fp32_groups_flat_partition"):       # bf16 without ZeRO (DeepSpeed's BF16_Optimizer)
        groups = getattr(opt, attr, None)
        if groups:
            return [g.data for g in groups]
    if engine.zero_optimization_stage() == 0 and not (engine.bfloat16_enabled() or engine.fp16_enabled()):
        return [p.data for group in opt.param_groups for p in group["params"]]  # the fp32 weights themselves
    raise NeonError(f"train.ema_decay: no fp32 master weights found in {type(opt).__name__} "
                    f"(use ZeRO 1-3, or fp32/bf16 without ZeRO)")


class PartitionEMA:
    def __init__(self, engine, decay: float):
        if not 0.0 < decay < 1.0:
            raise NeonError(f"train.ema_decay = {decay} must be in (0, 1)")
        self.engine, self.decay = engine, decay
        self.shadow = [m.detach().float().clone() for m in master_partitions(engine)]  # starts from the weights now

    @property
    def masters(self) -> list[torch.Tensor]:  # looked up each time: a checkpoint load may replace them
        return master_partitions(self.engine)

    @torch.no_grad()
    def update(self) -> None:
        """shadow <- decay * shadow + (1 - decay) * master, elementwise in fp32."""
        for shadow, master in zip(self.shadow, self.masters):
            shadow.lerp_(master, 1.0 - self.decay)

    def save(self, tag_dir: pathlib.Path) -> None:
        save_state_dict(ema_file(tag_dir, dist.rank()), {f"group{g}": s for g, s in enumerate(self.shadow)},
                        {"decay": str(self.decay), "world": str(dist.world())})

    @torch.no_grad()
    def load(self, tag_dir: pathlib.Path) -> None:
        path = ema_file(tag_dir, dist.rank())
        if not path.is_file():
            raise NeonError(f"{path}: EMA partition not found (checkpoint saved without train.ema_decay?)")
        state = load_state_dict(path)
        if len(state) != len(self.shadow) or any(state.get(f"group{g}") is None or state[f"group{g}"].shape != s.shape
                                                 for g, s in enumerate(self.shadow)):
            raise NeonError(f"{path}: EMA partition layout does not match this run (another world size or model?)")
        for g, s in enumerate(self.shadow):
            s.copy_(state[f"group{g}"])

    @contextlib.contextmanager
    def swapped_in(self):
        """The EMA in place of the master weights (e.g. to export it with DeepSpeed's gather);
        the masters are restored on exit. The two are exchanged in place, a chunk at a time (copies:
        exact both ways), so it costs SWAP_CHUNK elements, not a copy of the partition (1.3 GiB per
        rank for DiT-XL/2 on 2 ranks: the training stage's peak)."""
        masters = self.masters
        try:
            _exchange(masters, self.shadow)
            yield
        finally:
            _exchange(masters, self.shadow)


SWAP_CHUNK = 1 << 22  # elements (16 MiB in fp32)


@torch.no_grad()
def _exchange(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """Swap the contents of each pair of equally long 1-D tensors through a chunk-sized buffer."""
    for x, y in zip(a, b):
        for i in range(0, x.numel(), SWAP_CHUNK):
            cx, cy = x[i:i + SWAP_CHUNK], y[i:i + SWAP_CHUNK]
            tmp = cx.clone()
            cx.copy_(cy)
            cy.copy_(tmp)
