import csv
import io
import json

import numpy as np
import pytest
from conftest import make_image, make_tree, run_cli
from PIL import Image

from bottleneck import report as reports
from bottleneck.classify import fit
from bottleneck.compare import collect, compare, comparison
from bottleneck.errors import BottleneckError
from bottleneck.extract import extract
from bottleneck.finetune import finetune
from bottleneck.store import FeatureStore

LITE = "efficientnet_lite0"
CLASSES = ["cats", "dogs"]
TEST_PATHS = [f"test/{c}/{i:03d}.png" for c in CLASSES for i in range(20)]
TRUE = [0] * 20 + [1] * 20


def write_report(folder, right: int, **fields):
    """A report.json as fit or finetune write it (docs/reports.md), with its predictions.csv: the
    first `right` of the 40 test images predicted correctly."""
    pred = [t if i < right else 1 - t for i, t in enumerate(TRUE)]
    probs = np.eye(2)[pred] * 0.8 + 0.1
    reports.write_predictions(folder, TEST_PATHS, TRUE, pred, probs, CLASSES)
    m = reports.metrics(np.array(TRUE), np.array(pred), CLASSES)
    rep = {"model": LITE, "n_train": 100, "n_test": 40, "classes": CLASSES,
           "test_set": reports.test_set("test", TEST_PATHS, TRUE, CLASSES), **m}
    reports.write_report(folder, rep | fields)  # with its confusion-matrix PNG


FIT_COST = {"fit_seconds": 1.5, "predict_seconds": 0.01, "extraction": {"device": "cpu: test", "images": 160,
                                                                         "wall_seconds": 8.5}}


@pytest.fixture
def runs(tmp_path):
    write_report(tmp_path / "a" / "fit" / "pool-logreg", 32, stage="fit", tap="pool", clf="logreg", cost=FIT_COST)
    write_report(tmp_path / "a" / "fit" / "blocks.4-svm", 33, stage="fit", tap="blocks.4", clf="svm",
                 cost=FIT_COST | {"fit_seconds": 0.5})
    write_report(tmp_path / "b" / "finetune", 39, stage="finetune", clf="finetune",
                 cost={"wall_seconds": 600.0, "device": "cuda: test", "epochs_run": 3})
    write_report(tmp_path / "b" / "rescore", 4, stage="evaluate", tap="pool", clf="logreg", cost={})
    return tmp_path


def test_rows_add_extraction_to_fit_and_take_finetune_whole(runs):
    rows = collect([str(runs / "a"), str(runs / "b"), str(runs / "a")])
    assert [(r["method"], r["tap"], r["classifier"]) for r in rows] == [
        ("fixed features", "blocks.4", "svm"), ("fixed features", "pool", "logreg"),
        ("fine-tune", "", "fine-tuned head")]  # cheapest first; evaluate re-scores and repeats left out
    assert [r["cost_seconds"] for r in rows] == [9.0, 10.0, 600.0]
    assert [r["ms_per_image"] for r in rows] == [90.0, 100.0, 6000.0]
    assert rows[2]["device"] == "cuda: test" and rows[0]["id"] == "fit/blocks.4-svm"


def test_paired_difference_interval_p_value_and_verdict(runs):
    result = comparison([str(runs / "a"), str(runs / "b")])
    rows = {r["id"]: r for r in result["rows"]}
    assert result["reference"] == "fit/blocks.4-svm" and rows["fit/blocks.4-svm"]["reference"]  # best fixed row
    ft = rows["finetune"]
    # 39 vs 33 of 40 right, and fine-tuning is right on every image the svm gets right: b = 0, c = 6.
    assert ft["difference"] == pytest.approx(6 / 40) and ft["p_value"] == pytest.approx(2 * 0.5 ** 6)
    low, high = ft["difference_ci"]
    assert 0 < low < 6 / 40 < high <= 0.3
    lo, hi = ft["accuracy_ci"]
    assert lo < 39 / 40 < hi < 1  # Wilson: not the normal interval's impossible upper bound above 1
    assert result["verdict"].startswith("fine-tuning: +15.0 points (95 % CI +") and "p = 0.031" in result["verdict"]
    assert "67× the compute" in result["verdict"] and "over svm on efficientnet_lite0 blocks.4" in result["verdict"]
    pool = rows["fit/pool-logreg"]
    assert pool["difference"] == pytest.approx(-1 / 40) and pool["p_value"] == 1.0  # b = 1, c = 0


def test_no_detectable_difference_says_so(tmp_path):
    write_report(tmp_path / "fit" / "pool-logreg", 35, stage="fit", tap="pool", clf="logreg", cost=FIT_COST)
    write_report(tmp_path / "finetune", 36, stage="finetune", clf="finetune", cost={"wall_seconds": 100.0})
    result = comparison([str(tmp_path)])
    assert result["verdict"].startswith("no difference detectable with 40 test images: fine-tuning +2.5 points")
    assert "for 10× the compute" in result["verdict"]
    # 5 more right of 40, all in one direction: the bootstrap interval clears zero but McNemar's exact
    # p = 0.0625 does not clear 0.05, and a verdict claims a difference only when both do.
    write_report(tmp_path / "finetune", 40, stage="finetune", clf="finetune", cost={"wall_seconds": 100.0})
    result = comparison([str(tmp_path)])
    ft = next(r for r in result["rows"] if r["method"] == "fine-tune")
    assert ft["difference_ci"][0] > 0 and ft["p_value"] == pytest.approx(0.0625)
    assert result["verdict"].startswith("no difference detectable")


def test_rows_from_other_test_sets_are_kept_apart(runs, tmp_path):
    other = runs / "b" / "finetune-other-split"
    write_report(other, 40, stage="finetune", clf="finetune", cost={"wall_seconds": 60.0})
    rep = json.loads((other / "report.json").read_text())
    rep["test_set"]["sha256"] = "0" * 64  # as a fine-tune on another split (or --max-images) records it
    (other / "report.json").write_text(json.dumps(rep))
    old = runs / "b" / "from-an-old-version"
    write_report(old, 40, stage="fit", tap="pool", clf="mlp", cost=FIT_COST)
    rep = json.loads((old / "report.json").read_text())
    del rep["test_set"]  # no record of its test images: never assumed to match
    (old / "report.json").write_text(json.dumps(rep))

    md = compare([str(runs / "a"), str(runs / "b")], out=str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "comparison.json").read_text())
    assert {r["id"] for r in result["rows"]} == {"fit/pool-logreg", "fit/blocks.4-svm", "finetune"}
    assert {r["id"] for r in result["apart"]} == {"finetune-other-split", "from-an-old-version"}
    assert all(r["difference"] is None for r in result["apart"])
    assert result["verdict"].endswith("2 result(s) scored on other test images are listed apart")
    text = md.read_text()
    main, apart = text.split("Scored on other test images")
    assert "| 1.000 (" not in main and apart.count("| 1.000 (") == 2  # the perfect scores stay out of the table
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'id="apart"' in html and "Scored on other test images" in html


def test_compare_writes_table_csv_json_plot_and_html(runs):
    md = compare([str(runs / "a"), str(runs / "b")], out=str(runs / "out"))
    lines = md.read_text().splitlines()
    assert lines[0].startswith("**Verdict:** fine-tuning: +15.0 points")
    header = lines.index(next(line for line in lines if line.startswith("| method")))
    assert lines[header + 2] == ("| fixed features | efficientnet_lite0 | blocks.4 | svm | 0.825 (0.681-0.913) | "
                                 "reference |  | 0.825 | 9.0 s | 90.0 ms |")
    assert "| fine-tune | efficientnet_lite0 |  | fine-tuned head | 0.975 (" in lines[header + 4]
    result = json.loads((runs / "out" / "comparison.json").read_text())
    for r in result["rows"]:
        assert {"accuracy", "accuracy_ci", "difference", "difference_ci", "p_value", "cost_seconds"} <= set(r)
    assert isinstance(result["verdict"], str)
    assert len(list(csv.DictReader(io.StringIO((runs / "out" / "comparison.csv").read_text())))) == 3
    assert (runs / "out" / "comparison.png").stat().st_size > 10_000
    html = (runs / "out" / "report.html").read_text()
    assert 'id="verdict"' in html and html.count("data:image/png;base64,") >= 4  # plot + 3 confusion matrices
    assert "http" not in html.replace("http-equiv", "")  # nothing to fetch


def test_reference_option_and_bad_reference(runs):
    result = comparison([str(runs / "a"), str(runs / "b")], reference="fit/pool-logreg")
    assert result["reference"] == "fit/pool-logreg"
    with pytest.raises(BottleneckError, match="--reference 'fit/' names more than one row"):
        comparison([str(runs / "a"), str(runs / "b")], reference="fit/")


def test_cli_prints_each_format(runs):
    md = run_cli("compare", str(runs / "a"), str(runs / "b"))
    assert md.returncode == 0 and md.stdout.startswith("**Verdict:**")
    assert (runs / "a" / "comparison.png").is_file() and (runs / "a" / "report.html").is_file()
    result = json.loads(run_cli("compare", str(runs / "a"), "--json").stdout)
    assert [r["classifier"] for r in result["rows"]] == ["svm", "logreg"]
    table = list(csv.DictReader(io.StringIO(run_cli("compare", str(runs / "b"), "--csv").stdout)))
    assert table[0]["method"] == "fine-tune" and float(table[0]["accuracy"]) == 0.975


def test_nothing_to_compare_is_a_clear_error(tmp_path):
    with pytest.raises(BottleneckError, match="no fit or finetune report.json"):
        collect([str(tmp_path)])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "report.json").write_text("{truncated")
    with pytest.raises(BottleneckError, match="not a readable report"):
        collect([str(tmp_path)])
    result = run_cli("compare", str(tmp_path / "missing"))
    assert result.returncode != 0 and "run folder" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "is not a report"), ("null", "is not a report"),
    ('{"stage": "fit", "accuracy": "high"}', "lacks what a report holds"),
    ('{"stage": "fit", "accuracy": NaN, "model": "x"}', "lacks what a report holds"),
    ('{"stage": "finetune", "accuracy": 0.5, "cost": "cheap"}', "lacks what a report holds"),
])
def test_a_report_of_the_wrong_shape_is_one_error_and_writes_nothing(runs, tmp_path, text, message):
    (runs / "odd").mkdir()
    (runs / "odd" / "report.json").write_text(text)
    result = run_cli("compare", str(runs), "--out", str(tmp_path / "cmp"))
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "cmp").exists() or not any((tmp_path / "cmp").iterdir())


# --------------------------------------------------------------------------- the same test images, end to end

QUICK = dict(batch_size=4, workers=0, progress=False, precision="fp32", image_size=64, head_epochs=0, epochs=1)


@pytest.mark.parametrize("source", ["class-tree", "csv-manifest", "cache-without-test"])
def test_extract_fit_and_finetune_score_the_same_test_images(tmp_path, source):
    """A plain class tree or a CSV manifest split by fractions: every stage scores the same files.

    `cache-without-test`: with --test-fraction 0 extract makes no test split; fit holds one out of
    the cache and finetune (given the same flags) out of the data, both with data.split_samples,
    and they still agree.
    """
    tree = make_tree(tmp_path / "d", {"all": 10}, split_folders=False)
    data = str(tree)
    if source == "csv-manifest":
        rows = [f"d/{f.parent.name}/{f.name},{f.parent.name}" for f in sorted(tree.rglob("*.*"))]
        (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
        data = str(tmp_path / "m.csv")
    split = {"val_fraction": 0.2, "test_fraction": 0.0 if source == "cache-without-test" else 0.3, "split_seed": 3}
    cache = extract(LITE, data, out=str(tmp_path / "c"), batch_size=8, workers=0, progress=False, **split)
    fit_report = fit(str(cache), out=str(tmp_path / "run" / "fit"))
    fitted = json.loads(fit_report.read_text())
    tuned = json.loads(finetune(LITE, data, out=str(tmp_path / "run" / "ft"), seed=1, **split, **QUICK)
                       .read_text())

    fit_paths = list(reports.read_predictions(fit_report.parent / "predictions.csv"))
    ft_paths = list(reports.read_predictions(tmp_path / "run" / "ft" / "predictions.csv"))
    n_test = 4 if source == "cache-without-test" else 6  # a quarter of train's 16, or 30 % of 20
    assert sorted(fit_paths) == sorted(ft_paths) and len(fit_paths) == n_test
    with FeatureStore(cache) as st:
        if source == "cache-without-test":
            assert "test" not in st.splits and fitted["holdout"]["by"] == "bottleneck.data.split_samples"
        else:
            assert sorted(st.paths("test")) == sorted(fit_paths)
    assert fitted["test_set"] == tuned["test_set"] and fitted["test_set"]["n"] == n_test
    result = comparison([str(tmp_path / "run")])
    assert len(result["rows"]) == 2 and not result["apart"]


# --------------------------------------------------------------------------- what a user sees

def test_report_html_renders_in_chromium(runs, tmp_path):
    """The page in a real browser: the verdict, the table, every plot and the disputed images' thumbnails."""
    browser = pytest.importorskip("browser")
    try:
        browser.chromium()
    except browser.Unavailable as e:
        pytest.skip(str(e))
    for i, rel in enumerate(TEST_PATHS):  # the test images the gallery shows
        make_image(runs / "images" / rel, i, tint=TRUE[i])
    for rep_path in (runs / "a").rglob("report.json"):
        rep = json.loads(rep_path.read_text())
        rep_path.write_text(json.dumps(rep | {"data_root": str(runs / "images")}))
    compare([str(runs / "a"), str(runs / "b")], out=str(tmp_path / "out"))
    page = tmp_path / "out" / "report.html"

    seen = browser.inspect(page)
    assert seen["verdict"].startswith("fine-tuning: +15.0 points")
    assert seen["table_rows"] == 3
    assert seen["gallery"] == 6  # the 6 images on which the svm and the fine-tune disagree
    assert seen["images"] >= 10 and seen["decoded"] == seen["images"]  # every embedded image decodes

    shot = np.asarray(Image.open(browser.screenshot(page, tmp_path / "page.png")).convert("L"), dtype=float)
    assert shot.std() > 20 and (shot < 128).mean() > 0.01  # not a blank page: text, table and plots drawn


def test_repeats_over_seeds_show_their_spread(runs):
    for seed, right in ((1, 37), (2, 38)):  # the fine-tune rerun with two more seeds
        write_report(runs / "b" / f"finetune-seed{seed}", right, stage="finetune", clf="finetune",
                     cost={"wall_seconds": 600.0})
    (runs / "b" / "finetune").rename(runs / "b" / "finetune-seed0")
    result = comparison([str(runs / "a"), str(runs / "b")])
    (rep,) = result["repeats"]
    assert rep["config"] == "finetune"
    assert rep["n"] == 3 and rep["mean"] == pytest.approx(38 / 40) and rep["sd"] == pytest.approx(1 / 40)
    assert "finetune over 3 seeds: 0.950 ± 0.025 (0.925 to 0.975)" in result["verdict"]
    assert "Across seeds" in compare([str(runs / "a"), str(runs / "b")]).read_text()


def test_lp_ft_rows_say_which_run_and_how_long_they_trained(tmp_path):
    from bottleneck.compare import row

    base = {"stage": "finetune", "model": "m", "clf": "finetune", "accuracy": 0.8, "balanced_accuracy": 0.8,
            "n_test": 10, "n_train": 20, "cost": {"wall_seconds": 5.0}, "probe_cost_seconds": 2.0}
    rows = [row(base | {"params": {"init_head": "p.joblib", "epochs": e}}, tmp_path / f"r{e}" / "report.json")
            for e in (2, 8)]
    assert [r["classifier"] for r in rows] == ["head from a logreg probe (LP-FT r2, 2 epochs)",
                                               "head from a logreg probe (LP-FT r8, 8 epochs)"]
    assert rows[0]["cost_seconds"] == 7.0  # the probe it started from is part of its cost
    assert row(base | {"params": {"epochs": 2}}, tmp_path / "f" / "report.json")["classifier"] == "fine-tuned head"


def test_a_top_trained_on_cached_maps_says_so_and_counts_their_extraction(tmp_path):
    from bottleneck.compare import row

    base = {"stage": "finetune", "model": "m", "clf": "finetune", "accuracy": 0.8, "balanced_accuracy": 0.8,
            "n_test": 10, "n_train": 20, "cost": {"wall_seconds": 5.0}, "cache_cost_seconds": 30.0,
            "tap": "blocks.5", "from_cache": {"views": "flips"}}
    top = row(base | {"params": {"from_cache": "c.h5", "epochs": 8}}, tmp_path / "top" / "report.json")
    assert top["classifier"] == "layers after blocks.5 on cached maps of flips views (top, 8 epochs)"
    assert top["cost_seconds"] == 35.0 and top["tap"] == "blocks.5"
    lpft = row(base | {"params": {"from_cache": "c.h5", "init_head": "p.joblib", "epochs": 8},
                       "probe_cost_seconds": 2.0}, tmp_path / "lp" / "report.json")
    assert lpft["classifier"] == ("layers after blocks.5 on cached maps of flips views, head from a logreg probe "
                                  "(lp, 8 epochs)")
    assert lpft["cost_seconds"] == 37.0
