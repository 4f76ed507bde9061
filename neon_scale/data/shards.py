"""Synthetic sets as webdataset shards.

A record holds `__key__`, the sample (`x` -> `.npy`, other tensors -> `<name>.npy`, uint8
images `image` [C, H, W] -> `.png`, integer labels `cls` -> `.cls`) and the sampler settings
(`.json`). `decode_record` is the inverse, one record at a time. Shards are written to a temporary
file and renamed, so a shard that exists is complete; a per-set manifest lists shards and counts.
"""
from __future__ import annotations

import io
import json
import pathlib
import time

import numpy as np
import torch
import webdataset as wds

from ..errors import NeonError
from ..io import atomic_path

MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


_SPECIAL = {"x": "npy", "cls": "cls", "image": "png"}


def _field_to_ext(name: str) -> str:
    return _SPECIAL.get(name, f"{name}.npy")


def _ext_to_field(ext: str) -> str:
    return {v: k for k, v in _SPECIAL.items()}.get(ext, ext.removesuffix(".npy"))


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [C, H, W] (C = 1 or 3) -> PNG bytes."""
    from PIL import Image

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise NeonError(f"image: expected uint8 [C, H, W] with C = 1 or 3, got {image.dtype} {list(image.shape)}")
    buf = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 [C, H, W] (grey stays 1 channel, everything else becomes RGB)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img = img if img.mode in ("L", "RGB") else img.convert("RGB")
        arr = np.asarray(img)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()


def write_shard(path: pathlib.Path, samples: dict[str, torch.Tensor], settings: dict, key_prefix: str) -> int:
    n = len(next(iter(samples.values())))
    arrays = {k: v.detach().cpu().numpy() for k, v in samples.items()}
    settings_json = json.dumps(settings).encode()
    # An integer mtime keeps tarfile from adding a pax header to every member (2x faster reads).
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f, wds.TarWriter(f, mtime=int(time.time())) as writer:
            for i in range(n):
                record = {"__key__": f"{key_prefix}-{i:06d}", "json": settings_json}
                for name, arr in arrays.items():
                    if name == "cls":
                        record["cls"] = int(arr[i])
                    elif name == "image":
                        record["png"] = encode_png(arr[i])
                    else:
                        record[_field_to_ext(name)] = np.ascontiguousarray(arr[i])
                writer.write(record)
    return n


class _NpyDecoder:
    """`.npy` bytes -> array. Records of a set share one header; parse it once, then view the
    payload directly (np.load re-parses the header with ast.literal_eval for every record)."""

    def __init__(self):
        self._headers: dict[bytes, tuple[np.dtype, tuple, int]] = {}

    def __call__(self, data: bytes) -> np.ndarray:
        if data[:6] != b"\x93NUMPY":
            raise ValueError("not an .npy payload")
        major = data[6]
        hlen = int.from_bytes(data[8:10], "little") if major == 1 else int.from_bytes(data[8:12], "little")
        offset = (10 if major == 1 else 12) + hlen
        header = data[:offset]
        if header not in self._headers:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
            if arr.dtype.hasobject or not arr.flags.c_contiguous:
                return arr
            self._headers[header] = (arr.dtype, arr.shape, offset)
        dtype, shape, off = self._headers[header]
        return np.frombuffer(data, dtype=dtype, offset=off).reshape(shape)


def decode_record(record: dict, npy: _NpyDecoder) -> dict[str, object]:
    """One webdataset record -> {field: array or int}; raises on a payload that does not decode."""
    out: dict[str, object] = {}
    for ext, value in record.items():
        if ext.startswith("__") or ext == "json":
            continue
        if ext.endswith("npy"):
            out[_ext_to_field(ext)] = npy(value)
        elif ext == "cls":
            out["cls"] = int(value)
        elif ext == "png":
            out["image"] = decode_png(value)
    return out


def read_shard(path: pathlib.Path, expected: int | None = None, skip_bad: bool = False,
               hint: str = "") -> tuple[dict[str, np.ndarray], int, int]:
    """Decode every record of one shard, in order -> (columns {field: stacked array}, number of
    good records, number of bad records). Bad input (unreadable tar, undecodable record, fewer
    records than `expected`) is one error naming the shard, ending with `hint`; with `skip_bad`
    the bad records are skipped and counted instead."""
    import webdataset.tariterators as wti

    records, bad, npy = [], 0, _NpyDecoder()
    try:
        with open(path, "rb") as f:
            files = ({**member, "__url__": str(path)} for member in wti.tar_file_iterator(f))
            for raw in wti.group_by_keys(files):
                if not any(k.endswith(("npy", "png", "cls")) for k in raw):
                    continue  # a record cut off by truncation: the count check below reports it
                try:
                    records.append(decode_record(raw, npy))
                except Exception as e:  # a payload that does not decode
                    if not skip_bad:
                        raise NeonError(f"{path}: bad record {raw.get('__key__')!r} ({type(e).__name__}: {e}){hint}") from None
                    bad += 1
    except NeonError:
        raise
    except FileNotFoundError:
        raise NeonError(f"{path}: shard not found") from None
    except Exception as e:  # tarfile errors of every flavour
        if not skip_bad:
            raise NeonError(f"{path}: corrupt or truncated shard ({type(e).__name__}: {e}){hint}") from None
    missing = 0 if expected is None else expected - len(records) - bad
    if missing > 0:
        if not skip_bad:
            raise NeonError(f"{path}: corrupt or truncated shard (holds {len(records) + bad} samples, the manifest "
                            f"says {expected}){hint}")
        bad += missing
    fields = set(records[0]) if records else set()
    keep = [r for r in records if set(r) == fields]
    if len(keep) < len(records):  # records lacking a field the others have
        if not skip_bad:
            raise NeonError(f"{path}: records with different fields ({sorted(fields)} and others){hint}")
        bad += len(records) - len(keep)
    columns = {name: np.array([r[name] for r in keep], dtype=np.int64) if name == "cls" else np.stack([r[name] for r in keep])
               for name in fields}
    return columns, len(keep), bad


def read_shards(paths: list[pathlib.Path], expected_counts: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Read whole shards into memory (small synthetic sets); one clear error per bad shard."""
    parts = []
    for i, path in enumerate(paths):
        expected = None if expected_counts is None else expected_counts[i]
        columns, count, _ = read_shard(path, expected)
        if expected is not None and count != expected:
            raise NeonError(f"{path}: corrupt or truncated shard (holds {count} samples, the manifest says {expected})")
        parts.append(columns)
    fields = next((p for p in parts if p), {})
    return {name: torch.from_numpy(np.concatenate([p[name] for p in parts if p])) for name in fields}
