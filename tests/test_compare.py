import csv
import io
import json

import pytest
from conftest import run_cli

from bottleneck.compare import collect, compare
from bottleneck.errors import BottleneckError


def write_report(folder, **fields):
    """A report.json as fit or finetune write it (docs/reports.md), with only what compare reads."""
    rep = {"model": "efficientnet_lite0", "n_train": 100, "n_test": 40, "balanced_accuracy": 0.7, "macro_f1": 0.7}
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(rep | fields))


@pytest.fixture
def runs(tmp_path):
    fit_cost = {"fit_seconds": 1.5, "predict_seconds": 0.01,
                "extraction": {"device": "cpu: test", "images": 160, "wall_seconds": 8.5}}
    write_report(tmp_path / "a" / "fit" / "pool-logreg", stage="fit", tap="pool", clf="logreg", accuracy=0.8,
                 cost=fit_cost)
    write_report(tmp_path / "a" / "fit" / "blocks.4-svm", stage="fit", tap="blocks.4", clf="svm", accuracy=0.85,
                 cost=fit_cost | {"fit_seconds": 0.5})
    write_report(tmp_path / "b" / "finetune", stage="finetune", clf="finetune", accuracy=0.9,
                 cost={"wall_seconds": 600.0, "device": "cuda: test", "epochs_run": 3})
    write_report(tmp_path / "b" / "rescore", stage="evaluate", tap="pool", clf="logreg", accuracy=0.1, cost={})
    return tmp_path


def test_rows_add_extraction_to_fit_and_take_finetune_whole(runs):
    rows = collect([str(runs / "a"), str(runs / "b"), str(runs / "a")])
    assert [(r["method"], r["tap"], r["classifier"]) for r in rows] == [
        ("fixed features", "blocks.4", "svm"), ("fixed features", "pool", "logreg"),
        ("fine-tune", "", "fine-tuned head")]  # cheapest first; evaluate re-scores and repeats left out
    assert [r["cost_seconds"] for r in rows] == [9.0, 10.0, 600.0]
    assert [r["ms_per_image"] for r in rows] == [90.0, 100.0, 6000.0]
    assert rows[2]["device"] == "cuda: test"


def test_compare_writes_table_csv_json_and_plot(runs):
    md = compare([str(runs / "a"), str(runs / "b")], out=str(runs / "out"))
    lines = md.read_text().splitlines()
    assert lines[0] == ("| method | backbone | tap | classifier | test accuracy | balanced accuracy | macro-F1 | "
                        "total cost | cost per image |")
    assert lines[2] == ("| fixed features | efficientnet_lite0 | blocks.4 | svm | 0.850 | 0.700 | 0.700 | 9.0 s "
                        "| 90.0 ms |")
    assert "| fine-tune | efficientnet_lite0 |  | fine-tuned head | 0.900 |" in lines[4] and "10.0 min" in lines[4]
    assert len(json.loads((runs / "out" / "comparison.json").read_text())) == 3
    assert len(list(csv.DictReader(io.StringIO((runs / "out" / "comparison.csv").read_text())))) == 3
    assert (runs / "out" / "comparison.png").stat().st_size > 10_000


def test_cli_prints_each_format(runs):
    md = run_cli("compare", str(runs / "a"), str(runs / "b"))
    assert md.returncode == 0 and md.stdout.startswith("| method |") and len(md.stdout.splitlines()) == 5
    assert (runs / "a" / "comparison.png").is_file()
    rows = json.loads(run_cli("compare", str(runs / "a"), "--json").stdout)
    assert [r["classifier"] for r in rows] == ["svm", "logreg"]
    table = list(csv.DictReader(io.StringIO(run_cli("compare", str(runs / "b"), "--csv").stdout)))
    assert table[0]["method"] == "fine-tune" and float(table[0]["accuracy"]) == 0.9


def test_nothing_to_compare_is_a_clear_error(tmp_path):
    with pytest.raises(BottleneckError, match="no fit or finetune report.json"):
        collect([str(tmp_path)])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "report.json").write_text("{truncated")
    with pytest.raises(BottleneckError, match="not a readable report"):
        collect([str(tmp_path)])
    result = run_cli("compare", str(tmp_path / "missing"))
    assert result.returncode != 0 and "run folder" in result.stderr and "Traceback" not in result.stderr
