"""Reports of fit, finetune and evaluate: metrics on a split, one `Report` written as report.json and a PNG.

The schema is documented in docs/reports.md. report.json stays a flat JSON object that older
bottleneck versions and users' scripts read; `read_report` reads it back, and the reports older
versions wrote, into the one `Report` shape.
"""

from __future__ import annotations

import csv
import json
import math
import os
import textwrap
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from bottleneck import scores, stats
from bottleneck.data import split_digest
from bottleneck.errors import BottleneckError


@dataclass
class Report:
    """What fit, finetune and evaluate report, one shape for all three (docs/reports.md has each key).

    `extra` holds what only one stage has (fit's search and layer choice, a fine-tune's history and
    head-only scores, ...) under the keys report.json gives them; `path` is where it was read from.
    """

    stage: str  # fit, finetune or evaluate
    model: str
    accuracy: float
    balanced_accuracy: float
    tap: str | None = None  # None for a fine-tune of the whole network
    clf: str = ""  # the classifier; "finetune" for a fine-tuned network
    classes: list[str] | None = None
    split: str = "test"
    n_train: int | None = None
    n_test: int = 0
    trained_on: list[str] = field(default_factory=list)
    test_set: dict | None = None
    accuracy_ci: list[float] | None = None
    balanced_accuracy_ci: list[float] | None = None
    macro_f1: float | None = None
    per_class: dict | None = None
    confusion_matrix: list | None = None
    validation: dict | None = None  # {"accuracy", "by"}: the score compare chooses contenders by
    log_loss: float | None = None
    brier: float | None = None
    calibration: dict | None = None
    positive_class: str | None = None
    roc_auc: float | None = None
    roc_auc_ci: list[float] | None = None
    average_precision: float | None = None
    average_precision_ci: list[float] | None = None
    operating_point: dict | None = None
    cost: dict = field(default_factory=dict)  # the stage's own breakdown: fit_seconds and extraction, or wall_seconds
    folds: dict | None = None
    data_root: str | None = None
    preprocessing: dict | None = None
    caveat: str | None = None  # evaluate on a split the model was trained on
    settings: dict = field(default_factory=dict)  # what the run was made with
    estimator_params: dict | None = None  # fit: the estimator's parameters as fitted
    extra: dict = field(default_factory=dict)
    path: Path | None = None

    @property
    def seed(self) -> int | None:
        """The training (estimator) seed."""
        return self.settings.get("seed")

    @property
    def predictions_path(self) -> Path | None:
        return None if self.path is None else self.path.with_name("predictions.csv")

    @property
    def method(self) -> str:
        return "fine-tune" if self.stage == "finetune" else "fixed features"

    @property
    def shared_seconds(self) -> float:
        """The extraction a fit or a top on cached maps read: one pass serves every fold and classifier."""
        if self.stage == "finetune":
            return _number(self.extra.get("cache_cost_seconds") or 0.0)
        return _number((self.cost.get("extraction") or {}).get("wall_seconds") or 0.0)

    @property
    def cost_seconds(self) -> float:
        """End to end: extraction and fit (with the choice of tap and classifier), or fine-tuning with the
        probe it started from and the maps it read."""
        if self.stage == "finetune":
            own = _number(self.cost.get("wall_seconds") or 0.0) + _number(self.extra.get("probe_cost_seconds") or 0.0)
        else:
            own = _number(self.cost.get("fit_seconds") or 0.0) + _number(self.cost.get("choice_seconds") or 0.0)
        return own + self.shared_seconds

    @property
    def device(self) -> str:
        return str(self.cost.get("device") if self.stage == "finetune"
                   else (self.cost.get("extraction") or {}).get("device", "") or "")

    def to_dict(self) -> dict:
        """The flat report.json: the keys it has always had, a field left out when None unless it always
        was written (as null); a fine-tune's settings also under "params", where older versions read them."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in NOT_KEYS and (value is not None or f.name in NULLABLE):
                out[f.name] = value
        params = self.settings if self.stage == "finetune" else self.estimator_params
        return out | {"settings": self.settings} | ({} if params is None else {"params": params}) | self.extra

    def write(self, out: Path) -> Path:
        """confusion_matrix.png, then report.json (crash-safe, last) into `out`; returns report.json's path."""
        self.path = write_report(out, self.to_dict())
        return self.path

    @classmethod
    def from_dict(cls, d: dict, path: Path | None = None) -> Report:
        """A report from report.json's object, as this version or an older one wrote it; raises
        KeyError, TypeError or ValueError when it lacks what a report holds."""
        if not isinstance(d, dict):
            raise TypeError("not a JSON object")
        d = dict(d)
        settings, params = d.pop("settings", None), d.pop("params", None)
        if d.get("stage") == "finetune":  # older fine-tunes kept their settings under "params" alone
            settings, params = settings or params, None
        names = {f.name for f in fields(cls)} - set(NOT_KEYS)
        known = {k: d.pop(k) for k in list(d) if k in names}
        rep = cls(**known, settings=settings or {}, estimator_params=params, extra=d, path=path)
        rep._check()
        return rep

    def _check(self) -> None:
        """Numbers that are numbers, intervals that are pairs; what older reports lack, filled in."""
        if not isinstance(self.stage, str) or not isinstance(self.cost, dict) or not isinstance(self.settings, dict):
            raise TypeError("its stage, cost or settings has the wrong type")
        self.accuracy, self.balanced_accuracy = _number(self.accuracy), _number(self.balanced_accuracy)
        self.n_test = int(self.n_test or 0)
        self.accuracy_ci = _interval(self.accuracy_ci) or stats.wilson(round(self.accuracy * self.n_test), self.n_test)
        self.balanced_accuracy_ci = _interval(self.balanced_accuracy_ci)
        if self.macro_f1 is not None:
            self.macro_f1 = _number(self.macro_f1)
        val = self.validation
        self.validation = _old_validation(self) if val is None else {"accuracy": _number(val["accuracy"]),
                                                                     "by": str(val.get("by", ""))}
        self.cost_seconds  # noqa: B018 (a cost that is not numbers is refused here, not in compare)


NOT_KEYS = ("settings", "estimator_params", "extra", "path")  # not report.json keys of their own name
NULLABLE = ("tap", "test_set", "validation", "operating_point", "folds")  # written as null when None


def read_report(path: str | Path) -> Report:
    """report.json at `path`, as any version of fit, finetune or evaluate wrote it; a BottleneckError
    naming the file when it is unreadable or lacks what a report holds."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BottleneckError(f"{path} is not a readable report ({e}); delete it or rerun its stage") from None
    if not isinstance(d, dict):
        raise BottleneckError(f"{path} is not a report (a JSON object); delete it or rerun its stage")
    try:
        return Report.from_dict(d, path)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise BottleneckError(f"{path} lacks what a report holds ({type(e).__name__}: {e}); "
                              "delete it or rerun its stage") from None


def best_epoch_score(best: int | None, history: list[dict]) -> dict | None:
    """A fine-tune's validation score: its best epoch's accuracy on the validation split."""
    if isinstance(best, int) and 0 < best <= len(history):
        return {"accuracy": _number(history[best - 1]["val_accuracy"]), "by": f"validation split, epoch {best}"}
    return None


def _old_validation(rep: Report) -> dict | None:
    """The validation score of a report written before reports recorded it: a fit's search score,
    a fine-tune's best epoch."""
    chosen = (rep.extra.get("search") or {}).get("chosen") or {}
    if rep.stage == "fit" and chosen.get("cv_accuracy") is not None:
        return {"accuracy": _number(chosen["cv_accuracy"]), "by": str(chosen.get("cv", "validation"))}
    if rep.stage == "finetune":
        return best_epoch_score(rep.extra.get("best_epoch"), rep.extra.get("history") or [])
    return None


def _interval(value) -> list[float] | None:
    """[low, high], or None when there is none (older reports)."""
    if value is None:
        return None
    low, high = (_number(v) for v in value)
    return [low, high]


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    return float(value)


def metrics(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], probs: np.ndarray | None = None,
            positive: str | None = None) -> dict:
    """Accuracy and balanced accuracy with 95 % intervals over the test images, macro-F1,
    per-class precision/recall/F1, confusion matrix; with the probabilities, the scores of
    probability_scores too."""
    labels = list(range(len(classes)))
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    p, r, f, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    extra = {} if probs is None else probability_scores(y_true, np.asarray(probs, dtype=float), classes, positive)
    return extra | {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "accuracy_ci": stats.wilson(int((y_true == y_pred).sum()), len(y_true)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "balanced_accuracy_ci": stats.balanced_accuracy_ci(y_true, y_pred, len(classes)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def probability_scores(y_true: np.ndarray, probs: np.ndarray, classes: list[str], positive: str | None = None) -> dict:
    """Log-loss, Brier score and calibration of the probabilities; for two classes, ROC-AUC and
    average precision of the `positive` class with their intervals.

    `positive` is by default the rarer class of these images (the second on a tie): the one a
    detector is usually asked to find, whose average precision says most.
    """
    out = {"log_loss": scores.log_loss(y_true, probs), "brier": scores.brier(y_true, probs),
           "calibration": scores.calibration(y_true, probs)}
    if len(classes) == 2:
        counts = np.bincount(y_true, minlength=2)
        c = classes.index(positive) if positive in classes else int(counts[1] <= counts[0])
        out |= {"positive_class": classes[c], **scores.ranking_scores(y_true == c, probs[:, c])}
    return out


def operating_point(target: str, classes: list[str], validation: tuple, chosen_on: str, y_test: np.ndarray,
                    p_test: np.ndarray) -> dict:
    """The threshold meeting `target` on the validation images `validation` = (labels, probabilities),
    and each class's recall and precision when the test images are decided by it."""
    chosen = scores.threshold_for(target, classes, *validation)
    return chosen | {"chosen_on": chosen_on,
                     "test": scores.at_threshold(chosen["threshold"], chosen["class"], classes, y_test, p_test)}


def test_set(split: str, paths: list[str], y_true, classes: list[str], groups: dict | None = None,
             twins: dict | None = None) -> dict:
    """Which images a report was scored on: equal sha256, equal images with equal labels; with
    `groups` (split_info's record of a grouped split), how its groups were given and counted; with
    `twins` (bottleneck.leaks' quick check), how many of them have a near-twin in train."""
    pairs = [(p, classes[int(y)]) for p, y in zip(paths, y_true)]
    return ({"split": split, "n": len(pairs), "sha256": split_digest(pairs)} | ({"groups": groups} if groups else {})
            | ({"twins": twins} if twins else {}))


def write_predictions(out: Path, paths: list[str], y_true, y_pred, probs: np.ndarray, classes: list[str]) -> Path:
    """predictions.csv: one row per scored image, its true and predicted class and every class's probability."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "predictions.csv"
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted", *[f"p_{c}" for c in classes]])
        for rel, t, pr, row in zip(paths, y_true, y_pred, probs):
            w.writerow([rel, classes[int(t)], classes[int(pr)], *[f"{v:.6f}" for v in row]])
    os.replace(tmp, path)
    return path


def read_predictions(path: Path) -> dict[str, dict]:
    """predictions.csv back as {path: {"true", "predicted", "probabilities": {class: p}}}."""
    rows = {}
    with open(path, newline="", encoding="utf-8") as f:
        lines = csv.reader(f)
        header = next(lines)
        if header[:3] != ["path", "true", "predicted"]:
            raise ValueError(f"its header is {header[:3]}, not path, true, predicted")
        classes = [h.removeprefix("p_") for h in header[3:]]
        for r in lines:
            rows[r[0]] = {"true": r[1], "predicted": r[2], "probabilities": dict(zip(classes, map(float, r[3:])))}
    return rows


def write_report(out: Path, report: dict) -> Path:
    """Write confusion_matrix.png, then report.json into `out`; returns the JSON's path.

    The report comes last: a folder holding report.json is finished, whatever failed before it.
    Above PLOT_CLASSES classes the picture shows the most confused ones, and the report says so.
    """
    out.mkdir(parents=True, exist_ok=True)
    cm = np.array(report["confusion_matrix"])
    shown = most_confused(cm, PLOT_CLASSES)
    report = report | {"confusion_plot": {"classes": len(shown), "of": len(cm),
                                          "chosen": "all" if len(shown) == len(cm) else "most confused"}}
    plot_confusion(cm[np.ix_(shown, shown)], [report["classes"][i] for i in shown], out / "confusion_matrix.png",
                   title=confusion_title(report)
                         + (f" ({len(shown)} most confused of {len(cm)} classes)" if len(shown) < len(cm) else ""))
    from bottleneck.store import atomic_write

    path = out / "report.json"
    atomic_write(path, json.dumps(report, indent=1).encode())
    return path


PLOT_CLASSES = 30  # a confusion matrix picture stays readable (and a few hundred pixels) up to this many classes
LABEL_CHARS = 24  # longer class names are shortened on plot axes (the report keeps them whole)


def most_confused(cm: np.ndarray, n: int) -> list[int]:
    """Every class when there are at most `n`; else the `n` classes in the most errors (as the true
    or the predicted class), in their own order. A 1,000-class matrix once asked for a 50,000-px figure."""
    if len(cm) <= n:
        return list(range(len(cm)))
    errors = cm.sum(0) + cm.sum(1) - 2 * np.diag(cm)
    return sorted(np.argsort(-errors, kind="stable")[:n].tolist())


def short_label(name: str, chars: int = LABEL_CHARS) -> str:
    """A class name that fits a plot's axis: long ones keep their start and end around an ellipsis."""
    return name if len(name) <= chars else name[:chars - 9] + "…" + name[-8:]


def confusion_title(report: dict) -> str:
    """Model, tap and classifier, then the accuracy; a fine-tune has no tap, and no "None" stands for it."""
    names = " ".join(str(v) for v in (report["model"], report.get("tap"), report.get("clf")) if v)
    return f"{names}: accuracy {report['accuracy']:.3f}"


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [short_label(c) for c in classes]
    size = min(max(4.2, 0.5 * len(classes) + 2), 20)  # bounded: write_report shows at most PLOT_CLASSES classes
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), n in np.ndenumerate(cm):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > cm.max() / 2 else "black")
    ax.set_title("\n".join(textwrap.wrap(title, 48)), fontsize=9)  # a long title wraps instead of being cut
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curve(xs: list, ys: list[float], xlabel: str, path: Path, title: str = "", log_x: bool = False) -> None:
    """A small line plot of test accuracy against something (layer, training-set size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(len(xs)) if not log_x else xs, ys, marker="o")
    if not log_x:
        ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=30)
    else:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy")
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_history(history: list[dict], path: Path, title: str = "") -> None:
    """Per-epoch train/val loss and accuracy of a fine-tuning run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2))
    for key, style in (("train", "-o"), ("val", "--o")):
        left.plot(epochs, [h[f"{key}_loss"] for h in history], style, label=key)
        right.plot(epochs, [h[f"{key}_accuracy"] for h in history], style, label=key)
    left.set(xlabel="epoch", ylabel="loss")
    right.set(xlabel="epoch", ylabel="accuracy")
    left.legend()
    fig.suptitle("\n".join(textwrap.wrap(title, 90)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
