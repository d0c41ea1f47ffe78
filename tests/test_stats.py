import numpy as np
import pytest

from bottleneck import stats


def test_wilson_interval_matches_the_closed_form_and_stays_in_bounds():
    lo, hi = stats.wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)  # the textbook 95 % Wilson interval for 8/10
    assert stats.wilson(0, 10)[0] == 0.0 and stats.wilson(10, 10)[1] == pytest.approx(1.0)
    assert round(stats.wilson(10, 10)[0], 3) == 0.722
    assert stats.wilson(0, 0) == [0.0, 1.0]


def test_mcnemar_uses_only_disagreements_exactly():
    assert stats.mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert stats.mcnemar_exact(3, 3) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0
    assert stats.mcnemar_exact(1, 9) == stats.mcnemar_exact(9, 1) == pytest.approx(2 * 11 / 1024)


def test_paired_difference_keeps_pairs_together():
    a = np.array([True] * 90 + [False] * 10)
    same = stats.paired_difference(a, a)
    assert same["difference"] == 0 and same["difference_ci"] == [0.0, 0.0] and same["p_value"] == 1.0
    b = a.copy()
    b[90:96] = True  # b gets 6 more right, loses none
    d = stats.paired_difference(a, b)
    assert d["difference"] == pytest.approx(0.06) and d["only_this_right"] == 6 and d["only_reference_right"] == 0
    assert 0 < d["difference_ci"][0] <= 0.06 <= d["difference_ci"][1] and d["p_value"] == pytest.approx(2 / 64)
    with pytest.raises(ValueError):
        stats.paired_difference(a, b[:5])


def test_balanced_accuracy_interval_holds_the_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    pred = np.where(rng.random(200) < 0.8, y, (y + 1) % 3)
    ci = stats.balanced_accuracy_ci(y, pred, 3)
    point = np.mean([(pred[y == k] == k).mean() for k in range(3)])
    assert ci[0] < point < ci[1] and ci == stats.balanced_accuracy_ci(y, pred, 3)
