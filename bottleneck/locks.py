"""One writer per result: an exclusive, non-blocking lock file beside what is being written.

A POSIX record lock, not flock: DataLoader workers forked from the writer must not inherit it
(they can outlive a killed writer by seconds), and it also works over NFS. The lock file is
removed when the writer is done, so none is left behind; a process that opened the file just
before it was removed notices (the name no longer leads to its file) and tries again.

A lock file may sit in a folder others write to (a shared cache folder), so it is opened
without following a symbolic link, and written to (truncated to the holder's pid) only when it
is a plain file of its own that holds nothing but a pid: a link, or a file with other content,
under a lock file's name is an error, and its target is never touched.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
from pathlib import Path

from bottleneck.errors import BottleneckError, Busy

# O_NONBLOCK: a named pipe under the name must not hang the open (it is refused just after).
_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_PID = re.compile(rb"\s*\d*\s*")  # what a lock file of ours holds: a pid, or nothing yet


class WriteLock:
    """`with WriteLock(Path("x.lock"), "x"):` holds the lock or raises Busy naming the holder's pid."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = Path(path), what

    def __enter__(self) -> WriteLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = _open_own(self.path, create=True)
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
        if os.fstat(fd).st_size > 32 or not _PID.fullmatch(os.pread(fd, 64, 0)):  # no writer of ours is mid-write
            os.close(fd)
            raise _foreign(self.path, "holds something other than a pid")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def _still_named(self, fd: int) -> bool:
        try:
            return os.lstat(self.path).st_ino == os.fstat(fd).st_ino
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
    if not os.path.lexists(path):
        return False
    try:
        fd = _open_own(Path(path), create=False)
    except (OSError, BottleneckError):  # a link or someone else's file: nobody's lock can be told
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def is_stale(path: Path) -> bool:
    """Whether `path` is a lock file of ours that nobody holds (left by a killed writer, say)."""
    if held(path) is not False or not os.path.lexists(path):
        return False
    try:
        with open(path, "rb", opener=lambda p, _: _open_own(Path(p), create=False)) as f:
            return bool(_PID.fullmatch(f.read(64)))
    except (OSError, BottleneckError):
        return False


def _open_own(path: Path, create: bool) -> int:
    """A descriptor of the lock file at `path`, never through a link; created if missing and asked
    to. Raises BottleneckError when the name holds a link, a folder, a pipe, or a file with other
    names (a hard link), which a lock file of ours never is."""
    flags = _OPEN_FLAGS | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        if os.path.islink(path):  # ELOOP, or a dangling link that O_CREAT would have followed
            raise _foreign(path, "is a symbolic link") from None
        if os.path.isdir(path):
            raise _foreign(path, "is a folder") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise _foreign(path, "has other names (a hard link)" if stat.S_ISREG(info.st_mode) else "is not a plain file")
    return fd


def _foreign(path: Path, what: str) -> BottleneckError:
    return BottleneckError(f"lock file {path} {what}, which no lock file bottleneck writes does; it is left as it "
                           "is: move it away if it is yours, or remove it, then rerun")
