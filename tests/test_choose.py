"""The choice by repeated cross-validation (bottleneck.choose): folds that keep groups whole, and
the one-standard-error rule."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from bottleneck import choose


def test_one_standard_error_keeps_the_simpler_candidate_unless_the_best_is_clearly_better():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.8, 0.9, 10)
    offsets = np.array([0.03, -0.02, 0.025, -0.015, 0.02, -0.02, 0.01, -0.01, 0.0, 0.02])  # mean 0.004, sd 0.019
    noisy = {"pool": base, "concat": base + offsets}  # a hair better on average, within the noise
    kept = choose.one_se_choice(noisy, ["pool", "concat"])
    assert kept["best"] == "concat" and kept["chosen"] == "pool"
    clear = {"pool": base, "concat": base + 0.03 + rng.normal(0, 0.002, 10)}  # better on every fold
    assert choose.one_se_choice(clear, ["pool", "concat"])["chosen"] == "concat"
    assert choose.one_se_choice(clear, ["pool", "concat"])["scores"]["concat"]["best_of_folds"] == 1.0
    tie = {"a": base, "b": base.copy()}
    assert choose.one_se_choice(tie, ["a", "b"])["chosen"] == "a"  # a tie goes to the simpler
    assert choose.one_se_choice(tie, ["a", "b"])["scores"]["a"]["best_of_folds"] == pytest.approx(0.5)


def test_repeated_folds_are_stratified_keep_each_group_in_one_fold_and_differ_between_repeats():
    rng = np.random.default_rng(1)
    groups = [f"g{i // 4}" for i in range(200)]  # 50 groups of 4 rows (an image's views, or a module's cells)
    y = np.array([int(g[1:]) % 3 == 0 for g in groups], dtype=int)
    folds = choose.repeated_folds(y, groups, k=5, seed=3)
    assert len(folds) == 5 * choose.REPEATS
    for r in range(choose.REPEATS):
        held = np.concatenate([h for _, h in folds[5 * r:5 * r + 5]])
        assert sorted(held) == list(range(200))  # every row held out once per repeat
    for train, held in folds:
        assert not {groups[i] for i in train} & {groups[i] for i in held}
        assert abs(y[held].mean() - y.mean()) < 0.1
    assert not all(np.array_equal(a[1], b[1]) for a, b in zip(folds[:5], folds[5:]))  # reshuffled
    x = rng.normal(size=(200, 3)) + y[:, None]
    scores = choose.fold_scores(LogisticRegression(), x, y, folds)
    train, held = folds[0]
    assert scores[0] == np.mean(LogisticRegression().fit(x[train], y[train]).predict(x[held]) == y[held])
