"""A streaming safetensors writer, and the output folder it writes into.

The writer knows every output tensor's shape and dtype up front (from the sources' metadata), so
it writes each safetensors header first and then streams tensor bytes in order: one tensor in
memory at a time, shards of at most `max_shard_size` bytes, an index when there are several.
An output is built in a staging folder next to it and swapped in whole (`staged_output`).
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
from typing import Callable, Iterable, Iterator

import torch

from .. import io
from ..errors import NeonError
from .sources import INDEX_NAME, ST_DTYPES, TensorMeta


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
            header[key] = {"dtype": ST_DTYPES[meta.dtype], "shape": list(meta.shape),
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
