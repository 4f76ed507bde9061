"""Stop resumably on a signal: SIGTERM (Slurm's time limit, preemption) or SIGUSR1 (what
neon.sbatch asks Slurm to send ahead of the limit).

The handler only records the signal; the work decides where to stop. Long loops (training steps,
synth batches, evaluation chunks, feature extraction) call `check(where)` at points every rank
reaches the same number of times: the flag is all-reduced there, so a signal that reaches one rank
(Slurm's can arrive first at one node) stops every rank at the same point. The stage saves what it
has, then `Stopped` ends the process with EXIT_STOPPED. A checkpoint being written when the signal
arrives is finished first: nothing is interrupted, only the next check point stops.
"""
from __future__ import annotations

import signal
from collections.abc import Callable, Iterable, Iterator

from . import dist
from .errors import Stopped  # noqa: F401  (re-exported: stop.Stopped)

_received: list[str] = []  # signal names, in order of arrival (this process)
_installed: dict[int, object] = {}  # signal number -> the handler it replaced


def _record(signum, _frame) -> None:
    _received.append(signal.Signals(signum).name)


def install(names) -> None:
    """Catch these signals (names such as "SIGTERM") from now on; previous handlers are restored
    by `uninstall`. Only the main thread may install handlers (Python's rule)."""
    for name in names:
        num = signal.Signals[name]
        if num not in _installed:
            _installed[num] = signal.signal(num, _record)


def uninstall() -> None:
    for num, old in _installed.items():
        signal.signal(num, old)
    _installed.clear()
    _received.clear()


def ignore_in_worker(_worker_id: int = 0) -> None:
    """DataLoader workers are forked with our handlers; Slurm signals every process of the step, so
    a worker ignores the stop signals and leaves the decision to its trainer process."""
    for num in list(_installed):
        signal.signal(num, signal.SIG_IGN)


def requested() -> str | None:
    """The first stop signal this process received, or None (local: no communication)."""
    return _received[0] if _received else None


def agreed() -> bool:
    """True on every rank when any rank received a stop signal. Collective (every rank must call it
    at the same points) when handlers are installed; False at no cost otherwise."""
    return bool(_installed) and dist.any_flag(bool(_received))


def check(where: str, saved: str = "") -> None:
    """Collective stop point: raise Stopped on every rank if any rank received a stop signal.
    `where` says what was running, `saved` what was kept."""
    if agreed():
        raise Stopped(message(where, saved))


def turns(work: Iterable, count: int, where: str | Callable[[int], str], saved: str = "") -> Iterator:
    """`count` turns on every rank, each ending at a collective stop point (`check`): turn t hands
    out the next item of this rank's `work` while there is one, so a rank with less work (or none)
    still reaches every stop point. `where`: the text for `check`, or a function of the turn t."""
    items, done = iter(work), object()
    for t in range(count):
        item = next(items, done)
        if item is not done:
            yield item
        check(where(t) if callable(where) else where, saved)


def message(where: str, saved: str = "") -> str:
    sig = requested() or "a stop signal (on another rank)"
    return (f"stopped by {sig} during {where}" + (f"; {saved}" if saved else "")
            + "; resumable: rerun the same command to continue")
