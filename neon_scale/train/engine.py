"""DeepSpeed engine for fine-tuning: our TrainConfig -> a DeepSpeed config -> `initialize`.

The engine wraps `LossModule`, so `engine(batch, gen)` is the model's training loss; the fp32
master weights (whatever the ZeRO stage and dtype) are exported with DeepSpeed's public
`safe_get_full_fp32_param`. DeepSpeed's checkpoint engine unpickles whatever a checkpoint holds
(`torch.load(weights_only=False)`) when a run resumes; ours reads through `io.torch_load` and its
allow-list instead, so a pickle planted in a checkpoint folder is refused, not run.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import TrainConfig
from ..errors import NeonError
from ..io import torch_load
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
    if cfg.deepspeed_json:
        user = load_user_json(cfg.deepspeed_json)
        for key in _BATCH_KEYS:
            if key in user and user[key] != ds[key]:
                raise NeonError(f"{cfg.deepspeed_json}: '{key}' = {user[key]} but the config gives {ds[key]} "
                                f"(train.global_batch / train.grad_accum on {world} rank(s))")
        ds = _deep_merge(ds, user)
    return ds


# Top-level sections DeepSpeed reads besides the scalar keys of deepspeed.runtime.constants.
_SECTIONS = {
    "zero_optimization", "bf16", "fp16", "amp", "optimizer", "scheduler", "activation_checkpointing",
    "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "aio", "checkpoint",
    "data_efficiency", "compression_training", "autotuning", "elasticity", "pipeline", "sparse_attention",
    "curriculum_learning", "progressive_layer_drop", "nebula", "weight_quantization", "hybrid_engine",
    "eigenvalue", "quantize_training", "gradient_clipping", "zero_allow_untested_optimizer", "torch_autocast",
}
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _known_top_level() -> set[str]:
    import deepspeed.runtime.constants as constants

    scalars = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str) and v.islower() and " " not in v}
    return scalars | _SECTIONS


def load_user_json(path: str) -> dict:
    """Read a user's DeepSpeed JSON; one line naming the file and key for anything DeepSpeed would
    not understand (top-level keys, and the zero_optimization section via DeepSpeed's own model)."""
    import difflib
    import json
    import pathlib

    p = pathlib.Path(path)
    if not p.is_file():
        raise NeonError(f"{p}: DeepSpeed JSON not found (train.deepspeed_json)")
    try:
        user = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise NeonError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(user, dict):
        raise NeonError(f"{p}: the top level must be an object")
    known = _known_top_level()
    for key in user:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise NeonError(f"{p}: unknown DeepSpeed key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    if isinstance(user.get("zero_optimization"), dict):
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        from pydantic import ValidationError

        try:
            DeepSpeedZeroConfig(**user["zero_optimization"])
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err["loc"])
            raise NeonError(f"{p}: zero_optimization.{where}: {err['msg']}") from None
    return user


def _deep_merge(ours: dict, theirs: dict) -> dict:
    out = dict(ours)
    for key, value in theirs.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class AllowListedLoads:
    """DeepSpeed's checkpoint engine with its one unpickling call (`load`) replaced by ours;
    saving and everything else is the wrapped engine's."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def load(self, path: str, map_location=None):
        from ..merge.zero import deepspeed_classes

        return torch_load(path, "DeepSpeed checkpoint file", allow=deepspeed_classes(), map_location=map_location)


def initialize(spec: ModelSpec, model: nn.Module, cfg: TrainConfig, world: int):
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    wrapper = LossModule(spec, model)
    engine, *_ = deepspeed.initialize(model=wrapper, model_parameters=wrapper.parameters(),
                                      config=deepspeed_config(cfg, world))
    engine.checkpoint_engine = AllowListedLoads(engine.checkpoint_engine)
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
