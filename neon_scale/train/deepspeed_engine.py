"""The DeepSpeed engine for fine-tuning: `initialize` wraps the model in `LossModule`, so
`engine(batch, gen)` is the model's training loss; `fp32_tensors` gives the fp32 master weights a
tensor at a time (whatever the ZeRO stage and dtype) with DeepSpeed's public `safe_get_full_fp32_param`.

DeepSpeed's checkpoint engine unpickles whatever a checkpoint holds (`torch.load(weights_only=False)`)
when a run resumes; ours reads through `io.torch_load` and its allow-list instead, so a pickle planted
in a checkpoint folder is refused, not run.
"""
from __future__ import annotations

import ctypes
import logging
from typing import Iterator

import torch
from torch import nn

from ..config import TrainConfig
from ..io import torch_load
from ..merge.zero import as_built, deepspeed_classes
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
    # What the optimizer never updates (frozen parameters, floating buffers: DiT's pos_embed, xAR's
    # RoPE tables), as built: DeepSpeed casts them to bf16/fp16 with the module and keeps no fp32
    # master of them, so an export would otherwise write them rounded (see fp32_tensors).
    exact = {name: t.detach().clone() for name, t in _untrained(model).items()}
    engine, *_ = deepspeed.initialize(model=wrapper, model_parameters=wrapper.parameters(),
                                      config=deepspeed_config(cfg, world))
    engine.neon_untrained = exact
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


def _untrained(model: nn.Module) -> dict[str, torch.Tensor]:
    """The floating tensors of the state dict that the optimizer does not own."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    out = {}
    for name in model.state_dict():
        t = params.get(name, buffers.get(name))
        if name not in trained and t is not None and t.is_floating_point():
            out[name] = t
    return out


def fp32_layout(engine) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, full shape, dtype) of every tensor `fp32_tensors` yields, in its order, without
    gathering anything (ZeRO-3 keeps a partitioned parameter's full shape in ds_shape)."""
    model = engine.module.model
    params = dict(model.named_parameters())
    out = []
    for name, value in model.state_dict().items():
        p = params.get(name)
        shape = tuple(p.ds_shape) if p is not None and hasattr(p, "ds_shape") else tuple(value.shape)
        out.append((name, shape, torch.float32 if value.is_floating_point() else value.dtype))
    return out


def fp32_tensors(engine) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's state dict with fp32 master weights, one (name, tensor) at a time: a writer
    streams them to disk and never holds the whole model. Collective under ZeRO-3: every rank must
    run the generator to its end (each tensor is gathered from every rank's partition).

    A tensor the optimizer does not own (frozen parameter, buffer) is gathered too (ZeRO-3
    partitions a frozen parameter above its persistence threshold: DiT-XL/2's pos_embed, 295k
    elements, read as an empty tensor without the gather) and given as it was built, in fp32,
    when its live value is that value cast to the module's dtype (so nothing has changed it);
    otherwise its live value (floating ones in fp32)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    model = engine.module.model
    params = dict(model.named_parameters())
    exact = getattr(engine, "neon_untrained", {})
    zero3 = engine.zero_optimization_stage() == 3
    for name, value in model.state_dict().items():
        p = params.get(name)
        if p is not None and p.requires_grad:
            full = safe_get_full_fp32_param(p)
            value = (full if full is not None else p.detach()).float()
        elif p is not None:
            with deepspeed.zero.GatheredParameters([p], enabled=zero3 and hasattr(p, "ds_id")):
                value = p.detach().clone()
        yield name, as_built(exact.get(name), value).detach().cpu()


def full_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """`fp32_tensors` as one dict (collective under ZeRO-3), each tensor a copy of its own."""
    return {name: value.clone() for name, value in fp32_tensors(engine)}
