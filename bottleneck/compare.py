"""Stage 4: put fixed-feature classifiers and fine-tuned networks side by side: accuracy with its
uncertainty, what each cost, and a verdict.

Reads every `report.json` (docs/reports.md) under the given folders. Rows share a table only
when they were scored on the same test images (equal `test_set.sha256`); the others are listed
apart. Runs that differ only by their seed (ids ending -seedN) are one contender: their mean,
with an interval that covers both the test images and the seeds. The verdict's two contenders,
the reference fixed-feature classifier and the fine-tune it is measured against, are chosen on
their validation scores, never on the test images; they are then scored on the test images once,
image by image from the `predictions.csv` beside each report: a paired difference with its 95 %
interval and test, an equivalence check against a margin, and the difference these test images
could have detected (docs/reports.md, "The verdict"). The cost of a classifier on cached features
is its extraction plus its fit; the cost of a fine-tune is its whole run. Outputs:
comparison.{md,csv,json,png} and a self-contained report.html.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from bottleneck import leaks, stats
from bottleneck import report as reports
from bottleneck.console import warn
from bottleneck.errors import BottleneckError

COLUMNS = ("id", "method", "backbone", "tap", "classifier", "seeds", "validation_accuracy", "accuracy", "accuracy_ci",
           "difference", "difference_ci", "p_value", "p_holm", "balanced_accuracy", "balanced_accuracy_ci",
           "balanced_difference", "balanced_difference_ci", "macro_f1", "cost_seconds", "ms_per_image", "n_train",
           "n_test", "device", "test_set", "report")
HEADERS = ("method", "backbone", "tap", "classifier", "runs", "validation accuracy", "test accuracy (95 % CI)",
           "vs reference, points (95 % CI)", "p (Holm)", "balanced accuracy", "balanced, vs reference",
           "total cost", "cost per image")
ALPHA = 0.05
MARGIN = 0.01  # a difference under one point is one a user would not act on
INTERVALS = ("95 % over the test images (which images landed in the test split); for a contender run with "
             "several seeds, over its seeds too. The reference and the named fine-tune were chosen on their "
             "validation scores, not on these test images; p is adjusted for the number of rows compared (Holm)")


def compare(run_dirs: list[str] | str, *, out: str | None = None, reference: str | None = None,
            challenger: str | None = None, margin: float = 1.0, without_twins: str | None = None) -> Path:
    """Collect the reports under `run_dirs` into OUT/comparison.{md,csv,json,png} and OUT/report.html;
    returns the .md's path. `out` defaults to the first folder; `reference` names the fixed-feature
    contender (its id, the report's folder under the run folder, without -seedN) every other is
    measured against, `challenger` the fine-tune the verdict names (default for both: the best on
    validation); `margin` is the difference, in accuracy points, that a user would not act on.
    `without_twins`: an audit.json of `bottleneck audit`; every row is scored again without the test
    images it found to be copies of training images, to show how much the leak flatters each path.
    """
    run_dirs = _folders(run_dirs)
    if out is not None and not isinstance(out, (str, os.PathLike)):
        raise BottleneckError(f"out must be a folder path, not {out!r}")
    found, twins = read_audit(without_twins) if without_twins else (None, None)
    result = comparison(run_dirs, reference, challenger=challenger, margin=margin, exclude=twins)
    if result["leak"]:
        warn(result["leak"])
    if found:
        result["audit"] = audit_summary(found, without_twins)
    out_dir = Path(out or run_dirs[0])
    from bottleneck.compare_html import html_report

    # Everything is rendered first, then written: a bad report leaves no half-written outputs.
    png = plot(result["rows"])
    files = {"comparison.md": markdown(result), "comparison.csv": to_csv(result["rows"] + result["apart"]),
             "comparison.json": json.dumps(_without_predictions(result), indent=1, default=_plain) + "\n",
             "report.html": html_report(result, png)}
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_bytes(out_dir / "comparison.png", png)
    for name, text in files.items():
        _write_bytes(out_dir / name, text.encode("utf-8"))
    return out_dir / "comparison.md"


def _folders(run_dirs) -> list[str]:
    """One folder or a list of them, as strings (a bare string is one folder, not its letters)."""
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    if not isinstance(run_dirs, (list, tuple)) or not run_dirs or \
            not all(isinstance(d, (str, os.PathLike)) for d in run_dirs):
        raise BottleneckError(f"run_dirs must be a folder or a list of folders, not {run_dirs!r}")
    return [str(d) for d in run_dirs]


def _without_predictions(result: dict) -> dict:
    """The result for comparison.json: pooled folds' per-image predictions stay in their folds' CSVs."""
    strip = lambda rows: [{k: v for k, v in r.items() if k != "predictions"} for r in rows]  # noqa: E731
    return result | {k: strip(result[k]) for k in ("rows", "apart", "left_out")}


def _plain(value):
    """JSON for numpy scalars that slip into the result."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def comparison(run_dirs: list[str], reference: str | None = None, *, challenger: str | None = None,
               margin: float = 1.0, exclude: set[str] | None = None) -> dict:
    """The comparison as plain data: decision and verdict, contenders with paired statistics, rows kept apart.
    `exclude`: test images left out of every row, whose measures are then recomputed without them."""
    margin = _margin(margin)
    rows = pool_folds(collect(_folders(run_dirs)))
    main, apart = split_by_test_set(rows)
    outcomes, images, paired_rows, left_out = pairable(main)
    excluded = sorted(set(images) & (exclude or set()))
    if exclude is not None:
        outcomes, images, paired_rows = without(outcomes, images, paired_rows, set(excluded))
    groups = contenders(paired_rows, outcomes, images) if paired_rows else contenders(main, {}, [])
    ref = pick(groups, "fixed features", reference, "--reference")
    ft = pick(groups, "fine-tune", challenger, "--challenger")
    anchor = ref["row"]  # none chosen: no row is measured against an arbitrary one
    for g in groups:
        g["reference"] = g is anchor
        g["challenger"] = g is ft["row"]
        if anchor is not None and g is not anchor and "correct" in g and "correct" in anchor:
            g |= versus(anchor, g, images)
    adjust_for_rows(groups)
    decision = decide(ref, ft, margin, len(images))
    counts = {"fixed features": sum(g["method"] == "fixed features" for g in groups),
              "fine-tune": sum(g["method"] == "fine-tune" for g in groups)}
    for g in groups:
        g.pop("correct", None)
        g.pop("y_true", None)
    return {"verdict": verdict_text(decision, ref["row"], ft["row"], apart, left_out), "decision": decision,
            "reference": anchor["id"] if anchor else None, "challenger": ft["row"]["id"] if ft["row"] else None,
            "contenders": counts, "margin": margin, "test_set": main[0]["test_set"], "rows": groups,
            "apart": apart, "left_out": left_out, "repeats": [g["across_seeds"] for g in groups if g["n_seeds"] > 1],
            "intervals": INTERVALS, "excluded": excluded if exclude is not None else None,
            "leak": None if exclude is not None else leak(main)}


def leak(rows: list[dict]) -> str | None:
    """The warning of the largest near-twin share the compared rows' own checks found (fit's on
    features, finetune's on files), or None when every share is small."""
    checks = [r["twins"] for r in rows if r.get("twins")]
    return leaks.warning(max(checks, key=lambda c: c["share"])) if checks else None


def read_audit(audit_json: str | os.PathLike) -> tuple[dict, set[str]]:
    """An audit.json of 'bottleneck audit', and the test images it found to be near-twins or copies of
    training images."""
    try:
        found = json.loads(Path(audit_json).read_text())
        return found, {t["path"] for t in found["twins"] if t["split"] == "test"}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BottleneckError(f"{audit_json} is not an audit.json written by 'bottleneck audit' ({e})") from None


AUDIT_SHOWN = 12  # twin pairs and suspect labels shown in report.html


def audit_summary(found: dict, audit_json: str | os.PathLike) -> dict:
    """What report.html shows of an audit: the first twin pairs and suspect labels, and its map."""
    return {"file": str(audit_json), "data_root": found.get("data_root"), "threshold": found.get("threshold"),
            "pixel_threshold": found.get("pixel_threshold"),
            "twin_share": found.get("twin_share", {}), "probe": found.get("probe", {}),
            "twins": [t for t in found["twins"] if t["split"] == "test"][:AUDIT_SHOWN],
            "suspects": found.get("suspects", [])[:AUDIT_SHOWN],
            "map": str(Path(audit_json).with_name("audit.png"))}


def without(outcomes: dict, images: list[str], rows: list[dict], excluded: set[str]):
    """Outcomes, images and rows with `excluded` test images left out; each row's accuracy, its interval
    and balanced accuracy recomputed on the rest (its other measures stay those of the whole test set)."""
    outcomes = {k: {p: v for p, v in o.items() if p not in excluded} if o is not None else None
                for k, o in outcomes.items()}
    kept = [p for p in images if p not in excluded]
    if not kept:
        raise BottleneckError("every test image is a twin of a training image; nothing is left to score")
    rescored = []
    for r in rows:
        right = np.array([outcomes[r["id"]][p][0] for p in kept])
        truth = np.array([outcomes[r["id"]][p][1] for p in kept])
        recall = [right[truth == c].mean() for c in np.unique(truth)]
        rescored.append(r | {"accuracy": float(right.mean()), "accuracy_ci": stats.wilson(int(right.sum()), len(right)),
                             "balanced_accuracy": float(np.mean(recall)), "n_test": len(kept)})
    return outcomes, kept, rescored


def pairable(rows: list[dict]) -> tuple[dict, list[str], list[dict], list[dict]]:
    """(per-image outcomes by row id, the test images, rows that can be paired on them, rows left out with
    the reason): a row without predictions, or whose predictions list other images, is named, never
    silently replaced by another."""
    outcomes = {r["id"]: correct_by_image(r) for r in rows}
    left_out = [r | {"left_out": "no predictions.csv beside its report: rerun its stage"}
                for r in rows if outcomes[r["id"]] is None]
    scored = [r for r in rows if outcomes[r["id"]] is not None]
    images = sorted(outcomes[scored[0]["id"]]) if scored else []
    paired = [r for r in scored if sorted(outcomes[r["id"]]) == images]
    left_out += [r | {"left_out": "its predictions.csv lists other images than its report's test set"}
                 for r in scored if r not in paired]
    return outcomes, images, paired, left_out


def _margin(points) -> float:
    if isinstance(points, bool) or not isinstance(points, (int, float)) or not math.isfinite(points) \
            or not 0 < points < 100:
        raise BottleneckError(f"--margin must be a number of accuracy points between 0 and 100, not {points!r}")
    return points / 100


# --------------------------------------------------------------------------- contenders

def contenders(rows: list[dict], outcomes: dict, images: list[str]) -> list[dict]:
    """Rows that differ only by seed (ids ending -seedN; seed 0 may keep the plain name) as one contender:
    the mean over seeds of accuracy, validation score and cost, each seed's run kept in `runs`."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(re.sub(r"-seed\d+$", "", r["id"]), []).append(r)
    out = []
    for base, members in groups.items():
        g = dict(members[0]) | {"id": base, "n_seeds": len(members)}
        acc = np.array([m["accuracy"] for m in members])
        vals = [m["validation"]["accuracy"] for m in members if m.get("validation")]
        g["runs"] = [{"id": m["id"], "accuracy": m["accuracy"], "report": m["report"],
                      "validation_accuracy": (m.get("validation") or {}).get("accuracy")} for m in members]
        g["validation_accuracy"] = float(np.mean(vals)) if len(vals) == len(members) else None
        g["accuracy"] = float(acc.mean())
        g["cost_seconds"] = round(float(np.mean([m["cost_seconds"] for m in members])), 3)
        g["ms_per_image"] = members[0]["ms_per_image"] and round(
            float(np.mean([m["ms_per_image"] or 0 for m in members])), 3)
        g["balanced_accuracy"] = float(np.mean([m["balanced_accuracy"] for m in members]))
        g["seeds"] = [m["id"] for m in members]
        if images:
            g["correct"] = np.array([[outcomes[m["id"]][p][0] for p in images] for m in members])
            g["y_true"] = [outcomes[members[0]["id"]][p][1] for p in images]
            g["accuracy_ci"] = stats.mean_accuracy_ci(g["correct"]) if len(members) > 1 else members[0]["accuracy_ci"]
        if len(members) > 1:
            g["across_seeds"] = {"config": base, "n": len(members), "mean": float(acc.mean()),
                                 "sd": float(acc.std(ddof=1)), "min": float(acc.min()), "max": float(acc.max()),
                                 "runs": g["runs"]}
        out.append(g)
    return out


def pick(groups: list[dict], method: str, named: str | None, option: str) -> dict:
    """The contender of one side the verdict names: the one asked for, else the best on validation
    (the cheaper on a tie). Never chosen on the test images; {"row": None, "why": ...} when none can be."""
    side = [g for g in groups if g["method"] == method]
    if named:
        found = [g for g in groups if g["id"] == named] or [g for g in groups if named in g["id"]]
        if len(found) != 1:
            ids = ", ".join(g["id"] for g in groups)
            raise BottleneckError(f"{option} '{named}' names {'no' if not found else 'more than one'} contender "
                                  f"of the main table; choose one of: {ids}")
        return {"row": found[0], "by": option, "among": len(side)}
    if not side:
        return {"row": None, "why": f"no {method} result scored on these test images", "among": 0}
    scored = [g for g in side if g.get("validation_accuracy") is not None]
    if not scored:
        return {"row": None, "among": len(side),
                "why": f"no {method} result records a validation score to choose by; name one with {option}"}
    best = max(scored, key=lambda g: (g["validation_accuracy"], -g["cost_seconds"]))
    return {"row": best, "by": "validation", "among": len(side), "unscored": len(side) - len(scored)}


def versus(ref: dict, g: dict, images: list[str]) -> dict:
    """A contender against the reference on the same images: accuracy and balanced accuracy differences."""
    d = stats.paired_difference(ref["correct"], g["correct"])
    bal = stats.paired_balanced_difference(np.array(g["y_true"]), ref["correct"], g["correct"])
    return {"difference": d["difference"], "difference_ci": d["difference_ci"], "p_value": d["p_value"],
            "paired": d, "balanced_difference": bal["difference"], "balanced_difference_ci": bal["difference_ci"]}


def adjust_for_rows(groups: list[dict]) -> None:
    """Holm-adjusted p-values over all contenders compared with the reference: with six rows and no true
    difference, one unadjusted p < 0.05 turns up in about a third of tables."""
    compared = [g for g in groups if g.get("p_value") is not None]
    for g, p in zip(compared, stats.holm([g["p_value"] for g in compared])):
        g["p_holm"] = p


# --------------------------------------------------------------------------- the decision

def decide(ref: dict, ft: dict, margin: float, n: int) -> dict:
    """Fine-tuning better, fixed features better, equivalent within the margin, or inconclusive with the
    difference these test images could have detected. The 95 % interval decides a difference (it excludes
    zero exactly when the test's p < 0.05); equivalence needs the 90 % interval inside ±margin (two
    one-sided tests at 5 %)."""
    base = {"margin": margin, "n_test": n, "reference": _choice(ref), "challenger": _choice(ft)}
    if ref["row"] is None or ft["row"] is None or "paired" not in ft["row"]:
        missing = [p["why"] for p in (ft, ref) if p["row"] is None]  # no fine-tune at all: the plainer reason
        why = (missing[0] if missing else "the reference and the challenger are the same contender"
               if ft["row"] is ref["row"] else "its predictions are missing")
        return base | {"outcome": "no pair", "why": why}
    d = ft["row"]["paired"]
    outcome = str(outcome_of(*d["difference_ci"], *d["difference_ci90"], margin))
    return base | {"outcome": outcome, **{k: d[k] for k in ("difference", "difference_ci", "difference_ci90",
                                                             "p_value", "method", "detectable", "seeds")},
                   "images_needed": needed(d, margin, n), "cost_ratio": _ratio(ft["row"], ref["row"])}


def _choice(picked: dict) -> dict:
    """How a side's contender was chosen, as plain data for comparison.json."""
    return {"id": picked["row"]["id"] if picked["row"] else None} | {k: v for k, v in picked.items() if k != "row"}


def outcome_of(low, high, low90, high90, margin: float):
    """The three-way rule (vectorised, so the simulation in the tests applies this very rule)."""
    low, high, low90, high90 = (np.asarray(v) for v in (low, high, low90, high90))
    return np.select([low > 0, high < 0, (low90 > -margin) & (high90 < margin)],
                     ["fine-tuning better", "fixed features better", "equivalent"], "inconclusive")


def needed(d: dict, margin: float, n: int) -> int | None:
    """Test images at which a difference of `margin` would be detected with 80 % power; None when the
    seeds' own spread alone hides it (more seeds, not more images, would help)."""
    if d["method"] == "score":
        return stats.images_needed(margin, d["discordant"])
    z = stats.Z95 + stats.Z_POWER
    room = (margin / z) ** 2 - d["seed_se"] ** 2
    return math.ceil(n * d["image_se"] ** 2 / room) if room > 0 else None


def _ratio(ft: dict, ref: dict) -> float:
    return ft["cost_seconds"] / ref["cost_seconds"] if ref["cost_seconds"] > 0 else math.inf


def verdict_text(decision: dict, ref: dict | None, ft: dict | None, apart: list[dict], left_out: list[dict]) -> str:
    """One sentence a user can act on (three-way, with the margin and the power), then what was left out."""
    text = _verdict(decision, ref, ft)
    if left_out:
        text += "; left out: " + ", ".join(f"{r['id']} ({r['left_out']})" for r in left_out)
    if apart:
        text += f"; {len(apart)} result(s) scored on other test images are listed apart"
    return text


def _verdict(dec: dict, ref: dict | None, ft: dict | None) -> str:
    if dec["outcome"] == "no pair":
        return f"no verdict: {dec['why']}"
    diff, (low, high), (low90, high90) = (100 * dec["difference"], [100 * v for v in dec["difference_ci"]],
                                          [100 * v for v in dec["difference_ci90"]])
    m, n, p = 100 * dec["margin"], dec["n_test"], _p(dec["p_value"])
    cost = _times(dec["cost_ratio"])
    ci = f"95 % CI {low:+.1f} to {high:+.1f}, {p}"
    if dec["outcome"] == "fine-tuning better":
        return (f"fine-tuning is better: {label(ft)} scores {diff:.1f} points higher than {label(ref)} ({ci}), "
                f"for {cost} the compute")
    if dec["outcome"] == "fixed features better":
        return (f"fixed features are better: {label(ref)} scores {-diff:.1f} points higher than {label(ft)} "
                f"({ci}), and fine-tuning takes {cost} the compute")
    # "0.0 points lower than" reads as a contradiction: a difference that rounds to zero is "the same as"
    direction = (f"{abs(diff):.1f} points {'higher' if diff >= 0 else 'lower'} than" if round(abs(diff), 1)
                 else "the same accuracy as")
    if dec["outcome"] == "equivalent":
        return (f"fixed features are as good, within ±{m:g} points: {label(ft)} scores {direction} "
                f"{label(ref)} (90 % CI {low90:+.1f} to {high90:+.1f}, inside the margin), for {cost} the compute")
    need = dec["images_needed"]
    more = (f"about {need:,} would be needed to tell a {m:g}-point difference" if need is not None else
            f"the spread between seeds alone hides a {m:g}-point difference: more seeds are needed")
    return (f"inconclusive: {label(ft)} scores {direction} {label(ref)} ({ci}); these {n} test images "
            f"can only tell differences above {100 * dec['detectable']:.1f} points (80 % power), and {more}; "
            f"fine-tuning takes {cost} the compute")

# --------------------------------------------------------------------------- rows

def collect(run_dirs: list[str]) -> list[dict]:
    """One row per fit or finetune report under the folders, cheapest first."""
    rows, seen = [], set()
    for folder in run_dirs:
        if not Path(folder).is_dir():
            raise BottleneckError(f"run folder {folder} does not exist")
        for path in sorted(Path(folder).rglob("report.json")):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            rep = reports.read_report(path)
            if rep.stage in ("fit", "finetune"):
                rows.append(row(rep, Path(folder)))
    if not rows:
        raise BottleneckError(f"no fit or finetune report.json under {', '.join(run_dirs)}; run "
                              "'bottleneck fit', 'bottleneck finetune' or 'bottleneck run' first")
    return sorted(rows, key=lambda r: (r["cost_seconds"], r["report"]))


def pool_folds(rows: list[dict]) -> list[dict]:
    """Each cross-validated path's K fold rows (folders ending -foldI) as one row scored on every image
    (folds.pool checks they are one complete assignment), so paths pair image by image across all folds."""
    from bottleneck import folds

    by_path = folds.groups([r["report"] for r in rows])
    if not by_path:
        return rows
    pools = {key: folds.pool(paths) for key, paths in by_path.items()}
    folds.same_folds(pools)
    in_folds = {str(p) for paths in by_path.values() for p in paths}
    out = [r for r in rows if r["report"] not in in_folds]
    for key, paths in by_path.items():
        members = [r for r in rows if r["report"] in {str(p) for p in paths}]
        out.append(_pooled_row(members, pools[key]))
    return sorted(out, key=lambda r: (r["cost_seconds"], r["report"]))


def _pooled_row(members: list[dict], pooled: dict) -> dict:
    from sklearn.metrics import balanced_accuracy_score

    preds = pooled["predictions"]
    classes = members[0]["classes"] or sorted({v["true"] for v in preds.values()})
    y_true = np.array([classes.index(v["true"]) for v in preds.values()])
    y_pred = np.array([classes.index(v["predicted"]) for v in preds.values()])
    right, n = int((y_true == y_pred).sum()), len(y_true)
    vals = [m["validation"]["accuracy"] for m in members if m.get("validation")]
    k = len(members)
    # the extraction is one pass for all folds: counted once, each fold's own training added
    cost = sum(m["cost_seconds"] for m in members) - (k - 1) * members[0]["shared_seconds"]
    n_train = int(np.mean([m["n_train"] for m in members]))
    return members[0] | {
        "id": re.sub(r"-fold\d+$", "", members[0]["id"]), "accuracy": right / n, "accuracy_ci": stats.wilson(right, n),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "balanced_accuracy_ci": stats.balanced_accuracy_ci(y_true, y_pred, len(classes)),
        "n_test": n, "test_set": pooled["test_set_sha256"], "cost_seconds": round(cost, 3),
        "ms_per_image": round(1000 * cost / n_train, 3) if n_train else None,
        "validation": {"accuracy": float(np.mean(vals)), "by": f"mean over {k} folds"} if len(vals) == k else None,
        "folds": pooled["folds"] | {"reports": [m["report"] for m in members]}, "predictions": preds}


def row(rep: reports.Report, run_dir: Path | None = None) -> dict:
    """The comparison's view of one report (read by report.read_report): its scores, intervals and total
    cost in seconds, named by its folder relative to `run_dir`."""
    folder = rep.path.parent
    ident = str(folder.relative_to(run_dir)) if run_dir and folder.is_relative_to(run_dir) else str(folder)
    seconds, n_train = rep.cost_seconds, int(rep.n_train or 0)
    return {"id": ident, "method": rep.method, "backbone": str(rep.model), "tap": rep.tap or "",
            "classifier": rep.clf if rep.stage == "fit" else _finetuned(rep, folder.name),
            "accuracy": rep.accuracy, "accuracy_ci": rep.accuracy_ci,
            "difference": None, "difference_ci": None, "p_value": None,
            "balanced_accuracy": rep.balanced_accuracy, "balanced_accuracy_ci": rep.balanced_accuracy_ci,
            "macro_f1": rep.macro_f1 or 0.0,
            "cost_seconds": round(seconds, 3),
            # per training image: what each labelled example cost to learn from
            "ms_per_image": round(1000 * seconds / n_train, 3) if n_train else None,
            "n_train": n_train, "n_test": rep.n_test, "device": rep.device,
            "test_set": str(rep.test_set["sha256"]) if rep.test_set else None, "report": str(rep.path),
            "classes": rep.classes, "data_root": rep.data_root, "validation": rep.validation,
            "shared_seconds": rep.shared_seconds, "twins": (rep.test_set or {}).get("twins")}


def _finetuned(rep: reports.Report, name: str) -> str:
    """What a fine-tune trained; several LP-FT or top runs are told apart by their run's name (without
    -seedN: a contender's seeds share it) and length."""
    settings = rep.settings
    name = re.sub(r"-seed\d+$", "", name)
    lpft = "head from a logreg probe" if settings.get("init_head") else ""
    if settings.get("from_cache"):
        views = (rep.extra.get("from_cache") or {}).get("views", "none")
        return (f"layers after {rep.tap} on cached maps{'' if views == 'none' else ' of ' + views + ' views'}"
                f"{', ' + lpft if lpft else ''} ({name}, {settings.get('epochs')} epochs)")
    if lpft:
        return f"{lpft} (LP-FT {name}, {settings.get('epochs')} epochs)"
    unfreeze = str(settings.get("unfreeze", "all"))
    if unfreeze == "all":
        return "whole network, new head"
    if unfreeze.startswith("from:"):
        return f"layers from {unfreeze.removeprefix('from:')} on, new head"
    return f"last {unfreeze} blocks, new head"


def split_by_test_set(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """The rows scored on the most common test set (a set with a fine-tune wins a tie), and the rest.

    A report without a test_set record (made before they existed) is never assumed to match.
    """
    groups: dict[str, list[dict]] = {}
    if not any(r["test_set"] for r in rows):  # all from before test sets were recorded: one table, unpaired
        return rows, []
    for r in rows:
        groups.setdefault(r["test_set"] or f"unknown:{r['report']}", []).append(r)
    best = max(groups, key=lambda k: (not k.startswith("unknown:"), len(groups[k]),
                                      any(r["method"] == "fine-tune" for r in groups[k])))
    return groups[best], [r for k, g in groups.items() if k != best for r in g]


def predictions(r: dict) -> dict[str, dict] | None:
    """The predictions.csv beside a row's report (report.read_predictions), if there is one; a
    cross-validated row's pooled predictions of all its folds."""
    if r.get("predictions") is not None:
        return r["predictions"]
    path = Path(r["report"]).with_name("predictions.csv")
    if not path.is_file():
        return None
    try:
        return reports.read_predictions(path)
    except (OSError, ValueError, KeyError, csv.Error) as e:
        raise BottleneckError(f"{path} is not a readable predictions file ({e}); rerun its stage") from None


def correct_by_image(r: dict) -> dict[str, tuple[bool, str]] | None:
    """{test image: (predicted right?, true class)} for a row, from its predictions."""
    rows = predictions(r)
    return None if rows is None else {p: (v["true"] == v["predicted"], v["true"]) for p, v in rows.items()}


def label(r: dict) -> str:
    seeds = f" (mean of {r['n_seeds']} seeds)" if r.get("n_seeds", 1) > 1 else ""
    if r["method"] == "fine-tune":
        return f"fine-tuning {r['backbone']} ({r['classifier']}){seeds}"
    return f"{r['classifier']} on {r['backbone']} {r['tap']}".rstrip() + seeds


def _ci(ci) -> str:
    return f"{ci[0]:.3f}-{ci[1]:.3f}" if ci else ""


def _p(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}" if p < 0.1 else f"p = {p:.2f}"


def _times(ratio: float) -> str:
    """A cost ratio as words: "67×", "2.5×", "1/4 of", "unmeasurable"."""
    if math.isinf(ratio) or ratio <= 0:
        return "an unmeasured multiple of"
    if ratio < 1:
        return f"1/{1 / ratio:.0f} of" if ratio <= 0.1 else f"1/{1 / ratio:.1f} of"
    return f"{ratio:.0f}×" if ratio >= 10 else f"{ratio:.1f}×"


# --------------------------------------------------------------------------- outputs

def markdown(result: dict) -> str:
    """comparison.md. Run names are the user's folder names: escaped, so no Markdown or HTML in them renders."""
    c = result["contenders"]
    lines = [f"**Verdict:** {_md(result['verdict'])}", "",
             f"Reference: `{_code(result['reference'])}`; fine-tune named: `{_code(result['challenger'])}`; chosen on "
             f"validation among {c['fixed features']} fixed-feature and {c['fine-tune']} fine-tune contender(s), "
             f"never on the test images. Margin: ±{100 * result['margin']:g} points.", "",
             f"Intervals: {result['intervals']}.", "", *_table(result["rows"])]
    if result.get("leak"):
        lines[1:1] = ["", f"**Warning:** {_md(result['leak'])}."]
    if result.get("excluded") is not None:
        lines[1:1] = ["", f"Scored without the {len(result['excluded'])} test images the audit found to be copies "
                          "of training images (accuracy, its interval and balanced accuracy; the other measures "
                          "are those of the whole test set)."]
    if result.get("repeats"):
        lines += ["", "Seeds of each contender (a rerun's noise; the contender's row is their mean):", "",
                  "| contender | runs | mean accuracy ± sd | each run |", "|---|---|---|---|"]
        lines += [f"| {_md(r['config'])} | {r['n']} | {r['mean']:.3f} ± {r['sd']:.3f} | "
                  + ", ".join(f"{_md(run['id'])} {run['accuracy']:.3f}" for run in r["runs"]) + " |"
                  for r in result["repeats"]]
    if result.get("left_out"):
        lines += ["", "Left out of the comparison:", ""] + [f"- {_md(r['id'])}: {_md(r['left_out'])}"
                                                             for r in result["left_out"]]
    if result["apart"]:
        lines += ["", "Scored on other test images (not comparable with the table above):", "",
                  *_table(result["apart"])]
    return "\n".join(lines) + "\n"


def _md(text) -> str:
    """Text safe in a Markdown table cell: whatever could open an HTML tag or entity made an entity, Markdown's
    own punctuation escaped; plain text such as "p < 0.001" stays as it reads."""
    text = re.sub(r"&(?=#?\w+;)", "&amp;", str(text).replace("\n", " "))
    text = re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)
    return re.sub(r"([\\`*\[\]|])", r"\\\1", text)


def _code(text) -> str:
    return str(text).replace("`", "'").replace("\n", " ")


def _table(rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in rows:
        # the names (backbone, tap, classifier) come from the user's runs; the rest is our own text
        lines.append("| " + " | ".join(_md(c) if 1 <= i <= 3 else c for i, c in enumerate(cells(r))) + " |")
    return lines


def cells(r: dict) -> list[str]:
    """A row's table cells, as text (shared by the markdown and the HTML)."""
    versus_ref, p, balanced = "", "", ""
    if r.get("reference"):
        versus_ref = balanced = "reference"
    elif r.get("difference") is not None:
        low, high = (100 * v for v in r["difference_ci"])
        versus_ref = f"{100 * r['difference']:+.1f} ({low:+.1f} to {high:+.1f})"
        p = _p(r["p_holm"]) if r.get("p_holm") is not None else _p(r["p_value"])
        if r.get("balanced_difference") is not None:
            bl, bh = (100 * v for v in r["balanced_difference_ci"])
            balanced = f"{100 * r['balanced_difference']:+.1f} ({bl:+.1f} to {bh:+.1f})"
    runs = str(r.get("n_seeds", 1)) + (" seeds" if r.get("n_seeds", 1) > 1 else "")
    val = r.get("validation_accuracy")
    classifier = r["classifier"] + (" (named)" if r.get("challenger") else "")
    return [r["method"], r["backbone"], r["tap"], classifier, runs, f"{val:.3f}" if val is not None else "",
            f"{r['accuracy']:.3f} ({_ci(r['accuracy_ci'])})", versus_ref, p, f"{r['balanced_accuracy']:.3f}", balanced,
            seconds(r["cost_seconds"]), f"{r['ms_per_image']:.1f} ms" if r.get("ms_per_image") is not None else ""]


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    return buf.getvalue()


def seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.1f} s"


def _write_bytes(path: Path, content: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def plot(rows: list[dict]) -> bytes:
    """Test accuracy (95 % interval bars) against total cost (log scale), one labelled point per contender;
    the PNG's bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several = len({r["backbone"] for r in rows}) > 1
    colours = {"fixed features": "tab:blue", "fine-tune": "tab:red"}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, colour in colours.items():
        mine = [r for r in rows if r["method"] == method]
        if not mine:  # no legend entry for a path that was not run
            continue
        xs = [max(r["cost_seconds"], 1e-3) for r in mine]
        ys = [r["accuracy"] for r in mine]
        # clipped at zero: a report whose interval misses its own accuracy still plots
        errors = np.maximum(0, np.array([[r["accuracy"] - r["accuracy_ci"][0], r["accuracy_ci"][1] - r["accuracy"]]
                                         for r in mine]).T)
        ax.errorbar(xs, ys, yerr=errors, fmt="o", color=colour, ecolor=colour, elinewidth=1, capsize=3,
                    label=method, zorder=3)
    placed: list[tuple[float, float, int]] = []
    for r in sorted(rows, key=lambda r: (r["cost_seconds"], r["accuracy"])):
        text = r["classifier"] if r["method"] == "fine-tune" else f"{r['tap']} {r['classifier']}"
        text = f"{r['backbone']} {text}" if several else text
        x, y = max(r["cost_seconds"], 1e-3), r["accuracy"]
        # Two contenders of about the same cost and accuracy would print their labels on top of each other:
        # each further one goes a line lower.
        dy = 3
        while any(abs(np.log10(x / px)) < 0.15 and abs(y - py) < 0.008 and dy == pdy for px, py, pdy in placed):
            dy -= 9
        placed.append((x, y, dy))
        ax.annotate(text + (" (reference)" if r.get("reference") else ""), (x, y), textcoords="offset points",
                    xytext=(5, dy), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("total cost, seconds (extraction + fit, or fine-tuning)")
    ax.set_ylabel("test accuracy (95 % interval)")
    ax.set_title("Is fine-tuning worth it? Accuracy against cost", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
