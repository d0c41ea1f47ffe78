"""Cross-validated results read back as one: a path's K fold reports pooled into per-image predictions.

With `folds = K` (`fit --folds K`, `finetune --folds K`) every image is a test image exactly
once, in the fold data.fold_assignment gave it, and every path gets the same folds. `pool`
checks that a path's K reports are such a set and returns their predictions as one test set
of all images, so a comparison pairs two paths image by image across all folds.
"""

from __future__ import annotations

import re
from pathlib import Path

from bottleneck import data
from bottleneck.errors import BottleneckError
from bottleneck.report import Report, read_predictions, read_report

FOLD_SUFFIX = re.compile(r"-fold(\d+)$")


def pool(reports: list[str | Path]) -> dict:
    """One path's K fold reports (report.json, predictions.csv beside each) as one set of predictions.

    Returns {"predictions": {image path: {"true", "predicted", "probabilities": {class: p}}}
    (report.read_predictions's rows, every image of the data once), "n": images,
    "test_set_sha256": data.split_digest of all (path, true class) pairs, "fold_of": {image
    path: fold}, "folds": {"k", "seed", "assignment_sha256"}}. Pool each path's reports (one
    group of `groups`), check `same_folds` across paths, then pair the paths on "predictions"
    as on one test split. Raises BottleneckError, naming the report, when the reports are not
    K folds of one assignment, a fold is missing or twice, a fold's predictions are not its
    test set, or the folds' test images overlap or do not cover every image of the assignment.
    """
    if not reports:
        raise BottleneckError("no fold reports to pool; give the K report.json files of one path")
    records, pooled, fold_of = {}, {}, {}
    for path in map(Path, reports):
        rep = read_report(path)
        rec = rep.folds
        if not rec:
            raise BottleneckError(f"{path} is not a fold of a cross-validated run (it has no 'folds' record); pool "
                                  "only reports of fit or finetune --folds K")
        first = next(iter(records.values()), rec)
        for key in ("k", "seed", "assignment_sha256"):
            if rec[key] != first[key]:
                raise BottleneckError(f"{path} has folds {key} {rec[key]!r}, another report of this path "
                                      f"{first[key]!r}; pool the folds of one run, made with the same --folds and "
                                      "--split-seed from the same images")
        if rec["fold"] in records:
            raise BottleneckError(f"{path} is fold {rec['fold']} again; give each fold's report once")
        records[rec["fold"]] = rec
        rows = _fold_predictions(path, rep)
        for image, row in rows.items():
            if image in pooled:
                raise BottleneckError(f"{image} is a test image of folds {fold_of[image]} and {rec['fold']} "
                                      f"({path}); the folds' test sets must not overlap")
            pooled[image], fold_of[image] = row, rec["fold"]
    k = first["k"]
    missing = sorted(set(range(k)) - set(records))
    if missing:
        raise BottleneckError(f"fold{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {k} "
                              f"missing among {len(reports)} reports; run them (fit or finetune --folds {k} "
                              f"--fold I) before pooling")
    if data.assignment_digest(fold_of) != first["assignment_sha256"]:
        raise BottleneckError(f"the {k} folds' test images ({len(fold_of)}) are not the images their assignment "
                              "was made of; a fold skipped images or scored others, so rerun those folds")
    return {"predictions": pooled, "n": len(pooled),
            "test_set_sha256": data.split_digest([(p, r["true"]) for p, r in pooled.items()]),
            "fold_of": fold_of, "folds": {key: first[key] for key in ("k", "seed", "assignment_sha256")}}


def same_folds(pools: dict[str, dict]) -> None:
    """Refuse to pair paths whose folds differ: {name: pool(...)} must share one assignment."""
    digests = {name: p["folds"]["assignment_sha256"] for name, p in pools.items()}
    if len(set(digests.values())) > 1:
        names = sorted(digests, key=digests.get)
        raise BottleneckError(f"{names[0]} and {names[-1]} were cross-validated on different folds; run every path "
                              "with the same [data] folds and seed on the same images")


def groups(reports: list[str | Path]) -> dict[str, list[Path]]:
    """Reports of fold runs grouped by their run folder without -foldI: {folder: [report, ...]};
    reports of folders without the suffix are left out."""
    found: dict[str, list[Path]] = {}
    for path in map(Path, reports):
        match = FOLD_SUFFIX.search(path.parent.name)
        if match:
            key = str(path.parent.with_name(path.parent.name[:match.start()]))
            found.setdefault(key, []).append(path)
    return found


def _fold_predictions(path: Path, rep: Report) -> dict[str, dict]:
    """A fold's predictions.csv, checked against the test set its report names."""
    csv = path.parent / "predictions.csv"
    if not csv.is_file():
        raise BottleneckError(f"{path} has no predictions.csv beside it; run fold {rep.folds['fold']} again")
    rows = read_predictions(csv)
    digest = data.split_digest([(p, r["true"]) for p, r in rows.items()])
    if digest != (rep.test_set or {}).get("sha256"):
        raise BottleneckError(f"{csv} does not hold the test images {path} names; run fold "
                              f"{rep.folds['fold']} again")
    return rows
