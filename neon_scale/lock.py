"""One writer per output: an advisory lock held for the whole job.

`neon run` (and each stage command) holds `<run>/.lock`; `neon merge -o OUT` and `neon consolidate
-o OUT` hold `.<OUT>.lock` beside OUT. The lock is `flock(LOCK_EX | LOCK_NB)` on that file: a
second writer fails at once with one line naming the holder (host, pid, Slurm job, start time,
which the holder writes into the file), and the kernel drops the lock of a process that dies, so
a holder killed with SIGKILL never blocks the next run (its stale file is simply taken over).

Races handled: the holder's info may be half-written when read ("holder unknown"); the file is
unlinked on release while still locked, so a newcomer may have opened the old inode just before:
after locking, the path must still name the inode locked (fstat vs stat), else it retries. The
info is written in place (no temporary file). Children forked while the lock is held (DataLoader
workers) close their copy of the descriptor, so only the holder itself keeps the lock alive.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
from collections.abc import Iterator

from . import dist
from .errors import NeonError

_INFO_MAX = 4096  # more than any holder writes; a read of a larger file is garbage anyway
_held: set[int] = set()  # descriptors of locks this process holds


def _close_in_child() -> None:
    # flock belongs to the open file description, which fork shares: a forked worker outliving a
    # SIGKILLed holder would keep the lock. Closing the child's copy leaves the parent's lock alone.
    for fd in list(_held):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _holder_info() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID") or None,
            "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def describe_holder(raw: bytes) -> str:
    """'pid 1234 on host h (Slurm job 567), since ...' from the lock file's bytes; 'holder unknown'
    when they are not (yet) a complete record: read between the holder's lock and its write."""
    try:
        info = json.loads(raw.decode())
        pid, host, since = int(info["pid"]), str(info["host"]), str(info["since"])
        job = info.get("slurm_job")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "holder unknown"
    return f"pid {pid} on host {host}" + (f" (Slurm job {job})" if job else "") + f", since {since}"


def _busy(what: str, raw: bytes) -> NeonError:
    holder = describe_holder(raw)
    who = f"by {holder}" if holder != "holder unknown" else "by another process (holder unknown)"
    return Locked(f"{what} is in use {who}; wait for it to finish or stop it")


class Locked(NeonError):
    """Another process holds the lock (the message names it)."""


def _same_file(fd: int, path: pathlib.Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


class Lock:
    """An exclusive lock on `path` guarding `what` (named in the error a second writer gets).
    `remove`: unlink the file on release (nothing left behind)."""

    def __init__(self, path: str | os.PathLike, what: str, remove: bool = True):
        # absolute: release unlinks it, whatever the working directory has become by then
        self.path, self.what, self.remove = pathlib.Path(os.path.abspath(path)), what, remove
        self._fd: int | None = None

    def acquire(self) -> "Lock":
        """Take the lock or raise Locked at once, naming the holder."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as e:
                raise NeonError(f"{self.path}: cannot create the lock file for {self.what} ({e.strerror})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                raw = b"" if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) else os.pread(fd, _INFO_MAX, 0)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise _busy(self.what, raw) from None
                raise NeonError(f"{self.path}: cannot lock {self.what} ({e.strerror}; the filesystem may not support "
                                f"flock, e.g. Lustre mounted without -o flock)") from None
            if _same_file(fd, self.path):
                break
            # the previous holder unlinked the file between our open and our flock: we hold an inode
            # no one else will open, and a newcomer could lock a fresh file at the path. Start over.
            os.close(fd)
        self._fd = fd
        _held.add(fd)
        data = json.dumps(_holder_info()).encode()
        try:
            os.pwrite(fd, data, 0)  # over the old record (a killed holder's), then cut its tail
            os.ftruncate(fd, len(data))
        except OSError:  # a full disk: the lock holds all the same; no stale name, "holder unknown"
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd not in _held:  # not held, or a forked child's copy (closed at the fork: not ours to drop)
            return
        try:
            # unlink while still locked: after the unlock a newcomer may lock this inode, and an
            # unlink then would remove its file. Only our inode (someone may have replaced the path).
            if self.remove and _same_file(fd, self.path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        finally:
            _held.discard(fd)
            os.close(fd)  # drops the flock

    @property
    def held(self) -> bool:
        return self._fd is not None


@contextlib.contextmanager
def hold(lock_path: str | os.PathLike, what: str, remove: bool = True) -> Iterator[Lock]:
    """Hold the lock on `lock_path` for the block; a second holder raises Locked at once."""
    lock = Lock(lock_path, what, remove).acquire()
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def hold_on_rank0(lock_path: str | os.PathLike, what: str, remove: bool = True) -> Iterator[Lock | None]:
    """Rank 0 holds the lock for the block; every rank learns the outcome (one broadcast), so with a
    busy lock every rank raises the same one line and none waits in a later collective."""
    lock, failure, message = None, None, None
    if dist.is_main():
        try:
            lock = Lock(lock_path, what, remove).acquire()
        except Exception as e:  # noqa: BLE001  (any failure must reach the other ranks too)
            failure, message = e, str(e) if isinstance(e, NeonError) else f"{type(e).__name__}: {e}"
    try:
        message = dist.broadcast_object(message)
        if message is not None:
            if failure is not None:
                raise failure
            raise NeonError(message)
        yield lock
    finally:
        if lock is not None:
            lock.release()


def lock_path_for(out: str | os.PathLike) -> pathlib.Path:
    """The lock file of an output directory OUT: `.<OUT name>.lock` beside it, outside what is
    staged, swapped or cleared in OUT's place. Normalized, not resolved: `-o .` or `-o x/..` name
    a real folder, and a symlink OUT is swapped as the link itself."""
    out = pathlib.Path(os.path.abspath(out))
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def hold_output(out: str | os.PathLike) -> Iterator[Lock]:
    """The one-writer guard of an output directory (merge, consolidate); the lock file is removed
    on release. OUT's parent is created if needed (the lock lives there) and removed again if
    nothing was written into it (a failed command leaves no empty folders)."""
    path = lock_path_for(out)
    created = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with hold(path, str(out)) as lock:
            yield lock
    finally:
        for p in created:  # deepest first; one that holds anything stays
            try:
                p.rmdir()
            except OSError:
                break
