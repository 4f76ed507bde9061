"""The DeepSpeed JSON of a fine-tuning run: our TrainConfig -> DeepSpeed's config dict, and the
check of a user's own JSON (`train.deepspeed_json`), one line naming the file and key."""
from __future__ import annotations

import difflib
import json
import pathlib

from ..config import Config, TrainConfig
from ..errors import NeonError


def micro_batch_size(cfg: TrainConfig, world: int) -> int:
    per_step = world * cfg.grad_accum
    if cfg.global_batch % per_step:
        raise NeonError(f"train.global_batch={cfg.global_batch} is not divisible by world size {world} x "
                        f"train.grad_accum {cfg.grad_accum}")
    return cfg.global_batch // per_step


# DeepSpeed's own defaults are sized for GPUs with the host memory to spare: a 5e8-element gradient
# bucket (1 GiB in bf16), up to 1e9 gathered parameters kept alive under ZeRO-3, and one optimizer
# sub-group of 1e9 elements (Adam's temporaries are then whole-partition sized: ~3 x 4 bytes x P / W).
# At 675M parameters on 2 CPU ranks these took each rank past 12 GiB during deepspeed.initialize
# and the first step (bench/scale.py); with the values below the step's peak is ~13 bytes per
# parameter per rank (the ZeRO formula's 8 + the EMA's 2 + buffers). A user's deepspeed_json
# overrides any of them.
ZERO_MEMORY = {"reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000}
ZERO3_MEMORY = {"sub_group_size": 50_000_000, "stage3_max_live_parameters": 100_000_000,
                "stage3_max_reuse_distance": 100_000_000, "stage3_prefetch_bucket_size": 50_000_000}


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    zero = {"stage": cfg.zero_stage, **(ZERO_MEMORY if cfg.zero_stage >= 1 else {}),
            **(ZERO3_MEMORY if cfg.zero_stage == 3 else {})}
    ds = {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world),
        "gradient_accumulation_steps": cfg.grad_accum,
        "optimizer": {"type": "AdamW", "params": {
            "lr": cfg.lr, "betas": list(cfg.betas), "weight_decay": cfg.weight_decay,
            "torch_adam": True,  # DeepSpeed's fused Adam is a JIT build; torch's is enough here
        }},
        "zero_optimization": zero,
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
    import deepspeed.runtime.constants as constants  # lazy: loading a config must never import DeepSpeed

    scalars = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str) and v.islower() and " " not in v}
    return scalars | _SECTIONS


def load_user_json(path: str) -> dict:
    """Read a user's DeepSpeed JSON; one line naming the file and key for anything DeepSpeed would
    not understand (top-level keys, and the zero_optimization section via DeepSpeed's own model)."""
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
        # lazy, as above: only a user JSON with a zero_optimization section needs DeepSpeed's model
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


def check_user_json(cfg: Config) -> None:
    """Every trainer's `deepspeed_json` (train, base.train) read and checked, before any stage runs."""
    for t in (cfg.train, cfg.base.train):
        if t is not None and t.deepspeed_json:
            load_user_json(t.deepspeed_json)
