"""DeepSpeed engine for fine-tuning: our TrainConfig -> a DeepSpeed config -> `initialize`.

The engine wraps `LossModule`, so `engine(batch, gen)` is the model's training loss; the fp32
master weights (whatever the ZeRO stage and dtype) are exported with DeepSpeed's public
`safe_get_full_fp32_param`.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import TrainConfig
from ..errors import NeonError
from ..models.registry import ModelSpec


class LossModule(nn.Module):
    def __init__(self, spec: ModelSpec, model: nn.Module):
        super().__init__()
        self.spec = spec
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        return self.spec.loss(self.model, batch, gen)


def micro_batch_size(cfg: TrainConfig, world: int) -> int:
    per_step = world * cfg.grad_accum
    if cfg.global_batch % per_step:
        raise NeonError(f"train.global_batch={cfg.global_batch} is not divisible by world size {world} x "
                        f"train.grad_accum {cfg.grad_accum}")
    return cfg.global_batch // per_step


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    ds = {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world),
        "gradient_accumulation_steps": cfg.grad_accum,
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.lr, "betas": list(cfg.betas), "weight_decay": cfg.weight_decay,
            "torch_adam": True,  # DeepSpeed's fused Adam is a JIT build; torch's is enough here
        }},
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.dtype == "bf16"},
        "fp16": {"enabled": cfg.dtype == "fp16", "initial_scale_power": 16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.grad_clip > 0:
        ds["gradient_clipping"] = cfg.grad_clip
    if cfg.warmup_steps > 0:
        ds["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": cfg.lr, "warmup_num_steps": cfg.warmup_steps, "warmup_type": "linear"}}
    return ds


def initialize(spec: ModelSpec, model: nn.Module, cfg: TrainConfig, world: int):
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    wrapper = LossModule(spec, model)
    engine, *_ = deepspeed.initialize(model=wrapper, model_parameters=wrapper.parameters(),
                                      config=deepspeed_config(cfg, world))
    return engine


def full_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """The model's state dict with fp32 master weights. Collective under ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param

    model = engine.module.model
    params = dict(model.named_parameters())
    out = {}
    for name, value in model.state_dict().items():
        if name in params:
            full = safe_get_full_fp32_param(params[name])
            value = full if full is not None else params[name].detach()
            value = value.float()
        out[name] = value.detach().cpu().clone()
    return out
