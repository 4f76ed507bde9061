"""Lazy, tensor-at-a-time readers of weight files, and the metadata every reader and the writer share.

A source lists keys with shape and dtype without reading data, and `get(key)` reads one tensor:
- `SafetensorsSource`: a `.safetensors` file or a directory of shards with a Hugging Face
  `model.safetensors.index.json` (headers parsed here, tensors read with positioned reads);
- `TorchSource`: a PyTorch `.pt`/`.pth` file (read with weights_only=True and mmap, `key` picks
  a sub-dict).
The DeepSpeed ZeRO reader is zero.py; open.py picks the reader for a path.
"""
from __future__ import annotations

import json
import pathlib
import struct
from dataclasses import dataclass

import torch

from ..errors import NeonError
from ..io import check_keys, check_shapes, load_into, load_state_dict, load_torch_checkpoint

INDEX_NAME = "model.safetensors.index.json"

ST_DTYPES = {  # torch dtype -> safetensors dtype code (read and written)
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


CAST_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype choices


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    def cast(self, dtype: str | None) -> "TensorMeta":
        """The output meta under `--dtype`: float tensors take it, others keep their dtype."""
        if dtype is None or not self.dtype.is_floating_point:
            return self
        return TensorMeta(self.shape, CAST_DTYPES[dtype])

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


class TensorSource:
    """Interface: keys in storage order, metadata without reading data, one tensor per get."""

    name: str

    def keys(self) -> list[str]:
        raise NotImplementedError

    def meta(self, key: str) -> TensorMeta:
        raise NotImplementedError

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SafetensorsSource(TensorSource):
    """A .safetensors file or a directory of shards with an index. Headers are parsed at open
    (a file shorter than its header says is reported then); `get` reads one tensor's bytes with a
    positioned read (no mmap: pages of a whole checkpoint never pile up in resident memory)."""

    def __init__(self, path: pathlib.Path):
        self.name = str(path)
        if path.is_dir():
            index = path / INDEX_NAME
            if not index.is_file():
                raise NeonError(f"{path}: a directory of safetensors needs {INDEX_NAME}")
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise NeonError(f"{index}: not a valid safetensors index ({e})") from None
            files = [path / f for f in dict.fromkeys(weight_map.values())]
        else:
            weight_map, files = None, [path]
        self._entries: dict[str, tuple[pathlib.Path, int, TensorMeta]] = {}
        for fpath in files:
            if not fpath.is_file():
                raise NeonError(f"{fpath}: file not found (listed in {self.name})")
            for key, (offset, meta) in read_header(fpath).items():
                self._entries[key] = (fpath, offset, meta)
        if weight_map is not None:
            missing = [k for k in weight_map if k not in self._entries]
            if missing:
                raise NeonError(f"{self.name}: index lists '{missing[0]}' but its file does not hold it")
            self._keys = list(weight_map)
        else:
            self._keys = list(self._entries)
        self._files: dict[pathlib.Path, object] = {}

    def keys(self) -> list[str]:
        return self._keys

    def meta(self, key: str) -> TensorMeta:
        return self._entries[key][2]

    def get(self, key: str) -> torch.Tensor:
        fpath, offset, meta = self._entries[key]
        if fpath not in self._files:
            self._files[fpath] = open(fpath, "rb")
        out = torch.empty(meta.shape, dtype=meta.dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if meta.nbytes else memoryview(b"")
        f = self._files[fpath]
        f.seek(offset)
        if f.readinto(view) != meta.nbytes:
            raise NeonError(f"{fpath}: truncated while reading '{key}'")
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def load_file_into(module: torch.nn.Module, path: str | pathlib.Path) -> None:
    """`io.load_into(module, io.load_state_dict(path), path)` for our own weights files without a
    second copy of the model in memory: a safetensors file is read a tensor at a time with positioned
    reads (SafetensorsSource: no mmap, whose pages would count as a second model in the process's
    memory) and copied into the module's own tensors. Peak: the model + its largest tensor, not twice
    the model (2.6 GiB less per process for DiT-XL/2). Keys and shapes are all checked first."""
    path = pathlib.Path(path)
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin") or not path.is_file():
        load_into(module, load_state_dict(path), str(path))
        return
    own = module.state_dict()
    with SafetensorsSource(path) as src:
        check_keys(list(own), src.keys(), str(path))
        check_shapes(own, lambda k: src.meta(k).shape, str(path))
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(src.get(k))  # the module's parameter/buffer storage, cast to its dtype


def read_header(fpath: pathlib.Path) -> dict[str, tuple[int, TensorMeta]]:
    """key -> (absolute byte offset, meta). Checked as the safetensors library checks a file: a
    JSON object; known dtypes; shapes of non-negative integers; every tensor's byte range exactly
    numel x itemsize; the ranges sorted, contiguous from 0, not overlapping, and ending exactly at
    the end of the file. A file that fails is one line: merging it would read the wrong bytes."""
    size = fpath.stat().st_size
    try:
        with open(fpath, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            if hlen > size - 8:
                raise ValueError(f"header length {hlen} exceeds the file size {size}")
            header = json.loads(f.read(hlen))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise NeonError(f"{fpath}: not a valid safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise NeonError(f"{fpath}: not a valid safetensors file (the header is not a JSON object)")
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            shape = info["shape"]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (start, stop, *shape)):
                raise ValueError(f"offsets {[start, stop]} and shape {shape} must be non-negative integers")
            meta = TensorMeta(tuple(shape), _dtype_from_st(info["dtype"], fpath))
        except NeonError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise NeonError(f"{fpath}: bad header entry for '{key}' ({e})") from None
        if stop - start != meta.nbytes:
            raise NeonError(f"{fpath}: '{key}' has {stop - start} bytes for shape {meta.shape} {meta.dtype} "
                            f"({meta.nbytes} bytes)")
        spans.append((start, stop, key, meta))
    spans.sort(key=lambda x: (x[0], x[1]))
    out, end = {}, 0
    for start, stop, key, meta in spans:
        if start != end:
            what = "overlaps the tensor before it" if start < end else f"leaves a gap of {start - end} bytes"
            raise NeonError(f"{fpath}: '{key}' at data_offsets [{start}, {stop}] {what}")
        out[key] = (8 + hlen + start, meta)
        end = stop
    if 8 + hlen + end != size:
        raise NeonError(f"{fpath}: {'truncated' if 8 + hlen + end > size else 'trailing bytes in'} safetensors "
                        f"file ({size} bytes, the header describes {8 + hlen + end})")
    return {key: out[key] for key in header if key in out}  # the file's key order


def _dtype_from_st(code: str, fpath) -> torch.dtype:
    for dt, c in ST_DTYPES.items():
        if c == code:
            return dt
    raise NeonError(f"{fpath}: unsupported safetensors dtype {code}")


class TorchSource(TensorSource):
    """A .pt/.pth file, loaded with weights_only=True and mmap (tensors stay on disk until used)."""

    def __init__(self, path: pathlib.Path, key: str | None):
        self.name = str(path)
        self._state = load_torch_checkpoint(path, key, mmap=True)

    def keys(self) -> list[str]:
        return list(self._state)

    def meta(self, key: str) -> TensorMeta:
        t = self._state[key]
        return TensorMeta(tuple(t.shape), t.dtype)

    def get(self, key: str) -> torch.Tensor:
        return self._state[key]
