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


# Sub-dicts of training checkpoints that may hold the weights. DiT's train.py saves
# {"model", "ema", "opt", "args"}, MAR/xAR's {"model", "model_ema", ...}; when several are present
# the EMA is taken (what is sampled).
CONTAINER_KEYS = ("ema", "model_ema", "model", "state_dict", "module")
EMA_KEYS = ("ema", "model_ema")


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def pick_state_dict(obj, key: str | None, path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: `obj` itself, its `key` entry, the only one of
    CONTAINER_KEYS that holds tensors, or the EMA when it is among several; otherwise one line."""
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            found = sorted(k for k, v in obj.items() if isinstance(v, dict)) if isinstance(obj, dict) else []
            raise NeonError(f"{path}: no sub-dict key {key!r}; candidates: {found}")
        if not _is_state_dict(obj[key]):
            raise NeonError(f"{path}: key {key!r} is not a dict of tensors")
        return obj[key]
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        candidates = [k for k in CONTAINER_KEYS if _is_state_dict(obj.get(k))]
        if candidates and (len(candidates) == 1 or candidates[0] in EMA_KEYS):
            return obj[candidates[0]]
        if len(candidates) > 1:
            raise NeonError(f"{path}: several state dicts {candidates}; pick one with a key")
        others = sorted(k for k, v in obj.items() if _is_state_dict(v))
        raise NeonError(f"{path}: no state dict found; candidates for a key: {others}")
    raise NeonError(f"{path}: not a state dict (a {type(obj).__name__})")


def load_torch_checkpoint(path: pathlib.Path, key: str | None = None, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a PyTorch checkpoint (.pt/.pth/.ckpt/.bin) read with weights_only=True
    (argparse.Namespace, which official training files keep under "args", is allowed)."""
    import argparse

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001  (pickle / zip errors of every flavour: one line)
        first = (str(e).strip().splitlines() or [""])[0]
        raise NeonError(f"{path}: cannot read PyTorch file with weights_only=True ({type(e).__name__}: {first})") from None
    return pick_state_dict(obj, key, path)


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
