"""How sure a score is: intervals over test images and paired tests between two predictors.

Every interval here covers one source of noise only: which images happened to land in the
test split. It says nothing about how a rerun with another seed would score (repeats over
seeds answer that; docs/reports.md).
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95 % interval
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: a report's interval must not change when it is rewritten


def wilson(correct: int, n: int, z: float = Z95) -> list[float]:
    """Wilson score interval of a proportion; well-behaved near 0 and 1, unlike the normal one."""
    if n == 0:
        return [0.0, 1.0]
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def resample_indices(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """`resamples` × n indices drawn with replacement: the same draws for every statistic."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def balanced_accuracy_ci(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> list[float]:
    """Stratified percentile-bootstrap 95 % interval of balanced accuracy over the test images.

    Each class's images are resampled among themselves, so every resample keeps every class
    and its size, as the test split does; resamples are drawn in chunks to bound memory.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    recalls = []
    for c in range(n_classes):
        hits = (y_pred[y_true == c] == c).astype(np.float32)
        if len(hits) == 0:  # a class absent from the test split has no recall: left out, as sklearn does
            continue
        chunks = [hits[rng.integers(0, len(hits), size=(k, len(hits)))].mean(1)
                  for k in _chunks(BOOTSTRAP_RESAMPLES, max(1, 2**24 // len(hits)))]
        recalls.append(np.concatenate(chunks))
    if not recalls:
        return [0.0, 1.0]
    values = np.mean(recalls, axis=0)
    return [float(v) for v in np.percentile(values, [2.5, 97.5])]


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - i) for i in range(0, total, size)]


def paired_difference(a_correct: np.ndarray, b_correct: np.ndarray) -> dict:
    """Accuracy of b minus accuracy of a on the same images: paired bootstrap 95 % CI, McNemar's p.

    The bootstrap resamples images, keeping each image's pair of outcomes together, so what both
    predictors get right or wrong alike does not widen the interval. McNemar's exact test uses
    only the images on which they disagree.
    """
    a, b = np.asarray(a_correct, dtype=bool), np.asarray(b_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError("paired outcomes must be two equally long, non-empty vectors")
    diff = b.astype(float) - a.astype(float)
    means = diff[resample_indices(len(diff))].mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    only_b, only_a = int((b & ~a).sum()), int((a & ~b).sum())
    return {"difference": float(diff.mean()), "difference_ci": [float(low), float(high)],
            "p_value": mcnemar_exact(only_a, only_b), "only_reference_right": only_a, "only_this_right": only_b}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of b successes in b + c at one half."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n  # exact integers, then one division
    return min(1.0, 2.0 * tail)
