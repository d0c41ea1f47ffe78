"""Every classifier on elpv EfficientNet-Lite0 features: accuracy and fit time, as a markdown table.

    python benchmarks/fit_elpv.py [--taps blocks.4,pool] [--out runs/bench-fit]

Writes elpv with 'bottleneck data elpv' and extracts the features if they are not cached.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from bottleneck.classify import fit
from bottleneck.data import write_elpv
from bottleneck.extract import extract
from bottleneck.settings import CLASSIFIERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--taps", default="blocks.4,pool")
    parser.add_argument("--data", default="data/elpv")
    parser.add_argument("--out", default="runs/bench-fit")
    args = parser.parse_args()
    taps = args.taps.split(",")
    if not os.path.isdir(args.data):
        write_elpv(args.data)
    cache = extract("efficientnet_lite0", args.data, layer=taps, progress=False)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; cache {cache}\n")
    print("| tap | clf | test accuracy | balanced accuracy | macro-F1 | chosen | fit + search s | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for tap in taps:
        for clf in CLASSIFIERS:
            started = time.perf_counter()
            rep = json.loads(fit(str(cache), clf=clf, layer=tap, search=True, out=args.out).read_text())
            wall = time.perf_counter() - started
            chosen = {k: v for k, v in rep["search"]["chosen"].items() if k not in ("cv", "cv_accuracy")}
            print(f"| {tap} | {clf} | {rep['accuracy']:.3f} | {rep['balanced_accuracy']:.3f} | "
                  f"{rep['macro_f1']:.3f} | {chosen} | {rep['cost']['fit_seconds']:.1f} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
