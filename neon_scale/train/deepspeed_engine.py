"""The DeepSpeed engine for fine-tuning: `initialize` wraps the model in `LossModule`, so
`engine(batch, gen)` is the model's training loss; `full_fp32_state_dict` exports the fp32 master
weights (whatever the ZeRO stage and dtype) with DeepSpeed's public `safe_get_full_fp32_param`.

DeepSpeed's checkpoint engine unpickles whatever a checkpoint holds (`torch.load(weights_only=False)`)
when a run resumes; ours reads through `io.torch_load` and its allow-list instead, so a pickle planted
in a checkpoint folder is refused, not run.
"""
from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from ..config import TrainConfig
from ..io import torch_load
from ..merge.zero import deepspeed_classes
from ..specs.base import ModelSpec
from .deepspeed_config import deepspeed_config


class LossModule(nn.Module):
    def __init__(self, spec: ModelSpec, model: nn.Module):
        super().__init__()
        self.spec = spec
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        return self.spec.loss(self.model, batch, gen)


class AllowListedLoads:
    """DeepSpeed's checkpoint engine with its one unpickling call (`load`) replaced by ours;
    saving and everything else is the wrapped engine's."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        return torch_load(path, "DeepSpeed checkpoint file", allow=deepspeed_classes(), map_location=map_location)


def initialize(spec: ModelSpec, model: nn.Module, cfg: TrainConfig, world: int):
    import deepspeed  # heavy (and JIT-builds ops on import): only when an engine is made
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    wrapper = LossModule(spec, model)
    engine, *_ = deepspeed.initialize(model=wrapper, model_parameters=wrapper.parameters(),
                                      config=deepspeed_config(cfg, world))
    engine.checkpoint_engine = AllowListedLoads(engine.checkpoint_engine)
    trim_heap()  # the whole fp32 model this rank built, now partitioned and freed
    return engine


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere). glibc serves
    tensors under its dynamic mmap threshold (which grows to 32 MiB) from the heap and keeps the pages
    once they are freed: after ZeRO-3 partitions a 675M-parameter model, each rank would otherwise go
    on holding most of the 2.6 GiB it built it in (bench/scale.py)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def full_fp32_state_dict(engine, keep: bool = True) -> dict[str, torch.Tensor]:
    """The model's state dict with fp32 master weights. Collective under ZeRO-3: every rank takes
    part in each tensor's gather; a rank with keep=False drops each tensor at once and returns {}
    (so only the writer ever holds a whole fp32 model: at 675M parameters, 2.6 GiB per rank)."""
    from deepspeed.utils import safe_get_full_fp32_param

    model = engine.module.model
    params = dict(model.named_parameters())
    out = {}
    for name, value in model.state_dict().items():
        if name in params:
            full = safe_get_full_fp32_param(params[name])
            value = full if full is not None else params[name].detach()
            value = value.float()
        if keep:
            out[name] = value.detach().cpu().clone()
    return out
