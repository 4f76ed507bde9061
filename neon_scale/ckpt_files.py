"""The names of the files in a training checkpoint folder, shared by the trainer (train/) and the
ZeRO reader (merge/zero.py), which must not import each other:

    CKPT/latest                        the tag of the newest complete checkpoint (as DeepSpeed's)
    CKPT/step000250/                   one tag: DeepSpeed's partitions, plus ours:
        trainer-rank00000.json         step, world, data-stream position, MODULE_PREFIX
        ema-rank00000.safetensors      this rank's EMA partition (train/ema.py)
"""
from __future__ import annotations

import pathlib
import re

from .errors import NeonError

LATEST = "latest"
TAG_RE = re.compile(r"step(\d+)")
MODULE_PREFIX = "model."  # the engine wraps the model as `.model` (train/deepspeed_engine.py LossModule); readers strip it


def tag_of(step: int) -> str:
    return f"step{step:06d}"


def trainer_file(tag_dir: pathlib.Path, rank: int) -> pathlib.Path:
    return tag_dir / f"trainer-rank{rank:05d}.json"


def ema_file(tag_dir: pathlib.Path, rank: int) -> pathlib.Path:
    return tag_dir / f"ema-rank{rank:05d}.safetensors"


def untrained_file(tag_dir: pathlib.Path) -> pathlib.Path:
    """The tensors the optimizer does not own (frozen parameters, floating buffers) as built, in
    their own dtype (DeepSpeed saves them cast to the module's bf16/fp16): written by rank 0."""
    return tag_dir / "untrained.safetensors"


def read_latest(ckpt_dir: pathlib.Path) -> str | None:
    """The tag `ckpt_dir/latest` names, None without that file; one line when it cannot be read or
    is empty."""
    latest = ckpt_dir / LATEST
    if not latest.is_file():
        return None
    try:
        tag = latest.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise NeonError(f"{latest}: cannot read ({e})") from None
    if not tag:
        raise NeonError(f"{latest}: empty, expected a checkpoint tag")
    return tag
