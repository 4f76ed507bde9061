"""Lazy, tensor-at-a-time access to checkpoints, and a streaming safetensors writer.

Sources (`open_source`): a `.safetensors` file or a directory of shards with a Hugging Face
`model.safetensors.index.json` (headers parsed here, tensors read with positioned reads); a PyTorch `.pt`/`.pth` file (read with weights_only=True and
mmap, `key` picks a sub-dict); a DeepSpeed checkpoint directory (ZeRO 1/2/3 fp32 master
partitions, see zero.py). A source lists keys with shape and dtype without reading data, and
`get(key)` reads one tensor.

The writer knows every output tensor's shape and dtype up front (from the sources' metadata), so
it writes each safetensors header first and then streams tensor bytes in order: one tensor in
memory at a time, shards of at most `max_shard_size` bytes, an index when there are several.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from ..errors import NeonError
from .. import io
from ..io import load_torch_checkpoint

INDEX_NAME = "model.safetensors.index.json"

_ST_DTYPES = {
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
            for key, (offset, meta) in _read_header(fpath).items():
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


def _read_header(fpath: pathlib.Path) -> dict[str, tuple[int, TensorMeta]]:
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
    for dt, c in _ST_DTYPES.items():
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


def open_source(path: str | os.PathLike, *, tag: str | None = None, key: str | None = None) -> TensorSource:
    p = pathlib.Path(path)
    if not p.exists():
        raise NeonError(f"{p}: no such file or directory")
    if not os.access(p, os.R_OK):
        raise NeonError(f"{p}: permission denied")
    if p.is_dir():
        if (p / INDEX_NAME).is_file():
            return SafetensorsSource(p)
        from .zero import ZeroCheckpointSource, is_zero_checkpoint

        if is_zero_checkpoint(p, tag):
            return ZeroCheckpointSource(p, tag)
        raise NeonError(f"{p}: neither a safetensors directory ({INDEX_NAME}) nor a DeepSpeed checkpoint ('latest' or --tag)")
    if p.suffix == ".safetensors":
        return SafetensorsSource(p)
    if p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return TorchSource(p, key)
    raise NeonError(f"{p}: unknown checkpoint format (expected .safetensors, .pt/.pth, or a directory)")


# ---------------------------------------------------------------------------------- writing

def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise NeonError(f"--max-shard-size {text!r}: expected a size such as 5GB or 500MB")
    unit = m.group(2).upper().rstrip("B").rstrip("I")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[unit]
    if "I" in m.group(2).upper():
        scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit]
    return int(float(m.group(1)) * scale)


def plan_shards(entries: list[tuple[str, TensorMeta]], max_shard_size: int) -> list[list[tuple[str, TensorMeta]]]:
    """Consecutive keys grouped into shards of at most max_shard_size bytes (a larger tensor
    gets a shard of its own)."""
    shards: list[list[tuple[str, TensorMeta]]] = [[]]
    size = 0
    for key, meta in entries:
        if shards[-1] and size + meta.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append((key, meta))
        size += meta.nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class StreamingSafetensorsWriter:
    """Writes one safetensors file whose header is known in advance, tensor by tensor, in order."""

    def __init__(self, path: pathlib.Path, entries: list[tuple[str, TensorMeta]], metadata: dict | None = None):
        self.path, self.entries = path, entries
        header: dict = {}
        offset = 0
        for key, meta in entries:
            header[key] = {"dtype": _ST_DTYPES[meta.dtype], "shape": list(meta.shape),
                           "data_offsets": [offset, offset + meta.nbytes]}
            offset += meta.nbytes
        if metadata:
            header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0
        self._pending = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append one whole tensor (the next in header order)."""
        self.write_bytes(tensor.to(self.entries[self._next][1].dtype))
        self.end_tensor(key)

    def write_bytes(self, part: torch.Tensor) -> None:
        """Append part of the current tensor (flat chunks, in order)."""
        t = part.detach().contiguous().cpu()
        if t.numel():
            self._file.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            self._pending += t.numel() * t.element_size()

    def end_tensor(self, key: str) -> None:
        want_key, meta = self.entries[self._next]
        if key != want_key or self._pending != meta.nbytes:
            raise RuntimeError(f"{self.path}: wrote {self._pending} bytes for '{key}', the header says "
                               f"{meta.nbytes} bytes for '{want_key}'")
        self._next += 1
        self._pending = 0

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
        if self._next != len(self.entries):
            raise RuntimeError(f"{self.path}: {len(self.entries) - self._next} tensors were not written")


def write_index(directory: pathlib.Path, shards: list[list[tuple[str, TensorMeta]]], names: Iterable[str]) -> None:
    weight_map = {key: name for shard, name in zip(shards, names) for key, _ in shard}
    total = sum(meta.nbytes for shard in shards for _, meta in shard)
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def check_output(out: pathlib.Path, overwrite: bool) -> None:
    """Settle what a killed earlier write left next to `out` (an interrupted swap is finished,
    stale partial folders removed), then refuse an existing `out` unless `overwrite`."""
    if out.parent.is_dir():
        io.restore_dir(out)
        io.remove_stale(out.parent, recursive=False, of=out.name)
    if out.exists() and not overwrite:
        raise NeonError(f"{out}: already exists (use --overwrite to replace it)")


@contextlib.contextmanager
def staged_output(out: pathlib.Path, overwrite: bool) -> Iterator[pathlib.Path]:
    """A staging directory next to `out`, put in its place if the block succeeds and removed if
    not: a failed or killed write never leaves a partial OUT, and `--overwrite` keeps the old OUT
    until the new one is complete (io.replace_dir). Leftovers of a killed earlier run (a swap cut
    short, partial directories) are settled first."""
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    io.file_mode(staging, directory=True)  # mkdtemp makes it private; OUT gets the usual mode
    try:
        with io.disk_errors(out):
            yield staging
        io.replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_checkpoint(directory: pathlib.Path, entries: list[tuple[str, TensorMeta]], fetch: Callable[[str], torch.Tensor],
                     max_shard_size: int, metadata: dict | None = None, progress=None) -> int:
    """Stream `fetch(key)` for every entry into safetensors shards (+ index when several) in
    `directory`, one tensor in memory at a time. Returns the number of shards."""
    shards = plan_shards(entries, max_shard_size)
    names = shard_file_names(len(shards))
    for shard, name in zip(shards, names):
        writer = StreamingSafetensorsWriter(directory / name, shard, metadata)
        for key, meta in shard:
            writer.write(key, fetch(key))
            if progress is not None:
                progress.update(advance=meta.nbytes)
        writer.close()
    if len(shards) > 1:
        write_index(directory, shards, names)
    return len(shards)
