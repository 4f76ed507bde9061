"""Rich console and progress bars, on rank 0 only. Other ranks print only errors."""
from __future__ import annotations

import contextlib
import time

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from . import dist

# Without a terminal (a Slurm log, a pipe) rich takes COLUMNS, or 80, as the width and wraps or cuts
# ('step…') the cells of a table that does not fit. A log has no width: tables are drawn at their
# natural width, every cell whole, whatever COLUMNS says (a table does not pad its lines to this width).
LOG_WIDTH = 100_000
console = Console(stderr=False, highlight=False, soft_wrap=True)
if not console.is_terminal:
    console.width = LOG_WIDTH
err_console = Console(stderr=True, highlight=False)


def log(msg: str) -> None:
    if dist.is_main():
        console.print(msg)


def error(msg: str) -> None:
    prefix = f"[rank {dist.rank()}] " if dist.world() > 1 else ""
    # escaped: a '[...]' in a path or message is text, not rich markup to be swallowed
    err_console.print(f"[bold red]error:[/] {escape(prefix + msg)}", markup=True, soft_wrap=True)


def notice(msg: str) -> None:
    """One line on stderr from every rank (e.g. why the run stopped), not an error."""
    prefix = f"[rank {dist.rank()}] " if dist.world() > 1 else ""
    err_console.print(f"[bold yellow]neon:[/] {escape(prefix + msg)}", markup=True, soft_wrap=True)


LINE_INTERVAL_S = 10.0  # the fewest seconds between two progress lines without a terminal


class _NullProgress:
    def update(self, *args, **kwargs):
        pass


class _LineProgress:
    """Without a terminal (Slurm logs, CI): a line at each 10% of the work, with elapsed time and
    eta, but none before LINE_INTERVAL_S seconds have passed since the start or the last line (the
    last one, all done, is printed after an earlier one). A job of a few seconds prints nothing."""

    def __init__(self, description: str, total: int):
        self.description, self.total = description, max(total, 1)
        self.done, self.info, self.start, self.last_decile = 0, "", time.perf_counter(), 0
        self.last_line: float | None = None  # when the last line was printed (None: none yet)
        self.resumed_at: int | None = None  # work done before this process started (a resumed run)

    def update(self, advance: int = 1, info: str | None = None, completed: int | None = None):
        self.done = completed if completed is not None else self.done + advance
        if self.resumed_at is None:
            self.resumed_at = self.done if completed is not None else 0
        self.info = info if info is not None else self.info
        decile = min(10, self.done * 10 // self.total)
        if decile <= self.last_decile:
            return
        self.last_decile = decile
        now = time.perf_counter()
        too_soon = now - (self.last_line or self.start) < LINE_INTERVAL_S
        if too_soon and (self.done < self.total or self.last_line is None):
            return  # a short job's end is left to the caller's own output
        self.last_line = now
        elapsed = now - self.start
        rate = (self.done - self.resumed_at) / max(elapsed, 1e-9)
        eta = f", eta {(self.total - self.done) / rate:.0f} s" if rate > 0 and self.done < self.total else ""
        console.print(f"{self.description}: {self.done}/{self.total} ({elapsed:.0f} s{eta}) {self.info}".rstrip(),
                      markup=False)


@contextlib.contextmanager
def progress(description: str, total: int):
    """A progress bar on rank 0 (without a terminal: lines at 10% steps, at most one per
    LINE_INTERVAL_S seconds; see _LineProgress); a no-op elsewhere.
    Use as `bar.update(advance=k, info="...")` or `bar.update(completed=n)`."""
    if not dist.is_main():
        yield _NullProgress()
        return
    if not console.is_terminal:
        yield _LineProgress(description, total)
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console, transient=True) as p:
        task = p.add_task(description, total=total, info="")

        class _Bar:
            def update(self, advance: int = 1, info: str | None = None, completed: int | None = None):
                kw = {"info": info} if info is not None else {}
                if completed is not None:
                    p.update(task, completed=completed, **kw)
                else:
                    p.update(task, advance=advance, **kw)

        yield _Bar()
