"""A classifier pipeline of `fit` folded into torch layers, for `export`.

Each step of a fitted Pipeline becomes a module that computes what its `transform` (scalers,
EqualTaps, SelectRelevant) or its `predict_proba` (the classifier) computes, from the fitted
arrays alone: a StandardScaler subtracts and divides, logistic regression is a linear layer and
a softmax, an MLP its layers, the RBF SVM a kernel over its support vectors with the sigmoids
of its Platt calibration, kNN a distance layer over its stored vectors. The classifier also
gives a label: its own, as `predict` gives it (an SVM labels by its decision function, which
its calibrated probabilities can disagree with near the boundary).

The layers compute in float64, as scikit-learn does, so a near-tie between two neighbours or
two classes comes out as it does there. `FOLDS` maps each type to the function that folds it; a
type missing there is refused by name, never approximated.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bottleneck.classifiers import EqualTaps, PlattSVC, SelectRelevant
from bottleneck.errors import BottleneckError

KNN_WARN_BYTES = 200 * 2**20  # stored vectors beyond this make a file too large to ship comfortably


def _buffer(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64))


class Standardise(nn.Module):
    def __init__(self, mean, scale):
        super().__init__()
        self.register_buffer("mean", _buffer(mean))
        self.register_buffer("scale", _buffer(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class Multiply(nn.Module):
    def __init__(self, factor):
        super().__init__()
        self.register_buffer("factor", _buffer(factor))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class UnitLength(nn.Module):
    """sklearn's Normalizer (l2): a zero vector stays zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.pow(2).sum(1, keepdim=True).sqrt()
        return x / torch.where(norm == 0, torch.ones_like(norm), norm)


class Columns(nn.Module):
    def __init__(self, keep):
        super().__init__()
        self.register_buffer("keep", torch.as_tensor(np.asarray(keep, dtype=np.int64)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.keep)


def two_columns(p1: torch.Tensor) -> torch.Tensor:
    """[1 - p, p] from the probability of the second class, as scikit-learn's binary classifiers."""
    return torch.stack([1 - p1, p1], dim=1)


class LinearProbabilities(nn.Module):
    """Logistic regression: the sigmoid of its one decision (two classes), else a softmax."""

    def __init__(self, coef, intercept):
        super().__init__()
        self.register_buffer("coef", _buffer(coef).T.contiguous())
        self.register_buffer("intercept", _buffer(intercept))
        self.binary = self.coef.shape[1] == 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = x @ self.coef + self.intercept
        probs = two_columns(torch.sigmoid(z[:, 0])) if self.binary else torch.softmax(z, dim=1)
        return probs, probs.argmax(1)


class Perceptron(nn.Module):
    """MLPClassifier: its layers with the activation it was fitted with; a logistic output for two
    classes, a softmax for more."""

    ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "logistic": torch.sigmoid, "identity": lambda x: x}

    def __init__(self, coefs, intercepts, activation: str, out_activation: str):
        super().__init__()
        if activation not in self.ACTIVATIONS or out_activation not in ("logistic", "softmax"):
            raise BottleneckError(f"an MLP with activation {activation!r} and output {out_activation!r} "
                                  "cannot be exported")
        self.weights = nn.ParameterList([nn.Parameter(_buffer(c), requires_grad=False) for c in coefs])
        self.biases = nn.ParameterList([nn.Parameter(_buffer(b), requires_grad=False) for b in intercepts])
        self.activation, self.binary = activation, out_activation == "logistic"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        act = self.ACTIVATIONS[self.activation]
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = x @ w + b
            if i != last:
                x = act(x)
        probs = two_columns(torch.sigmoid(x[:, 0])) if self.binary else torch.softmax(x, dim=1)
        return probs, probs.argmax(1)


class RBFDecision(nn.Module):
    """SVC's decision function: one-vs-one decisions from an RBF kernel over its support vectors,
    turned into one column per class as scikit-learn's `ovr` shape does (votes, ties broken by
    confidence); one column for two classes."""

    def __init__(self, svc):
        super().__init__()
        if svc.kernel != "rbf":
            raise BottleneckError(f"an SVC with a {svc.kernel!r} kernel cannot be exported (only 'rbf')")
        sv, coef, n_sv = svc.support_vectors_, svc.dual_coef_, svc.n_support_
        classes = len(svc.classes_)
        start = np.concatenate([[0], np.cumsum(n_sv)])
        pairs = [(i, j) for i in range(classes) for j in range(i + 1, classes)]
        weights = np.zeros((len(sv), len(pairs)))
        for p, (i, j) in enumerate(pairs):  # libsvm's layout of dual_coef_ for the pair (i, j)
            weights[start[i]:start[i + 1], p] = coef[j - 1, start[i]:start[i + 1]]
            weights[start[j]:start[j + 1], p] = coef[i, start[j]:start[j + 1]]
        self.register_buffer("sv", _buffer(sv))
        self.register_buffer("sv_sq", _buffer((sv ** 2).sum(1)))
        self.register_buffer("weights", _buffer(weights))
        self.register_buffer("intercept", _buffer(svc.intercept_))
        self.gamma = float(svc._gamma)
        # the pair's two classes, as (pairs × classes) indicators: votes and confidences per class
        first, second = np.zeros((len(pairs), classes)), np.zeros((len(pairs), classes))
        for p, (i, j) in enumerate(pairs):
            first[p, i], second[p, j] = 1, 1
        self.register_buffer("first", _buffer(first))
        self.register_buffer("second", _buffer(second))
        self.binary = classes == 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sq = (x.pow(2).sum(1, keepdim=True) + self.sv_sq - 2 * x @ self.sv.T).clamp(min=0)
        dec = torch.exp(-self.gamma * sq) @ self.weights + self.intercept
        if self.binary:
            return dec
        first_wins = (dec >= 0).to(dec.dtype)
        votes = first_wins @ self.first + (1 - first_wins) @ self.second
        confidence = dec @ self.first - dec @ self.second
        return votes + confidence / (3 * (confidence.abs() + 1))


class LinearDecision(nn.Module):
    def __init__(self, coef, intercept):
        super().__init__()
        self.register_buffer("coef", _buffer(coef).T.contiguous())
        self.register_buffer("intercept", _buffer(intercept))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.coef + self.intercept


DECISIONS = {"SVC": RBFDecision, "LinearSVC": lambda est: LinearDecision(est.coef_, est.intercept_)}


class Calibrated(nn.Module):
    """One calibrated classifier of CalibratedClassifierCV: its estimator's decision per class
    through Platt's sigmoid 1 / (1 + exp(a d + b)), normalised to sum to one (the uniform
    distribution where every sigmoid gives zero); two classes: [1 - p, p]."""

    def __init__(self, member, classes: int):
        super().__init__()
        est = member.estimator
        if member.method != "sigmoid":
            raise BottleneckError(f"a classifier calibrated by {member.method!r} cannot be exported (only sigmoid)")
        if type(est).__name__ not in DECISIONS:
            raise BottleneckError(f"a calibrated {type(est).__name__} cannot be exported")
        self.decision = DECISIONS[type(est).__name__](est)
        self.register_buffer("a", _buffer([c.a_ for c in member.calibrators]))
        self.register_buffer("b", _buffer([c.b_ for c in member.calibrators]))
        # the column each sigmoid fills (a fold may have missed a class): classes are 0..K-1 here
        place = np.zeros((len(member.calibrators), classes))
        cols = [classes - 1] if classes == 2 else np.searchsorted(member.classes, est.classes_)
        place[np.arange(len(cols)), cols] = 1
        self.register_buffer("place", _buffer(place))
        self.binary = classes == 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dec = self.decision(x)
        dec = dec[:, None] if dec.ndim == 1 else dec
        p = torch.sigmoid(-(self.a * dec + self.b)) @ self.place
        if self.binary:
            return two_columns(p[:, 1]), dec
        total = p.sum(1, keepdim=True)
        return torch.where(total == 0, torch.full_like(p, 1 / p.shape[1]), p / total), dec


class CalibratedMean(nn.Module):
    """CalibratedClassifierCV: the mean of its members' probabilities, labelled by their argmax; with
    `own_label` (PlattSVC, one member) labelled by the SVM's decision instead."""

    def __init__(self, clf, own_label: bool = False):
        super().__init__()
        classes = len(clf.classes_)
        self.members = nn.ModuleList([Calibrated(m, classes) for m in clf.calibrated_classifiers_])
        self.own_label, self.binary = own_label, classes == 2

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = [m(x) for m in self.members]
        probs = torch.stack([p for p, _ in outs]).mean(0).clamp(max=1.0)
        if not self.own_label:
            return probs, probs.argmax(1)
        dec = outs[0][1]
        label = (dec[:, 0] > 0).long() if self.binary else dec.argmax(1)
        return probs, label


class Neighbours(nn.Module):
    """KNeighborsClassifier (uniform weights, Euclidean): the share of each class among the k
    nearest stored vectors."""

    def __init__(self, knn):
        super().__init__()
        metric = (knn.effective_metric_, knn.effective_metric_params_)
        if knn.weights != "uniform" or metric[0] != "euclidean":
            raise BottleneckError(f"a kNN with weights {knn.weights!r} and metric {metric[0]!r} cannot be exported "
                                  "(only uniform weights and Euclidean distance)")
        stored = np.asarray(knn._fit_X, dtype=np.float64)
        self.register_buffer("stored", _buffer(stored))
        self.register_buffer("stored_sq", _buffer((stored ** 2).sum(1)))
        self.register_buffer("labels", torch.as_tensor(np.asarray(knn._y, dtype=np.int64)))
        self.k, self.classes = int(knn.n_neighbors), len(knn.classes_)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sq = x.pow(2).sum(1, keepdim=True) + self.stored_sq - 2 * x @ self.stored.T
        nearest = sq.topk(self.k, dim=1, largest=False).indices
        votes = nn.functional.one_hot(self.labels[nearest], self.classes).to(x.dtype)
        probs = votes.mean(1)
        return probs, probs.argmax(1)


def _standard_scaler(s) -> nn.Module:
    mean = s.mean_ if s.with_mean else np.zeros(s.n_features_in_)
    scale = s.scale_ if s.with_std else np.ones(s.n_features_in_)
    return Standardise(mean, scale)


def _normalizer(s) -> nn.Module:
    if s.norm != "l2":
        raise BottleneckError(f"a Normalizer with norm {s.norm!r} cannot be exported (only l2)")
    return UnitLength()


def _equal_taps(s) -> nn.Module:
    dims = tuple(s.dims)
    return Multiply(np.repeat([1 / np.sqrt(d) for d in dims], dims) if len(dims) > 1 else np.ones(1))


def _knn(knn) -> nn.Module:
    size = knn._fit_X.shape[0] * knn._fit_X.shape[1] * 8
    if size > KNN_WARN_BYTES:
        from bottleneck.console import warn

        warn(f"the kNN classifier keeps {knn._fit_X.shape[0]} training vectors of {knn._fit_X.shape[1]} features: "
             f"the exported file holds them all ({size / 2**20:.0f} MB) and compares every image with each")
    return Neighbours(knn)


FOLDS = {
    "StandardScaler": _standard_scaler,
    "Normalizer": _normalizer,
    "EqualTaps": _equal_taps,
    "SelectRelevant": lambda s: Columns(s.support_),
    "LogisticRegression": lambda c: LinearProbabilities(c.coef_, c.intercept_),
    "LinearProbe": lambda c: LinearProbabilities(c.coef_, c.intercept_),  # a softmax over K rows, two classes too
    "MLPClassifier": lambda c: Perceptron(c.coefs_, c.intercepts_, c.activation, c.out_activation_),
    "PlattSVC": lambda c: CalibratedMean(c, own_label=True),
    "CalibratedClassifierCV": CalibratedMean,
    "KNeighborsClassifier": _knn,
}
assert {EqualTaps.__name__, SelectRelevant.__name__, PlattSVC.__name__} <= set(FOLDS)


class FoldedPipeline(nn.Module):
    """The pipeline's transforms, then its classifier: features → (probabilities, label), float64."""

    def __init__(self, steps: list[nn.Module], classifier: nn.Module):
        super().__init__()
        self.steps, self.classifier = nn.Sequential(*steps), classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classifier(self.steps(x.to(torch.float64)))


def fold(pipe, where: str) -> FoldedPipeline:
    """The torch layers computing `pipe`'s probabilities and labels, or a refusal naming the step
    that has no folding (`where` names the file in it)."""
    modules = []
    for name, step in pipe.steps:
        kind = type(step).__name__
        if kind not in FOLDS or type(step).__module__.split(".")[0] not in ("sklearn", "bottleneck"):
            raise BottleneckError(f"{where}: its step {name!r} is a {kind}, which export cannot turn into torch "
                                  f"layers (it folds {', '.join(FOLDS)}); fit the classifier again with "
                                  "'bottleneck fit'")
        modules.append(FOLDS[kind](step))
    return FoldedPipeline(modules[:-1], modules[-1])
