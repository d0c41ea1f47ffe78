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


def test_many_classes_plot_the_most_confused_and_the_report_comes_last(tmp_path):
    from PIL import Image

    classes = [f"class_{i:04d}" for i in range(300)]  # 1,000 once died here; 300 take seconds less
    y_true = np.arange(600) % 300
    y_pred = y_true.copy()
    y_pred[:40] = (y_true[:40] + 1) % 300  # classes 0..40 are confused, the rest right
    rep = {"model": "m", "classes": classes, **report.metrics(y_true, y_pred, classes)}
    path = report.write_report(tmp_path, rep)
    saved = json.loads(path.read_text())
    assert saved["confusion_plot"] == {"classes": report.PLOT_CLASSES, "of": 300, "chosen": "most confused"}
    assert report.most_confused(np.array(rep["confusion_matrix"]), report.PLOT_CLASSES)[:3] == [1, 2, 3]
    with Image.open(tmp_path / "confusion_matrix.png") as png:
        assert max(png.size) <= 2000  # a ~50,000-px figure once ran out of memory

    # A picture that cannot be written leaves no report: report.json present means the folder is finished.
    again = tmp_path / "again"
    (again / "confusion_matrix.png").mkdir(parents=True)
    with pytest.raises(OSError):
        report.write_report(again, rep)
    assert not (again / "report.json").exists()


def test_long_class_names_are_shortened_on_plots_and_kept_whole_in_the_report(tmp_path):
    long = "a_very_long_class_name_from_a_folder_of_someones_dataset_" * 3
    classes = [long + "1", long + "2"]
    assert all(len(report.short_label(c)) <= report.LABEL_CHARS for c in classes)
    assert report.short_label(classes[0]) != report.short_label(classes[1])  # the ends keep them apart
    rep = {"model": "m", "classes": classes, **report.metrics([0, 1], [0, 0], classes)}
    saved = json.loads(report.write_report(tmp_path, rep).read_text())
    assert saved["classes"] == classes and (tmp_path / "confusion_matrix.png").is_file()
