import json
from pathlib import Path

import pytest
from conftest import make_tree, run_cli

from bottleneck import pipeline
from bottleneck.errors import BottleneckError

ROOT = Path(__file__).resolve().parent.parent


def experiment(tmp_path: Path, data: Path, finetune: str = "") -> Path:
    """A small experiment: Lite0 with two taps, two quick classifiers, optional fine-tuning."""
    path = tmp_path / "tiny.toml"
    path.write_text(f"""
name = "tiny"
out = "{tmp_path / 'run'}"
cache = "{tmp_path / 'cache'}"

[data]
path = "{data}"

[[backbone]]
model = "efficientnet_lite0"
layers = ["blocks.4", "pool"]
batch_size = 8
workers = 0

[fit]
classifiers = ["logreg", "knn"]
{finetune}""")
    return path


@pytest.mark.parametrize("shipped", ["elpv", "catsdogs"])
def test_shipped_experiments_are_valid(shipped):
    exp = pipeline.load(ROOT / "pipelines" / f"{shipped}.toml")
    assert exp.backbones and exp.fit and exp.finetunes and exp.out == Path("runs") / shipped


GOOD = """\
name = "x"

[data]
path = "data/x"

[[backbone]]
model = "efficientnet_lite0"
layers = ["blocks.4"]

[fit]
classifiers = ["logreg"]
"""


@pytest.mark.parametrize("old, new, words", [
    ('name = "x"', 'name = "x', ["not valid TOML", "line 1"]),
    ('name = "x"', 'name = "x"\nouts = "runs"', ["line 2", "outs: unknown key"]),
    ('model = "efficientnet_lite0"', 'model = "efficientnet_lite1"',
     ["line 7", "[[backbone]] #1 model", "did you mean 'efficientnet_lite0'"]),
    ('layers = ["blocks.4"]', 'layers = ["blocks.9"]', ["line 8", "layers", "no tap 'blocks.9'"]),
    ('layers = ["blocks.4"]', 'layers = "blocks.4"', ["line 8", "must be a list of strings"]),
    ('layers = ["blocks.4"]', 'layers = ["blocks.4"]\nbatch_size = "64"', ["line 9", "batch_size: must be an integer"]),
    ('classifiers = ["logreg"]', 'classifiers = ["forest"]', ["line 11", "[fit] classifiers", "unknown classifier"]),
    ('classifiers = ["logreg"]', 'classifiers = ["logreg"]\nlayers = ["pool"]', ["line 12", "does not extract pool"]),
    ('path = "data/x"', 'path = "data/x"\nbuiltin = "mnist"', ["line 5", "unknown dataset 'mnist'"]),
    ('[data]\npath = "data/x"', '[data]', ["line 3", "[data]: needs path"]),
    ('[[backbone]]', '[backbone]', ["line 6", "write [[backbone]] (double brackets)"]),
    ('[fit]', '[[finetune]]\nmodel = "resnet18"\nepoch = 3\n[fit]', ["line 12", "[[finetune]] #1 epoch: unknown key"]),
])
def test_a_bad_file_is_one_error_naming_key_and_line(tmp_path, old, new, words):
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(BottleneckError) as e:
        pipeline.load(path)
    for word in words:
        assert word in str(e.value)
    assert str(e.value).startswith(str(path))


def test_run_does_every_stage_then_skips_what_is_done(tmp_path):
    data = make_tree(tmp_path / "data", {"train": 6, "val": 2, "test": 3})
    path = experiment(tmp_path, data)
    result = run_cli("run", str(path), "--no-progress")
    assert result.returncode == 0, result.stderr
    table = result.stdout.strip().splitlines()
    assert table[0].startswith("| method | backbone | tap | classifier | test accuracy") and len(table) == 2 + 4
    run = tmp_path / "run"
    cache = Path((run / "caches" / "efficientnet_lite0.path").read_text().strip())
    reports = sorted(run.glob("fit/efficientnet_lite0/*/report.json"))
    assert [p.parent.name for p in reports] == ["blocks.4-knn", "blocks.4-logreg", "pool-knn", "pool-logreg"]
    assert all(json.loads(p.read_text())["cache"]["path"] == str(cache) for p in reports)
    assert {f.name for f in run.iterdir()} >= {"experiment.toml", "comparison.md", "comparison.csv",
                                              "comparison.json", "comparison.png"}
    stamps = [p.stat().st_mtime_ns for p in [cache, *reports]]

    again = run_cli("run", str(path), "--no-progress")
    assert again.returncode == 0 and again.stdout == result.stdout
    assert "reusing complete cache" in again.stderr and again.stderr.count("done before") == 4
    assert [p.stat().st_mtime_ns for p in [cache, *reports]] == stamps

    status = run_cli("status", str(run), "--json")
    rows = {r["stage"]: r for r in json.loads(status.stdout)}
    assert list(rows) == ["extract-efficientnet_lite0", "fit-efficientnet_lite0", "compare"]
    assert all(r["state"] == "done" for r in rows.values()) and rows["fit-efficientnet_lite0"]["output"] == \
        "done: 4/4 reports"


def test_changed_fit_settings_fit_again(tmp_path):
    data = make_tree(tmp_path / "data", {"train": 6, "test": 3})
    path = experiment(tmp_path, data)
    pipeline.run(path, progress=False)
    report = tmp_path / "run" / "fit" / "efficientnet_lite0" / "pool-logreg" / "report.json"
    assert json.loads(report.read_text())["search"] is None
    path.write_text(path.read_text().replace('classifiers = ["logreg", "knn"]',
                                             'classifiers = ["logreg"]\nsearch = true'))
    pipeline.run(path, progress=False)
    assert json.loads(report.read_text())["search"]["chosen"]["cv"] == "5-fold stratified on train"


def test_run_fine_tunes_and_compares_it_with_the_classifiers(tmp_path):
    data = make_tree(tmp_path / "data", {"train": 6, "val": 2, "test": 3})
    path = experiment(tmp_path, data, finetune="""
[[finetune]]
model = "squeezenet1_1"
weights = "none"
head_epochs = 0
epochs = 1
batch_size = 4
image_size = 64
workers = 0
""")
    comparison = pipeline.run(path, progress=False)
    rows = json.loads(comparison.with_suffix(".json").read_text())
    tuned = [r for r in rows if r["method"] == "fine-tune"]
    assert len(rows) == 5 and len(tuned) == 1 and tuned[0]["backbone"] == "squeezenet1_1"
    assert tuned[0]["cost_seconds"] > 0
    assert pipeline.run(path, progress=False) == comparison  # the finished fine-tune is not repeated


def test_run_refuses_slurm_options_without_slurm(tmp_path):
    result = run_cli("run", str(ROOT / "pipelines" / "elpv.toml"), "--partition", "gpu")
    assert result.returncode != 0 and "--partition only apply with --slurm" in result.stderr
