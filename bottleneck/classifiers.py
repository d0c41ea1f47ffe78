"""The classifiers `fit` trains on cached features: one entry each.

An entry gives the estimator with its fixed defaults, how features are scaled before it, and
the grid `--search` tries for its main hyperparameter. A new classifier is one entry in
`TABLE`: its name becomes a choice of `fit --clf` and of `[fit] classifiers`, and the tests run
every name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import ParameterGrid
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC

from bottleneck.errors import BottleneckError
from bottleneck.linear import LinearProbe


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


class SelectRelevant(BaseEstimator, TransformerMixin):
    """Keep the `fraction` of standardised features most relevant to the classes, whichever tap
    they come from (Head2Toe, Evci et al. 2022): a softmax regression on all of them with a
    group-lasso penalty (one group per feature: its weights for every class) ranks them by the
    norm of their weights; the classifier after it sees only the best. The fraction is searched
    on validation with the classifier's own grid."""

    def __init__(self, fraction: float = 0.1, strength: float = 0.1):
        self.fraction, self.strength = fraction, strength

    def fit(self, x, y):
        self.relevance_ = feature_relevance(np.asarray(x, dtype=np.float64), np.asarray(y), self.strength)
        keep = max(1, int(round(self.fraction * x.shape[1])))
        self.support_ = np.sort(np.argsort(-self.relevance_, kind="stable")[:keep])
        return self

    def transform(self, x):
        return np.asarray(x)[:, self.support_]


_RELEVANCE: dict[str, np.ndarray] = {}  # a search refits the selection per grid point on the same rows


def feature_relevance(x: np.ndarray, y: np.ndarray, strength: float, steps: int = 300) -> np.ndarray:
    """Per feature, the norm of its weights in a group-lasso softmax regression, with the penalty
    `strength` × the smallest one that zeroes every weight; features it zeroes are ranked by their
    gradient at zero (their correlation with the classes). Proximal gradient with momentum."""
    key = hashlib.sha256(x.tobytes() + y.tobytes() + repr((x.shape, strength, steps)).encode()).hexdigest()
    if key in _RELEVANCE:
        return _RELEVANCE[key]
    classes = np.unique(y)
    target = (y[:, None] == classes[None, :]).astype(np.float64)
    n = len(x)
    bias = np.log(target.mean(0))
    at_zero = np.linalg.norm(x.T @ (_softmax(np.broadcast_to(bias, target.shape)) - target) / n, axis=1)
    penalty = strength * at_zero.max()
    step = n / (np.linalg.norm(x, 2) ** 2)  # 1 / the gradient's Lipschitz bound (softmax curvature ≤ 1)
    w = z = np.zeros((x.shape[1], len(classes)))
    t = 1.0
    for _ in range(steps):
        p = _softmax(x @ z + bias)
        bias = bias - step * (p - target).mean(0)  # not penalised
        g = z - step * (x.T @ (p - target) / n)
        norms = np.linalg.norm(g, axis=1, keepdims=True)
        new = g * np.maximum(0.0, 1 - step * penalty / np.maximum(norms, 1e-30))
        t_next = (1 + np.sqrt(1 + 4 * t * t)) / 2
        z = new + (t - 1) / t_next * (new - w)
        w, t = new, t_next
    relevance = np.linalg.norm(w, axis=1) + 1e-9 * at_zero / max(at_zero.max(), 1e-30)
    if len(_RELEVANCE) > 8:
        _RELEVANCE.clear()
    _RELEVANCE[key] = relevance
    return relevance


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@dataclass(frozen=True)
class Sizes:
    """How much training data a classifier gets: its smallest class (rows, and which class) and all rows."""

    smallest: int
    smallest_class: int
    rows: int
    classes: int

    @classmethod
    def of(cls, *labels: np.ndarray) -> Sizes:
        """The worst of several label sets (the training rows of each CV fold, and of the refit)."""
        sizes = []
        for y in labels:
            counts = np.bincount(np.asarray(y, dtype=int))
            present = np.flatnonzero(counts)
            low = present[np.argmin(counts[present])]
            sizes.append(cls(int(counts[low]), int(low), len(y), len(present)))
        return min(sizes, key=lambda z: (z.smallest, z.rows))


def _calibration_folds(params: dict, n: Sizes) -> dict:
    """3-fold calibration, or as many folds as the smallest class has rows (at least 2)."""
    return {"clf__cv": min(3, n.smallest)} if n.smallest >= 2 else {"refuse": "calibrates its probabilities by "
                                                                     "cross-validation, which needs 2 per class"}


def _early_stopping(params: dict, n: Sizes) -> dict:
    """Early stopping holds out a stratified tenth: it needs a row of every class on both sides."""
    held = int(np.ceil(params["clf__validation_fraction"] * n.rows))
    return {} if n.smallest >= 2 and held >= n.classes and n.rows - held >= n.classes else {
        "clf__early_stopping": False}


def _neighbours(params: dict, n: Sizes) -> dict:
    """No more neighbours than training rows."""
    return {"clf__n_neighbors": min(params["clf__n_neighbors"], n.rows)}


# Above these sizes a fit takes minutes (a warning) or hours (a refusal) on 2 cores: benchmarks/classifier_sizes.py
# measured it, docs/benchmarks.md ("Which classifiers warn or refuse at which sizes") has the table.
SVM_WARN_ROWS = 10_000  # training rows
SVM_REFUSE_ROWS = 50_000
LOGREG_WARN = 2_000_000  # training rows × classes: logreg and linear-svm fit one weight vector per class
LOGREG_REFUSE = 100_000_000
LINEAR_SVM_WARN = 500_000  # its calibration fits three, one class against the rest at a time: slower than logreg
LINEAR_SVM_REFUSE = 20_000_000
KNN_WARN = 2 * 10**12  # training rows × rows scored × width: the multiply-adds of knn's distances
KNN_REFUSE = 2 * 10**14


def _kernel_svm_cost(n: Sizes, width: int, scored: int) -> tuple[str, str] | None:
    """An RBF SVM's fit grows about quadratically with the training rows, whatever their classes."""
    if n.rows <= SVM_WARN_ROWS:
        return None
    return ("refuse" if n.rows > SVM_REFUSE_ROWS else "warn",
            f"{n.rows:,} training rows (above {SVM_WARN_ROWS:,} it takes minutes, above {SVM_REFUSE_ROWS:,} hours: "
            "an RBF SVM's fit grows about quadratically with the rows, and its calibration fits three more)")


def _rows_times_classes(warn: int, refuse: int) -> Callable[[Sizes, int, int], tuple[str, str] | None]:
    """scikit-learn's linear models hold the whole split in memory and fit one weight vector per class:
    their fit grows with rows × classes."""
    def cost(n: Sizes, width: int, scored: int) -> tuple[str, str] | None:
        if n.rows * n.classes <= warn:
            return None
        return ("refuse" if n.rows * n.classes > refuse else "warn",
                f"{n.rows:,} training rows × {n.classes:,} classes (above {warn:,} it takes minutes, above "
                f"{refuse:,} hours: the fit grows with rows × classes, on the CPU, with every row in memory)")
    return cost


def _neighbour_cost(n: Sizes, width: int, scored: int) -> tuple[str, str] | None:
    """knn's cost is its prediction: every scored row's distance to every training row."""
    cost = n.rows * scored * width
    if cost <= KNN_WARN:
        return None
    return ("refuse" if cost > KNN_REFUSE else "warn",
            f"{n.rows:,} training rows × {scored:,} rows to score × {width:,} features ({cost:.1e} multiply-adds; "
            f"above {KNN_WARN:.0e} prediction takes minutes, above {KNN_REFUSE:.0e} hours)")


@dataclass(frozen=True)
class Classifier:
    estimator: Callable[[int, str | None], BaseEstimator]  # (seed, class_weight) → an unfitted estimator
    grid: dict  # the main hyperparameter(s), searched by --search
    standardise: bool = True  # else L2-normalise each vector (neighbours by cosine); no per-tap weighting then
    # (parameters, Sizes) → parameters to change for data this small, or {"refuse": why}; logreg needs none
    small: Callable[[dict, Sizes], dict] | None = None
    streams: bool = False  # trains on a split larger than --memory-budget, read from the cache in chunks
    # (Sizes, feature width, rows to score) → ("warn" or "refuse", the size and why) for data this large, or None
    large: Callable[[Sizes, int, int], tuple[str, str] | None] | None = None
    instead: str = ""  # what to fit when `large` warns or refuses
    gpu: bool = False  # trains on the GPU when there is one: its Slurm fit jobs ask for one (settings.GPU_CLASSIFIERS)


TABLE: dict[str, Classifier] = {
    "logreg": Classifier(lambda seed, cw: LogisticRegression(C=0.01, max_iter=3000, class_weight=cw),
                         {"clf__C": [0.001, 0.003, 0.01, 0.03, 0.1, 1.0]},
                         large=_rows_times_classes(LOGREG_WARN, LOGREG_REFUSE),
                         instead="fit linear, the same model in torch, which streams the cache and uses a GPU"),
    "svm": Classifier(lambda seed, cw: PlattSVC(SVC(C=1.0, class_weight=cw, random_state=seed), cv=3,
                                                ensemble=False),
                      {"clf__estimator__C": [0.3, 1.0, 3.0, 10.0]}, small=_calibration_folds,
                      large=_kernel_svm_cost, instead="fit linear, logreg or mlp, which grow linearly with the rows"),
    # Calibrated so that predict_proba exists, as for every other classifier.
    "linear-svm": Classifier(lambda seed, cw: CalibratedClassifierCV(
        LinearSVC(C=0.001, class_weight=cw, random_state=seed), cv=3),
        {"clf__estimator__C": [0.0003, 0.001, 0.01, 0.1]}, small=_calibration_folds,
        large=_rows_times_classes(LINEAR_SVM_WARN, LINEAR_SVM_REFUSE),
        instead="fit linear, a linear model in torch, which streams the cache and uses a GPU"),
    # One hidden layer, L2 penalty and early stopping on a held-out tenth of the training data.
    "mlp": Classifier(lambda seed, cw: MLPClassifier(hidden_layer_sizes=(256,), alpha=0.01, early_stopping=True,
                                                     validation_fraction=0.1, n_iter_no_change=10, max_iter=300,
                                                     random_state=seed),
                      {"clf__alpha": [1e-3, 1e-2, 1e-1, 1.0], "clf__hidden_layer_sizes": [(256,), (1024,)]},
                      small=_early_stopping),
    # Softmax regression in torch (bottleneck.linear): its L2 strengths are trained together and chosen on a
    # held-out tenth of the training rows inside every fit, so --search has no grid of its own to try.
    "linear": Classifier(lambda seed, cw: LinearProbe(seed=seed, class_weight=cw), {}, streams=True, gpu=True),
    "knn": Classifier(lambda seed, cw: KNeighborsClassifier(n_neighbors=5), {"clf__n_neighbors": [1, 5, 11, 21]},
                      standardise=False, small=_neighbours, large=_neighbour_cost,
                      instead="fit linear, logreg or mlp, whose prediction does not grow with the training rows"),
}
CLASSIFIERS = tuple(TABLE)
GRIDS = {name: c.grid for name, c in TABLE.items()}
SELECT_FRACTIONS = [0.02, 0.05, 0.1, 0.2, 0.5]  # of all taps' features, searched on validation


def grid(clf: str, select: bool = False) -> dict:
    """What --search tries: the classifier's grid, and with feature selection, the fraction kept."""
    return GRIDS[clf] | ({"select__fraction": SELECT_FRACTIONS} if select else {})


def make_classifier(clf: str, seed: int = 0, class_weight: str | None = None,
                    dims: tuple[int, ...] = (), select: bool = False) -> Pipeline:
    """An unfitted Pipeline for one of CLASSIFIERS; `dims` are the widths of concatenated taps.
    With `select`, the relevant features of all taps are kept (SelectRelevant) instead of every
    tap weighted equally."""
    if clf not in TABLE:
        raise BottleneckError(f"unknown classifier '{clf}'; choose one of {', '.join(CLASSIFIERS)}")
    entry = TABLE[clf]
    if select:  # standardised features of any tap side by side: their relevance decides, not their tap
        return Pipeline([("scale", StandardScaler()), ("select", SelectRelevant()),
                         ("clf", entry.estimator(seed, class_weight))])
    if not entry.standardise:
        return Pipeline([("scale", Normalizer()), ("clf", entry.estimator(seed, class_weight))])
    scale = [("scale", StandardScaler())] + ([("taps", EqualTaps(tuple(dims)))] if len(dims) > 1 else [])
    return Pipeline(scale + [("clf", entry.estimator(seed, class_weight))])


def suited(clf: str, pipe: Pipeline, grid: dict, sizes: Sizes, classes: list[str]) -> tuple[Pipeline, list[dict]]:
    """The pipeline and the grid's points with what training data this small can hold (fewer calibration
    folds, no early stopping, fewer neighbours), or a refusal naming the smallest class."""
    small = TABLE[clf].small
    points = [dict(p) for p in ParameterGrid(grid)] if grid else [{}]
    if small is None:
        return pipe, [{k: [v] for k, v in p.items()} for p in points]
    base = pipe.get_params()
    changes = [small(base | p, sizes) for p in [{}] + points]
    if "refuse" in changes[0]:
        raise BottleneckError(f"class {classes[sizes.smallest_class]!r} has {sizes.smallest} training "
                              f"image{'s' if sizes.smallest != 1 else ''} here; {clf} {changes[0]['refuse']}: add "
                              "images of it, or fit logreg, mlp or knn")
    pipe = clone(pipe).set_params(**changes[0])
    suited_points = []
    for p, change in zip(points, changes[1:]):
        point = {k: [v] for k, v in (p | change).items()}
        if point not in suited_points:  # two grid values may become one (21 and 11 neighbours of 8 rows)
            suited_points.append(point)
    return pipe, suited_points


def check_size(clf: str, sizes: Sizes, width: int, scored: int = 0) -> str | None:
    """A warning for data large enough that `clf` takes minutes, or None; a BottleneckError where it would
    take hours. `width`: the features per row; `scored`: the rows it will predict (what knn's cost grows with)."""
    entry = TABLE[clf]
    verdict = entry.large(sizes, width, scored) if entry.large else None
    if verdict is None:
        return None
    level, why = verdict
    if level == "refuse":
        raise BottleneckError(f"{clf} would take hours on {why}; {entry.instead}")
    return f"{clf} will take minutes on {why}; if that is too long, {entry.instead}"
