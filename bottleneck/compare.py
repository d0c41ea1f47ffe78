"""Stage 4: put fixed-feature classifiers and fine-tuned networks side by side: accuracy with its
uncertainty, what each cost, and a verdict.

Reads every `report.json` (docs/reports.md) under the given folders. Rows share a table only
when they were scored on the same test images (equal `test_set.sha256`); the others are listed
apart. Every row of the main table is compared with a reference row (by default the best
fixed-feature one) image by image, from the `predictions.csv` beside each report: the paired
difference in accuracy with a 95 % bootstrap interval and McNemar's exact p-value. The cost of
a classifier on cached features is its extraction plus its fit; the cost of a fine-tune is its
whole run. Outputs: comparison.{md,csv,json,png} and a self-contained report.html.
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

from bottleneck import report as reports
from bottleneck import stats
from bottleneck.errors import BottleneckError

COLUMNS = ("id", "method", "backbone", "tap", "classifier", "accuracy", "accuracy_ci", "difference", "difference_ci",
           "p_value", "balanced_accuracy", "balanced_accuracy_ci", "macro_f1", "cost_seconds", "ms_per_image",
           "n_train", "n_test", "device", "test_set", "report")
HEADERS = ("method", "backbone", "tap", "classifier", "test accuracy (95 % CI)", "vs reference, points (95 % CI)",
           "p", "balanced accuracy", "total cost", "cost per image")
ALPHA = 0.05
INTERVALS = ("95 % over test images: which images landed in the test split, not seed-to-seed noise; the reference "
             "and the fine-tune the verdict names are the best on these same test images, so with many candidates "
             "read a p near 0.05 as a hint, not a finding")


def compare(run_dirs: list[str], *, out: str | None = None, reference: str | None = None) -> Path:
    """Collect the reports under `run_dirs` into OUT/comparison.{md,csv,json,png} and OUT/report.html;
    returns the .md's path. `out` defaults to the first folder; `reference` names the row (its id,
    the report's folder under the run folder) every other row is measured against.
    """
    result = comparison(run_dirs, reference)
    out_dir = Path(out or run_dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    from bottleneck.compare_html import html_report

    # Everything is rendered first, then written: a bad report leaves no half-written outputs.
    files = {"comparison.md": markdown(result), "comparison.csv": to_csv(result["rows"] + result["apart"]),
             "comparison.json": json.dumps(result, indent=1) + "\n"}
    for name, text in files.items():
        _write_text(out_dir / name, text)
    plot(result["rows"], out_dir / "comparison.png")
    _write_text(out_dir / "report.html", html_report(result, out_dir / "comparison.png"))
    return out_dir / "comparison.md"


def comparison(run_dirs: list[str], reference: str | None = None) -> dict:
    """The comparison as plain data: verdict, reference, main rows with paired statistics, rows kept apart."""
    rows = collect(run_dirs)
    main, apart = split_by_test_set(rows)
    ref = pick_reference(main, reference)
    outcomes = {r["id"]: correct_by_image(r) for r in main}
    for r in main:
        r |= paired(outcomes.get(ref["id"]), outcomes.get(r["id"]), r is ref)
    repeats = across_seeds(main)
    return {"verdict": verdict(main, ref, apart, repeats), "reference": ref["id"],
            "test_set": main[0]["test_set"], "rows": main, "apart": apart, "repeats": repeats,
            "intervals": INTERVALS}


def across_seeds(rows: list[dict]) -> list[dict]:
    """Results of one configuration run with several seeds (ids ending -seedN): mean and spread.

    The spread is the noise a rerun brings (data order, augmentation, initialisation), which
    the test-set intervals do not cover.
    """
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(re.sub(r"-seed\d+$", "", r["id"]), []).append(r)
    repeats = []
    for config, members in groups.items():
        if len(members) < 2:
            continue
        acc = np.array([m["accuracy"] for m in members])
        summary = {"config": config, "n": len(members), "mean": float(acc.mean()), "sd": float(acc.std(ddof=1)),
                   "min": float(acc.min()), "max": float(acc.max())}
        repeats.append(summary)
        for m in members:
            m["across_seeds"] = summary
    return repeats


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
            rep = _read_report(path)
            if rep.get("stage") in ("fit", "finetune"):
                rows.append(row(rep, path, Path(folder)))
    if not rows:
        raise BottleneckError(f"no fit or finetune report.json under {', '.join(run_dirs)}; run "
                              "'bottleneck fit', 'bottleneck finetune' or 'bottleneck run' first")
    return sorted(rows, key=lambda r: (r["cost_seconds"], r["report"]))


def _read_report(path: Path) -> dict:
    try:
        rep = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BottleneckError(f"{path} is not a readable report ({e}); delete it or rerun its stage") from None
    if not isinstance(rep, dict):
        raise BottleneckError(f"{path} is not a report (a JSON object); delete it or rerun its stage")
    return rep


def row(rep: dict, path: Path, run_dir: Path | None = None) -> dict:
    """The comparison's view of one report: its scores, intervals and total cost in seconds."""
    try:
        return _row(rep, path, run_dir)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise BottleneckError(f"{path} lacks what a report holds ({type(e).__name__}: {e}); "
                              "delete it or rerun its stage") from None


def _row(rep: dict, path: Path, run_dir: Path | None) -> dict:
    cost = rep.get("cost") or {}
    if rep["stage"] == "finetune":
        method, seconds, device = "fine-tune", _number(cost.get("wall_seconds", 0.0)), cost.get("device", "")
        seconds += _number(rep.get("probe_cost_seconds") or 0.0)  # LP-FT: the probe it started from counts too
        seconds += _number(rep.get("cache_cost_seconds") or 0.0)  # a top trained on cached maps: their extraction
    else:
        extraction = cost.get("extraction") or {}
        method = "fixed features"
        seconds = _number(cost.get("fit_seconds", 0.0)) + _number(extraction.get("wall_seconds", 0.0))
        device = extraction.get("device", "")
    accuracy, n_test = _number(rep["accuracy"]), int(rep.get("n_test") or 0)
    n_train = int(rep.get("n_train") or 0)
    folder = path.parent
    ident = str(folder.relative_to(run_dir)) if run_dir and folder.is_relative_to(run_dir) else str(folder)
    return {"id": ident, "method": method, "backbone": str(rep["model"]), "tap": rep.get("tap") or "",
            "classifier": rep["clf"] if rep["stage"] == "fit" else _finetuned(rep, folder.name),
            "accuracy": accuracy,
            "accuracy_ci": _interval(rep.get("accuracy_ci")) or stats.wilson(round(accuracy * n_test), n_test),
            "difference": None, "difference_ci": None, "p_value": None,
            "balanced_accuracy": _number(rep["balanced_accuracy"]),
            "balanced_accuracy_ci": _interval(rep.get("balanced_accuracy_ci")),
            "macro_f1": _number(rep.get("macro_f1", 0.0)),
            "cost_seconds": round(seconds, 3),
            # per training image: what each labelled example cost to learn from
            "ms_per_image": round(1000 * seconds / n_train, 3) if n_train else None,
            "n_train": n_train, "n_test": n_test, "device": device,
            "test_set": str(rep["test_set"]["sha256"]) if rep.get("test_set") else None, "report": str(path),
            "classes": rep.get("classes"), "data_root": rep.get("data_root")}


def _finetuned(rep: dict, name: str) -> str:
    """What a fine-tune trained; several LP-FT or top runs are told apart by their run's name and length."""
    params = rep.get("params") or {}
    lpft = "head from a logreg probe" if params.get("init_head") else ""
    if params.get("from_cache"):
        views = (rep.get("from_cache") or {}).get("views", "none")
        return (f"layers after {rep.get('tap')} on cached maps{'' if views == 'none' else ' of ' + views + ' views'}"
                f"{', ' + lpft if lpft else ''} ({name}, {params.get('epochs')} epochs)")
    if lpft:
        return f"{lpft} (LP-FT {name}, {params.get('epochs')} epochs)"
    return "fine-tuned head"


def _interval(value) -> list[float] | None:
    """A report's [low, high], or None when it has none (older reports) or it is malformed."""
    if value is None:
        return None
    low, high = (_number(v) for v in value)
    return [low, high]


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    return float(value)


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


def pick_reference(rows: list[dict], reference: str | None) -> dict:
    """The named row, else the most accurate fixed-feature row (the cheaper on a tie), else the first."""
    if reference:
        found = [r for r in rows if r["id"] == reference] or [r for r in rows if reference in r["id"]]
        if len(found) != 1:
            ids = ", ".join(r["id"] for r in rows)
            raise BottleneckError(f"--reference '{reference}' names {'no' if not found else 'more than one'} row "
                                  f"of the main table; choose one of: {ids}")
        return found[0]
    fixed = [r for r in rows if r["method"] == "fixed features"] or rows
    return max(fixed, key=lambda r: (r["accuracy"], -r["cost_seconds"]))


def predictions(r: dict) -> dict[str, dict] | None:
    """The predictions.csv beside a row's report (report.read_predictions), if there is one."""
    path = Path(r["report"]).with_name("predictions.csv")
    if not path.is_file():
        return None
    try:
        return reports.read_predictions(path)
    except (OSError, ValueError, KeyError, csv.Error) as e:
        raise BottleneckError(f"{path} is not a readable predictions file ({e}); rerun its stage") from None


def correct_by_image(r: dict) -> dict[str, bool] | None:
    """{test image: predicted right?} for a row, from its predictions."""
    rows = predictions(r)
    return None if rows is None else {p: v["true"] == v["predicted"] for p, v in rows.items()}


def paired(ref: dict[str, bool] | None, mine: dict[str, bool] | None, is_reference: bool) -> dict:
    """Difference to the reference on the same images, with its interval and McNemar's p."""
    if is_reference or ref is None or mine is None or set(ref) != set(mine):
        return {"reference": is_reference}
    order = sorted(ref)
    d = stats.paired_difference(np.array([ref[p] for p in order]), np.array([mine[p] for p in order]))
    return {"reference": False, **d}


# --------------------------------------------------------------------------- the verdict

def verdict(rows: list[dict], ref: dict, apart: list[dict], repeats: list[dict] | None = None) -> str:
    """One sentence a user can act on: does the best fine-tune beat the reference, by how much, at what cost."""
    tunes = [r for r in rows if r["method"] == "fine-tune" and r is not ref and r.get("difference") is not None]
    n = ref["n_test"]
    if ref["method"] != "fixed features" or not tunes:
        best = max(rows, key=lambda r: r["accuracy"])
        text = (f"best: {label(best)} at {best['accuracy']:.3f} (95 % CI {_ci(best['accuracy_ci'])}) on {n} test "
                "images; no fixed-feature and fine-tuned pair to compare")
    else:
        ft = max(tunes, key=lambda r: r["accuracy"])
        low, high = (100 * v for v in ft["difference_ci"])
        diff, p = 100 * ft["difference"], _p(ft["p_value"])
        ratio = ft["cost_seconds"] / ref["cost_seconds"] if ref["cost_seconds"] > 0 else math.inf
        # A difference is claimed only when the interval clears zero and McNemar's exact test agrees:
        # with few discordant images the bootstrap interval alone is too narrow.
        detected = ft["p_value"] < ALPHA
        if detected and low > 0:
            text = (f"fine-tuning: {diff:+.1f} points (95 % CI {low:+.1f} to {high:+.1f}, {p}) over {label(ref)} "
                    f"for {_times(ratio)} the compute")
        elif detected and high < 0:
            text = (f"fixed features: {label(ref)} beats fine-tuning by {-diff:.1f} points (95 % CI {-high:.1f} to "
                    f"{-low:.1f}, {p}), and fine-tuning takes {_times(ratio)} the compute")
        else:
            text = (f"no difference detectable with {n} test images: fine-tuning {diff:+.1f} points (95 % CI "
                    f"{low:+.1f} to {high:+.1f}, {p}) over {label(ref)}, for {_times(ratio)} the compute")
    for rep in repeats or []:
        text += (f"; {rep['config']} over {rep['n']} seeds: {rep['mean']:.3f} ± {rep['sd']:.3f} "
                 f"({rep['min']:.3f} to {rep['max']:.3f})")
    if apart:
        text += f"; {len(apart)} result(s) scored on other test images are listed apart"
    return text


def label(r: dict) -> str:
    if r["method"] == "fine-tune":
        return f"fine-tuned {r['backbone']}"
    return f"{r['classifier']} on {r['backbone']} {r['tap']}".rstrip()


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
    lines = [f"**Verdict:** {result['verdict']}", "",
             f"Reference: `{result['reference']}`; intervals: {result['intervals']}.", "",
             *_table(result["rows"])]
    if result.get("repeats"):
        lines += ["", "Across seeds (a rerun's noise, which the intervals above do not cover):", "",
                  "| configuration | runs | mean accuracy ± sd | min | max |", "|---|---|---|---|---|"]
        lines += [f"| {r['config']} | {r['n']} | {r['mean']:.3f} ± {r['sd']:.3f} | {r['min']:.3f} | {r['max']:.3f} |"
                  for r in result["repeats"]]
    if result["apart"]:
        lines += ["", "Scored on other test images (not comparable with the table above):", "",
                  *_table(result["apart"])]
    return "\n".join(lines) + "\n"


def _table(rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in rows:
        lines.append("| " + " | ".join(cells(r)) + " |")
    return lines


def cells(r: dict) -> list[str]:
    """A row's table cells, as text (shared by the markdown and the HTML)."""
    if r.get("reference"):
        versus, p = "reference", ""
    elif r.get("difference") is not None:
        low, high = (100 * v for v in r["difference_ci"])
        versus, p = f"{100 * r['difference']:+.1f} ({low:+.1f} to {high:+.1f})", _p(r["p_value"])
    else:
        versus, p = "", ""
    return [r["method"], r["backbone"], r["tap"], r["classifier"],
            f"{r['accuracy']:.3f} ({_ci(r['accuracy_ci'])})", versus, p, f"{r['balanced_accuracy']:.3f}",
            seconds(r["cost_seconds"]), f"{r['ms_per_image']:.1f} ms" if r["ms_per_image"] is not None else ""]


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


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def plot(rows: list[dict], path: Path) -> None:
    """Test accuracy (95 % interval bars) against total cost (log scale), one labelled point per run."""
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
        errors = np.array([[r["accuracy"] - r["accuracy_ci"][0], r["accuracy_ci"][1] - r["accuracy"]] for r in mine]).T
        ax.errorbar(xs, ys, yerr=errors, fmt="o", color=colour, ecolor=colour, elinewidth=1, capsize=3,
                    label=method, zorder=3)
    for r in rows:
        text = r["classifier"] if r["method"] == "fine-tune" else f"{r['tap']} {r['classifier']}"
        text = f"{r['backbone']} {text}" if several else text
        ax.annotate(text + (" (reference)" if r.get("reference") else ""), (max(r["cost_seconds"], 1e-3),
                    r["accuracy"]), textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("total cost, seconds (extraction + fit, or fine-tuning)")
    ax.set_ylabel("test accuracy (95 % interval)")
    ax.set_title("Is fine-tuning worth it? Accuracy against cost", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
