import json

import numpy as np
import pytest

from bottleneck import report, stats


def test_metrics_count_every_class_and_give_wilson_intervals():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 0])
    m = report.metrics(y_true, y_pred, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["accuracy_ci"] == stats.wilson(4, 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    lo, hi = m["balanced_accuracy_ci"]
    assert lo <= m["balanced_accuracy"] <= hi


def test_test_set_digest_is_the_same_for_the_same_images_in_any_order():
    a = report.test_set("test", ["x/1.png", "x/2.png"], [0, 1], ["cat", "dog"])
    b = report.test_set("test", ["x/2.png", "x/1.png"], [1, 0], ["cat", "dog"])
    c = report.test_set("test", ["x/1.png", "x/2.png"], [1, 0], ["cat", "dog"])  # labels swapped
    assert a == b and a["n"] == 2 and a["sha256"] != c["sha256"]


def test_predictions_and_report_round_trip_and_leave_no_temporary_files(tmp_path):
    probs = np.array([[0.9, 0.1], [0.3, 0.7]])
    report.write_predictions(tmp_path, ["a.png", "b,c.png"], [0, 0], [0, 1], probs, ["cat", "dog"])
    back = report.read_predictions(tmp_path / "predictions.csv")
    assert back["b,c.png"] == {"true": "cat", "predicted": "dog", "probabilities": {"cat": 0.3, "dog": 0.7}}
    rep = {"model": "m", "classes": ["cat", "dog"], "accuracy": 0.5, **report.metrics([0, 0], [0, 1], ["cat", "dog"])}
    path = report.write_report(tmp_path, rep)
    assert json.loads(path.read_text())["accuracy"] == 0.5
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion_matrix.png", "predictions.csv", "report.json"]


def test_learning_curve_plot_is_a_png(tmp_path):
    history = [{"epoch": e, "phase": "finetune", "train_loss": 1 / e, "val_loss": 1.2 / e, "train_accuracy": 0.5,
                "val_accuracy": 0.4 + e / 10} for e in (1, 2, 3)]
    report.plot_history(history, tmp_path / "curve.png", title="t")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_confusion_title_names_no_missing_tap():
    from bottleneck.report import confusion_title

    fine_tune = {"model": "resnet50", "tap": None, "clf": "finetune", "accuracy": 0.9}
    assert confusion_title(fine_tune) == "resnet50 finetune: accuracy 0.900"  # once "resnet50 None finetune"
    assert confusion_title(fine_tune | {"tap": "pool", "clf": "logreg"}) == "resnet50 pool logreg: accuracy 0.900"
