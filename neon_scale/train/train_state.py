"""Resumable training checkpoints: DeepSpeed's own format, plus per-rank files we add to the tag
(their names: neon_scale/ckpt_files.py).

    CKPT/latest                       the tag of the newest complete checkpoint (as DeepSpeed's)
    CKPT/step000250/...               DeepSpeed's model and optimizer partitions
    CKPT/step000250/ema-rank*.safetensors     this rank's EMA partition (train/ema.py)
    CKPT/step000250/trainer-rank*.json        step, data-stream positions, the name prefix of
                                              the model inside the engine (readers strip it)

A checkpoint written by N ranks resumes on M ranks: with the same count DeepSpeed loads its own
partitions; with another, train/reshard.py re-partitions them (the trainer state is global).

A save writes the whole tag directory on every rank, waits for all of them, and only then
replaces `latest` (rank 0, temp file + rename). A kill at any moment leaves `latest` naming a
complete checkpoint; the partial directory is removed on resume. Only the newest `keep_last`
tags are kept.
"""
from __future__ import annotations

import pathlib
import shutil

from .. import dist
from ..ckpt_files import LATEST, MODULE_PREFIX, TAG_RE, read_latest, tag_of, trainer_file, untrained_file
from ..errors import DISK_FULL, NeonError, first_line
from ..io import read_json, save_state_dict, write_json, write_text
from .reshard import load_resharded

def _tags(ckpt_dir: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    if not ckpt_dir.is_dir():
        return []
    return sorted((int(m[1]), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := TAG_RE.fullmatch(p.name)))


def latest_tag(ckpt_dir: pathlib.Path) -> str | None:
    tag = read_latest(ckpt_dir)
    if tag is not None and not (ckpt_dir / tag).is_dir():
        raise NeonError(f"{ckpt_dir / LATEST}: names '{tag}', which is not a directory of {ckpt_dir}")
    return tag


def _save_failure(tag_dir: pathlib.Path, e: Exception) -> str:
    """One line for a DeepSpeed save that failed; a full disk said as such."""
    free = shutil.disk_usage(tag_dir.parent).free
    full = isinstance(e, OSError) and e.errno in DISK_FULL
    detail = first_line(e)
    if full or free < (1 << 20):
        return f"{tag_dir}: no space left on device while DeepSpeed saved the checkpoint ({free} bytes free)"
    return f"{tag_dir}: DeepSpeed could not save the checkpoint ({type(e).__name__}: {detail})"


def save(engine, ckpt_dir: pathlib.Path, step: int, trainer_state: dict, ema=None, keep_last: int = 2) -> None:
    """Write checkpoint `step` (collective), then point `latest` at it and drop old tags."""
    tag = tag_of(step)
    tag_dir = ckpt_dir / tag
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    except Exception as e:  # noqa: BLE001  (torch's zip writer hides ENOSPC behind "unexpected pos")
        raise NeonError(_save_failure(tag_dir, e)) from None
    if ema is not None:
        ema.save(tag_dir)
    untrained = getattr(engine, "neon_untrained", None)
    if untrained and dist.is_main():
        save_state_dict(untrained_file(tag_dir), {k: v.contiguous() for k, v in untrained.items()})
    write_json(trainer_file(tag_dir, dist.rank()), {**trainer_state, "step": step, "world": dist.world(),
                                                    "module_prefix": MODULE_PREFIX})
    dist.barrier()  # every rank's files are on disk
    if dist.is_main():
        write_text(ckpt_dir / "latest", tag)
        for _, path in _tags(ckpt_dir)[:-keep_last]:
            shutil.rmtree(path, ignore_errors=True)
    dist.barrier()


def resume(engine, ckpt_dir: pathlib.Path, ema=None) -> dict | None:
    """Load the checkpoint `latest` names (collective); returns this rank's trainer state, or None
    to start from scratch. Tags newer than `latest` (a save cut short by a kill) are removed."""
    tag = latest_tag(ckpt_dir)
    if dist.is_main():
        newest = int(TAG_RE.fullmatch(tag)[1]) if tag else -1
        for step, path in _tags(ckpt_dir):
            if step > newest:
                shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    if tag is None:
        return None
    tag_dir = ckpt_dir / tag
    state_file = trainer_file(tag_dir, 0)  # the step and the data position are global: rank 0's file says
    if not state_file.is_file():
        raise NeonError(f"{state_file}: not found (an incomplete checkpoint, or one of another version?)")
    state = read_json(state_file)
    saved_world = state.get("world")
    if not isinstance(saved_world, int) or saved_world < 1:
        raise NeonError(f"{state_file}: 'world' = {saved_world!r} is not a number of ranks")
    if saved_world != dist.world():
        # Another world size (a requeued job on another node count): our ZeRO reader re-partitions
        # parameters, optimizer state and the EMA for this world (train/reshard.py).
        load_resharded(engine, tag_dir, ema, saved_world)
        return state
    try:  # DeepSpeed reads the files through train/deepspeed_engine.AllowListedLoads (no pickle runs)
        path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
    except NeonError:
        raise
    except Exception as e:  # noqa: BLE001  (a checkpoint that does not fit this engine: one line)
        detail = first_line(e)
        raise NeonError(f"{tag_dir}: DeepSpeed could not load this checkpoint ({type(e).__name__}: {detail})") from None
    if path is None:
        raise NeonError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
    if ema is not None:
        ema.load(tag_dir)
    return state
