"""The folder `bottleneck data` writes a built-in dataset into, and the marker naming its files.

A rerun with another seed or subset replaces the tree written before (old images must not stay
mixed in with the new ones), so it must know which files are its own: `<out>/.bottleneck-data.json`
names the dataset, how it was written and every file. A folder holding anything else (a user's
images, class folders added by hand, another dataset's tree) is refused before anything is
written, and nothing in it is touched. Only files the marker lists are ever removed, and a folder
only once it is empty. Links are entries like files: never followed, never written through.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from bottleneck.errors import BottleneckError, write_error

MARKER = ".bottleneck-data.json"
FORMAT = "bottleneck-data/1"


def temporary(path: Path) -> Path:
    """The name a file of the tree is written under before it is renamed to `path`."""
    return path.with_suffix(".tmp" + path.suffix)


def claim(out: Path, dataset: str, how: dict, planned: list[str],
          legacy: Callable[[Path], bool] | None = None) -> set[str]:
    """Check that `out` is new, empty or a tree of `dataset` written by bottleneck, then record,
    before any file is written, that `planned` (paths relative to `out`) will be; returns the files
    the tree held before. `legacy(path)` recognises a file of a tree written before markers were."""
    previous = _previous_files(out, dataset, legacy)
    foreign = _foreign_entries(out, previous)
    if foreign:
        raise BottleneckError(
            f"{out} holds {len(foreign)} file{'s' if len(foreign) != 1 else ''} or folder"
            f"{'s' if len(foreign) != 1 else ''} that 'bottleneck data {dataset}' did not write (e.g. {foreign[0]}); "
            "nothing was changed: give a new or empty --out, or move them away")
    out.mkdir(parents=True, exist_ok=True)
    _write_marker(out, dataset, how, sorted(previous | set(planned)))  # a run killed from now on leaves listed files
    return previous


def settle(out: Path, dataset: str, how: dict, planned: list[str], previous: set[str]) -> None:
    """Remove the files of the earlier tree that this run did not write (and folders that leaves
    empty) and the temporaries of killed runs; then the marker lists this run's files only."""
    gone = previous - set(planned)
    for path in [out / rel for rel in sorted(gone)] + [temporary(out / rel) for rel in sorted(previous | set(planned))]:
        if path.is_symlink() or path.is_file():
            path.unlink()
    for folder in sorted({p for rel in gone for p in PurePosixPath(rel).parents if p.parts},
                         key=lambda p: len(p.parts), reverse=True):
        try:
            (out / folder).rmdir()
        except OSError:  # not empty: it holds this run's files
            pass
    _write_marker(out, dataset, how, sorted(planned))


def _previous_files(out: Path, dataset: str, legacy: Callable[[Path], bool] | None) -> set[str]:
    if not os.path.lexists(out):
        return set()
    if not out.is_dir():
        raise BottleneckError(f"--out {out} is not a folder; give a new or empty folder")
    marker = out / MARKER
    if not os.path.lexists(marker):
        files = _entries(out)[0]
        return set(files) if legacy and files and all(legacy(out / f) for f in files) else set()
    try:
        if marker.is_symlink():
            raise ValueError
        m = json.loads(marker.read_text())
        if m["format"] != FORMAT or not isinstance(m["files"], list) or not all(map(_plain_relative, m["files"])):
            raise ValueError
    except (OSError, ValueError, TypeError, KeyError):
        raise BottleneckError(f"{marker} is not a marker bottleneck wrote (or was edited), so which files in {out} "
                              "are bottleneck's cannot be told; give a new or empty --out") from None
    if m.get("dataset") != dataset:
        raise BottleneckError(f"{out} holds bottleneck's {m.get('dataset')!s} tree, not {dataset}'s; "
                              "give another --out")
    return set(m["files"])


def _plain_relative(rel) -> bool:
    """A path inside the tree: relative, normalised, no '..' (a marker must never lead outside)."""
    if not isinstance(rel, str):
        return False
    p = PurePosixPath(rel)
    return not p.is_absolute() and str(p) == rel and all(part not in ("", ".", "..") for part in p.parts)


def _foreign_entries(out: Path, previous: set[str]) -> list[str]:
    """What under `out` is not the earlier tree: files it does not list, folders on none of their paths."""
    if not out.is_dir():
        return []
    files, folders = _entries(out)
    ours = previous | {str(temporary(Path(f))) for f in previous} | {MARKER, str(temporary(Path(MARKER)))}
    paths = {str(p) for f in previous for p in PurePosixPath(f).parents if p.parts}
    return sorted([f for f in files if f not in ours] + [d for d in folders if d not in paths])


def _entries(out: Path) -> tuple[list[str], list[str]]:
    """(files, folders) under `out`, relative; a link, even to a folder, is a file: never walked into."""
    files, folders = [], []
    for dirpath, dirnames, filenames in os.walk(out):
        rel = PurePosixPath(os.path.relpath(dirpath, out))
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        dirnames[:] = [d for d in dirnames if d not in links]
        files += [str(rel / f) for f in filenames + links]
        folders += [str(rel / d) for d in dirnames]
    return files, folders


def _write_marker(out: Path, dataset: str, how: dict, files: list[str]) -> None:
    target = out / MARKER
    tmp = temporary(target)
    try:
        tmp.write_text(json.dumps({"format": FORMAT, "dataset": dataset, "how": how, "files": files}))
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(e, target) from None
