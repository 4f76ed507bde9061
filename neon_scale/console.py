"""Rich console and progress bars, on rank 0 only. Other ranks print only errors."""
from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from . import dist

console = Console(stderr=False, highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False)


def log(msg: str) -> None:
    if dist.is_main():
        console.print(msg)


def error(msg: str) -> None:
    prefix = f"[rank {dist.rank()}] " if dist.world() > 1 else ""
    err_console.print(f"[bold red]error:[/] {prefix}{msg}", markup=True, soft_wrap=True)


class _NullProgress:
    def update(self, *args, **kwargs):
        pass


@contextlib.contextmanager
def progress(description: str, total: int):
    """A progress bar on rank 0; `bar.update(advance=k, info="...")`; a no-op elsewhere."""
    if not dist.is_main():
        yield _NullProgress()
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, console=console, transient=not console.is_terminal, disable=not console.is_terminal) as p:
        task = p.add_task(description, total=total, info="")

        class _Bar:
            def update(self, advance: int = 1, info: str | None = None, completed: int | None = None):
                kw = {"info": info} if info is not None else {}
                if completed is not None:
                    p.update(task, completed=completed, **kw)
                else:
                    p.update(task, advance=advance, **kw)

        yield _Bar()

