import csv
import io
import json

import numpy as np
import pytest
from conftest import cli, make_image, make_tree
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


def write_report(folder, right: int, val: float | None = 0.8, paths=TEST_PATHS, true=TRUE, **fields):
    """A report.json as fit or finetune write it (docs/reports.md), with its predictions.csv: the
    first `right` of the 40 test images predicted correctly; `val`, its validation score."""
    pred = [t if i < right else 1 - t for i, t in enumerate(true)]
    probs = np.eye(2)[pred] * 0.8 + 0.1
    reports.write_predictions(folder, paths, true, pred, probs, CLASSES)
    m = reports.metrics(np.array(true), np.array(pred), CLASSES)
    rep = {"model": LITE, "n_train": 100, "n_test": len(true), "classes": CLASSES,
           "test_set": reports.test_set("test", paths, true, CLASSES), **m}
    if val is not None:
        rep["validation"] = {"accuracy": val, "by": "validation split"}
    reports.write_report(folder, rep | fields)  # with its confusion-matrix PNG


FIT_COST = {"fit_seconds": 1.5, "predict_seconds": 0.01, "extraction": {"device": "cpu: test", "images": 160,
                                                                         "wall_seconds": 8.5}}


@pytest.fixture
def runs(tmp_path):
    write_report(tmp_path / "a" / "fit" / "pool-logreg", 32, 0.80, stage="fit", tap="pool", clf="logreg",
                 cost=FIT_COST)
    write_report(tmp_path / "a" / "fit" / "blocks.4-svm", 33, 0.85, stage="fit", tap="blocks.4", clf="svm",
                 cost=FIT_COST | {"fit_seconds": 0.5})
    write_report(tmp_path / "b" / "finetune", 39, 0.90, stage="finetune", clf="finetune",
                 cost={"wall_seconds": 600.0, "device": "cuda: test", "epochs_run": 3})
    write_report(tmp_path / "b" / "rescore", 4, stage="evaluate", tap="pool", clf="logreg", cost={})
    return tmp_path


def test_rows_add_extraction_to_fit_and_take_finetune_whole(runs):
    rows = collect([str(runs / "a"), str(runs / "b"), str(runs / "a")])
    assert [(r["method"], r["tap"], r["classifier"]) for r in rows] == [
        ("fixed features", "blocks.4", "svm"), ("fixed features", "pool", "logreg"),
        ("fine-tune", "", "whole network, new head")]  # cheapest first; evaluate re-scores and repeats left out
    assert [r["cost_seconds"] for r in rows] == [9.0, 10.0, 600.0]
    assert [r["ms_per_image"] for r in rows] == [90.0, 100.0, 6000.0]
    assert rows[2]["device"] == "cuda: test" and rows[0]["id"] == "fit/blocks.4-svm"


def test_paired_difference_interval_p_value_and_verdict(runs):
    result = comparison([str(runs / "a"), str(runs / "b")])
    rows = {r["id"]: r for r in result["rows"]}
    assert result["reference"] == "fit/blocks.4-svm" and rows["fit/blocks.4-svm"]["reference"]  # best on validation
    ft = rows["finetune"]
    # 39 vs 33 of 40 right, and fine-tuning is right on every image the svm gets right: b = 0, c = 6.
    # McNemar's score test: z = 6 / sqrt(6); the interval is its inversion, so they agree.
    assert ft["difference"] == pytest.approx(6 / 40) and ft["p_value"] == pytest.approx(0.014305, abs=1e-5)
    low, high = ft["difference_ci"]
    assert 0 < low < 6 / 40 < high <= 0.3
    lo, hi = ft["accuracy_ci"]
    assert lo < 39 / 40 < hi < 1  # Wilson: not the normal interval's impossible upper bound above 1
    assert result["decision"]["outcome"] == "fine-tuning better"
    assert result["verdict"].startswith("fine-tuning is better: fine-tuning efficientnet_lite0 (whole network, new "
                                        "head) scores 15.0 points higher than svm on efficientnet_lite0 blocks.4 "
                                        "(95 % CI +")
    assert "p = 0.014" in result["verdict"] and "for 67× the compute" in result["verdict"]
    pool = rows["fit/pool-logreg"]
    assert pool["difference"] == pytest.approx(-1 / 40) and pool["p_value"] == pytest.approx(0.3173, abs=1e-4)
    # Holm over the two rows compared with the reference: the smaller p doubles, the larger stays
    assert ft["p_holm"] == pytest.approx(2 * ft["p_value"]) and pool["p_holm"] == pytest.approx(pool["p_value"])
    assert result["contenders"] == {"fixed features": 2, "fine-tune": 1}


def test_contenders_are_chosen_on_validation_not_on_the_test_images(runs):
    """The svm scores best on the test images, logistic regression on validation: the reference is the latter."""
    write_report(runs / "a" / "fit" / "pool-logreg", 32, 0.95, stage="fit", tap="pool", clf="logreg", cost=FIT_COST)
    write_report(runs / "b" / "finetune-lucky", 40, 0.70, stage="finetune", clf="finetune",
                 cost={"wall_seconds": 600.0})
    result = comparison([str(runs / "a"), str(runs / "b")])
    assert result["reference"] == "fit/pool-logreg" and result["challenger"] == "finetune"
    assert result["decision"]["reference"] == {"id": "fit/pool-logreg", "by": "validation", "among": 2,
                                               "unscored": 0}
    # Named by the user instead: taken as asked, and said so
    named = comparison([str(runs / "a"), str(runs / "b")], reference="fit/blocks.4-svm", challenger="finetune-lucky")
    assert named["decision"]["reference"]["by"] == "--reference" and named["challenger"] == "finetune-lucky"
    # Without any validation score on a side, nothing is chosen on the test images: the verdict says so
    for path in (runs / "b").rglob("report.json"):
        rep = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in rep.items() if k != "validation"}))
    result = comparison([str(runs / "a"), str(runs / "b")])
    assert result["verdict"].startswith("no verdict: no fine-tune result records a validation score to choose by; "
                                        "name one with --challenger")


def test_no_detectable_difference_is_inconclusive_with_the_power_it_had(tmp_path):
    write_report(tmp_path / "fit" / "pool-logreg", 35, stage="fit", tap="pool", clf="logreg", cost=FIT_COST)
    write_report(tmp_path / "finetune", 36, stage="finetune", clf="finetune", cost={"wall_seconds": 100.0})
    result = comparison([str(tmp_path)])
    assert result["decision"]["outcome"] == "inconclusive"
    assert result["verdict"].startswith("inconclusive: fine-tuning efficientnet_lite0 (whole network, new head) "
                                        "scores 2.5 points higher than logreg on efficientnet_lite0 pool (95 % CI")
    assert "these 40 test images can only tell differences above" in result["verdict"]
    assert "(80 % power), and about" in result["verdict"] and "would be needed to tell a 1-point difference" in \
        result["verdict"] and "fine-tuning takes 10× the compute" in result["verdict"]
    # 5 more right of 40, all in one direction: interval and test come from one statistic, so both
    # clear zero together (the exact binomial p = 0.0625 is kept for the record)
    write_report(tmp_path / "finetune", 40, stage="finetune", clf="finetune", cost={"wall_seconds": 100.0})
    result = comparison([str(tmp_path)])
    ft = next(r for r in result["rows"] if r["method"] == "fine-tune")
    assert ft["difference_ci"][0] > 0 and ft["p_value"] < 0.05 and ft["paired"]["p_exact"] == pytest.approx(0.0625)
    assert result["decision"]["outcome"] == "fine-tuning better"


def test_equivalence_within_the_margin_needs_enough_images(tmp_path):
    """4,000 test images on which the two disagree on 20, evenly: within ±1 point (the 90 % interval is inside).
    A margin of 0.1 point is not shown by the same data, and a wider one is."""
    n = 4000
    paths = [f"test/{CLASSES[i % 2]}/{i:05d}.png" for i in range(n)]
    true = [i % 2 for i in range(n)]
    write_report(tmp_path / "fit" / "pool-logreg", n - 300, paths=paths, true=true, stage="fit", tap="pool",
                 clf="logreg", cost=FIT_COST)
    tune = tmp_path / "finetune"
    write_report(tune, n - 300, paths=paths, true=true, stage="finetune", clf="finetune", cost={"wall_seconds": 50.0})
    rows = reports.read_predictions(tune / "predictions.csv")
    # swap 10 right and 10 wrong images: 20 disagreements, 10 each way
    flips = paths[:10] + paths[-10:]
    with open(tune / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "predicted", "p_cats", "p_dogs"])
        for p, r in rows.items():
            pred = r["predicted"] if p not in flips else ("dogs" if r["predicted"] == "cats" else "cats")
            w.writerow([p, r["true"], pred, 0.5, 0.5])
    result = comparison([str(tmp_path)])
    assert result["decision"]["outcome"] == "equivalent" and result["decision"]["difference"] == 0
    assert result["verdict"].startswith("fixed features are as good, within ±1 points: fine-tuning")
    assert comparison([str(tmp_path)], margin=0.1)["decision"]["outcome"] == "inconclusive"
    with pytest.raises(BottleneckError, match="--margin must be a number"):
        comparison([str(tmp_path)], margin=float("nan"))


def test_a_row_without_predictions_is_named_and_left_out(runs):
    (runs / "b" / "finetune" / "predictions.csv").unlink()
    result = comparison([str(runs / "a"), str(runs / "b")])
    assert [r["id"] for r in result["left_out"]] == ["finetune"]
    assert result["verdict"].startswith("no verdict: no fine-tune result scored on these test images")
    assert "left out: finetune (no predictions.csv beside its report" in result["verdict"]


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
    assert lines[0].startswith("**Verdict:** fine-tuning is better: fine-tuning efficientnet_lite0")
    header = lines.index(next(line for line in lines if line.startswith("| method")))
    assert lines[header + 2] == ("| fixed features | efficientnet_lite0 | blocks.4 | svm | 1 | 0.850 | "
                                 "0.825 (0.681-0.913) | reference |  | 0.825 | reference | 9.0 s | 90.0 ms |")
    assert "| fine-tune | efficientnet_lite0 |  | whole network, new head (named) | 1 | 0.900 | 0.975 (" in \
        lines[header + 4]
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
    with pytest.raises(BottleneckError, match="--reference 'fit/' names more than one contender"):
        comparison([str(runs / "a"), str(runs / "b")], reference="fit/")


def test_cli_prints_each_format(runs):
    md = cli("compare", str(runs / "a"), str(runs / "b"))
    assert md.returncode == 0 and md.stdout.startswith("**Verdict:**")
    assert (runs / "a" / "comparison.png").is_file() and (runs / "a" / "report.html").is_file()
    result = json.loads(cli("compare", str(runs / "a"), "--json").stdout)
    assert [r["classifier"] for r in result["rows"]] == ["svm", "logreg"]
    table = list(csv.DictReader(io.StringIO(cli("compare", str(runs / "b"), "--csv").stdout)))
    assert table[0]["method"] == "fine-tune" and float(table[0]["accuracy"]) == 0.975


def test_nothing_to_compare_is_a_clear_error(tmp_path):
    with pytest.raises(BottleneckError, match="no fit or finetune report.json"):
        collect([str(tmp_path)])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "report.json").write_text("{truncated")
    with pytest.raises(BottleneckError, match="not a readable report"):
        collect([str(tmp_path)])
    result = cli("compare", str(tmp_path / "missing"))
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
    result = cli("compare", str(runs), "--out", str(tmp_path / "cmp"))
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
    assert fitted["test_set"].pop("twins")["by"] == "features" and tuned["test_set"].pop("twins")["by"] == "files"
    assert fitted["test_set"] == tuned["test_set"] and fitted["test_set"]["n"] == n_test
    result = comparison([str(tmp_path / "run")])
    assert len(result["rows"]) == 2 and not result["apart"]


# --------------------------------------------------------------------------- what a user sees

@pytest.mark.slow
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
    assert seen["verdict"].startswith("fine-tuning is better: fine-tuning efficientnet_lite0")
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
    (ft,) = [r for r in result["rows"] if r["method"] == "fine-tune"]  # the three seeds are one contender
    assert ft["id"] == "finetune" and ft["n_seeds"] == 3 and ft["accuracy"] == pytest.approx(38 / 40)
    assert ft["paired"]["method"] == "t over images and seeds" and ft["paired"]["seeds"] == [1, 3]
    lo, hi = ft["accuracy_ci"]
    assert lo < 38 / 40 < hi
    assert "fine-tuning efficientnet_lite0 (whole network, new head) (mean of 3 seeds)" in result["verdict"]
    text = compare([str(runs / "a"), str(runs / "b")]).read_text()
    assert "| finetune | 3 | 0.950 ± 0.025 | finetune-seed0 0.975, finetune-seed1 0.925, finetune-seed2 0.950 |" \
        in text.replace("\\", "")


def row(rep: dict, path):
    """compare's row of the report `rep` as read from `path`."""
    from bottleneck.compare import row

    return row(reports.Report.from_dict(rep, path))


def test_lp_ft_rows_say_which_run_and_how_long_they_trained(tmp_path):
    base = {"stage": "finetune", "model": "m", "clf": "finetune", "accuracy": 0.8, "balanced_accuracy": 0.8,
            "n_test": 10, "n_train": 20, "cost": {"wall_seconds": 5.0}, "probe_cost_seconds": 2.0}
    rows = [row(base | {"params": {"init_head": "p.joblib", "epochs": e}}, tmp_path / f"r{e}" / "report.json")
            for e in (2, 8)]
    assert [r["classifier"] for r in rows] == ["head from a logreg probe (LP-FT r2, 2 epochs)",
                                               "head from a logreg probe (LP-FT r8, 8 epochs)"]
    assert rows[0]["cost_seconds"] == 7.0  # the probe it started from is part of its cost
    assert row(base | {"params": {"epochs": 2}}, tmp_path / "f" / "report.json")["classifier"] == \
        "whole network, new head"
    assert row(base | {"params": {"unfreeze": "2"}}, tmp_path / "f" / "report.json")["classifier"] == \
        "last 2 blocks, new head"


def test_a_top_trained_on_cached_maps_says_so_and_counts_their_extraction(tmp_path):
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


def test_run_names_are_escaped_in_markdown_and_the_api_checks_its_arguments(runs, tmp_path):
    evil = runs / "a" / "fit" / "<img src=x onerror=alert(1)>|x"
    write_report(evil, 30, 0.1, stage="fit", tap="pool", clf="knn", cost=FIT_COST)
    (evil / "predictions.csv").unlink()  # so it is listed, by its folder's name, among the rows left out
    md = compare(str(runs / "a"), out=str(tmp_path / "out")).read_text()  # one folder as a plain string
    assert "<img" not in md and "- fit/&lt;img src=x onerror=alert(1)>\\|x: no predictions.csv" in md
    with pytest.raises(BottleneckError, match="out must be a folder path"):
        compare([str(runs / "a")], out=5)
    with pytest.raises(BottleneckError, match="run_dirs must be a folder or a list"):
        compare(None)


def test_a_report_whose_interval_misses_its_accuracy_still_renders(runs, tmp_path):
    path = runs / "a" / "fit" / "pool-logreg" / "report.json"
    rep = json.loads(path.read_text())
    path.write_text(json.dumps(rep | {"accuracy_ci": [0.95, 0.99]}))
    compare([str(runs / "a"), str(runs / "b")], out=str(tmp_path / "out"))
    assert (tmp_path / "out" / "comparison.png").is_file() and (tmp_path / "out" / "report.html").is_file()
