"""The reader for a path: safetensors (file or indexed directory), PyTorch file, or DeepSpeed
ZeRO checkpoint directory."""
from __future__ import annotations

import os
import pathlib

from ..errors import NeonError
from .sources import INDEX_NAME, SafetensorsSource, TensorSource, TorchSource
from .zero import ZeroCheckpointSource, is_zero_checkpoint


def open_source(path: str | os.PathLike, *, tag: str | None = None, key: str | None = None) -> TensorSource:
    p = pathlib.Path(path)
    if not p.exists():
        raise NeonError(f"{p}: no such file or directory")
    if not os.access(p, os.R_OK):
        raise NeonError(f"{p}: permission denied")
    if p.is_dir():
        if (p / INDEX_NAME).is_file():
            return SafetensorsSource(p)
        if is_zero_checkpoint(p, tag):
            return ZeroCheckpointSource(p, tag)
        raise NeonError(f"{p}: neither a safetensors directory ({INDEX_NAME}) nor a DeepSpeed checkpoint ('latest' or --tag)")
    if p.suffix == ".safetensors":
        return SafetensorsSource(p)
    if p.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return TorchSource(p, key)
    raise NeonError(f"{p}: unknown checkpoint format (expected .safetensors, .pt/.pth, or a directory)")
