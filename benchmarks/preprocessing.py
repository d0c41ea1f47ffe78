"""Crop or whole image, bicubic or bilinear: fixed-feature accuracy per choice, as a markdown table.

    python benchmarks/preprocessing.py --data data/elpv [--model efficientnet_lite0]
    python benchmarks/preprocessing.py --data data/cifar10-sub

Each choice gets its own cache (the preprocessing is part of the fingerprint); every tap is
scored with logistic regression, C chosen on the validation split. The evidence behind the
rules in bottleneck/preprocess.py (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np

from bottleneck import report, stats
from bottleneck.classify import fit
from bottleneck.extract import extract
from bottleneck.store import FeatureStore

CHOICES = [("crop", "bicubic"), ("crop", "bilinear"), ("whole", "bicubic"), ("whole", "bilinear")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--layers", default="blocks.3,blocks.4,blocks.5,blocks.6,pool")
    parser.add_argument("--out", default="runs/bench-preprocessing")
    args = parser.parse_args()
    layers = args.layers.split(",")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; data {args.data}\n")
    print("| preprocessing | interpolation | " + " | ".join(layers) + " | extract s |")
    print("|---|---|" + "---|" * (len(layers) + 1))
    correct = {}
    for crop, interpolation in CHOICES:
        cache = extract(args.model, args.data, layer=layers, crop=crop == "crop", interpolation=interpolation,
                        progress=False)
        with FeatureStore(cache) as st:
            seconds = st.attrs["cost"]["wall_seconds"]
        accs = []
        for tap in layers:
            out = f"{args.out}/{os.path.basename(args.data)}-{crop}-{interpolation}"
            rep = json.loads(fit(str(cache), layer=tap, search=True, out=out, force=True).read_text())
            accs.append(f"{rep['accuracy']:.3f}")
            rows = report.read_predictions(Path(out) / f"{tap}-logreg-search" / "predictions.csv")
            correct[crop, interpolation, tap] = np.array([r["true"] == r["predicted"] for _, r in sorted(rows.items())])
        print(f"| {crop} | {interpolation} | " + " | ".join(accs) + f" | {seconds:.0f} |", flush=True)
    print("\nPaired against the model's own pipeline (crop, bicubic) on the same test images: accuracy "
          "difference in points (95 % CI), McNemar p\n")
    print("| preprocessing | interpolation | " + " | ".join(layers) + " |")
    print("|---|---|" + "---|" * len(layers))
    for crop, interpolation in CHOICES[1:]:
        cells = []
        for tap in layers:
            d = stats.paired_difference(correct[CHOICES[0] + (tap,)], correct[crop, interpolation, tap])
            (low, high), diff = d["difference_ci"], d["difference"]
            cells.append(f"{100 * diff:+.1f} ({100 * low:+.1f} to {100 * high:+.1f}), p {d['p_value']:.2g}")
        print(f"| {crop} | {interpolation} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
