"""Training and sweep curves for TensorBoard (and, when asked for, Weights & Biases). Rank 0 only.

    with open_tracker(ctx.run_dir, ctx.cfg.run, "train/zeta_1.1") as tracker:
        tracker.scalars("train", {"loss": 0.12, "lr": 1e-5, "grad_norm": None}, step)   # train/loss, train/lr

Event files go to `<run_dir>/tb/<name>/` (`tensorboard --logdir <run_dir>/tb`); W&B, when
`run.wandb` is true, gets one run per tracker named `<run dir name>/<name>`, its files under
`<run_dir>/wandb/`. On ranks other than 0, and when both backends are off, the tracker is a no-op
object: callers never test the rank themselves. Writes are buffered and flushed at most
FLUSH_SECS apart and on close; closing twice is harmless. The run section is operational: it is
part of no stage fingerprint, so switching tracking on or off never reruns a stage.
"""
from __future__ import annotations

import importlib.util
import json
import operator
import pathlib
import re
from collections.abc import Mapping
from typing import Protocol

from . import dist
from .errors import NeonError

FLUSH_SECS = 30  # at most this long between flushes: a killed run loses under 30 s of curves
WANDB_MISSING = "run.wandb is true but the wandb package is not installed: pip install wandb, or set run.wandb=false"
TENSORBOARD_MISSING = ("run.tensorboard is true but the tensorboard package is not installed: pip install tensorboard, "
                       "or set run.tensorboard=false")
_W_STEP = "step"  # W&B: our step as a logged key (its own step must increase; the sweep's w x 1000 does not)


class TrackingSettings(Protocol):
    """What open_tracker reads of its settings: the config's `run` section (config.RunConfig),
    duck-typed: config imports this module (a layer below it), so this module never imports config."""
    tensorboard: bool
    wandb: bool
    wandb_project: str
    wandb_mode: str


def wandb_available() -> bool:
    """Whether `import wandb` would find the package (without importing it: it is slow)."""
    return importlib.util.find_spec("wandb") is not None


def tb_dir(run_dir: pathlib.Path, name: str) -> pathlib.Path:
    """`<run_dir>/tb/<name>`: '/' in name nests folders; anything else unsafe in a path becomes '_'."""
    parts = [re.sub(r"[^A-Za-z0-9._=,+@-]", "_", p) for p in name.split("/") if p]
    parts = [p if p.strip(".") else p.replace(".", "_") for p in parts]  # no '.' or '..' components
    if not parts:
        raise ValueError(f"tracker name {name!r} is empty")
    return pathlib.Path(run_dir, "tb", *parts)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class Tracker:
    """Scalars and figures to TensorBoard and/or W&B; every method does nothing when neither is open."""

    def __init__(self, writer=None, wandb_run=None, where: pathlib.Path | None = None):
        self._writer, self._wandb, self._where = writer, wandb_run, where

    @property
    def active(self) -> bool:
        return self._writer is not None or self._wandb is not None

    @property
    def log_dir(self) -> pathlib.Path | None:
        """The TensorBoard folder written to (None when TensorBoard is off or on a rank != 0)."""
        return self._where if self._writer is not None else None

    def scalars(self, group: str, values: Mapping[str, float | None], step: int) -> None:
        """Each value under the tag `<group>/<key>` at integer `step`; None values are skipped."""
        if not self.active:
            return
        step = operator.index(step)  # TensorBoard steps are integers: a float here is a caller's bug
        tagged = {f"{group}/{k}" if group else k: float(v) for k, v in values.items() if v is not None}
        if not tagged:
            return
        if self._writer is not None:
            with self._disk_errors():
                for tag, value in tagged.items():
                    self._writer.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log({**tagged, _W_STEP: step})

    def figure(self, tag: str, figure, step: int = 0) -> None:
        """A matplotlib figure as an image; the figure stays open (the caller closes it)."""
        if not self.active:
            return
        step = operator.index(step)
        if self._writer is not None:
            with self._disk_errors():
                self._writer.add_figure(tag, figure, step, close=False)
        if self._wandb is not None:
            import wandb  # lazy: optional (a W&B run is open here, so it is installed)

            self._wandb.log({tag: wandb.Image(figure), _W_STEP: step})

    def flush(self) -> None:
        if self._writer is not None:
            with self._disk_errors():
                self._writer.flush()

    def close(self) -> None:
        """Flush and close; harmless when called again."""
        writer, run = self._writer, self._wandb
        self._writer = self._wandb = None
        try:
            if writer is not None:
                with self._disk_errors():
                    writer.close()
        finally:
            if run is not None:
                run.finish()

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already failing: keep that error, not one from closing
            self.close()
        except Exception:
            pass

    def _disk_errors(self):
        return _DiskErrors(self._where)


class _DiskErrors:
    """OSError from the event writer (its thread re-raises on the next call) -> one NeonError line."""

    def __init__(self, where):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and issubclass(exc_type, OSError):
            raise NeonError(f"{self.where}: writing TensorBoard events failed ({_first_line(exc)})") from None
        return False


def open_tracker(run_dir: pathlib.Path, run_cfg: TrackingSettings, name: str, config: dict | None = None, *,
                 purge_step: int | None = None, fresh: bool = False) -> Tracker:
    """A Tracker for `name` ("base", "train/zeta_1.1", "sweep") in `run_dir`, as the config's `run`
    section `run_cfg` asks (its tensorboard, wandb, wandb_project and wandb_mode settings).

    config: recorded with the run (TensorBoard text `config`, W&B run config).
    purge_step: a resumed training run passes the step it resumes from; TensorBoard then hides
    the events of the killed run at that step and later (they would be drawn twice).
    fresh: remove this name's earlier event files first (for a caller that logs everything again,
    as the sweep does from its cache: its steps go back and forth, so purge_step cannot help).
    Raises NeonError when a backend is asked for but its package is missing, when the folder
    cannot be created, or when wandb.init fails."""
    if not dist.is_main() or not (run_cfg.tensorboard or run_cfg.wandb):
        return Tracker()
    if run_cfg.wandb and not wandb_available():  # before anything is written
        raise NeonError(WANDB_MISSING)
    run_dir = pathlib.Path(run_dir)
    where = tb_dir(run_dir, name)
    writer = None
    if run_cfg.tensorboard:
        try:
            # lazy: tensorboard is optional (run.tensorboard=false needs no install), and config
            # imports this module, so every command would pay for it
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise NeonError(TENSORBOARD_MISSING) from None
        try:
            if fresh and where.is_dir():
                for old in where.glob("events.out.tfevents.*"):
                    old.unlink()
            where.mkdir(parents=True, exist_ok=True)
            writer = SummaryWriter(log_dir=str(where), flush_secs=FLUSH_SECS, purge_step=purge_step)
            if config is not None:  # four-space indent: TensorBoard's text tab renders markdown
                text = json.dumps(config, indent=1, sort_keys=False, default=str)
                writer.add_text("config", "    " + text.replace("\n", "\n    "), 0)
        except OSError as e:
            if writer is not None:
                writer.close()
            raise NeonError(f"{where}: cannot write TensorBoard events ({_first_line(e)})") from None
    run = None
    if run_cfg.wandb:
        try:
            run = _wandb_init(run_dir, run_cfg, name, config)
        except BaseException:
            if writer is not None:
                writer.close()
            raise
    return Tracker(writer, run, where)


def _wandb_init(run_dir: pathlib.Path, run_cfg: TrackingSettings, name: str, config: dict | None):
    import wandb  # lazy: optional, and slow to import

    # console="off": wandb would otherwise wrap stdout/stderr, under rich's live progress display;
    # quiet: no history sparklines at every close (one W&B run per stage)
    settings = wandb.Settings(console="off", quiet=True)
    run = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=run_cfg.wandb_project, mode=run_cfg.wandb_mode, dir=str(run_dir),
                         name=f"{run_dir.resolve().name}/{name}", config=config, settings=settings)
        # our step is a logged key, the x axis of every other key: W&B's own step must only
        # increase, and the sweep logs w x 1000, which goes back and forth
        run.define_metric(_W_STEP)
        run.define_metric("*", step_metric=_W_STEP)
    except Exception as e:  # wandb's own errors (no login for online mode, no network, ...)
        if run is not None:
            run.finish(exit_code=1)
        raise NeonError(f"W&B: wandb.init failed ({_first_line(e)}); run.wandb_mode=offline needs no network or "
                        f"login (wandb sync later), or set run.wandb=false") from None
    return run


__all__ = ["FLUSH_SECS", "Tracker", "open_tracker", "tb_dir", "wandb_available", "WANDB_MISSING",
           "TENSORBOARD_MISSING"]
