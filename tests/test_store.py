"""The HDF5 feature cache as a file: every reader checks its schema, so an edited or damaged cache is
one error line, never a traceback, a NaN score or a half-written merge."""

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import cli, make_tree

from bottleneck import store
from bottleneck.errors import BottleneckError
from bottleneck.extract import extract


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    tree = make_tree(root / "data", {"train": 4, "test": 2})
    return [extract("squeezenet1_1", str(tree), layer=["fire7", "fire9"], out=str(root / "c"), batch_size=4,
                    workers=0, progress=False, weights="none", shard=shard) for shard in ("0/1", "0/2", "1/2")]


def _replace(f: h5py.File, name: str, value) -> None:
    del f[name]
    f[name] = value


EDITS = {
    "rows": (r"features/fire9 is float32 of shape \(\d+, \d+\), expected floats of \d+ rows",
             lambda f: _replace(f, "train/features/fire9", f["train/features/fire9"][:-1])),
    "nan": ("holds NaN or inf", lambda f: f["train/features/fire9"].write_direct(
        np.full((1, f["train/features/fire9"].shape[1]), np.nan, dtype="float32"), dest_sel=np.s_[0:1])),
    "bytes": (r"features/fire9 is \|S8", lambda f: _replace(f, "train/features/fire9",
                                                         np.array([b"x" * 8] * f["train/labels"].shape[0]
                                                                  ).reshape(-1, 1))),
    "label-7": ("labels hold 7, outside the 2 classes", lambda f: f["train/labels"].write_direct(
        np.array([7], dtype=f["train/labels"].dtype), dest_sel=np.s_[0:1])),
    "label-minus-1": ("labels hold -1", lambda f: f["train/labels"].write_direct(
        np.array([-1], dtype=f["train/labels"].dtype), dest_sel=np.s_[0:1])),
    "labels-float": ("labels are not integers", lambda f: _replace(f, "train/labels",
                                                                  f["train/labels"][:].astype("float64"))),
    "classes-not-json": ("attribute 'classes' is not valid JSON", lambda f: f.attrs.__setitem__("classes", "[cats,")),
    "classes-not-list": ("'classes' attribute is not a list", lambda f: f.attrs.__setitem__("classes", '"cats"')),
    "dims": ("'dims' attribute does not give a positive size", lambda f: f.attrs.__setitem__(
        "dims", json.dumps({"fire7": "x", "fire9": 512}))),
    "dims-wrong": ("has 512 columns, its 'dims' say 9", lambda f: f.attrs.__setitem__(
        "dims", json.dumps({"fire7": 384, "fire9": 9}))),
    "no-paths": ("has no dataset paths", lambda f: f.__delitem__("train/paths")),
    "zeroed": ("features/fire9 does not match its checksum", lambda f: f["train/features/fire9"].write_direct(
        np.zeros((1, f["train/features/fire9"].shape[1]), dtype="float32"), dest_sel=np.s_[0:1])),
}


@pytest.mark.parametrize("edit", EDITS)
def test_an_edited_cache_is_one_error_in_every_reader_and_merge_leaves_nothing(shards, tmp_path, edit):
    message, change = EDITS[edit]
    damaged = [tmp_path / p.name for p in shards]  # the whole cache and its two shards
    for src, dst in zip(shards, damaged):
        shutil.copy(src, dst)
    for path in damaged[:2]:
        with h5py.File(path, "r+") as f:
            change(f)
    verify = cli("cache", "verify", str(damaged[0]))
    assert verify.returncode == 1 and "Traceback" not in verify.stderr
    assert re.search(message, verify.stdout), verify.stdout
    readers = [["fit", "--features", str(damaged[0]), "--out", str(tmp_path / "fit")],
               ["cache", "merge", *map(str, damaged[1:]), "--out", str(tmp_path / "merged.h5")]]
    if edit not in ("nan", "zeroed"):  # info reads metadata and labels, never the features themselves
        readers.append(["cache", "info", str(damaged[0])])
    for args in readers:
        result = cli(*args)
        assert result.returncode != 0 and "Traceback" not in result.stderr, (args, result.stderr)
        assert result.stderr.startswith("error: ") and "damaged or was edited" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in damaged)  # no .tmp, no fit
    assert store.verify(shards[0]) == []  # the original is untouched


def test_a_sound_cache_passes_the_schema_and_reads_back(shards):
    with store.FeatureStore(shards[0]) as st:
        x = st.features("train", "fire9")
        assert x.dtype == np.float32 and np.isfinite(x).all() and len(st.labels("train")) == x.shape[0]
    with pytest.raises(BottleneckError, match="does not exist"):
        store.FeatureStore(shards[0].with_name("nope.h5"))


def test_leftovers_are_listed_once_and_cleaned_and_other_data_is_pointed_out(tmp_path):
    tree = make_tree(tmp_path / "data", {"train": 10, "test": 4})
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "bottleneck", "extract", "--model", "squeezenet1_1", "--weights", "none",
           "--layer", "fire9", "--data", str(tree), "--out", str(out), "--batch-size", "2", "--workers", "0",
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not list(out.glob("*.parts/*.npz")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted = next(out.glob("*.parts"))
    shutil.copy(next((tree / "train" / "cats").iterdir()), tree / "train" / "cats" / "added.png")  # data change
    done = cli(*cmd[3:])  # the rerun needs no process of its own: the kill above is the point
    assert done.returncode == 0, done.stderr
    assert "also holds 1 interrupted extraction of squeezenet1_1-fire9-avg" in done.stderr
    path = Path(done.stdout.strip().splitlines()[-1])
    shutil.copytree(interrupted, f"{path}.parts")  # as left by a writer killed just after its final rename
    listing = cli("cache", "ls", str(out)).stdout
    assert listing.count(path.name[:20]) == 2, listing  # the finished cache once, the other data's run once
    Path(f"{path}.lock").write_text("12345")  # as left by a writer from before lock files were removed
    dry = cli("cache", "clean", str(out), "--dry-run")
    killed_lock = str(interrupted).removesuffix(".parts") + ".lock"  # a killed writer cannot remove its lock file
    assert sorted(dry.stdout.split()) == sorted([f"{path}.parts", f"{path}.lock", killed_lock])
    assert "would remove 3 leftovers" in dry.stderr and Path(killed_lock).exists()
    assert cli("cache", "clean", str(out), "--interrupted").returncode == 0
    assert sorted(p.name for p in out.iterdir()) == [path.name]  # neither blocks nor lock files remain
    again = cli(*cmd[3:])
    assert again.returncode == 0 and again.stdout.strip().endswith(path.name), again.stderr


def test_cache_clean_removes_only_what_extraction_left_and_leaves_look_alikes_and_links(shards, tmp_path):
    folder, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    precious = elsewhere / "notes.txt"
    precious.write_text("a user's notes\n")
    (elsewhere / "meta.json").write_text("{}")
    shutil.copy(shards[0], folder / "a.h5")
    ours = {"a.h5.parts": {"meta.json": "{}", "train-0000000.npz": "", "test-0000003.tmp77": ""},
            "a.h5.tmp": "", "f.h5.lock": "12345"}  # blocks of a finished cache, a dead writer's files
    theirs = {"notes.h5.tmpl": "notes", "backup.h5.tmp_old": {"old.txt": "old"}, "d.h5.tmp": "not HDF5",
              "c.h5.parts": {"meta.json": "{}", "my-notes.txt": "mine"}, "x.h5.lock": "not a pid"}
    for name, content in (ours | theirs).items():
        if isinstance(content, dict):
            (folder / name).mkdir()
            for inner, text in content.items():
                (folder / name / inner).write_text(text)
        else:
            (folder / name).write_text(content)
    for link in ("b.h5.parts", "e.h5.lock", "g.h5.tmp"):  # links under our names lead to others' files
        (folder / link).symlink_to(elsewhere if link.endswith(".parts") else precious)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))

    dry = cli("cache", "clean", str(folder), "--interrupted", "--dry-run")
    assert sorted(dry.stdout.split()) == sorted(str(folder / n) for n in ours), dry.stdout
    done = cli("cache", "clean", str(folder), "--interrupted")
    assert done.returncode == 0 and sorted(done.stdout.split()) == sorted(str(folder / n) for n in ours)
    assert "removed 3 leftovers" in done.stderr, done.stderr
    after = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    gone = [p for p in before if p not in after]
    assert all(p.split("/")[1] in ours for p in gone) and len(gone) == 6, gone  # 3 leftovers + 3 blocks
    assert precious.read_text() == "a user's notes\n" and (folder / "backup.h5.tmp_old" / "old.txt").exists()
    assert (folder / "x.h5.lock").read_text() == "not a pid" and (folder / "a.h5").exists()
