"""`neon consolidate`: a DeepSpeed ZeRO 1/2/3 checkpoint -> safetensors, tensor by tensor.

The fp32 master weights are read straight from the partition files (neon_scale.merge.zero: one
parameter's slices at a time) and streamed into `model.safetensors`, or into
`model-0000i-of-0000n.safetensors` shards with `model.safetensors.index.json` when larger than
`--max-shard-size`. Peak memory is about one tensor, not the model. Names are those of the
model's `state_dict()`; the values equal DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`.
With `--ema` the EMA partitions saved beside the checkpoint (train/ema.py, same layout as the
master partitions) are read instead; buffers and frozen parameters are the same either way.
`.<OUT>.lock` beside OUT is held while writing (neon_scale.lock): one writer per OUT.
"""
from __future__ import annotations

import os
import pathlib

from ..console import console, progress
from ..errors import NeonError
from ..lock import hold_output
from .writer import parse_size, staged_output, write_checkpoint
from .zero import ZeroCheckpointSource, is_zero_checkpoint


def consolidate(ckpt_dir: str | os.PathLike, out: str | os.PathLike, *, tag: str | None = None, ema: bool = False,
                dtype: str | None = None, max_shard_size: str = "5GB", overwrite: bool = False) -> int:
    """`neon consolidate` (`max_shard_size` as --max-shard-size, e.g. "500MB"): write with a
    progress bar, print one line; returns the number of shards."""
    ckpt_dir, out = pathlib.Path(ckpt_dir), pathlib.Path(out)
    with progress("consolidate", 1) as bar:
        n = _write_consolidated(ckpt_dir, out, tag=tag, ema=ema, dtype=dtype, max_shard_size=parse_size(max_shard_size),
                                overwrite=overwrite)
        bar.update()
    console.print(f"{ckpt_dir} -> {out} ({n} file{'s' if n > 1 else ''})")
    return n


def _write_consolidated(ckpt_dir: pathlib.Path, out: pathlib.Path, *, tag: str | None, ema: bool, dtype: str | None,
                        max_shard_size: int, overwrite: bool) -> int:
    """Write the consolidated checkpoint; returns the number of shards."""
    if not ckpt_dir.is_dir():
        raise NeonError(f"{ckpt_dir}: no such checkpoint directory")
    if not is_zero_checkpoint(ckpt_dir, tag):
        raise NeonError(f"{ckpt_dir}: not a DeepSpeed ZeRO checkpoint (no 'latest' file{' or tag ' + tag if tag else ''})")
    # one writer per OUT (a second consolidate to it fails at once, naming this one)
    with hold_output(out), ZeroCheckpointSource(ckpt_dir, tag, ema=ema) as source:
        entries = [(key, source.meta(key).cast(dtype)) for key in source.keys()]
        with staged_output(out, overwrite) as staging:
            return write_checkpoint(staging, entries, source.get, max_shard_size,
                                    {"format": "pt", "source": str(ckpt_dir), "weights": "ema" if ema else "master"})

