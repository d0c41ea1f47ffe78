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


def balanced_accuracy_ci(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> list[float]:
    """Stratified percentile-bootstrap 95 % interval of balanced accuracy over the test images.

    Each class's images are resampled among themselves, so every resample keeps every class
    and its size, as the test split does.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    recalls = [resampled_means(rng, (y_pred[y_true == c] == c).astype(float)) for c in range(n_classes)
               if (y_true == c).any()]  # a class absent from the test split has no recall: left out, as sklearn does
    if not recalls:
        return [0.0, 1.0]
    return [float(v) for v in np.percentile(np.mean(recalls, axis=0), [2.5, 97.5])]


def resampled_means(rng: np.random.Generator, values: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """Means of `resamples` bootstrap resamples of `values`, drawn as counts of each distinct value
    (a multinomial draw: the same distribution as resampling the items, in time independent of n)."""
    distinct, counts = np.unique(values, return_counts=True)
    draws = rng.multinomial(len(values), counts / len(values), size=resamples)
    return draws @ distinct / len(values)


# --------------------------------------------------------------------------- two predictors on the same images
#
# One method gives both the interval and the test, so they never disagree: for one run on each
# side, the score test of the paired difference (at zero it is McNemar's test) and its inversion,
# Tango's score interval, which keeps its coverage with few disagreeing images where the
# percentile bootstrap does not (Tango 1998; Fagerland, Lydersen & Laake 2013). For runs repeated
# over seeds, a t interval whose error adds the test images' part and each side's seed-to-seed
# part (docs/reports.md, "Seeds").

Z90 = 1.6448536269514722  # two-sided 90 %: the equivalence test's interval
POWER = 0.8
Z_POWER = 0.8416212335729143  # the normal quantile of 80 % power


def _score_statistic(delta, only_this, only_ref, n):
    """Tango's score statistic for H0: accuracy(this) - accuracy(ref) = delta (vectorised)."""
    b, c, n, delta = (np.asarray(v, dtype=float) for v in (only_this, only_ref, n, delta))
    w = -(b + c) + delta * (2 * n - b + c)
    # the constrained maximum-likelihood estimate of P(only ref right) under the hypothesis
    q = (-w + np.sqrt(np.maximum(w * w + 8 * n * c * delta * (1 - delta), 0.0))) / (4 * n)
    var = n * (2 * q + delta * (1 - delta))
    num = b - c - n * delta
    with np.errstate(divide="ignore", invalid="ignore"):
        t = num / np.sqrt(np.maximum(var, 0.0))
    return np.where(var > 1e-12, t, np.where(np.abs(num) < 1e-9, 0.0, np.sign(num) * np.inf))


def score_interval(only_this, only_ref, n, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
    """Tango's score interval of the paired difference in accuracy, by bisection (vectorised over tables)."""
    b, c, n = (np.asarray(v, dtype=float) for v in (only_this, only_ref, n))
    centre = (b - c) / n
    bounds = []
    for target, lo, hi in ((z, -np.ones_like(centre), centre), (-z, centre, np.ones_like(centre))):
        lo, hi = lo.copy(), hi.copy()
        for _ in range(60):  # the statistic falls as delta grows: halve the bracket 60 times
            mid = (lo + hi) / 2
            above = _score_statistic(mid, b, c, n) > target
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        bounds.append((lo + hi) / 2)
    return bounds[0], bounds[1]


def mcnemar_score_p(only_this, only_ref):
    """Two-sided p of McNemar's score test (no continuity correction): the score test above at zero."""
    b, c = np.asarray(only_this, dtype=float), np.asarray(only_ref, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(b + c > 0, np.abs(b - c) / np.sqrt(b + c), 0.0)
    return _normal_two_sided(z)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of b successes in b + c at one half (closed form)."""
    from scipy.stats import binom

    n = b + c
    return 1.0 if n == 0 else float(min(1.0, 2.0 * binom.cdf(min(b, c), n, 0.5)))


def _normal_two_sided(z):
    from scipy.special import erfc

    return erfc(np.asarray(z, dtype=float) / math.sqrt(2))


def detectable_difference(n: float, discordant: float, z: float = Z95, z_power: float = Z_POWER) -> float:
    """The smallest difference McNemar's test detects with 80 % power on n images of which a share
    `discordant` have one predictor right and the other wrong (Connor 1987), by bisection."""
    psi = max(discordant, 1.0 / max(n, 1))  # no disagreement seen: as if one image were disputed
    lo, hi = 0.0, math.sqrt(psi)
    if math.sqrt(n) * hi < z * math.sqrt(psi):
        return hi  # too few images for any difference the disagreements allow
    for _ in range(60):
        mid = (lo + hi) / 2
        if math.sqrt(n) * mid < z * math.sqrt(psi) + z_power * math.sqrt(max(psi - mid * mid, 0.0)):
            lo = mid
        else:
            hi = mid
    return hi


def images_needed(margin: float, discordant: float, z: float = Z95, z_power: float = Z_POWER) -> int:
    """Test images at which McNemar's test detects a difference of `margin` with 80 % power (Connor 1987)."""
    psi = max(discordant, margin * margin)
    return math.ceil((z * math.sqrt(psi) + z_power * math.sqrt(psi - margin * margin)) ** 2 / margin ** 2)


def paired_difference(ref_correct: np.ndarray, this_correct: np.ndarray) -> dict:
    """Accuracy of `this` minus accuracy of `ref` on the same images: estimate, 95 % and 90 % intervals, p.

    Each argument is a seeds × images matrix of right (1) or wrong (0), or one vector for one run.
    One run on each side: Tango's score interval and McNemar's score test (the same statistic).
    Several seeds on either side: the per-image seed means are compared, with a t interval whose
    error adds the images' part and each side's seed-to-seed part (Satterthwaite's degrees of freedom).
    """
    a, b = np.atleast_2d(np.asarray(ref_correct, dtype=float)), np.atleast_2d(np.asarray(this_correct, dtype=float))
    if a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError("paired outcomes must cover the same, non-empty list of images")
    n = a.shape[1]
    if len(a) == 1 and len(b) == 1:
        only_this, only_ref = int((b[0] > a[0]).sum()), int((a[0] > b[0]).sum())
        lo95, hi95 = (float(v) for v in score_interval(only_this, only_ref, n))
        lo90, hi90 = (float(v) for v in score_interval(only_this, only_ref, n, Z90))
        discordant = (only_this + only_ref) / n
        return {"difference": (only_this - only_ref) / n, "difference_ci": [lo95, hi95],
                "difference_ci90": [lo90, hi90],
                "p_value": float(mcnemar_score_p(only_this, only_ref)), "p_exact": mcnemar_exact(only_ref, only_this),
                "only_reference_right": only_ref, "only_this_right": only_this, "n": n, "seeds": [1, 1],
                "method": "score", "discordant": discordant,
                "detectable": detectable_difference(n, discordant)}
    return _seeds_difference(a, b)


def _seeds_difference(a: np.ndarray, b: np.ndarray) -> dict:
    from scipy.stats import t as student

    n = a.shape[1]
    d = b.mean(0) - a.mean(0)  # per image: this side's seed mean minus the reference's
    parts = [(d.var(ddof=1) / n if n > 1 else 0.0, n - 1)]
    parts += [(m.mean(1).var(ddof=1) / len(m), len(m) - 1) for m in (a, b) if len(m) > 1]
    var = sum(v for v, _ in parts)
    se = math.sqrt(var)
    df = var * var / sum(v * v / k for v, k in parts if k > 0 and v > 0) if var > 0 else float(n - 1)
    q95, q90, qp = (float(student.ppf(q, df)) for q in (0.975, 0.95, POWER))
    diff = float(d.mean())
    p = float(2 * student.sf(abs(diff) / se, df)) if se > 0 else float(diff == 0) or 0.0
    seed_var = sum(v for v, k in parts[1:])
    return {"difference": diff, "difference_ci": [diff - q95 * se, diff + q95 * se],
            "difference_ci90": [diff - q90 * se, diff + q90 * se], "p_value": min(1.0, p),
            "n": n, "seeds": [len(a), len(b)], "method": "t over images and seeds", "df": float(df), "se": se,
            "seed_se": math.sqrt(seed_var), "image_se": math.sqrt(parts[0][0]),
            "discordant": float(np.mean(np.abs(d) > 0)), "detectable": (q95 + qp) * se}


def mean_accuracy_ci(correct: np.ndarray) -> list[float]:
    """95 % interval of the seed-mean accuracy (seeds × images): test images' and seeds' noise together."""
    from scipy.stats import t as student

    m = np.atleast_2d(np.asarray(correct, dtype=float))
    if len(m) == 1:
        return wilson(int(m.sum()), m.shape[1])
    n, s = m.shape[1], len(m)
    parts = [(m.mean(0).var(ddof=1) / n, n - 1), (m.mean(1).var(ddof=1) / s, s - 1)]
    var = sum(v for v, _ in parts)
    df = var * var / sum(v * v / k for v, k in parts if v > 0) if var > 0 else float(n - 1)
    half = float(student.ppf(0.975, df)) * math.sqrt(var)
    mean = float(m.mean())
    return [max(0.0, mean - half), min(1.0, mean + half)]


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment: p-values that keep the chance of any false claim among them at alpha."""
    order = np.argsort(p_values)
    m, adjusted, running = len(p_values), [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def paired_balanced_difference(y_true: np.ndarray, ref_correct: np.ndarray, this_correct: np.ndarray) -> dict:
    """Balanced accuracy of `this` minus `ref` (per-image seed means), with a stratified paired bootstrap 95 %
    interval: each class's images are resampled among themselves, keeping each image's pair of outcomes."""
    y = np.asarray(y_true)
    d = np.atleast_2d(np.asarray(this_correct, float)).mean(0) - np.atleast_2d(np.asarray(ref_correct, float)).mean(0)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    per_class = [d[y == c].mean() for c in np.unique(y)]
    draws = [resampled_means(rng, d[y == c]) for c in np.unique(y)]
    low, high = np.percentile(np.mean(draws, axis=0), [2.5, 97.5])
    return {"difference": float(np.mean(per_class)), "difference_ci": [float(low), float(high)]}
