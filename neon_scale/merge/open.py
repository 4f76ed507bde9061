"""The reader for a path: safetensors (file, indexed directory, or a directory holding the one
`model.safetensors` that `neon merge` / `neon consolidate` write when everything fits one shard),
PyTorch file, or DeepSpeed ZeRO checkpoint directory."""
from __future__ import annotations

import os
import pathlib

from ..errors import NeonError
from .sources import INDEX_NAME, SafetensorsSource, TensorSource, TorchSource
from .writer import shard_file_names
from .zero import ZeroCheckpointSource, is_zero_checkpoint


def open_source(path: str | os.PathLike, *, tag: str | None = None, key: str | None = None,
                ema: bool = False) -> TensorSource:
    """`ema`: a DeepSpeed checkpoint directory's EMA partitions (train/ema.py) instead of its fp32
    master weights; any other source is one line (its weights are what the file holds)."""
    p = pathlib.Path(path)
    if not p.exists():
        raise NeonError(f"{p}: no such file or directory")
    if not os.access(p, os.R_OK):
        raise NeonError(f"{p}: permission denied")
    if ema and not (p.is_dir() and is_zero_checkpoint(p, tag)):
        raise NeonError(f"{p}: --ema reads a DeepSpeed checkpoint directory's EMA partitions; this is not one "
                        f"(its weights are whatever it holds)")
    if p.is_dir():
        if (p / INDEX_NAME).is_file():
            return SafetensorsSource(p)
        single = p / shard_file_names(1)[0]  # one shard: the writers write no index
        if single.is_file():
            return SafetensorsSource(single)
        if is_zero_checkpoint(p, tag):
            return ZeroCheckpointSource(p, tag, ema=ema)
        raise NeonError(f"{p}: neither a safetensors directory ({INDEX_NAME} or {shard_file_names(1)[0]}) nor a DeepSpeed checkpoint ('latest' or --tag)")
    if p.suffix == ".safetensors":
        return SafetensorsSource(p)
    if p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return TorchSource(p, key)
    raise NeonError(f"{p}: unknown checkpoint format (expected .safetensors, .pt/.pth, or a directory)")
