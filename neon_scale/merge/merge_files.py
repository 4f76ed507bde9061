"""`neon merge`: stream theta_r + w (theta_r - theta_s) from two checkpoints to safetensors.

One read of the inputs serves every w: tensors are read one pair at a time (lazily: safetensors
`safe_open`, mmap for torch and DeepSpeed files), merged in flat chunks of at most CHUNK bytes
and appended to one streaming writer per w. Resident memory is about the base tensor + the
theta_s tensor + one chunk, whatever the model size. Outputs are built in a temporary directory
next to OUT and renamed into place at the end; on any error nothing is left behind. One writer per
OUT: `.<OUT>.lock` beside it is held for the whole merge (neon_scale.lock), so a second merge
to the same OUT fails at once, naming the first.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from dataclasses import dataclass, field

import torch
from rich.markup import escape
from rich.table import Table

from neon_scale.kernels.reference import has_only_finite

from ..console import console, progress
from ..errors import NeonError
from ..io import file_sha256, write_json
from ..lock import hold_output
from .extrapolate import MERGE, MergeReport, action_for, check_keys, extrapolate_tensor
from .open import open_source
from .sources import TensorSource
from .writer import (
    StreamingSafetensorsWriter,
    check_output,
    parse_size,
    plan_shards,
    shard_file_names,
    staged_output,
    write_index,
)

CHUNK_BYTES = 4 << 20
PROVENANCE = "provenance.json"  # beside the shards of every merged model


@dataclass
class MergeSummary(MergeReport):
    # per top-level module: [sum (theta_r - theta_s)^2, sum theta_r^2] in float64
    moved: dict[str, list[float]] = field(default_factory=dict)
    non_finite: dict[str, int] = field(default_factory=dict)  # per top-level module: base elements left out
    outputs: dict[float, pathlib.Path] = field(default_factory=dict)
    bytes_written: int = 0

    def add_norms(self, key: str, base: torch.Tensor, theta_s: torch.Tensor) -> None:
        """Accumulate ||b - s||^2 and ||b||^2 (float64 sums; non-finite base elements left out and
        counted per module)."""
        module = key.split(".")[0]
        if not has_only_finite(base):
            finite = torch.isfinite(base)
            self.non_finite[module] = self.non_finite.get(module, 0) + base.numel() - int(finite.sum())
            base, theta_s = base[finite], theta_s[finite]
        acc = self.moved.setdefault(module, [0.0, 0.0])
        acc[0] += float(torch.linalg.vector_norm(torch.sub(base.float(), theta_s.float()), dtype=torch.float64) ** 2)
        acc[1] += float(torch.linalg.vector_norm(base, dtype=torch.float64) ** 2)

    def relative_moves(self) -> dict[str, float]:
        return {m: math.sqrt(d / n) if n > 0 else float("nan") for m, (d, n) in self.moved.items()}


def w_dir_name(w: float) -> str:
    return f"w={w:g}"


def _chunks(base: torch.Tensor, theta_s: torch.Tensor):
    """Matching flat chunks of at most CHUNK_BYTES (bounded temporaries for huge tensors)."""
    b, s = base.reshape(-1), theta_s.reshape(-1)
    step = max(1, CHUNK_BYTES // max(1, b.element_size()))
    for start in range(0, b.numel(), step):
        yield b[start:start + step], s[start:start + step]


def _merge_chunk(b: torch.Tensor, s: torch.Tensor, w: float, out_dtype: torch.dtype) -> torch.Tensor:
    if out_dtype != b.dtype and b.dtype != torch.float64:  # one rounding: fp32 result -> out dtype
        b, s = b.float(), s.float()
    return extrapolate_tensor(b, s, w).to(out_dtype)


def _merge_tensor(key: str, b: torch.Tensor, s: torch.Tensor, out_dtype: torch.dtype,
                  writers: dict[float, StreamingSafetensorsWriter], summary: MergeSummary) -> None:
    """Chunk by chunk into every writer. A function of its own so that the chunk views (which
    keep both input storages alive) are gone before the next tensor is read. A non-finite result
    from finite inputs (a huge w overflowing the output dtype) stops the merge: nothing is written."""
    for bc, sc in _chunks(b, s):
        summary.add_norms(key, bc, sc)
        summary.count_non_finite(bc)
        finite_in = has_only_finite(bc) and has_only_finite(sc)
        for w, writer in writers.items():
            merged = _merge_chunk(bc, sc, w, out_dtype)
            if finite_in and not has_only_finite(merged):
                raise NeonError(f"merge: --w {w:g} overflows {out_dtype} in '{key}' (theta_r + w (theta_r - theta_s) "
                                f"is not finite); nothing written")
            writer.write_bytes(merged)
    for writer in writers.values():
        writer.end_tensor(key)


def merge_checkpoints(base: TensorSource, theta_s: TensorSource, ws: list[float], out: pathlib.Path, *,
                      max_shard_size: int = 5 * 10**9, dtype: str | None = None, overwrite: bool = False,
                      progress=None, provenance: dict | None = None) -> MergeSummary:
    """Write one safetensors checkpoint per w (OUT itself for one w, OUT/w=<w>/ for several).
    `provenance` (JSON-able; where the inputs came from, what chose w) goes, with w, into every
    shard's metadata (`neon_provenance`) and PROVENANCE beside the shards."""
    if not ws:
        raise NeonError("merge: give at least one --w")
    for w in ws:
        if not math.isfinite(w):
            raise NeonError(f"merge: --w {w}: not a finite number")
    names = [w_dir_name(w) for w in ws]
    if len(set(names)) != len(names):  # OUT/w=<w>/ names round to 6 digits: two writers, one folder
        raise NeonError(f"merge: repeated --w values {ws} (output folders {names})")
    # One writer per OUT, before anything next to OUT is touched (check_output settles leftovers)
    with hold_output(out):
        return _merge_locked(base, theta_s, ws, out, max_shard_size=max_shard_size, dtype=dtype, overwrite=overwrite,
                             progress=progress, provenance=provenance or {})


def _merge_locked(base: TensorSource, theta_s: TensorSource, ws: list[float], out: pathlib.Path, *,
                  max_shard_size: int, dtype: str | None, overwrite: bool, progress, provenance: dict) -> MergeSummary:
    check_output(out, overwrite)  # again by staged_output; early here, before any reading
    base_keys, theta_s_keys = base.keys(), theta_s.keys()
    check_keys(base_keys, theta_s_keys)
    theta_s_set = set(theta_s_keys)
    summary = MergeSummary()
    entries, actions = [], {}
    for key in base_keys:
        bm = base.meta(key)
        sm = theta_s.meta(key) if key in theta_s_set else None
        actions[key] = action_for(key, bm.shape, bm.dtype, None if sm is None else sm.shape, None if sm is None else sm.dtype)
        entries.append((key, bm.cast(dtype)))
    shards = plan_shards(entries, max_shard_size)
    names = shard_file_names(len(shards))

    with staged_output(out, overwrite) as staging:
        dirs = {w: staging if len(ws) == 1 else staging / w_dir_name(w) for w in ws}
        shard_meta = {w: {"format": "pt", "neon_w": w,
                    "neon_provenance": json.dumps({**provenance, "w": w}, sort_keys=True)} for w in ws}
        for w, d in dirs.items():
            d.mkdir(parents=True, exist_ok=True)
            write_json(d / PROVENANCE, {**provenance, "w": w})
        for shard, name in zip(shards, names):
            writers = {w: StreamingSafetensorsWriter(dirs[w] / name, shard, shard_meta[w]) for w in ws}
            for key, meta in shard:
                b = base.get(key)
                action = actions[key]
                if action == MERGE:
                    _merge_tensor(key, b, theta_s.get(key), meta.dtype, writers, summary)
                else:
                    for writer in writers.values():
                        writer.write(key, b)
                summary.record(key, action)
                summary.bytes_written += meta.nbytes * len(ws)
                del b
                if progress is not None:
                    progress.update(advance=meta.nbytes)
            for writer in writers.values():
                writer.close()
        if len(shards) > 1:
            for d in dirs.values():
                write_index(d, shards, names)
    summary.outputs = {w: out if len(ws) == 1 else out / w_dir_name(w) for w in ws}
    return summary


def input_provenance(base: str | os.PathLike, theta_s: str | os.PathLike, *, base_tag: str | None = None,
                     theta_s_tag: str | None = None, base_key: str | None = None, theta_s_key: str | None = None,
                     theta_s_ema: bool = False) -> dict:
    """Where a merge's inputs came from: paths (absolute), the SHA-256 of each input that is one
    file, the DeepSpeed tags, .pt sub-dict keys and whether theta_s is a DeepSpeed EMA."""
    out = {}
    for name, path, tag, key in (("base", base, base_tag, base_key), ("theta_s", theta_s, theta_s_tag, theta_s_key)):
        p = pathlib.Path(path)
        out[name] = str(p.resolve())
        if p.is_file():
            out[f"{name}_sha256"] = file_sha256(p)
        if tag is not None:
            out[f"{name}_tag"] = tag
        if key is not None:
            out[f"{name}_key"] = key
    if theta_s_ema:
        out["theta_s_weights"] = "ema"
    return out


def merge(base: str | os.PathLike, theta_s: str | os.PathLike, ws: list[float], out: str | os.PathLike, *,
          base_tag: str | None = None, theta_s_tag: str | None = None, base_key: str | None = None,
          theta_s_key: str | None = None, theta_s_ema: bool = False, max_shard_size: str = "5GB",
          dtype: str | None = None, overwrite: bool = False, provenance: dict | None = None) -> MergeSummary:
    """`neon merge`: open both checkpoints (tags and sub-dict keys as --base-tag/--self-tag,
    --base-key/--self-key; `theta_s_ema` as --ema: a DeepSpeed directory's EMA; `max_shard_size`
    as --max-shard-size, e.g. "500MB"), merge with a progress bar, print the summary. The outputs
    record the inputs' provenance (input_provenance) and `provenance`."""
    shard_bytes = parse_size(max_shard_size)
    with open_source(base, tag=base_tag, key=base_key) as base_src, \
            open_source(theta_s, tag=theta_s_tag, key=theta_s_key, ema=theta_s_ema) as theta_s_src:
        record = {**input_provenance(base, theta_s, base_tag=base_tag, theta_s_tag=theta_s_tag, base_key=base_key,
                                     theta_s_key=theta_s_key, theta_s_ema=theta_s_ema), **(provenance or {})}
        total = sum(base_src.meta(k).nbytes for k in base_src.keys())
        with progress("merge", total) as bar:
            summary = merge_checkpoints(base_src, theta_s_src, ws, pathlib.Path(out), max_shard_size=shard_bytes,
                                        dtype=dtype, overwrite=overwrite, progress=bar, provenance=record)
    _print_summary(summary, theta_s)
    return summary


def _move_note(summary: MergeSummary, module: str) -> str:
    """Why a module's relative move reads as it does: ||theta_r|| = 0 (no ratio) and non-finite
    base elements (left out of both norms, kept as they are in theta_r)."""
    notes = []
    if summary.moved[module][1] == 0:
        notes.append("||theta_r|| = 0, no ratio (a zero-initialised layer, e.g. DiT's final layer)"
                     if module not in summary.non_finite else "||theta_r|| = 0 over its finite elements, no ratio")
    if module in summary.non_finite:
        notes.append(f"{summary.non_finite[module]} non-finite base elements (e.g. -inf in an attention mask) left "
                     f"out, kept as in theta_r")
    return "; ".join(notes)


def _print_summary(summary: MergeSummary, theta_s: str | os.PathLike) -> None:
    """The counts, the relative move per top-level module (a `note` column says why a move is n/a
    or what it leaves out) and the outputs. Complete in a log: the console draws tables whole
    without a terminal, and folds long cells in one."""
    for key in summary.missing_in_theta_s:
        console.print(f"[yellow]warning:[/] '{escape(key)}' is not in {escape(str(theta_s))}: copied from the base")
    console.print(f"merged {summary.merged} tensors; copied {len(summary.copied_non_float)} non-float and "
                  f"{len(summary.missing_in_theta_s)} missing from theta_s; {summary.non_finite_elements} non-finite "
                  f"base elements kept; {summary.bytes_written / 1e9:.3f} GB written")
    table = Table(title="how far self-training moved each module: ||theta_r - theta_s|| / ||theta_r||")
    notes = {m: _move_note(summary, m) for m in summary.moved}
    for col, justify in (("module", "left"), ("relative move", "right"), ("||theta_r - theta_s||", "right"),
                         ("note", "left")):
        if col != "note" or any(notes.values()):
            table.add_column(col, justify=justify, overflow="fold")
    for module, move in summary.relative_moves().items():
        absolute = math.sqrt(summary.moved[module][0])
        cells = [escape(module), "n/a" if math.isnan(move) else f"{move:.3e}", f"{absolute:.3e}"]
        table.add_row(*cells, *([escape(notes[module])] if any(notes.values()) else []))
    console.print(table)
    for w, path in summary.outputs.items():
        console.print(f"w = {w:g} -> {escape(str(path))}")
