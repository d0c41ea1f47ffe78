import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bottleneck import report, stats
from bottleneck.errors import BottleneckError


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


# --------------------------------------------------------------------------- one Report, old files read

FIXTURES = Path(__file__).parent / "fixtures" / "reports"  # written by fit, finetune (--from-cache) and evaluate
STAGES = {"fit": "fit", "finetune": "finetune", "finetune-top": "finetune", "evaluate": "evaluate"}  # before Report


@pytest.mark.parametrize("name", list(STAGES))
def test_reports_written_before_the_report_type_read_and_write_back_their_keys(name, tmp_path):
    path = FIXTURES / name / "report.json"
    old = json.loads(path.read_text())
    rep = report.read_report(path)
    assert rep.stage == STAGES[name] and rep.model == old["model"] and rep.accuracy == old["accuracy"]
    assert rep.test_set == old["test_set"] and rep.path == path and rep.predictions_path.is_file()
    assert rep.accuracy_ci == old["accuracy_ci"] and rep.calibration == old["calibration"]
    again = rep.to_dict()
    assert {k: again[k] for k in old} == old  # every key users' scripts read, with its value
    rep.write(tmp_path)
    assert report.read_report(tmp_path / "report.json").to_dict() == again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion_matrix.png", "report.json"]


def test_old_fine_tune_settings_are_read_from_params_and_its_validation_from_its_best_epoch():
    old = json.loads((FIXTURES / "finetune" / "report.json").read_text())
    rep = report.read_report(FIXTURES / "finetune" / "report.json")
    assert "settings" not in old and rep.settings == old["params"] and rep.seed == old["params"]["seed"]
    assert rep.estimator_params is None and rep.to_dict()["params"] == rep.to_dict()["settings"] == old["params"]
    best = old["best_epoch"]
    assert rep.validation == {"accuracy": old["history"][best - 1]["val_accuracy"],
                              "by": f"validation split, epoch {best}"}
    assert rep.cost_seconds == old["cost"]["wall_seconds"] and rep.device == old["cost"]["device"]
    top = report.read_report(FIXTURES / "finetune-top" / "report.json")
    assert top.tap == "blocks.5" and top.shared_seconds == top.extra["cache_cost_seconds"] > 0
    assert top.cost_seconds == pytest.approx(top.cost["wall_seconds"] + top.shared_seconds)


def test_a_fit_report_keeps_its_estimator_params_apart_from_its_settings():
    old = json.loads((FIXTURES / "fit" / "report.json").read_text())
    rep = report.read_report(FIXTURES / "fit" / "report.json")
    assert rep.settings == old["settings"] and rep.estimator_params == old["params"] and rep.seed == 0
    assert rep.validation == old["validation"] and rep.extra["search"] == old["search"]
    extraction = old["cost"]["extraction"]
    assert rep.shared_seconds == extraction["wall_seconds"] and rep.device == extraction["device"]
    assert rep.cost_seconds == pytest.approx(old["cost"]["fit_seconds"] + extraction["wall_seconds"])


def test_an_evaluate_report_says_nothing_of_a_caveat_it_has_not():
    rep = report.read_report(FIXTURES / "evaluate" / "report.json")
    assert rep.caveat is None and "caveat" not in rep.to_dict() and rep.extra["features"].endswith(".h5")
    rep.caveat = "trained on it"
    assert report.Report.from_dict(rep.to_dict()).caveat == "trained on it"


@pytest.mark.parametrize("text, message", [
    ("{cut", "not a readable report"), ("[]", "not a report"),
    ('{"stage": "fit", "model": "m", "accuracy": 0.5}', "lacks what a report holds"),
    ('{"stage": "fit", "model": "m", "accuracy": 0.5, "balanced_accuracy": "high"}', "lacks what a report holds"),
    ('{"stage": "fit", "model": "m", "accuracy": 0.5, "balanced_accuracy": 0.5, "accuracy_ci": [0.1]}',
     "lacks what a report holds"),
])
def test_a_report_that_is_not_one_is_a_clear_error(tmp_path, text, message):
    (tmp_path / "report.json").write_text(text)
    with pytest.raises(BottleneckError, match=message):
        report.read_report(tmp_path / "report.json")


def test_compare_pairs_the_reports_of_every_stage_as_older_versions_wrote_them(tmp_path):
    from bottleneck.compare import comparison

    for name in STAGES:
        shutil.copytree(FIXTURES / name, tmp_path / name)
    result = comparison([str(tmp_path)])
    rows = {r["id"]: r for r in result["rows"]}
    assert sorted(rows) == ["finetune", "finetune-top", "fit"]  # evaluate re-scores: no contender
    assert rows["fit"]["method"] == "fixed features" and rows["finetune"]["method"] == "fine-tune"
    assert rows["finetune-top"]["classifier"].startswith("layers after blocks.5 on cached maps")
    assert rows["finetune"]["classifier"] == "layers from blocks.5 on, new head"
    assert rows["fit"]["validation"]["by"] == "validation split" and not result["apart"]
    assert result["test_set"] == json.loads((FIXTURES / "fit" / "report.json").read_text())["test_set"]["sha256"]
