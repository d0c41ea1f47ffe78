import os

import pytest
from conftest import cli, hold_lock, make_tree

from bottleneck.errors import BottleneckError, Busy
from bottleneck.extract import extract
from bottleneck.locks import WriteLock, held, is_stale


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


def _foreign_lock_names(tmp_path):
    """What may sit under a lock file's name in a shared folder, each with the file it leads to."""
    precious = tmp_path / "precious.txt"
    precious.write_text("a user's notes\n")
    names = {}
    for kind in ("symlink", "dangling", "hardlink", "other-content", "folder"):
        path = tmp_path / f"{kind}.lock"
        if kind == "symlink":
            path.symlink_to(precious)
        elif kind == "dangling":
            path.symlink_to(tmp_path / "created-through-the-link")
        elif kind == "hardlink":
            os.link(precious, path)
        elif kind == "other-content":
            path.write_text("not a pid\n")
        else:
            path.mkdir()
        names[kind] = path
    return precious, names


def test_a_lock_name_holding_a_link_or_someone_elses_file_is_refused_and_left_as_it_is(tmp_path):
    precious, names = _foreign_lock_names(tmp_path)
    for kind, path in names.items():
        with pytest.raises(BottleneckError, match=f"lock file {path} .*left as it is"):
            with WriteLock(path, "x"):
                pass
        assert held(path) in (None, False) and not is_stale(path), kind  # so `cache clean` leaves it alone
    assert precious.read_text() == "a user's notes\n"  # never truncated to a pid
    assert names["other-content"].read_text() == "not a pid\n"
    assert not (tmp_path / "created-through-the-link").exists()
    assert names["symlink"].is_symlink() and names["folder"].is_dir()


def test_fit_refuses_a_result_folder_whose_lock_is_a_link_and_leaves_its_target(tmp_path):
    tree = make_tree(tmp_path / "data", {"train": 4, "test": 2})
    cache = extract("squeezenet1_1", str(tree), layer=["fire9"], out=str(tmp_path / "c"), batch_size=8,
                    workers=0, progress=False, weights="none")
    precious = tmp_path / "precious.txt"
    precious.write_text("a user's notes\n")
    (tmp_path / "fit").mkdir()
    (tmp_path / "fit" / "fire9-logreg-search.lock").symlink_to(precious)  # beside the result folder
    result = cli("fit", "--features", str(cache), "--layer", "fire9", "--out", str(tmp_path / "fit"))
    assert result.returncode == 1 and result.stderr.startswith("error: lock file ") and "Traceback" not in result.stderr
    assert "is a symbolic link" in result.stderr, result.stderr
    assert precious.read_text() == "a user's notes\n" and not (tmp_path / "fit" / "fire9-logreg-search").exists()
