"""Everything that touches disk: atomic writes, JSON, safetensors state dicts, the one torch.load.

Writes go to a temporary file in the target's directory and are renamed into place, so a killed
process leaves either the old file or the new one, never a partial one. The temporary names are
`.<name>.*.tmp` (files) and `.<name>.partial-*` / `.<name>.old-*` (directories); `remove_stale`
deletes those a killed process left behind. Outputs get the mode the umask gives, whoever
created them. A full disk is one line naming the file.

Every PyTorch file is read by `torch_load`: `weights_only=True` with an explicit allow-list of
classes, so no pickle executes; a file that needs another class is one line naming the file and
the class. `trust_pickles()` (`--trust-pickles`, config `trust_pickles: true`) lifts it.

Weights go into a model through `load_into` / `check_keys`: a missing key or a wrong shape is an
error; a key the model does not have is an error in our own files and a warning in official,
released files (as the official loaders accept them), unless `strict_keys()` (`--strict`, config
`strict_keys: true`).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import pathlib
import pickle
import re
import shutil
import tempfile
import time
from typing import Iterator

import torch
from rich.markup import escape
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .console import log
from .errors import DISK_FULL, NeonError, name_keys

_UMASK = os.umask(0)
os.umask(_UMASK)


_STARTED = time.time()  # temp files older than this process belong to killed ones


def file_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """Give `path` the mode the umask gives (mkstemp/mkdtemp and some writers make it private)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_UMASK)


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike) -> Iterator[None]:
    """A full disk (or quota) inside the block: one line naming `path`, not a bare errno."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise NeonError(f"{path}: no space left on device ({os.strerror(e.errno)}) while writing") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary path next to `path`; rename it onto `path` if the block succeeds."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp)
    try:
        with disk_errors(path):
            yield tmp
        file_mode(tmp)  # after the write: a writer that replaces the file (safetensors) resets the mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _aside_name(out: pathlib.Path) -> pathlib.Path:
    return out.parent / f".{out.name}.old-{os.getpid()}-{time.time_ns()}"


def _set_aside(out: pathlib.Path) -> list[pathlib.Path]:
    return sorted((p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.old-")),
                  key=lambda p: p.lstat().st_mtime)


def _remove(p: pathlib.Path) -> None:
    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or the filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(staging: pathlib.Path, out: pathlib.Path) -> None:
    """Put the complete `staging` in place of `out`; `out` is the old or the new output at every
    instant. Old and new are exchanged in one atomic step, then the old (now at `staging`) is
    removed; where the filesystem cannot exchange, the old is set aside (`.OUT.old-*`), the new
    renamed in and the old removed, and a kill between the renames is undone by `restore_dir`."""
    if not (out.exists() or out.is_symlink()):
        os.replace(staging, out)
        return
    if _exchange(staging, out):
        _remove(staging)
        return
    old = _aside_name(out)
    os.replace(out, old)
    os.replace(staging, out)
    _remove(old)


def restore_dir(out: pathlib.Path) -> None:
    """Finish a swap a kill interrupted: the old output set aside comes back when `out` is missing;
    copies set aside are dropped when `out` is there."""
    if not out.parent.is_dir():
        return
    aside = _set_aside(out)
    if aside and not (out.exists() or out.is_symlink()):
        os.replace(aside.pop(), out)
    for p in aside:
        _remove(p)


# ours (`.<name>.*.tmp`, `.<name>.partial-*`) and the safetensors library's own (`.tmp` + 6
# characters: it writes there and renames onto the path it is given)
_STALE = re.compile(r"\..+\.(.+\.tmp|partial-.+)|\.tmp[A-Za-z0-9]{6}")


def remove_stale(directory: str | os.PathLike, recursive: bool = True, of: str | None = None) -> int:
    """Delete temporary files and partial directories of our naming patterns under `directory`
    (only those of the output named `of`, when given) that are older than this process: a killed
    writer's leftovers (a live writer's are newer). Returns how many were removed."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return 0
    removed = 0
    for root, dirs, files in os.walk(directory):
        for name in [*files, *dirs]:
            p = pathlib.Path(root, name)
            if not _STALE.fullmatch(name) or (of is not None and not name.startswith(f".{of}.")):
                continue
            if name.endswith(".lock"):  # a writer's lock (neon_scale.lock; `.<x.partial-y>.lock` fits the pattern)
                continue
            try:
                if p.lstat().st_mtime >= _STARTED:
                    continue
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                removed += 1
            except FileNotFoundError:  # another rank removed it first
                continue
            if name in dirs:
                dirs.remove(name)
        if not recursive:
            break
    return removed


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj) -> None:
    """Strict JSON: a NaN or inf inside is an error naming the file, never a bare `NaN` token."""
    bad = _non_finite(obj)
    if bad is not None:
        raise NeonError(f"{path}: '{bad}' is not a finite number; not written")
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def _non_finite(obj, where: str = "") -> str | None:
    """The dotted key of the first non-finite float in `obj`, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where or "value"
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        found = _non_finite(v, f"{where}.{k}" if where else str(k))
        if found is not None:
            return found
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, read in 16 MiB blocks (provenance of merged models)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


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
# the EMA is taken (what is sampled), and one line names it and the others.
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
            if len(candidates) > 1:  # never silently: say which one and what else is there
                others = ", ".join(repr(k) for k in candidates[1:])
                log(escape(f"{path}: took the state dict {candidates[0]!r} (the EMA); also holds {others} "
                           f"(pick one with a key: --key / --base-key / --self-key, base.weights_key)"))
            return obj[candidates[0]]
        if len(candidates) > 1:
            raise NeonError(f"{path}: several state dicts {candidates}; pick one with a key")
        others = sorted(k for k, v in obj.items() if _is_state_dict(v))
        raise NeonError(f"{path}: no state dict found; candidates for a key: {others}")
    raise NeonError(f"{path}: not a state dict (a {type(obj).__name__})")


_TRUSTED = False
TRUST_HINT = "pickles are never executed unless you trust the file: --trust-pickles / trust_pickles: true"


def trust_pickles(on: bool = True) -> None:
    """Let `torch_load` unpickle anything (the user's opt-in for files they made themselves)."""
    global _TRUSTED
    _TRUSTED = on


def torch_load(path: str | os.PathLike, what: str = "PyTorch file", allow: tuple = (), mmap: bool = False,
               map_location="cpu"):
    """The package's one torch.load: weights_only=True with `allow` (classes the file format is
    known to hold, none with a custom __reduce__) plus argparse.Namespace (official training files
    keep their args in one). Anything else is one line naming the file and the class; so is a
    missing file (or a folder), named as `what`."""
    if not pathlib.Path(path).is_file():
        raise NeonError(f"{path}: {what} not found")
    if _TRUSTED:
        return torch.load(str(path), map_location=map_location, weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *allow]):
            return torch.load(str(path), map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:  # the weights-only unpickler refused a class: that is the pickle we will not run
            raise NeonError(f"{path}: {what} needs '{found[1]}', which is not on the allow-list ({TRUST_HINT})") from None
        raise NeonError(f"{path}: cannot read {what} ({_first_line(e)})") from None
    except FileNotFoundError:
        raise NeonError(f"{path}: {what} not found") from None
    except Exception as e:  # noqa: BLE001  (zip / storage errors of every flavour: one line)
        raise NeonError(f"{path}: cannot read {what}, truncated or corrupt? ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def load_torch_checkpoint(path: pathlib.Path, key: str | None = None, mmap: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a PyTorch checkpoint (.pt/.pth/.ckpt/.bin), read by `torch_load`."""
    return pick_state_dict(torch_load(path, "PyTorch checkpoint", mmap=mmap), key, path)


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


_STRICT_KEYS = False
STRICT_HINT = "--strict / strict_keys: true"


def strict_keys(on: bool = True) -> None:
    """Refuse official files that carry keys the model does not have (`--strict`, config
    `strict_keys: true`); by default they load with one warning line (see `check_keys`)."""
    global _STRICT_KEYS
    _STRICT_KEYS = on


def check_keys(expected: list[str], found: list[str], source: str, official: bool = False) -> list[str]:
    """Compare a file's keys (`found`, file order) with the model's (`expected`, model order).

    A key the model needs and the file lacks is an error naming the first (and how many). A key the
    file has and the model does not: for our own files an error; for an official, released file
    (`official=True`: DiT/xAR weights, kl16.ckpt, the SD VAE, Inception, DINOv2) one warning line
    with their count and the first names, as the official loaders (MAR's `load_state_dict(...,
    strict=False)`) accept such files; an error under `strict_keys()`. Returns the extra keys."""
    want, have = set(expected), set(found)
    missing = [k for k in expected if k not in have]
    if missing:
        raise NeonError(f"{source}: missing key {name_keys(missing)}")
    extra = [k for k in found if k not in want]
    if extra and not official:
        raise NeonError(f"{source}: unexpected key {name_keys(extra)}")
    if extra and _STRICT_KEYS:
        raise NeonError(f"{source}: unexpected key {name_keys(extra)} the model does not have (refused: {STRICT_HINT}; "
                        "without it such keys are ignored with a warning)")
    if extra:
        names = ", ".join(f"'{k}'" for k in extra[:3]) + (", ..." if len(extra) > 3 else "")
        log("[yellow]warning:[/] " + escape(f"{source}: ignored {len(extra)} key(s) the model does not have: {names} "
                                           f"({STRICT_HINT} refuses such files)"))
    return extra


def check_shapes(own: dict[str, torch.Tensor], shape_of, source: str) -> None:
    """One line for the first of the model's tensors (`own`) whose shape in the file (`shape_of(key)`)
    differs."""
    for k, v in own.items():
        if tuple(shape_of(k)) != tuple(v.shape):
            raise NeonError(f"{source}: key '{k}' has shape {tuple(shape_of(k))}, the model expects {tuple(v.shape)}")


def load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
              official: bool = False) -> dict[str, torch.Tensor]:
    """Load with one clear line for a missing or mis-shaped key; an unexpected key is an error for
    our own files and, for an official file (`official=True`), a warning unless `strict_keys()`
    (see `check_keys`). Returns the state dict loaded: `state` without the ignored keys."""
    own = module.state_dict()
    extra = set(check_keys(list(own), list(state), source, official))
    if extra:
        state = {k: v for k, v in state.items() if k not in extra}
    check_shapes(own, lambda k: state[k].shape, source)
    module.load_state_dict(state, strict=True)
    return state
