"""classifiers.check_size: which classifiers warn or refuse at which sizes, and what the messages say."""

from __future__ import annotations

import pytest

from bottleneck import classifiers
from bottleneck.classifiers import CLASSIFIERS, Sizes, check_size
from bottleneck.errors import BottleneckError


def sizes(rows: int, classes: int = 10) -> Sizes:
    return Sizes(smallest=rows // classes, smallest_class=0, rows=rows, classes=classes)


def test_small_data_passes_every_classifier_silently():
    for clf in CLASSIFIERS:
        assert check_size(clf, sizes(2_624, 2), 1280, scored=500) is None


def test_the_svm_warns_above_its_warning_rows_and_refuses_above_its_refusal_rows():
    assert check_size("svm", sizes(classifiers.SVM_WARN_ROWS), 1280) is None
    warning = check_size("svm", sizes(classifiers.SVM_WARN_ROWS + 1), 1280)
    assert warning.startswith("svm will take minutes on 10,001 training rows")
    assert "quadratically" in warning and "linear, logreg or mlp" in warning
    assert check_size("svm", sizes(classifiers.SVM_REFUSE_ROWS), 1280) is not None  # still a warning
    with pytest.raises(BottleneckError) as refused:
        check_size("svm", sizes(classifiers.SVM_REFUSE_ROWS + 1), 1280)
    message = str(refused.value)
    assert message.startswith("svm would take hours on 50,001 training rows")
    assert "quadratically" in message and "fit linear, logreg or mlp" in message


def test_the_svm_limit_counts_all_rows_whatever_their_classes():
    """One-vs-one SVMs over k classes cost about as much as one SVM over all the rows."""
    for k in (2, 10, 100):
        assert check_size("svm", sizes(20_000, k), 1280) is not None


@pytest.mark.parametrize("clf, warn, refuse", [
    ("logreg", classifiers.LOGREG_WARN, classifiers.LOGREG_REFUSE),
    ("linear-svm", classifiers.LINEAR_SVM_WARN, classifiers.LINEAR_SVM_REFUSE)])
def test_logreg_and_linear_svm_warn_on_rows_times_classes_and_point_to_linear(clf, warn, refuse):
    assert check_size(clf, sizes(warn // 10), 1280) is None
    warning = check_size(clf, sizes(warn // 10 + 1), 1280)
    assert warning.startswith(f"{clf} will take minutes on {warn // 10 + 1:,} training rows × 10 classes")
    assert "fit linear" in warning and "streams" in warning
    assert check_size(clf, sizes(refuse // 100, 100), 1280) is not None  # still a warning
    with pytest.raises(BottleneckError, match=rf"^{clf} would take hours on 1,281,167 training rows × 1,000 "
                                              r"classes.*fit linear"):
        check_size(clf, sizes(1_281_167, 1000), 1280)  # ImageNet-1k
    assert check_size("logreg", sizes(50_000, 10), 1280) is None  # CIFAR-10: about 20 s (docs/benchmarks.md)


def test_knn_warns_on_the_size_of_its_distance_matrix_and_refuses_where_it_would_take_hours():
    assert check_size("knn", sizes(100_000), 1280, scored=10_000) is None  # 1.3e12 multiply-adds
    warning = check_size("knn", sizes(1_281_167, 1000), 1280, scored=50_000)  # ImageNet-1k's validation images
    assert warning.startswith("knn will take minutes on 1,281,167 training rows × 50,000 rows to score × 1,280")
    assert "linear, logreg or mlp" in warning
    with pytest.raises(BottleneckError, match=r"^knn would take hours on 1,281,167 training rows × 150,000 rows"):
        check_size("knn", sizes(1_281_167, 1000), 1280, scored=150_000)
    assert check_size("knn", sizes(1_281_167, 1000), 64, scored=150_000) is not None  # narrower: a warning


def test_mlp_and_linear_never_refuse():
    for clf in ("mlp", "linear"):
        assert check_size(clf, sizes(1_281_167, 1000), 1280, scored=50_000) is None


def test_every_classifier_that_can_warn_names_what_to_fit_instead():
    for name, entry in classifiers.TABLE.items():
        assert (entry.large is None) == (entry.instead == ""), name
