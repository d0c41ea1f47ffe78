"""One writer per result: an exclusive, non-blocking lock file beside what is being written.

A POSIX record lock, not flock: DataLoader workers forked from the writer must not inherit it
(they can outlive a killed writer by seconds), and it also works over NFS. The lock file is
removed when the writer is done, so none is left behind; a process that opened the file just
before it was removed notices (the name no longer leads to its file) and tries again.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from bottleneck.errors import Busy


class WriteLock:
    """`with WriteLock(Path("x.lock"), "x"):` holds the lock or raises Busy naming the holder's pid."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = Path(path), what

    def __enter__(self) -> WriteLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise Busy(f"{self.what} is being written by another process (pid {holder}); wait for it to "
                           "finish, then rerun to reuse its result") from None
            if self._still_named(fd):
                break
            os.close(fd)  # the holder before us removed this file: lock the one now under the name
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def _still_named(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def __exit__(self, *exc) -> None:
        try:
            if self._still_named(self.fd):  # never another writer's file under the same name
                self.path.unlink()  # while still holding it: whoever waits on this file will retry
        except OSError:
            pass
        os.close(self.fd)


def beside(folder: Path) -> Path:
    """The lock file of a result folder: `<folder>.lock` next to it (also for `.` or a trailing `/`)."""
    folder = Path(folder).resolve()
    return folder.with_name(f"{folder.name}.lock")


def held(path: Path) -> bool | None:
    """True while some process holds the lock at `path`, False when none does, None if it cannot be
    told (a folder without write permission). The lock file stays as it is; the probe takes the
    lock for an instant, so a writer starting in that instant is told to wait (never called by a
    holder on its own lock: closing the probe would release it)."""
    if not Path(path).exists():
        return False
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def is_stale(path: Path) -> bool:
    """Whether `path` is a lock file nobody holds (left by a writer from before lock files were
    removed, say)."""
    return held(path) is False and Path(path).exists()
