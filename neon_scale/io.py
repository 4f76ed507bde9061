"""Everything that touches disk: atomic writes, JSON, safetensors state dicts.

Writes go to a temporary file in the target's directory and are renamed into place, so a killed
process leaves either the old file or the new one, never a partial one.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import NeonError, name_keys

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; outputs get the usual mode
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike):
    path = pathlib.Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise NeonError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise NeonError(f"{path}: not valid JSON ({e})") from None


def save_state_dict(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


# Where official training checkpoints keep their weights, in the order a weights_key of None
# tries them: DiT's train.py saves {"model", "ema", "opt", "args"} (the EMA is what is sampled).
CONTAINER_KEYS = ("ema", "model_ema", "model", "state_dict", "module")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in obj.items())


def load_torch_checkpoint(path: pathlib.Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """A PyTorch checkpoint (.pt/.pth/.ckpt) read with weights_only=True (argparse.Namespace, which
    official training files store under "args", is allowed). A bare state dict is returned as is;
    a training checkpoint gives its `key` entry, or with key None the first of CONTAINER_KEYS."""
    import argparse

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle/zip errors of many kinds: one line)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NeonError(f"{path}: cannot read PyTorch checkpoint with weights_only=True ({first})") from None
    if key is None and _is_state_dict(obj):
        return obj
    if not isinstance(obj, dict):
        raise NeonError(f"{path}: expected a state dict or a dict of them, got {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise NeonError(f"{path}: no key {key!r} in the checkpoint (it has {sorted(map(str, obj))})")
        chosen = key
    else:
        found = [k for k in CONTAINER_KEYS if k in obj]
        if not found:
            raise NeonError(f"{path}: no state dict in the checkpoint: none of {list(CONTAINER_KEYS)} among its "
                            f"keys {sorted(map(str, obj))[:8]}")
        chosen = found[0]
    if not _is_state_dict(obj[chosen]):
        raise NeonError(f"{path}: entry {chosen!r} is not a state dict of tensors")
    return obj[chosen]


def load_state_dict(path: str | os.PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """Weights from safetensors, or from a PyTorch checkpoint (see load_torch_checkpoint)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise NeonError(f"{path}: weights file not found")
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return load_torch_checkpoint(path, key)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise NeonError(f"{path}: cannot read safetensors file ({e})") from None


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load with one clear line for missing, unexpected or mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise NeonError(f"{source}: missing key {name_keys(missing)}")
    if unexpected:
        raise NeonError(f"{source}: unexpected key {name_keys(unexpected)}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise NeonError(f"{source}: key '{k}' has shape {tuple(state[k].shape)}, the model expects {tuple(v.shape)}")
    module.load_state_dict(state, strict=True)
