"""What a user gets from the plain commands: extract + fit with today's defaults against the old ones.

    python benchmarks/defaults.py --data data/elpv
    python benchmarks/defaults.py --data data/cifar10-sub   # bottleneck data cifar10 --per-class 200,50,100

"after" is `bottleneck extract --model MODEL --data DATA` then `bottleneck fit --features CACHE`
(default taps, crop rule, `--layer auto`, `--search`, logreg). "before" is what those two commands
did until the defaults changed: the penultimate tap alone, the model's resize-and-crop, no search.
Both are scored on the same test images; the difference is paired (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np

from bottleneck import backbones, report, stats
from bottleneck.classify import fit
from bottleneck.extract import extract


def correct(report_path) -> np.ndarray:
    rows = report.read_predictions(report_path.parent / "predictions.csv")
    return np.array([r["true"] == r["predicted"] for _, r in sorted(rows.items())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--out", default="runs/bench-defaults")
    args = parser.parse_args()
    out = f"{args.out}/{os.path.basename(args.data.rstrip('/'))}"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; data {args.data}\n")
    results = {}
    penultimate = backbones.get_spec(args.model).default_tap
    for name, extract_kw, fit_kw in [("before", {"layer": [penultimate], "crop": True},
                                      {"layer": penultimate, "search": False}),
                                     ("after", {}, {})]:
        cache = extract(args.model, args.data, progress=False, **extract_kw)
        path = fit(str(cache), out=f"{out}/{name}", force=True, **fit_kw)
        rep = json.loads(path.read_text())
        # the cache's own extraction time (a reused cache is not extracted again) + the fit, search included
        seconds = rep["cost"]["extraction"]["wall_seconds"] + rep["cost"]["fit_seconds"]
        results[name] = (rep, correct(path), seconds)
    print("| defaults | taps stored | tap used | preprocessing | search | test accuracy (95 % CI) | extract + fit s |")
    print("|---|---|---|---|---|---|---|")
    for name, (rep, _, seconds) in results.items():
        prep = rep["preprocessing"]
        how = "crop" if prep.get("crop", True) else "whole image"
        chosen = rep["tap"] + (" (auto)" if rep.get("layer_choice") else "")
        lo, hi = rep["accuracy_ci"]
        print(f"| {name} | {_n_taps(rep)} | {chosen} | "
              f"{how}, {prep['interpolation']} | {'yes' if rep['search'] else 'no'} | "
              f"{rep['accuracy']:.3f} ({lo:.3f}–{hi:.3f}) | {seconds:.0f} |")
    d = stats.paired_difference(results["before"][1], results["after"][1])
    low, high = d["difference_ci"]
    print(f"\nafter − before: {100 * d['difference']:+.1f} points (95 % CI {100 * low:+.1f} to {100 * high:+.1f}), "
          f"McNemar p = {d['p_value']:.2g}")
    if results["after"][0].get("layer_choice"):
        print(f"tap choice: {results['after'][0]['layer_choice']}")


def _n_taps(rep: dict) -> int:
    from bottleneck.store import FeatureStore

    with FeatureStore(rep["cache"]["path"]) as st:
        return len(st.taps)


if __name__ == "__main__":
    main()
