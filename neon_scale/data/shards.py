"""Synthetic sets as webdataset shards.

A record holds `__key__`, the sample (`x` -> `.npy`, other tensors -> `<name>.npy`, uint8
images `image` [C, H, W] -> `.png`, integer labels `cls` -> `.cls`) and the sampler settings
(`.json`). `decode_record` is the inverse, one record at a time. Shards are written to a temporary
file and renamed, so a shard that exists is complete; a per-set manifest lists shards and counts,
and the schema every record must match (each field's dtype and shape).
"""
from __future__ import annotations

import io
import json
import pathlib
import time

import numpy as np
import torch
import webdataset as wds
import webdataset.tariterators as wti

from ..errors import NeonError
from ..io import atomic_path, write_json

MANIFEST = "manifest.json"

Schema = dict[str, tuple[np.dtype, tuple[int, ...]]]  # field -> (dtype, shape) of one record's value


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


_SPECIAL = {"x": "npy", "cls": "cls", "image": "png"}


def _field_to_ext(name: str) -> str:
    return _SPECIAL.get(name, f"{name}.npy")


def _ext_to_field(ext: str) -> str:
    return {v: k for k, v in _SPECIAL.items()}.get(ext, ext.removesuffix(".npy"))


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [C, H, W] (C = 1 or 3) -> PNG bytes."""
    from PIL import Image  # lazy: only image sets with PNGs need Pillow

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise NeonError(f"image: expected uint8 [C, H, W] with C = 1 or 3, got {image.dtype} {list(image.shape)}")
    buf = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 [C, H, W] (grey stays 1 channel, everything else becomes RGB)."""
    from PIL import Image  # lazy: only image sets with PNGs need Pillow

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


def decode_record(record: dict, npy: _NpyDecoder) -> dict[str, np.ndarray | np.int64]:
    """One webdataset record -> {field: array or int64}; raises on a payload that does not decode."""
    out: dict[str, np.ndarray | np.int64] = {}
    for ext, value in record.items():
        if ext.startswith("__") or ext == "json":
            continue
        if ext.endswith("npy"):
            field, decoded = _ext_to_field(ext), npy(value)
        elif ext == "cls":
            field, decoded = "cls", np.int64(int(value))  # a label past int64 raises here, not when stacked
        elif ext == "png":
            field, decoded = "image", decode_png(value)
        else:
            continue
        if field in out:  # `cls` and `cls.npy`: which one is the label?
            raise ValueError(f"two payloads for field {field!r}")
        out[field] = decoded
    return out


class BadRecord(ValueError):
    """A record that decodes but does not match its set's schema (or no set's: a string payload)."""


def _layout(dtype: np.dtype, shape: tuple) -> str:
    return f"dtype {dtype} shape {list(shape)}"


def _schema_problem(schema: Schema) -> str | None:
    """Why no set may have this schema (None: one may): every field a numeric array, the label an int64."""
    for name, (dtype, shape) in schema.items():
        if name == "cls" and (dtype != np.int64 or shape != ()):
            return f"field 'cls' has {_layout(dtype, shape)}, expected an integer label"
        if dtype.kind not in "biufc" or min(shape, default=0) < 0:  # strings, objects, records
            return f"field {name!r} has {_layout(dtype, shape)}, expected a numeric array"
    return None


def check_record(record: dict, schema: Schema | None) -> Schema:
    """Raise BadRecord unless `record` has `schema`'s fields, dtypes and shapes (no schema: any
    layout a set may hold) -> the schema, the record's own layout when none was given."""
    if schema is None:
        schema = {name: (value.dtype, value.shape) for name, value in record.items()}
        problem = _schema_problem(schema)
        if problem:
            raise BadRecord(problem)
        return schema
    if record.keys() != schema.keys():
        raise BadRecord(f"fields {sorted(record)}, expected {sorted(schema)}")
    for name, (dtype, shape) in schema.items():
        value = record[name]
        if value.dtype != dtype or value.shape != shape:  # never cast: int64 where float32 is expected is bad
            raise BadRecord(f"field {name!r} has {_layout(value.dtype, value.shape)}, expected {_layout(dtype, shape)}")
    return schema


def _tar_records(path: pathlib.Path):
    """The raw records of one shard, in order; raises as the tar reader does on a bad tar."""
    with open(path, "rb") as f:
        files = ({**member, "__url__": str(path)} for member in wti.tar_file_iterator(f))
        for raw in wti.group_by_keys(files):
            if any(k.endswith(("npy", "png", "cls")) for k in raw):
                yield raw  # else a record cut off by truncation: the manifest count reports it


def first_schema(paths: list[pathlib.Path]) -> Schema | None:
    """The layout of the first good record of the first shard holding one (None: no shard does)."""
    npy = _NpyDecoder()
    for path in paths:
        try:
            for raw in _tar_records(path):
                try:
                    return check_record(decode_record(raw, npy), None)
                except Exception:
                    continue  # a bad record: reading the shard reports it
        except Exception:
            continue  # an unreadable shard: likewise
    return None


def write_manifest(set_dir: pathlib.Path, shards: list[dict], **info) -> None:
    """A set's manifest: `info`, its shards (name, count) and the schema of its records (that of the
    first one: the writer gives every record the same fields, dtypes and shapes)."""
    schema = first_schema([set_dir / s["name"] for s in shards])
    fields = {name: {"dtype": str(dtype), "shape": list(shape)} for name, (dtype, shape) in (schema or {}).items()}
    write_json(set_dir / MANIFEST, {**info, "shards": shards, **({"schema": fields} if fields else {})})


def manifest_schema(set_dir: pathlib.Path, manifest: dict) -> Schema | None:
    """The schema every record of a set must match: the manifest's, or for a manifest written
    before manifests held one, the layout of the set's first good record."""
    if "schema" not in manifest:
        return first_schema([set_dir / s["name"] for s in manifest["shards"]])
    try:
        schema = {str(name): (np.dtype(f["dtype"]), tuple(int(k) for k in f["shape"]))
                  for name, f in manifest["schema"].items()}
    except Exception as e:
        raise NeonError(f"{set_dir / MANIFEST}: 'schema' must map each field to {{dtype, shape}} "
                        f"({type(e).__name__}: {e})") from None
    problem = _schema_problem(schema)
    if problem or not schema:
        raise NeonError(f"{set_dir / MANIFEST}: bad 'schema' ({problem or 'no fields'})")
    return schema


def read_shard(path: pathlib.Path, expected: int | None = None, skip_bad: bool = False,
               hint: str = "", schema: Schema | None = None) -> tuple[dict[str, np.ndarray], int, int]:
    """Decode every record of one shard, in order -> (columns {field: stacked array}, number of
    good records, number of bad records). A good record decodes and matches `schema` (None: the
    layout of the shard's first good record). Bad input (unreadable tar, bad record, fewer records
    than `expected`) is one error naming the shard, ending with `hint`; with `skip_bad` the bad
    records are skipped and counted instead."""
    records, bad, first_bad, npy = [], 0, None, _NpyDecoder()
    try:
        for raw in _tar_records(path):
            try:
                record = decode_record(raw, npy)
                schema = check_record(record, schema)
                records.append(record)
            except Exception as e:  # a payload that does not decode, or does not match the schema
                why = str(e) if isinstance(e, BadRecord) else f"{type(e).__name__}: {e}"
                first_bad = first_bad or f"{path}: bad record {raw.get('__key__')!r} ({why}){hint}"
                bad += 1
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
    if first_bad and not skip_bad:  # reported after the count: truncation also cuts the last record short
        raise NeonError(first_bad)
    # Every record matches the schema, so stacking cannot fail; an empty shard still has typed columns.
    columns = {name: np.stack([r[name] for r in records]) if records else np.empty((0, *shape), dtype)
               for name, (dtype, shape) in (schema or {}).items()}
    return columns, len(records), bad


def read_shards(paths: list[pathlib.Path], expected_counts: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Read whole shards into memory (small synthetic sets); one clear error per bad shard. Every
    record must match the set's first one, so the shards' columns concatenate."""
    parts, schema = [], first_schema(paths)
    for i, path in enumerate(paths):
        expected = None if expected_counts is None else expected_counts[i]
        columns, count, _ = read_shard(path, expected, schema=schema)
        if expected is not None and count != expected:
            raise NeonError(f"{path}: corrupt or truncated shard (holds {count} samples, the manifest says {expected})")
        parts.append(columns)
    fields = next((p for p in parts if p), {})
    return {name: torch.from_numpy(np.concatenate([p[name] for p in parts if p])) for name in fields}
