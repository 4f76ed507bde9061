"""Run the stages of a config in order: base -> synth -> train -> sweep.

Each stage reads only the artifacts of the stages before it and is skipped when its output is
complete for this config; a stage run alone checks that its inputs exist. Temporary files and
partial folders a killed earlier run left in the run directory are removed first. Rank 0 holds
`<run>/.lock` for the whole job: a second job on the same run directory fails at once, naming us.
"""
from __future__ import annotations

import time

import yaml

from . import dist
from .config import Config
from .console import log
from .errors import NeonError
from .io import remove_stale, write_text
from .lock import hold_on_rank0
from .stages import base, sweep, synth, train
from .stages.common import RunContext, StageDir

LOCK_NAME = ".lock"  # <run>/.lock: held by rank 0 for the whole job (neon_scale.lock)
STAGES = {"base": base.run, "synth": synth.run, "train": train.run, "sweep": sweep.run}
ORDER = list(STAGES)


def _require_previous(ctx: RunContext, stage: str) -> None:
    i = ORDER.index(stage)
    if i == 0:
        return
    prev = ORDER[i - 1]
    if not StageDir(ctx.run_dir / prev, ctx.fingerprint(prev), prev).is_done():
        raise NeonError(f"stage '{stage}' needs the output of '{prev}' in {ctx.run_dir / prev} for this config; "
                        f"run `neon {prev}` (or `neon run`) first")


def run(cfg: Config, stages: list[str] | None = None) -> dict[str, float]:
    stages = stages or ORDER
    ctx = RunContext.from_config(cfg)
    if dist.is_main():
        ctx.run_dir.mkdir(parents=True, exist_ok=True)
    # One writer per run directory, taken before anything is written in it: a second job would
    # interleave metrics.jsonl, resume from our half-written checkpoint or clear a stage under us.
    with hold_on_rank0(ctx.run_dir / LOCK_NAME, str(ctx.run_dir)):
        if dist.is_main():
            stale = remove_stale(ctx.run_dir)
            if stale:
                log(f"[dim]removed {stale} temporary file(s) a killed run left in {ctx.run_dir}[/]")
            write_text(ctx.run_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        log(f"[bold]neon[/] {cfg.name}: model {cfg.model.name}, {dist.world()} rank(s), run dir {ctx.run_dir}")
        timings = {}
        for name in stages:
            _require_previous(ctx, name)
            start = time.perf_counter()
            STAGES[name](ctx)
            timings[name] = time.perf_counter() - start
            log(f"[dim]{name}: {timings[name]:.1f} s[/]")
        # every rank is done with the run directory before rank 0 lets the next writer in
        dist.barrier()
    return timings
