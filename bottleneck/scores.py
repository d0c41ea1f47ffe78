"""Scores of predicted probabilities beyond accuracy: pure numpy on labels and probabilities.

For every result: log-loss, Brier score and expected calibration error with the points of its
reliability diagram. For two classes: ROC and precision-recall curves, ROC-AUC and average
precision with 95 % stratified bootstrap intervals over the test images, and the decision
threshold that meets a target such as `recall:defective=0.9` on validation images.

The curves are computed from weighted counts at each distinct probability, so tied
probabilities count together as scikit-learn counts them, and one bootstrap resample is a row
of weights (how often each image was drawn): thousands of resamples are a few cumulative sums.
"""

from __future__ import annotations

import numpy as np

from bottleneck.errors import BottleneckError
from bottleneck.settings import parse_target
from bottleneck.stats import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED

CALIBRATION_BINS = 10  # equal-width bins of the top probability; few test sets fill more
EPS = 1e-15  # a probability of exactly 0 for the true class costs -log(1e-15), not infinity


# --------------------------------------------------------------------------- every result

def log_loss(y: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log of the probability given to each image's true class."""
    y, probs = np.asarray(y, dtype=int), np.asarray(probs, dtype=float)
    return max(0.0, float(-np.log(np.clip(probs[np.arange(len(y)), y], EPS, 1.0)).mean()))  # never "-0.000"


def brier(y: np.ndarray, probs: np.ndarray) -> float:
    """Brier score: for two classes the mean squared error of the second class's probability (0 to 1);
    for more, the mean over images of the squared distance between the probability vector and the
    true class's one-hot vector (0 to 2), as scikit-learn scores each case."""
    y, probs = np.asarray(y, dtype=int), np.asarray(probs, dtype=float)
    if probs.shape[1] == 2:
        return float(((probs[:, 1] - (y == 1)) ** 2).mean())
    return float(((probs - np.eye(probs.shape[1])[y]) ** 2).sum(1).mean())


def calibration(y: np.ndarray, probs: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Expected calibration error and its reliability diagram, on the top probability of each image.

    The top probability's range [0, 1] is cut into `bins` equal-width bins; in each non-empty one, the
    mean top probability (confidence) is set against the fraction of its images predicted right.
    The error is the mean gap, weighted by the images in each bin.
    """
    y, probs = np.asarray(y, dtype=int), np.asarray(probs, dtype=float)
    top, right = probs.max(1), (probs.argmax(1) == y).astype(float)
    b = np.minimum((top * bins).astype(int), bins - 1)  # a top probability of 1 falls in the last bin
    n = np.bincount(b, minlength=bins)
    confidence = np.bincount(b, top, minlength=bins) / np.maximum(n, 1)
    accuracy = np.bincount(b, right, minlength=bins) / np.maximum(n, 1)
    ece = float((n * np.abs(accuracy - confidence)).sum() / max(len(y), 1))
    points = [{"confidence": round(float(confidence[i]), 6), "accuracy": round(float(accuracy[i]), 6),
               "n": int(n[i])} for i in np.flatnonzero(n)]
    return {"ece": ece, "bins": bins, "points": points}


# --------------------------------------------------------------------------- two classes: curves

def _ranked(positive: np.ndarray, score: np.ndarray):
    """(scores, positive?) sorted by score, highest first, and the index of the last image of each
    run of equal scores (where a threshold can fall)."""
    order = np.argsort(-score, kind="stable")
    s = score[order]
    return s, positive[order], np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]


def _counts(positive: np.ndarray, score: np.ndarray):
    """(thresholds, true positives, false positives) at each distinct score, highest first."""
    s, pos, ends = _ranked(positive, score)
    tp, fp = _weighted_counts(pos, ends, np.ones((1, int(pos.sum()))), np.ones((1, int((~pos).sum()))))
    return s[ends], tp, fp


def _weighted_counts(pos: np.ndarray, ends: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray):
    """True and false positives at or above each threshold when the ranked positive images count
    w_pos[:, j] times each (in rank order) and the negative ones w_neg[:, j]."""
    above_pos = np.cumsum(pos)[ends]  # positive images ranked at or above each threshold
    above_neg = ends + 1 - above_pos
    tp = np.cumsum(np.hstack([np.zeros((len(w_pos), 1)), w_pos]), axis=1)[:, above_pos]
    fp = np.cumsum(np.hstack([np.zeros((len(w_neg), 1)), w_neg]), axis=1)[:, above_neg]
    return tp, fp


def _auc(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Area under the ROC curve through (0, 0) and each threshold's (fp rate, tp rate): the trapezoids
    count a tie between a positive and a negative image as half right."""
    tpr, fpr = tp / tp[:, -1:], fp / fp[:, -1:]
    return (np.diff(fpr, axis=1, prepend=0) * (tpr + np.hstack([np.zeros((len(tp), 1)), tpr[:, :-1]])) / 2).sum(1)


def _average_precision(tp: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """Sum over thresholds of the recall gained times the precision there (scikit-learn's definition,
    without interpolation)."""
    gained = np.diff(tp, axis=1, prepend=0) / tp[:, -1:]
    drawn = tp + fp  # 0 above the first image a resample drew, where no recall is gained either
    return (gained * np.divide(tp, drawn, out=np.zeros_like(tp), where=drawn > 0)).sum(1)


def roc_curve(positive: np.ndarray, score: np.ndarray) -> dict:
    """False and true positive rates at each distinct score, from (0, 0) to (1, 1)."""
    _, tp, fp = _counts(np.asarray(positive, dtype=bool), np.asarray(score, dtype=float))
    return {"fpr": np.r_[0.0, fp[0] / fp[0, -1]].tolist(), "tpr": np.r_[0.0, tp[0] / tp[0, -1]].tolist()}


def pr_curve(positive: np.ndarray, score: np.ndarray) -> dict:
    """Recall and precision at each distinct score, highest score first."""
    _, tp, fp = _counts(np.asarray(positive, dtype=bool), np.asarray(score, dtype=float))
    return {"recall": (tp[0] / tp[0, -1]).tolist(), "precision": (tp[0] / (tp[0] + fp[0])).tolist()}


def roc_auc(positive: np.ndarray, score: np.ndarray) -> float:
    _, tp, fp = _counts(np.asarray(positive, dtype=bool), np.asarray(score, dtype=float))
    return float(_auc(tp, fp)[0])


def average_precision(positive: np.ndarray, score: np.ndarray) -> float:
    _, tp, fp = _counts(np.asarray(positive, dtype=bool), np.asarray(score, dtype=float))
    return float(_average_precision(tp, fp)[0])


def ranking_scores(positive: np.ndarray, score: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """ROC-AUC and average precision with 95 % stratified percentile-bootstrap intervals.

    Each resample draws the positive images among themselves and the negative ones among
    themselves (so each keeps its size, as in the test split), with the fixed seed of stats.py:
    a report's intervals do not change when it is rewritten. Resamples go in chunks to bound memory.
    """
    positive, score = np.asarray(positive, dtype=bool), np.asarray(score, dtype=float)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:  # one class only: neither curve exists
        return {"roc_auc": None, "roc_auc_ci": None, "average_precision": None, "average_precision_ci": None}
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    _, pos, ends = _ranked(positive, score)
    aucs, aps = [], []
    chunk = max(1, 2**22 // len(score))
    for k in [min(chunk, resamples - i) for i in range(0, resamples, chunk)]:
        tp, fp = _weighted_counts(pos, ends, _draw_counts(rng, k, n_pos), _draw_counts(rng, k, n_neg))
        aucs.append(_auc(tp, fp))
        aps.append(_average_precision(tp, fp))
    return {"roc_auc": roc_auc(positive, score), "roc_auc_ci": _percentiles(aucs),
            "average_precision": average_precision(positive, score), "average_precision_ci": _percentiles(aps)}


def _draw_counts(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """k × n: how often each of n images is drawn in each of k resamples of n draws with replacement."""
    drawn = rng.integers(0, n, size=(k, n), dtype=np.int32 if k * n < 2**31 else np.int64) + np.arange(k)[:, None] * n
    return np.bincount(drawn.ravel(), minlength=k * n).reshape(k, n)


def _percentiles(chunks: list[np.ndarray]) -> list[float]:
    return [float(x) for x in np.percentile(np.concatenate(chunks), [2.5, 97.5])]


# --------------------------------------------------------------------------- two classes: an operating point

def target_class(target: str, classes: list[str]) -> int:
    """The index of the class a target names, checked against the data's classes."""
    cls = parse_target(target)[1]
    if len(classes) != 2:
        raise BottleneckError(f"--target {target} needs two classes; this data has {len(classes)}: leave it out")
    if cls not in classes:
        raise BottleneckError(f"--target {target} names class {cls!r}, which is not one of {', '.join(classes)}")
    return classes.index(cls)


def threshold_for(target: str, classes: list[str], y_val: np.ndarray, p_val: np.ndarray) -> dict:
    """The threshold on the target class's probability (that class is predicted at or above it) meeting
    the target on validation images, and what it gives there.

    For recall, the highest threshold that keeps the recall (which costs the fewest false alarms);
    for precision, the lowest that reaches it (which keeps the most of the class). A precision the
    validation images never reach is not met: the threshold of the highest precision is taken and said so.
    """
    measure, cls, goal = parse_target(target)
    c = target_class(target, classes)
    positive, score = np.asarray(y_val) == c, np.asarray(p_val, dtype=float)[:, c]
    if not positive.any():
        raise BottleneckError(f"the validation images hold no image of class {cls!r}, so --target {target} "
                              "cannot be met on them; add validation images of that class")
    thresholds, tp, fp = _counts(positive, score)
    recall, precision = tp[0] / tp[0, -1], tp[0] / (tp[0] + fp[0])
    reached = (recall if measure == "recall" else precision) >= goal - 1e-12
    met = bool(reached.any())
    if measure == "recall":  # thresholds fall as recall rises: the first that reaches it is the highest
        i = int(np.argmax(reached))
    elif met:
        i = int(np.flatnonzero(reached)[-1])  # the lowest threshold reaching the precision
    else:
        i = int(np.flatnonzero(precision == precision.max())[-1])
    return {"target": target, "measure": measure, "class": cls, "goal": goal, "threshold": float(thresholds[i]),
            "met_on_validation": met, "n_validation": int(len(score)),
            "validation": {"recall": float(recall[i]), "precision": float(precision[i])}}


def at_threshold(threshold: float, cls: str, classes: list[str], y: np.ndarray, probs: np.ndarray) -> dict:
    """Accuracy, recall and precision of each class, and the confusion matrix, when `cls` is predicted
    wherever its probability is at least `threshold` (and the other class elsewhere)."""
    c, y = classes.index(cls), np.asarray(y, dtype=int)
    pred = np.where(np.asarray(probs, dtype=float)[:, c] >= threshold, c, 1 - c)
    cm = np.zeros((2, 2), dtype=int)
    np.add.at(cm, (y, pred), 1)
    per_class = {name: {"recall": float(cm[k, k] / max(cm[k].sum(), 1)),
                        "precision": float(cm[k, k] / max(cm[:, k].sum(), 1))} for k, name in enumerate(classes)}
    return {"accuracy": float(np.trace(cm) / max(len(y), 1)), "per_class": per_class, "confusion_matrix": cm.tolist()}
