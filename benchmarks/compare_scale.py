"""How long `compare` takes on a large test set: two reports scored on N test images.

    python benchmarks/compare_scale.py [--images 100000]

Writes two fit-style reports with predictions.csv (as fit writes them) into a temporary folder
and times `compare.comparison` on them: reading the predictions, the paired score interval,
McNemar's tests, the balanced-accuracy bootstrap and the verdict.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bottleneck import report as reports
from bottleneck.compare import comparison


def write(folder: Path, stage: str, paths: list[str], true: np.ndarray, pred: np.ndarray, val: float) -> None:
    classes = ["no", "yes"]
    reports.write_predictions(folder, paths, true, pred, np.eye(2)[pred] * 0.8 + 0.1, classes)
    rep = {"stage": stage, "model": "m", "tap": "pool", "clf": "logreg" if stage == "fit" else "finetune",
           "classes": classes, "n_train": 1000, "n_test": len(paths), "validation": {"accuracy": val},
           "test_set": reports.test_set("test", paths, true, classes), "cost": {"wall_seconds": 60.0},
           **reports.metrics(true, pred, classes)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(__import__("json").dumps(rep))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    n = ap.parse_args().images
    rng = np.random.default_rng(0)
    true = rng.integers(0, 2, n)
    paths = [f"test/{i:07d}.png" for i in range(n)]
    a = np.where(rng.random(n) < 0.87, true, 1 - true)
    b = np.where(rng.random(n) < 0.9, a, 1 - a)  # disagrees with a on about 10 % of images
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp) / "fit", "fit", paths, true, a, 0.8)
        write(Path(tmp) / "finetune", "finetune", paths, true, b, 0.8)
        started = time.perf_counter()
        result = comparison([tmp])
        seconds = time.perf_counter() - started
    print(f"{n:,} test images: compare took {seconds:.1f} s; verdict: {result['verdict']}")


if __name__ == "__main__":
    main()
