"""How each classifier's cost grows with the training rows: the evidence for classifiers.check_size.

    python benchmarks/classifier_sizes.py [--rows 2000,5000,10000,20000] [--classes 2,10] [--width 1280]
                                          [--scored 2000] [--classifiers svm,knn,mlp,logreg,linear-svm,linear]
                                          [--skip-above 120] [--out runs/bench-classifier-sizes]

Features are synthetic but structured like a backbone's pooled vector: each class a point in a
32-d latent space, each row its class's point plus noise, mapped to --width dimensions by a fixed
random matrix, plus noise in every dimension (not separable: the SVM keeps many support vectors,
as on real features). Each cell is one fit of `classifiers.make_classifier(NAME)` with its defaults
(no search, no tap choice: `bottleneck fit` by default does several of these) on N rows, then the
prediction of --scored rows (what dominates knn). A classifier whose next size would take longer
than --skip-above seconds, growing as its last two sizes did, is skipped there.
Prints a markdown table and writes it to --out/classifier_sizes.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from bottleneck.classifiers import make_classifier


def structured_features(rows: int, classes: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `classes` overlapping clusters in a 32-d latent space, seen through a fixed width-d mapping."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 0.3, (classes, 32))  # overlapping: accuracy near 0.85, not 1
    mapping = np.random.default_rng(12345).normal(0, 1 / np.sqrt(32), (32, width))  # the same for every size
    y = rng.integers(0, classes, rows)
    latent = centres[y] + rng.normal(0, 1.0, (rows, 32))
    x = np.maximum(latent @ mapping + rng.normal(0, 0.5, (rows, width)), 0)  # non-negative, as after a ReLU
    return x.astype(np.float32), y


def timed(clf: str, x, y, x_scored, y_scored) -> tuple[float, float, float]:
    """Fit seconds, prediction seconds for the scored rows, and accuracy on them."""
    pipe = make_classifier(clf)
    started = time.perf_counter()
    pipe.fit(x, y)
    fitted = time.perf_counter()
    predicted = pipe.predict(x_scored)
    return fitted - started, time.perf_counter() - fitted, float((predicted == y_scored).mean())


def extrapolated(done: list[tuple[int, float]], rows: int) -> float:
    """Seconds a cell of `rows` should take, growing as the last two cells did (at least linearly, at most
    cubically), or linearly from a single one."""
    if not done:
        return 0.0
    (n0, s0), (n1, s1) = done[-2] if len(done) > 1 else done[-1], done[-1]
    power = min(3.0, max(1.0, np.log(s1 / s0) / np.log(n1 / n0))) if n1 > n0 and s0 > 0 and s1 > 0 else 1.0
    return s1 * (rows / n1) ** power


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="2000,5000,10000,20000")
    parser.add_argument("--classes", default="2,10")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--scored", type=int, default=2000, help="rows predicted after each fit")
    parser.add_argument("--classifiers", default="svm,knn,mlp,logreg,linear-svm,linear")
    parser.add_argument("--skip-above", type=float, default=120.0, help="seconds a cell may be expected to take")
    parser.add_argument("--out", default="runs/bench-classifier-sizes")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    lines = [f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} at the start; "
             f"width {args.width}; {args.scored} rows predicted after each fit; one run per cell", "",
             "| classifier | classes | train rows | fit s | predict s | accuracy |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    sizes = [int(n) for n in args.rows.split(",")]
    for k in (int(c) for c in args.classes.split(",")):
        x_all, y_all = structured_features(max(sizes) + args.scored, k, args.width)
        x_scored, y_scored = x_all[-args.scored:], y_all[-args.scored:]
        for clf in args.classifiers.split(","):
            done = []  # (rows, seconds) of the classifier's cells so far
            for n in sizes:
                expected = extrapolated(done, n)
                if expected > args.skip_above:
                    line = f"| {clf} | {k} | {n} | skipped: about {expected:.0f} s expected | | |"
                else:
                    fit_s, predict_s, accuracy = timed(clf, x_all[:n], y_all[:n], x_scored, y_scored)
                    done.append((n, fit_s + predict_s))
                    line = f"| {clf} | {k} | {n} | {fit_s:.1f} | {predict_s:.2f} | {accuracy:.3f} |"
                print(line, flush=True)
                lines.append(line)
    lines.append(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    print(lines[-1], flush=True)
    (out / "classifier_sizes.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
