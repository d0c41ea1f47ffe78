import numpy as np
import pytest
from sklearn import metrics as sk

from bottleneck import scores
from bottleneck.errors import BottleneckError


def two_classes(n: int = 300, seed: int = 0, rounded: bool = False):
    """Labels and probabilities of a fair classifier; `rounded` makes many ties."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    p1 = 1 / (1 + np.exp(-(2.0 * y - 1 + rng.normal(0, 1.2, n))))
    if rounded:
        p1 = np.round(p1, 1)
    return y, np.c_[1 - p1, p1]


@pytest.mark.parametrize("rounded", [False, True])
def test_two_class_scores_match_scikit_learn(rounded):
    y, p = two_classes(rounded=rounded)
    assert scores.roc_auc(y == 1, p[:, 1]) == pytest.approx(sk.roc_auc_score(y, p[:, 1]), abs=1e-12)
    assert scores.average_precision(y == 1, p[:, 1]) == pytest.approx(sk.average_precision_score(y, p[:, 1]),
                                                                       abs=1e-12)
    assert scores.log_loss(y, p) == pytest.approx(sk.log_loss(y, p), abs=1e-12)
    assert scores.brier(y, p) == pytest.approx(sk.brier_score_loss(y, p[:, 1]), abs=1e-12)
    fpr, tpr, _ = sk.roc_curve(y, p[:, 1], drop_intermediate=False)
    mine = scores.roc_curve(y == 1, p[:, 1])
    assert np.allclose(mine["fpr"], fpr) and np.allclose(mine["tpr"], tpr)
    precision, recall, _ = sk.precision_recall_curve(y, p[:, 1], drop_intermediate=False)
    curve = scores.pr_curve(y == 1, p[:, 1])  # scikit-learn lists them lowest score first, with (1, 0) added
    assert np.allclose(curve["precision"], precision[:-1][::-1]) and np.allclose(curve["recall"], recall[:-1][::-1])


def test_multiclass_log_loss_brier_and_calibration():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 200)
    p = rng.dirichlet(np.ones(4), 200)
    assert scores.log_loss(y, p) == pytest.approx(sk.log_loss(y, p, labels=range(4)), abs=1e-12)
    assert scores.brier(y, p) == pytest.approx(sk.brier_score_loss(y, p, labels=range(4)), abs=1e-12)
    cal = scores.calibration(y, p)
    assert cal["bins"] == 10 and sum(pt["n"] for pt in cal["points"]) == 200
    # the error by hand: per bin of the top probability, |accuracy - mean top probability|, weighted by its size
    top, right = p.max(1), p.argmax(1) == y
    b = np.minimum((top * 10).astype(int), 9)
    by_hand = sum(abs(right[b == i].mean() - top[b == i].mean()) * (b == i).sum() for i in np.unique(b)) / 200
    assert cal["ece"] == pytest.approx(by_hand, abs=1e-12)


def test_a_calibrated_classifier_has_a_small_calibration_error_and_an_overconfident_one_a_large():
    rng = np.random.default_rng(2)
    p1 = rng.random(20000)
    y = (rng.random(20000) < p1).astype(int)  # the probabilities are the true frequencies
    assert scores.calibration(y, np.c_[1 - p1, p1])["ece"] < 0.02
    sharp = (p1 > 0.5).astype(float) * 0.98 + 0.01  # always 99 % sure, right about 75 % of the time
    assert scores.calibration(y, np.c_[1 - sharp, sharp])["ece"] > 0.2


def test_bootstrap_intervals_are_seeded_cover_the_estimate_and_narrow_with_more_images():
    y, p = two_classes(n=120)
    first = scores.ranking_scores(y == 1, p[:, 1])
    assert first == scores.ranking_scores(y == 1, p[:, 1])  # a report's interval never changes on rewriting
    for key in ("roc_auc", "average_precision"):
        lo, hi = first[f"{key}_ci"]
        assert lo < first[key] < hi
    y_big, p_big = two_classes(n=2000, seed=3)
    big = scores.ranking_scores(y_big == 1, p_big[:, 1])
    assert np.diff(big["roc_auc_ci"])[0] < np.diff(first["roc_auc_ci"])[0] / 2
    assert scores.ranking_scores(np.ones(5, bool), np.linspace(0, 1, 5))["roc_auc"] is None  # one class: no curve


@pytest.mark.parametrize("goal", [0.5, 0.8, 0.9, 1.0])
def test_threshold_for_a_recall_is_the_highest_that_keeps_it(goal):
    y, p = two_classes(n=200, seed=4)
    chosen = scores.threshold_for(f"recall:b={goal}", ["a", "b"], y, p)
    recall_at = lambda t: ((p[:, 1] >= t) & (y == 1)).sum() / (y == 1).sum()  # noqa: E731
    assert chosen["met_on_validation"] and recall_at(chosen["threshold"]) >= goal
    assert chosen["validation"]["recall"] == pytest.approx(recall_at(chosen["threshold"]))
    higher = p[:, 1][p[:, 1] > chosen["threshold"]]
    assert recall_at(higher.min()) < goal if len(higher) else True  # any higher threshold misses the goal


def test_threshold_for_a_precision_and_for_the_other_class():
    y, p = two_classes(n=200, seed=5)
    chosen = scores.threshold_for("precision:b=0.8", ["a", "b"], y, p)
    picked = p[:, 1] >= chosen["threshold"]
    assert chosen["met_on_validation"] and sk.precision_score(y, picked) >= 0.8
    lower = p[:, 1][p[:, 1] < chosen["threshold"]].max()
    assert sk.precision_score(y, p[:, 1] >= lower) < 0.8  # the next lower threshold misses it
    other = scores.threshold_for("recall:a=0.95", ["a", "b"], y, p)  # the threshold is on class a's probability
    assert ((p[:, 0] >= other["threshold"]) & (y == 0)).sum() / (y == 0).sum() >= 0.95
    test = scores.at_threshold(other["threshold"], "a", ["a", "b"], y, p)
    assert test["per_class"]["a"]["recall"] == pytest.approx(other["validation"]["recall"])
    assert test["per_class"]["b"]["recall"] == pytest.approx(sk.recall_score(y, p[:, 0] < other["threshold"]))
    never = scores.threshold_for("precision:b=1.0", ["a", "b"], np.array([1, 0, 1, 0]),
                                 np.array([[0.2, 0.8], [0.1, 0.9], [0.4, 0.6], [0.5, 0.5]]))
    assert not never["met_on_validation"] and never["threshold"] == 0.6  # said so, and the best precision taken
    assert never["validation"]["precision"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("target, message", [
    ("recall:b", "is not MEASURE:CLASS=VALUE"), ("f1:b=0.9", "is not MEASURE:CLASS=VALUE"),
    ("recall:b=1.5", "is not MEASURE:CLASS=VALUE"), ("recall:dogs=0.9", "not one of a, b")])
def test_bad_targets_are_clear_errors(target, message):
    y, p = two_classes(n=20)
    with pytest.raises(BottleneckError, match=message):
        scores.threshold_for(target, ["a", "b"], y, p)
    with pytest.raises(BottleneckError, match="needs two classes"):
        scores.threshold_for("recall:a=0.9", ["a", "b", "c"], np.zeros(3, int), np.eye(3))
