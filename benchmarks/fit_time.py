"""Classifier fit time on cached features: logreg, svm and mlp on CIFAR-10's 50,000 × 1280.

    python benchmarks/fit_time.py [--cache runs/bench-scaling/cache-60000/*.h5] [--classifiers logreg,svm,mlp]
                                  [--train-sizes 5000,50000] [--repeats 3] [--before 5000]

Each run is `bottleneck.fit(...)` with the classifier's defaults (no search) on N training
rows of the cache drawn at random (benchmarks/scaling.py writes it: EfficientNet-Lite0 `pool`
features of all 60,000 images). Reports the median fit seconds (the estimator's own fit, as
report.json records it), the median wall seconds of the whole call (reading the cache,
fitting, scoring the 10,000 test images, writing the report) and the test accuracy. Prints a
markdown table and writes it to --out/fit_time.md.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from bottleneck.classify import fit


def subset_cache(cache: Path, n: int, into: Path) -> Path:
    """A copy of the cache with n training rows drawn at random (seeded; the test split whole)."""
    with h5py.File(cache, "r") as src:
        total = src["train/labels"].shape[0]
    if n >= total:
        return cache
    rows = np.sort(np.random.default_rng(0).choice(total, n, replace=False))  # the cache is sorted by class
    out = into / f"sample-{n}.h5"
    with h5py.File(cache, "r") as src, h5py.File(out, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for split in src:
            for name in ("labels", "paths", "skipped", *[f"features/{t}" for t in src[split]["features"]]):
                data = src[split][name][rows] if split == "train" and name != "skipped" else src[split][name][:]
                dst.create_dataset(f"{split}/{name}", data=data, dtype=src[split][name].dtype)
    return out


def libsvm_probability_svm(features: Path, repeats: int) -> tuple[list[float], float]:
    """Fit seconds and test accuracy of the svm as bottleneck made it before: libsvm's own
    5-fold Platt scaling inside SVC(probability=True)."""
    import warnings

    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    with h5py.File(features, "r") as f:
        x, y = f["train/features/pool"][:], f["train/labels"][:]
        x_test, y_test = f["test/features/pool"][:], f["test/labels"][:]
    fits = []
    for _ in range(repeats):
        pipe = Pipeline([("scale", StandardScaler()), ("clf", SVC(C=1.0, probability=True, random_state=0))])
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pipe.fit(x, y)
        fits.append(time.perf_counter() - started)
    return fits, float((pipe.predict(x_test) == y_test).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="runs/bench-scaling/cache-60000/*.h5")
    parser.add_argument("--classifiers", default="logreg,svm,mlp")
    parser.add_argument("--train-sizes", default="5000,50000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/bench-fit-time")
    parser.add_argument("--before", default="", help="train sizes at which to time the svm as it was before, "
                        "SVC(probability=True), for comparison")
    args = parser.parse_args()
    found = sorted(glob.glob(args.cache))
    if not found:
        raise SystemExit(f"no cache matches {args.cache}; run benchmarks/scaling.py first")
    cache, out = Path(found[-1]), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-fit-"))
    lines = [f"machine: {platform.machine()}, {os.cpu_count()} cores; cache {cache.name}; "
             f"median of {args.repeats} runs", "",
             "| classifier | train rows | fit s | wall s | test accuracy |", "|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for n in (int(s) for s in args.train_sizes.split(",")):
        features = subset_cache(cache, n, work)
        for clf in args.classifiers.split(","):
            fits, walls, accuracy = [], [], None
            for i in range(args.repeats):
                started = time.perf_counter()
                rep = json.loads(fit(str(features), clf=clf, out=str(work / f"{clf}-{n}-{i}")).read_text())
                walls.append(time.perf_counter() - started)
                fits.append(rep["cost"]["fit_seconds"])
                accuracy = rep["accuracy"]
            line = (f"| {clf} | {n} | {statistics.median(fits):.1f} | {statistics.median(walls):.1f} | "
                    f"{accuracy:.3f} |")
            print(line, flush=True)
            lines.append(line)
        if str(n) in args.before.split(","):
            fits, accuracy = libsvm_probability_svm(features, args.repeats)
            line = f"| svm before: SVC(probability=True) | {n} | {statistics.median(fits):.1f} | | {accuracy:.3f} |"
            print(line, flush=True)
            lines.append(line)
    (out / "fit_time.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
