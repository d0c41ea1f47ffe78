"""The linear classifier against scikit-learn's logistic regression on one cache: paired accuracy,
fit time and peak memory.

    python benchmarks/linear_probe.py --cache CACHE.h5 [--layer pool] [--classifiers logreg,linear]
                                      [--search] [--memory-budget MB] [--out runs/bench-linear]

Each classifier is fitted by `bottleneck.fit` (its defaults; no search unless --search) in a
process of its own, so that its peak resident memory (ru_maxrss, which includes the Python and
torch runtime, about 0.4 GB) is its own. Reports per classifier the fit seconds (the estimator's
own fit, as report.json records it), the wall seconds of the whole call, the peak RSS and the
test accuracy with its 95 % interval; then, for each classifier against the first, the paired
difference in accuracy on the same test images with its 95 % score interval
(bottleneck.stats.paired_difference). Prints a markdown table and writes it to --out/linear_probe.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def fit_here(args: argparse.Namespace) -> None:
    """The child: one fit, then one JSON line with its report, wall seconds and peak RSS."""
    from bottleneck.classify import fit

    started = time.perf_counter()
    report = fit(args.cache, clf=args.child, layer=args.layer, search=args.search, memory_budget=args.memory_budget,
                 out=str(Path(args.out) / "fits"), force=True)
    wall = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
    print(json.dumps({"report": str(report), "wall_seconds": wall, "peak_rss_mb": peak_mb}))


def fit_apart(clf: str, args: argparse.Namespace) -> dict:
    """Fit `clf` in a fresh process; returns what the child printed."""
    cmd = [sys.executable, __file__, "--child", clf, "--cache", args.cache, "--layer", args.layer,
           "--memory-budget", str(args.memory_budget), "--out", args.out] + (["--search"] if args.search else [])
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def correct_by_path(report: Path) -> dict[str, bool]:
    """Whether each test image was labelled right, from the predictions.csv beside a report."""
    with open(report.parent / "predictions.csv", newline="", encoding="utf-8") as f:
        return {row["path"]: row["true"] == row["predicted"] for row in csv.DictReader(f)}


def table(results: dict[str, dict]) -> list[str]:
    from bottleneck.stats import paired_difference

    lines = ["| classifier | fit s | wall s | peak RSS MB | test accuracy (95 % CI) | minus the first (95 % CI) |",
             "|---|---|---|---|---|---|"]
    first = None
    for clf, r in results.items():
        rep = json.loads(Path(r["report"]).read_text())
        right = correct_by_path(Path(r["report"]))
        if first is None:
            first, versus = right, ""
        else:
            paths = sorted(first)
            d = paired_difference(np.array([first[p] for p in paths]), np.array([right[p] for p in paths]))
            lo, hi = d["difference_ci"]
            versus = f"{d['difference']:+.3f} ({lo:+.3f} to {hi:+.3f})"
        lo, hi = rep["accuracy_ci"]
        lines.append(f"| {clf} | {rep['cost']['fit_seconds']:.1f} | {r['wall_seconds']:.1f} | {r['peak_rss_mb']:.0f} "
                     f"| {rep['accuracy']:.3f} ({lo:.3f}-{hi:.3f}) | {versus} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True)
    parser.add_argument("--layer", default="pool")
    parser.add_argument("--classifiers", default="logreg,linear", help="the first is the reference")
    parser.add_argument("--search", action="store_true", help="tune each classifier as fit's --search does")
    parser.add_argument("--memory-budget", type=float, default=2048.0, help="fit --memory-budget, MB")
    parser.add_argument("--out", default="runs/bench-linear")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return fit_here(args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = {clf: fit_apart(clf, args) for clf in args.classifiers.split(",")}
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    lines = [f"machine: {platform.machine()}, {device}; cache {Path(args.cache).name}, tap {args.layer}, "
             f"search {'on' if args.search else 'off'}, memory budget {args.memory_budget:g} MB", "", *table(results)]
    print("\n".join(lines), flush=True)
    (Path(args.out) / "linear_probe.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
