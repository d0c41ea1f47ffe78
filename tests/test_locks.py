import os

import pytest
from conftest import hold_lock

from bottleneck.errors import Busy
from bottleneck.locks import WriteLock, held


def test_a_lock_is_exclusive_across_processes_and_leaves_no_file(tmp_path):
    path = tmp_path / "x.lock"
    holder = hold_lock(path)
    try:
        assert held(path) is True
        with pytest.raises(Busy, match=f"pid {holder.pid}"):
            with WriteLock(path, "x"):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert held(path) is False  # a killed holder's lock is free at once
    with WriteLock(path, "x"):
        assert path.read_text() == str(os.getpid())
    assert not path.exists()


def test_a_lock_file_removed_under_a_waiter_is_not_trusted(tmp_path):
    """The writer removes its lock file on exit: whoever opened that file just before must lock the
    file now under the name, or two writers could each hold a lock."""
    path = tmp_path / "x.lock"
    lock = WriteLock(path, "x")
    stale = os.open(path, os.O_RDWR | os.O_CREAT)  # opened by a waiter, then removed by the holder
    path.unlink()
    assert not lock._still_named(stale)
    path.write_text("")  # the next writer's file under the same name
    assert not lock._still_named(stale)
    fresh = os.open(path, os.O_RDWR)
    assert lock._still_named(fresh)
    os.close(stale)
    os.close(fresh)
