"""Choosing by repeated cross-validation over train + val: which tap `fit --layer auto` uses,
which classifier `fit --clf auto` trains, and the settings `--search` keeps.

A validation split of a couple of hundred images cannot tell candidates a point apart: on elpv
one point of validation noise moved the tap `fit` chose, and with it the test accuracy by two
points. Here every candidate is scored on the same REPEATS × K stratified folds of train and val
together (grouped where the cache has groups; an image's views stay in one fold), and the best
mean wins unless a simpler candidate is within one standard error of it, the standard error of
the paired differences over the folds: the one-standard-error rule (Breiman et al. 1984; Hastie,
Tibshirani and Friedman 2009, 7.10). A difference the folds cannot resolve is not worth a choice
that flips with the next split. Test images never take part.
"""

from __future__ import annotations

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import clone
from sklearn.model_selection import StratifiedGroupKFold

REPEATS = 2  # rounds of K-fold, each with its own shuffle
# What `fit --clf auto` chooses among, cheapest first: an RBF SVM's fit grows about quadratically with
# its rows, so past AUTO_SVM_ROWS training rows it would take minutes per fold and is left out.
AUTO_CLASSIFIERS = ("logreg", "svm", "mlp")
AUTO_SVM_ROWS = 5000


def pooled(d: dict) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Train and val rows together (train alone where there is no val split)."""
    parts = [d[s] for s in ("train", "val") if s in d]
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            [path for p in parts for path in p[2]])


def repeated_folds(y: np.ndarray, groups: list[str], k: int, seed: int,
                   repeats: int = REPEATS) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, held-out rows) of `repeats` stratified K-fold splits; rows of one group (an
    image's views, or a grouped cache's group) always fall in one fold."""
    x = np.zeros(len(y))
    return [fold for r in range(repeats)
            for fold in StratifiedGroupKFold(k, shuffle=True, random_state=seed + r).split(x, y, groups)]


def fold_scores(pipe, x: np.ndarray, y: np.ndarray, folds: list) -> np.ndarray:
    """Accuracy of `pipe`, refitted on each fold's training rows, on its held-out rows."""
    def score(train, held):
        return float(np.mean(clone(pipe).fit(x[train], y[train]).predict(x[held]) == y[held]))

    return np.array(Parallel(n_jobs=-1)(delayed(score)(train, held) for train, held in folds))


def one_se_choice(scores: dict[str, np.ndarray], simplest_first: list[str]) -> dict:
    """The candidate to keep: the first of `simplest_first` whose mean fold score is within one
    standard error (of its paired difference to the best, over the folds) of the best mean. Returns
    the choice and what a report shows of it: each candidate's mean and sd, the best, and how
    often each candidate was the best of a fold (ties shared)."""
    means = {c: float(s.mean()) for c, s in scores.items()}
    best = max(simplest_first, key=lambda c: means[c])  # ties go to the simpler
    n = len(scores[best])

    def within(c: str) -> bool:
        diff = scores[c] - scores[best]
        return diff.mean() >= -(diff.std(ddof=1) / np.sqrt(n) if n > 1 else 0.0)

    chosen = next(c for c in simplest_first if within(c))
    table = np.array([scores[c] for c in simplest_first])
    tops = table == table.max(axis=0)
    wins = (tops / tops.sum(axis=0)).sum(axis=1) / n
    return {"chosen": chosen, "best": best, "rule": "one standard error", "folds": n,
            "scores": {c: {"mean": round(means[c], 4), "sd": round(float(scores[c].std(ddof=1)) if n > 1 else 0.0, 4),
                           "best_of_folds": round(float(w), 3)} for c, w in zip(simplest_first, wins)}}


def describe(choice: dict, what: str) -> str:
    """One line for the console: each candidate's mean ± sd and what was chosen, and why."""
    scores = ", ".join(f"{c} {s['mean']:.3f}±{s['sd']:.3f}" for c, s in choice["scores"].items())
    why = ("" if choice["chosen"] == choice["best"] else
           f" (within one standard error of {choice['best']}, and simpler)")
    return f"{what} by {choice['by']}: {scores}; chose {choice['chosen']}{why}"
