import numpy as np
import pytest
from scipy.optimize import minimize_scalar
from scipy.stats import chi2

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


def test_paired_difference_keeps_pairs_together_and_its_interval_agrees_with_its_test():
    a = np.array([True] * 90 + [False] * 10)
    same = stats.paired_difference(a, a)
    assert same["difference"] == 0 and same["p_value"] == 1.0
    low, high = same["difference_ci"]  # no disagreement on 100 images: still not "equal" beyond about z²/n
    assert -0.04 < low < 0 < high < 0.04
    b = a.copy()
    b[90:96] = True  # b gets 6 more right, loses none
    d = stats.paired_difference(a, b)
    assert d["difference"] == pytest.approx(0.06) and d["only_this_right"] == 6 and d["only_reference_right"] == 0
    assert d["p_value"] == pytest.approx(chi2.sf(6, 1)) and d["p_exact"] == pytest.approx(2 / 64)
    assert 0 < d["difference_ci"][0] <= 0.06 <= d["difference_ci"][1]
    with pytest.raises(ValueError):
        stats.paired_difference(a, b[:5])


@pytest.mark.parametrize("only_this, only_ref, n", [(6, 0, 100), (30, 12, 200), (3, 9, 40), (61, 52, 656)])
def test_score_interval_inverts_the_score_test(only_this, only_ref, n):
    """At each end of Tango's interval the score statistic, with the nuisance parameter fitted by numerical
    maximum likelihood (not the closed form the code uses), is ±1.96; the test at zero is McNemar's."""
    low, high = stats.score_interval(only_this, only_ref, n)
    for delta, target in ((float(low), stats.Z95), (float(high), -stats.Z95)):
        assert score_by_likelihood(delta, only_this, only_ref, n) == pytest.approx(target, abs=1e-4)
    p = stats.mcnemar_score_p(only_this, only_ref)
    assert p == pytest.approx(chi2.sf((only_this - only_ref) ** 2 / (only_this + only_ref), 1))
    assert (low > 0 or high < 0) == (p < 0.05)


def score_by_likelihood(delta, b, c, n):
    def nll(q):  # q: P(only the reference right); P(only this right) = q + delta
        cells = np.array([q + delta, q, 1 - 2 * q - delta])
        return np.inf if (cells <= 0).any() else -np.dot([b, c, n - b - c], np.log(cells))
    q = minimize_scalar(nll, bounds=(max(0, -delta) + 1e-12, (1 - delta) / 2 - 1e-12), method="bounded",
                        options={"xatol": 1e-14}).x
    return (b - c - n * delta) / np.sqrt(n * (2 * q + delta * (1 - delta)))


def test_power_matches_the_textbook_sample_size():
    """656 images with 9 % of them disputed: 80 % power near 3.3 points (Connor 1987), and the images a
    1-point margin needs are many thousands."""
    assert 0.032 < stats.detectable_difference(656, 0.09) < 0.034
    assert stats.images_needed(stats.detectable_difference(656, 0.09), 0.09) in range(650, 662)
    assert stats.images_needed(0.01, 0.09) > 6000


def test_seeds_widen_the_interval_and_holm_adjusts_step_down():
    rng = np.random.default_rng(0)
    base = rng.random(400) < 0.85
    steady = np.array([base] * 3)
    shaky = np.array([np.where(rng.random(400) < 0.1, ~base, base) for _ in range(3)])
    ref = rng.random(400) < 0.85
    d_steady, d_shaky = stats.paired_difference(ref, steady), stats.paired_difference(ref, shaky)
    assert d_steady["method"] == "t over images and seeds" and d_steady["seed_se"] == 0
    assert d_shaky["seed_se"] > 0 and np.diff(d_shaky["difference_ci"]) > np.diff(d_steady["difference_ci"])
    lo, hi = stats.mean_accuracy_ci(shaky)
    assert lo < shaky.mean() < hi
    assert stats.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])


def test_balanced_accuracy_interval_holds_the_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    pred = np.where(rng.random(200) < 0.8, y, (y + 1) % 3)
    ci = stats.balanced_accuracy_ci(y, pred, 3)
    point = np.mean([(pred[y == k] == k).mean() for k in range(3)])
    assert ci[0] < point < ci[1] and ci == stats.balanced_accuracy_ci(y, pred, 3)
