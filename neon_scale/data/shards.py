"""Synthetic sets as webdataset shards.

A record holds `__key__`, the sample (`x` -> `.npy`, other tensors -> `<name>.npy`, integer
labels `cls` -> `.cls`) and the sampler settings (`.json`). Shards are written to a temporary
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


def _field_to_ext(name: str) -> str:
    return "npy" if name == "x" else ("cls" if name == "cls" else f"{name}.npy")


def _ext_to_field(ext: str) -> str:
    return "x" if ext == "npy" else ("cls" if ext == "cls" else ext.removesuffix(".npy"))


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
                    record[_field_to_ext(name)] = int(arr[i]) if name == "cls" else np.ascontiguousarray(arr[i])
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


def read_shards(paths: list[pathlib.Path], expected_counts: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Read whole shards into memory (small synthetic sets); one clear error per bad shard."""
    columns: dict[str, list] = {}
    npy = _NpyDecoder()
    for i, path in enumerate(paths):
        if not path.is_file():
            raise NeonError(f"{path}: shard not found")
        count = 0
        try:
            pipeline = wds.WebDataset(str(path), shardshuffle=False, nodesplitter=lambda urls: urls, empty_check=False)
            for record in pipeline:
                for ext, value in record.items():
                    if ext.endswith("npy"):
                        columns.setdefault(_ext_to_field(ext), []).append(npy(value))
                    elif ext == "cls":
                        columns.setdefault("cls", []).append(int(value))
                count += 1
        except NeonError:
            raise
        except Exception as e:  # tarfile / decode errors of every flavour
            raise NeonError(f"{path}: corrupt or truncated shard ({type(e).__name__}: {e})") from None
        if expected_counts is not None and count != expected_counts[i]:
            raise NeonError(f"{path}: corrupt or truncated shard (holds {count} samples, the manifest says {expected_counts[i]})")
    out = {}
    for name, values in columns.items():
        if name == "cls":
            out[name] = torch.tensor(values, dtype=torch.long)
        else:
            out[name] = torch.from_numpy(np.stack(values))
    return out
