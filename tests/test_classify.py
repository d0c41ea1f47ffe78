import json

import numpy as np
import pytest
from conftest import cli, hold_lock, make_tree

from bottleneck import trained
from bottleneck.classifiers import CLASSIFIERS
from bottleneck.classify import fit
from bottleneck.errors import BottleneckError
from bottleneck.extract import extract
from bottleneck.predict import evaluate, predict
from bottleneck.trained import read_pipeline


@pytest.mark.parametrize("clf", CLASSIFIERS)
def test_every_classifier_fits_and_reports(cache, tmp_path, clf):
    path = fit(str(cache[0]), clf=clf, layer="pool", search=False, out=str(tmp_path))
    rep = json.loads(path.read_text())
    assert rep["stage"] == "fit" and rep["clf"] == clf and rep["tap"] == "pool" and rep["split"] == "test"
    assert (rep["n_train"], rep["n_test"]) == (32, 12)
    assert rep["accuracy"] >= 0.75  # the two classes differ clearly in colour
    assert np.array(rep["confusion_matrix"]).sum() == 12 and set(rep["per_class"]) == {"cats", "dogs"}
    assert rep["cost"]["fit_seconds"] > 0 and rep["cost"]["extraction"]["images"] == 52
    assert (path.parent / "confusion_matrix.png").stat().st_size > 1000


def test_search_uses_repeated_cv_over_train_and_val_and_records_its_choice(cache, tmp_path):
    rep = json.loads(fit(str(cache[0]), clf="logreg", out=str(tmp_path)).read_text())  # search is the default
    assert rep["search"]["chosen"]["cv"] == "2 × 5-fold stratified CV on train + val"
    assert 0 <= rep["search"]["chosen"]["cv_sd"] < 0.5
    assert rep["search"]["chosen"]["C"] in rep["search"]["grid"]["clf__C"]
    assert rep["n_train"] == 40  # refit on train + val


def test_layer_probe_and_learning_curve(cache, tmp_path):
    table = json.loads(fit(str(cache[0]), layer="all", search=False, out=str(tmp_path)).read_text())
    assert [r["tap"] for r in table] == ["blocks.4", "pool"]
    assert (tmp_path / "layers-logreg.png").is_file()
    curve = json.loads(fit(str(cache[0]), layer="pool", train_sizes="2,8,all", out=str(tmp_path)).read_text())
    assert [r["n_train"] for r in curve] == [4, 16, 32]


def test_bad_classifier_inputs_are_clear_errors(cache, tmp_path):
    (tmp_path / "model.joblib").write_bytes(b"\x80\x04garbage")
    result = cli("evaluate", str(tmp_path / "model.joblib"), "--features", str(cache[0]), "--trust")
    assert result.returncode != 0 and "not a readable classifier" in result.stderr and "Traceback" not in result.stderr
    result = cli("fit", "--features", str(cache[0]), "--clf", "forest")
    assert result.returncode != 0 and "unknown classifier 'forest'" in result.stderr
    result = cli("fit", "--features", str(cache[0]), "--layer", "fc9")
    assert result.returncode != 0 and "no tap 'fc9'" in result.stderr
    for sizes in ("0", "-25", "10,0"):  # 0 once meant "all" and -25 was accepted
        with pytest.raises(BottleneckError, match="--train-sizes must be positive numbers"):
            fit(str(cache[0]), train_sizes=sizes, out=str(tmp_path))


def test_report_records_its_test_images_intervals_and_predictions(cache, tmp_path):
    rep = json.loads(fit(str(cache[0]), clf="logreg", layer="pool", search=False, out=str(tmp_path)).read_text())
    from bottleneck import data, report
    from bottleneck.store import FeatureStore

    with FeatureStore(cache[0]) as st:
        pairs = [(p, st.classes[y]) for p, y in zip(st.paths("test"), st.labels("test"))]
    twins = rep["test_set"].pop("twins")
    assert rep["test_set"] == {"split": "test", "n": 12, "sha256": data.split_digest(pairs)}
    assert twins["by"] == "features" and twins["checked"] == twins["of"] == 12 and twins["tap"] == "pool"
    lo, hi = rep["accuracy_ci"]
    assert lo <= rep["accuracy"] <= hi and hi - lo > 0.1  # 12 images cannot pin accuracy down
    assert len(rep["balanced_accuracy_ci"]) == 2
    rows = report.read_predictions(tmp_path / "pool-logreg" / "predictions.csv")
    assert sorted(rows) == sorted(p for p, _ in pairs)
    right = sum(r["true"] == r["predicted"] for r in rows.values())
    assert right == round(rep["accuracy"] * 12)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in rows.values())


def test_results_of_other_settings_get_their_own_folder_or_are_refused(cache, tmp_path):
    searched = fit(str(cache[0]), clf="logreg", layer="pool", out=str(tmp_path))
    probe = fit(str(cache[0]), clf="logreg", layer="all", search=False, out=str(tmp_path))  # once overwrote it
    assert searched.parent.name == "pool-logreg-search" and json.loads(searched.read_text())["search"] is not None
    assert json.loads((tmp_path / "pool-logreg" / "report.json").read_text())["search"] is None
    assert probe.name == "layers-logreg.json"
    other = extract("efficientnet_lite0", str(cache[1]), layer=["pool"], out=str(tmp_path / "c2"), batch_size=16,
                    workers=0, progress=False, dtype="float16")
    with pytest.raises(BottleneckError, match="already holds a fit with other cache; pass --force"):
        fit(str(other), clf="logreg", layer="pool", search=False, out=str(tmp_path))
    result = cli("fit", "--features", str(other), "--out", str(tmp_path), "--layer", "pool", "--no-search",
                     "--force")
    assert result.returncode == 0
    assert json.loads((tmp_path / "pool-logreg" / "report.json").read_text())["cache"]["path"] == str(other)


def test_layer_auto_picks_the_tap_with_the_best_validation_score(cache, tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from bottleneck.store import FeatureStore

    rep = json.loads(fit(str(cache[0]), search=False, out=str(tmp_path)).read_text())  # layer auto by default
    choice = rep["layer_choice"]
    assert choice["by"] == "2 × 5-fold stratified CV on train + val"
    assert list(choice["scores"]) == ["pool", "blocks.4", "concat"]  # simplest first
    from bottleneck import choose

    with FeatureStore(cache[0]) as st:  # the same scores, computed independently from the cache
        y = np.r_[st.labels("train"), st.labels("val")]
        folds = choose.repeated_folds(y, st.paths("train") + st.paths("val"), 5, 0)
        for tap in ("pool", "blocks.4"):
            x = np.r_[st.features("train", tap), st.features("val", tap)]
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=3000))
            folded = [clf.fit(x[a], y[a]).score(x[b], y[b]) for a, b in folds]
            assert choice["scores"][tap]["mean"] == pytest.approx(np.mean(folded), abs=1e-4)
    order, means = list(choice["scores"]), {t: v["mean"] for t, v in choice["scores"].items()}
    assert choice["best"] == max(order, key=means.get)
    # the best, or a simpler candidate (earlier in the order) within one standard error of it
    assert order.index(choice["chosen"]) <= order.index(choice["best"])
    assert rep["tap"] == choice["chosen"] and rep["settings"]["tap"] == "auto"
    assert (tmp_path / "auto-logreg" / "model.skops").is_file()


def test_concatenated_taps_are_weighted_equally_and_predict_as_fitted(cache, tmp_path):
    from bottleneck import report as reports

    path = fit(str(cache[0]), layer="concat", search=False, out=str(tmp_path))
    rep = json.loads(path.read_text())
    assert rep["tap"] == "concat" and rep["taps"] == ["blocks.4", "pool"]
    pipe = trained.load(path.parent / "model.skops").pipe
    assert pipe.named_steps["taps"].dims == (112, 1280) and pipe.bottleneck_["taps"] == ["blocks.4", "pool"]
    # each tap's block carries the same total variance after scaling
    x = np.random.default_rng(0).normal(size=(50, 1392))
    scaled = pipe.named_steps["taps"].transform(x)
    assert scaled[:, :112].var(0).sum() == pytest.approx(scaled[:, 112:].var(0).sum(), rel=0.2)
    # predicting from the images recomputes both taps and gives the labels the fit scored
    saved = reports.read_predictions(path.parent / "predictions.csv")
    files = sorted(saved)[:6]
    rows = predict(str(path.parent / "model.skops"), [str(cache[1] / f) for f in files])
    assert [r["label"] for r in rows] == [saved[f]["predicted"] for f in files]
    assert evaluate(str(path.parent / "model.skops"), str(cache[0]))["accuracy"] == rep["accuracy"]


def test_relevance_ranks_the_features_that_carry_the_classes_first():
    from bottleneck.classifiers import SelectRelevant

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.normal(size=(300, 60))
    informative = [7, 31, 52]
    for j, col in enumerate(informative):  # each separates one class from the others
        x[:, col] += 1.5 * (y == j)
    x = (x - x.mean(0)) / x.std(0)
    sel = SelectRelevant(fraction=0.05).fit(x, y)
    assert sel.support_.tolist() == informative
    assert sel.transform(x).shape == (300, 3)


def test_selected_features_of_all_taps_are_chosen_on_validation_and_predict_as_fitted(cache, tmp_path):
    from bottleneck import report as reports
    from bottleneck.classifiers import SELECT_FRACTIONS

    path = fit(str(cache[0]), layer="select", out=str(tmp_path))
    rep = json.loads(path.read_text())
    assert rep["tap"] == "select" and rep["taps"] == ["blocks.4", "pool"]
    assert rep["search"]["grid"]["select__fraction"] == SELECT_FRACTIONS
    assert rep["search"]["chosen"]["select__fraction"] in SELECT_FRACTIONS
    pipe = trained.load(path.parent / "model.skops").pipe
    kept = pipe.named_steps["select"].support_
    assert len(kept) == round(rep["search"]["chosen"]["select__fraction"] * 1392)
    saved = reports.read_predictions(path.parent / "predictions.csv")
    files = sorted(saved)[:6]
    rows = predict(str(path.parent / "model.skops"), [str(cache[1] / f) for f in files])
    assert [r["label"] for r in rows] == [saved[f]["predicted"] for f in files]


def test_fit_on_views_trains_on_every_view_and_scores_each_image_by_their_mean(cache, tmp_path):
    from bottleneck import report as reports
    from bottleneck.store import FeatureStore

    views = extract("efficientnet_lite0", str(cache[1]), layer=["pool"], views="flips", out=str(tmp_path / "c"),
                    batch_size=16, workers=0, progress=False)
    with FeatureStore(views) as st:
        assert st.n_views == 4 and st.info()["splits"]["test"]["images"] == 12
        x, paths = st.features("test", "pool"), st.paths("test")
        assert len(x) == 48 and list(st.views("test")[:8]) == [0, 1, 2, 3, 0, 1, 2, 3]
        assert paths[0] == paths[3] != paths[4]  # an image's views are next to each other
    path = fit(str(views), layer="pool", search=False, out=str(tmp_path / "f"))
    rep = json.loads(path.read_text())
    assert (rep["n_train"], rep["n_test"], rep["views"]) == (32, 12, "flips")
    model = path.parent / "model.skops"
    row_probs = trained.load(model).pipe.predict_proba(x)
    saved = reports.read_predictions(path.parent / "predictions.csv")
    assert len(saved) == 12
    for i in range(0, 48, 4):  # each image: the mean of its four views' probabilities
        mean = row_probs[i:i + 4].mean(0)
        assert [saved[paths[i]]["probabilities"][c] for c in ("cats", "dogs")] == pytest.approx(mean, abs=1e-6)
    assert evaluate(str(model), str(views))["accuracy"] == rep["accuracy"]
    image = paths[4]
    row = predict(str(model), [str(cache[1] / image)], top_k=2)[0]  # the views made again from the file
    assert dict(row["top"])["dogs"] == pytest.approx(saved[image]["probabilities"]["dogs"], abs=1e-4)


def test_a_cache_lacking_a_class_in_a_split_is_refused_by_fit(tmp_path):
    tree = make_tree(tmp_path / "data", {"train": 4, "test": 2})
    for f in (tree / "test" / "dogs").iterdir():
        f.write_bytes(b"not an image")  # every test dog is skipped at extraction
    path = extract("efficientnet_lite0", str(tree), layer=["pool"], out=str(tmp_path / "c"), batch_size=8,
                   workers=0, progress=False)
    with pytest.raises(BottleneckError, match=r"test split .* holds no image of class 'dogs' \(2 of its files were"):
        fit(str(path), out=str(tmp_path / "fit"))
    assert not (tmp_path / "fit").exists()


def test_one_writer_per_result_folder_and_a_report_always_matches_its_model(cache, tmp_path, monkeypatch):
    args = ("fit", "--features", str(cache[0]), "--out", str(tmp_path), "--layer", "pool", "--no-search")
    holder = hold_lock(tmp_path / "pool-logreg.lock")
    try:
        busy = cli(*args)
        assert busy.returncode == 4 and f"being written by another process (pid {holder.pid})" in busy.stderr
        assert not (tmp_path / "pool-logreg").exists()
    finally:
        holder.kill()
        holder.wait()
    assert cli(*args).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool-logreg"]  # no lock file left behind
    report_before = (tmp_path / "pool-logreg" / "report.json").read_text()

    def dies(*a, **k):  # the writer dies after the new model, before its predictions and report
        raise KeyboardInterrupt

    from bottleneck import report
    monkeypatch.setattr(report, "write_predictions", dies)
    with pytest.raises(KeyboardInterrupt):  # --force replaces the result: the old report must not survive it
        fit(str(cache[0]), layer="pool", search=False, out=str(tmp_path), force=True)
    assert report_before and not (tmp_path / "pool-logreg" / "report.json").exists()
    assert (tmp_path / "pool-logreg" / "model.skops").is_file()


def test_reuse_keeps_a_finished_fit_of_this_cache_and_replaces_one_of_another(cache, tmp_path):
    """The fit stage's own "already done?" check, which run and the Slurm fit jobs (--reuse) rely on."""
    first = fit(str(cache[0]), layer="pool", search=False, out=str(tmp_path), reuse=True)
    stamp = first.stat().st_mtime_ns
    assert fit(str(cache[0]), layer="pool", search=False, out=str(tmp_path), reuse=True) == first
    assert first.stat().st_mtime_ns == stamp
    again = cli("fit", "--features", str(cache[0]), "--layer", "pool", "--no-search", "--out", str(tmp_path),
                    "--reuse")
    assert again.returncode == 0 and "done before" in again.stderr and first.stat().st_mtime_ns == stamp
    other = extract("efficientnet_lite0", str(cache[1]), layer=["pool"], out=str(tmp_path / "c2"), batch_size=16,
                    workers=0, progress=False, dtype="float16")
    assert fit(str(other), layer="pool", search=False, out=str(tmp_path), reuse=True) == first
    assert json.loads(first.read_text())["cache"]["path"] == str(other)  # another cache: fitted again
    assert fit(str(other), layer="pool", search=False, out=str(tmp_path), force=True).stat().st_mtime_ns != stamp


def test_target_threshold_is_chosen_on_validation_and_applied_to_the_test_images(cache, tmp_path):
    from sklearn.base import clone

    from bottleneck import report, scores
    from bottleneck.classify import split_data
    from bottleneck.store import FeatureStore
    from bottleneck.trained import predict_images

    path = fit(str(cache[0]), layer="pool", target="recall:dogs=0.9", out=str(tmp_path))  # searched on val
    rep = json.loads(path.read_text())
    point = rep["operating_point"]
    assert point["chosen_on"].startswith("validation split") and point["n_validation"] == 8
    # the same threshold from the val split scored by the chosen classifier refitted on train alone
    with FeatureStore(cache[0]) as st:
        d = split_data(st, "pool", 0)
    alone = clone(read_pipeline(path.parent / "model.skops")).fit(*d["train"][:2])
    _, y_val, _, p_val = predict_images(alone, *d["val"], 2)
    assert point["threshold"] == scores.threshold_for("recall:dogs=0.9", ["cats", "dogs"], y_val, p_val)["threshold"]
    assert point["met_on_validation"] and point["validation"]["recall"] >= 0.9
    # applied to the test images of predictions.csv, it gives the recall the report states
    rows = report.read_predictions(path.parent / "predictions.csv").values()
    dogs = [r["probabilities"]["dogs"] for r in rows if r["true"] == "dogs"]
    assert point["test"]["per_class"]["dogs"]["recall"] == np.mean([p >= point["threshold"] for p in dogs])
    assert rep["positive_class"] == "dogs" and rep["settings"]["target"] == "recall:dogs=0.9"
    for key in ("roc_auc", "average_precision"):
        lo, hi = rep[f"{key}_ci"]
        assert lo <= rep[key] <= hi
    assert rep["log_loss"] > 0 and 0 <= rep["brier"] <= 1 and 0 <= rep["calibration"]["ece"] <= 1


def test_without_a_val_split_the_target_is_met_on_cross_validated_probabilities(tmp_path):
    tree = make_tree(tmp_path / "data", {"train": 10, "test": 3})
    cache = extract("efficientnet_lite0", str(tree), layer=["pool"], out=str(tmp_path / "c"), batch_size=32,
                    workers=0, progress=False)
    result = cli("fit", "--features", str(cache), "--no-search", "--target", "precision:cats=0.8",
                     "--out", str(tmp_path / "fit"))
    assert result.returncode == 0, result.stderr
    point = json.loads(open(result.stdout.strip().splitlines()[-1]).read())["operating_point"]
    assert point["chosen_on"].startswith("5-fold stratified CV on train") and point["n_validation"] == 20
    assert point["class"] == "cats" and sum(map(sum, point["test"]["confusion_matrix"])) == 6
    bad = cli("fit", "--features", str(cache), "--target", "recall:birds=0.9", "--out", str(tmp_path / "x"))
    assert bad.returncode != 0 and "names class 'birds', which is not one of cats, dogs" in bad.stderr
    assert not (tmp_path / "x").exists()  # refused before any training


@pytest.mark.parametrize("clf", CLASSIFIERS)
def test_tiny_classes_fit_every_classifier_or_are_refused_naming_the_class(cache, tmp_path, clf):
    # 2 images per class: the SVMs' 3-fold calibration, the MLP's held-out tenth and kNN's 5 neighbours
    # each crashed here; they get 2 folds, no early stopping and 4 neighbours.
    curve = json.loads(fit(str(cache[0]), clf=clf, layer="pool", train_sizes="2,all", out=str(tmp_path)).read_text())
    assert [r["n_train"] for r in curve] == [4, 32]
    if clf in ("svm", "linear-svm"):  # calibration needs 2 images of every class
        with pytest.raises(BottleneckError, match=f"class 'cats' has 1 training image here; {clf} calibrates"):
            fit(str(cache[0]), clf=clf, layer="pool", train_sizes="1", out=str(tmp_path))
    else:
        fit(str(cache[0]), clf=clf, layer="pool", train_sizes="1", out=str(tmp_path))

    # The search by CV on 3 images per class trains on folds of 2 per class: every grid point is suited to them.
    from bottleneck.classifiers import grid, make_classifier
    from bottleneck.classify import search_params

    rng = np.random.default_rng(0)
    y = np.array([0, 0, 0, 1, 1, 1])
    x = rng.normal(size=(6, 8)) + y[:, None] * 3
    d = {"train": (x, y, [f"{i}.png" for i in range(6)])}
    best, chosen, _, _ = search_params(make_classifier(clf), clf, d, 0, grid(clf), ["cats", "dogs"])
    assert chosen["cv"] == "2 × 3-fold stratified CV on train" and best.predict(x).tolist() == y.tolist()


def test_a_second_learning_curve_keeps_the_first(cache, tmp_path):
    first = fit(str(cache[0]), layer="pool", train_sizes="2,all", out=str(tmp_path))
    second = fit(str(cache[0]), layer="pool", train_sizes="4,all", seed=1, out=str(tmp_path))
    assert (first.name, second.name) == ("learning_curve-pool-logreg-2-all.json",
                                         "learning_curve-pool-logreg-seed1-4-all.json")
    assert [r["n_train"] for r in json.loads(first.read_text())] == [4, 32]  # not overwritten by the second
    assert first.with_suffix(".png").is_file() and second.with_suffix(".png").is_file()


@pytest.mark.parametrize("layer", ["auto", "concat", "all"])
def test_each_tap_is_read_from_the_file_once_per_fit(cache, tmp_path, monkeypatch, layer):
    # Choosing the tap scores every tap and their concatenation, then the final fit reads the winner again:
    # at 60,000 images that was three reads of 0.5 GB each. Each tap of each split is now read once.
    from bottleneck.store import FeatureStore

    reads = []
    read = FeatureStore._read_features

    def counted(self, split, tap):
        reads.append((split, tap))
        return read(self, split, tap)

    monkeypatch.setattr(FeatureStore, "_read_features", counted)
    fit(str(cache[0]), clf="logreg", layer=layer, out=str(tmp_path))
    assert sorted(reads) == sorted({(s, t) for s in ("train", "val", "test") for t in ("blocks.4", "pool")})


def test_clf_auto_chooses_by_cv_records_why_and_keeps_auto_as_asked(cache, tmp_path):
    path = fit(str(cache[0]), clf="auto", out=str(tmp_path))
    rep = json.loads(path.read_text())
    choice = rep["clf_choice"]
    assert list(choice["scores"]) == ["logreg", "svm", "mlp"]  # cheapest first
    assert rep["clf"] == choice["chosen"] and rep["settings"]["clf"] == "auto" and path.parent.name.startswith("auto")
    assert choice["by"] == "2 × 5-fold stratified CV on train + val" and choice["folds"] == 10
    means = {c: v["mean"] for c, v in choice["scores"].items()}
    assert choice["best"] == max(choice["scores"], key=means.get)
    assert list(choice["scores"]).index(choice["chosen"]) <= list(choice["scores"]).index(choice["best"])
    assert rep["layer_choice"]["chosen"] == rep["tap"]  # the tap logreg chose, then the classifier on it
    spent = rep["layer_choice"]["seconds"] + choice["seconds"]  # choosing is part of what the result cost
    assert rep["cost"]["choice_seconds"] == pytest.approx(spent, abs=2e-3) and spent > 0
    from bottleneck.report import read_report

    assert read_report(path).cost_seconds >= rep["cost"]["fit_seconds"] + spent
    assert fit(str(cache[0]), clf="auto", out=str(tmp_path), reuse=True) == path  # done before: kept
    with pytest.raises(BottleneckError, match="--clf auto chooses one classifier for one fit"):
        fit(str(cache[0]), clf="auto", layer="all", out=str(tmp_path))


def test_fit_warns_and_refuses_by_the_classifiers_size_limits(cache, tmp_path, monkeypatch):
    import dataclasses

    from bottleneck import classifiers

    def limits(clf, **changes):  # the limits as if these 40 images were many
        monkeypatch.setitem(classifiers.TABLE, clf, dataclasses.replace(classifiers.TABLE[clf], **changes))

    limits("logreg", large=classifiers._rows_times_classes(10, 10**9))
    done = cli("fit", "--features", str(cache[0]), "--clf", "logreg", "--layer", "pool", "--no-search",
               "--out", str(tmp_path / "w"))
    assert done.returncode == 0 and "logreg will take minutes on" in " ".join(done.stderr.split())
    monkeypatch.setattr(classifiers, "SVM_WARN_ROWS", 5)  # read when the rule runs
    monkeypatch.setattr(classifiers, "SVM_REFUSE_ROWS", 10)
    refused = cli("fit", "--features", str(cache[0]), "--clf", "svm", "--layer", "pool", "--no-search",
                  "--out", str(tmp_path / "r"))
    assert refused.returncode != 0 and "svm would take hours on" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "r" / "pool-svm" / "report.json").exists()
