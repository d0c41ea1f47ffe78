"""The classifiers `fit` trains on cached features: one entry each.

An entry gives the estimator with its fixed defaults, how features are scaled before it, and
the grid `--search` tries for its main hyperparameter. A new classifier is one entry in
`TABLE`: its name becomes a choice of `fit --clf` and of `[fit] classifiers`, and the tests run
every name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC

from bottleneck.errors import BottleneckError


class PlattSVC(CalibratedClassifierCV):
    """An SVM that labels by its own decision function, with Platt-scaled probabilities.

    Probabilities come from sigmoids fitted to 3-fold cross-validated decision values, then one
    SVM is fitted on all the data (`ensemble=False`). SVC(probability=True) did the same with
    5 folds inside libsvm: the same labels at 1.6 times the fitting time on 5,000 CIFAR-10
    feature vectors (docs/benchmarks.md), and scikit-learn 1.11 removes it. Labels stay the
    SVM's own, not the argmax of the calibrated probabilities, which can disagree with it.
    """

    def predict(self, X):
        return self.calibrated_classifiers_[0].estimator.predict(X)


class EqualTaps(BaseEstimator, TransformerMixin):
    """Scale each tap's block of standardised features by 1/sqrt(its width), so that every tap
    of a concatenation carries the same total variance: the 1280-d penultimate vector does not
    drown a 112-d mid-level tap under one shared penalty."""

    def __init__(self, dims: tuple[int, ...] = ()):
        self.dims = dims

    def fit(self, x, y=None):
        return self

    def transform(self, x):
        return x * np.repeat([1 / np.sqrt(d) for d in self.dims], self.dims) if len(self.dims) > 1 else x


@dataclass(frozen=True)
class Classifier:
    estimator: Callable[[int, str | None], BaseEstimator]  # (seed, class_weight) → an unfitted estimator
    grid: dict  # the main hyperparameter(s), searched by --search
    standardise: bool = True  # else L2-normalise each vector (neighbours by cosine); no per-tap weighting then


TABLE: dict[str, Classifier] = {
    "logreg": Classifier(lambda seed, cw: LogisticRegression(C=0.01, max_iter=3000, class_weight=cw),
                         {"clf__C": [0.001, 0.003, 0.01, 0.03, 0.1, 1.0]}),
    "svm": Classifier(lambda seed, cw: PlattSVC(SVC(C=1.0, class_weight=cw, random_state=seed), cv=3,
                                                ensemble=False),
                      {"clf__estimator__C": [0.3, 1.0, 3.0, 10.0]}),
    # Calibrated so that predict_proba exists, as for every other classifier.
    "linear-svm": Classifier(lambda seed, cw: CalibratedClassifierCV(
        LinearSVC(C=0.001, class_weight=cw, random_state=seed), cv=3),
        {"clf__estimator__C": [0.0003, 0.001, 0.01, 0.1]}),
    # One hidden layer, L2 penalty and early stopping on a held-out tenth of the training data.
    "mlp": Classifier(lambda seed, cw: MLPClassifier(hidden_layer_sizes=(256,), alpha=0.01, early_stopping=True,
                                                     validation_fraction=0.1, n_iter_no_change=10, max_iter=300,
                                                     random_state=seed),
                      {"clf__alpha": [1e-3, 1e-2, 1e-1, 1.0], "clf__hidden_layer_sizes": [(256,), (1024,)]}),
    "knn": Classifier(lambda seed, cw: KNeighborsClassifier(n_neighbors=5), {"clf__n_neighbors": [1, 5, 11, 21]},
                      standardise=False),
}
CLASSIFIERS = tuple(TABLE)
GRIDS = {name: c.grid for name, c in TABLE.items()}


def make_classifier(clf: str, seed: int = 0, class_weight: str | None = None,
                    dims: tuple[int, ...] = ()) -> Pipeline:
    """An unfitted Pipeline for one of CLASSIFIERS; `dims` are the widths of concatenated taps."""
    if clf not in TABLE:
        raise BottleneckError(f"unknown classifier '{clf}'; choose one of {', '.join(CLASSIFIERS)}")
    entry = TABLE[clf]
    if not entry.standardise:
        return Pipeline([("scale", Normalizer()), ("clf", entry.estimator(seed, class_weight))])
    scale = [("scale", StandardScaler())] + ([("taps", EqualTaps(tuple(dims)))] if len(dims) > 1 else [])
    return Pipeline(scale + [("clf", entry.estimator(seed, class_weight))])
