"""Cross-validated comparison: K folds of all images, the same for every path, pooled per path."""

import json
from pathlib import Path

import pytest
from conftest import cli, make_tree

from bottleneck import data, folds, pipeline, report
from bottleneck.classify import fit
from bottleneck.compare import comparison
from bottleneck.errors import BottleneckError
from bottleneck.extract import extract
from bottleneck.finetune import finetune

LITE = "efficientnet_lite0"
QUICK = dict(batch_size=8, workers=0, progress=False, precision="fp32")


@pytest.fixture(scope="module")
def maps_cache(tmp_path_factory):
    """26 tiny images (13 per class, in train/val/test folders) and a Lite0 cache of them with
    blocks.5's maps, so that probes and the top fine-tune read one extraction."""
    root = tmp_path_factory.mktemp("folds")
    tree = make_tree(root / "data", {"train": 8, "val": 2, "test": 3})
    cache = extract(LITE, str(tree), layer=["pool"], maps="blocks.5", image_size=64, out=str(root / "c"),
                    batch_size=16, workers=0, precision="fp32", progress=False)
    return cache, tree


def every_image(tree) -> set[str]:
    m = data.load_manifest(tree)
    return {p for samples in m.splits.values() for p, _ in samples}


def fold_reports(folder, name: str, k: int = 5) -> list:
    return [folder / f"{name}-fold{i}" / "report.json" for i in range(k)]


def test_a_5_fold_comparison_tests_every_image_once_for_every_path_on_the_same_folds(maps_cache, tmp_path):
    cache, tree = maps_cache
    for clf in ("logreg", "knn"):  # two paths; fine-tunes take the same folds (the test below)
        fit(str(cache), clf=clf, layer="pool", search=False, folds=5, out=str(tmp_path))
    found = folds.groups(sorted(tmp_path.glob("*/report.json")))
    assert sorted(found) == [str(tmp_path / "pool-knn"), str(tmp_path / "pool-logreg")]
    pools = {name: folds.pool(reports) for name, reports in found.items()}
    folds.same_folds(pools)
    everything = every_image(tree)
    for name, reports in found.items():
        pooled = pools[name]
        assert set(pooled["predictions"]) == everything and pooled["n"] == len(everything) == 26, name
        tested = [line for r in reports for line in (r.parent / "predictions.csv").read_text().splitlines()[1:]]
        assert len(tested) == 26, name  # each image once: no fold scores an image another fold scored
        assert [json.loads(r.read_text())["folds"]["fold"] for r in reports] == [0, 1, 2, 3, 4]
    first = pools[str(tmp_path / "pool-logreg")]
    for name, pooled in pools.items():
        assert pooled["fold_of"] == first["fold_of"], name  # every image's fold is the same for every path
        assert pooled["test_set_sha256"] == first["test_set_sha256"], name
    assert sorted(first["fold_of"].values()) == sorted(i % 5 for i in range(26))  # sizes within one of each other
    # compare pairs the two paths image by image across all folds: one row each, scored on all 26 images
    result = comparison([str(tmp_path)])
    assert not result["apart"] and sorted(r["id"] for r in result["rows"]) == ["pool-knn", "pool-logreg"]
    for r in result["rows"]:
        assert r["n_test"] == 26 and r["test_set"] == first["test_set_sha256"] and r["folds"]["k"] == 5
    compared = next(r for r in result["rows"] if not r["reference"])
    assert compared["paired"]["n"] == 26


def test_fine_tunes_on_images_and_on_cached_maps_get_the_same_fold_as_a_fit_on_the_cache(maps_cache, tmp_path):
    cache, tree = maps_cache
    probe = json.loads(fit(str(cache), layer="pool", search=False, folds=5, fold=3, out=str(tmp_path)).read_text())
    ft = json.loads(finetune(LITE, str(tree), folds=5, fold=3, head_epochs=0, epochs=1, unfreeze="1", image_size=64,
                             out=str(tmp_path / "ft"), **QUICK).read_text())
    top = json.loads(finetune(LITE, str(tree), from_cache=str(cache), folds=5, fold=3, head_epochs=0, epochs=1,
                              out=str(tmp_path / "top"), **QUICK).read_text())
    assert (tmp_path / "ft-fold3" / "model.pt").is_file() and (tmp_path / "top-fold3" / "model.pt").is_file()
    assert (tmp_path / "pool-logreg-fold3").is_dir()
    for rep in (ft, top):
        assert rep["folds"] == probe["folds"] and rep["folds"]["fold"] == 3 and rep["folds"]["k"] == 5
        assert rep["test_set"]["sha256"] == probe["test_set"]["sha256"] and rep["n_test"] == probe["n_test"] == 5
        assert rep["n_train"] + rep["n_val"] + rep["n_test"] == 26


def test_folds_are_stratified_balanced_and_a_pure_function_of_the_files():
    samples = [(f"c{c}/{i:02d}.png", c) for c in range(3) for i in range((11, 7, 5)[c])]
    folds_of = data.fold_assignment(samples, 5, seed=1)
    assert folds_of == data.fold_assignment(list(reversed(samples)), 5, seed=1)  # order of listing is no input
    assert folds_of != data.fold_assignment(samples, 5, seed=2)
    for c in range(3):  # every class in every fold
        assert {folds_of[p] for p, lab in samples if lab == c} == set(range(5))
    sizes = [list(folds_of.values()).count(f) for f in range(5)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 23
    splits, record = data.fold_splits(samples, 5, 2, seed=1)
    assert {p for p, _ in splits["test"]} == {p for p, f in folds_of.items() if f == 2}
    assert sorted(sum(splits.values(), [])) == sorted(samples)  # train, val and test: every image once
    assert {lab for _, lab in splits["val"]} == {0, 1, 2}
    assert record == {"k": 5, "fold": 2, "seed": 1, "assignment_sha256": data.assignment_digest(folds_of)}
    with pytest.raises(BottleneckError, match="class 'c' has 4 images, fewer than the 5 folds"):
        data.fold_assignment(samples + [(f"c3/{i}.png", 3) for i in range(4)], 5, 0, ["a", "b", "b2", "c"])


def test_pool_refuses_folds_that_are_not_one_complete_assignment(maps_cache, tmp_path):
    cache, _ = maps_cache
    fit(str(cache), layer="pool", search=False, folds=5, out=str(tmp_path / "a"))
    fit(str(cache), layer="pool", search=False, folds=5, split_seed=1, out=str(tmp_path / "b"))
    a, b = fold_reports(tmp_path / "a", "pool-logreg"), fold_reports(tmp_path / "b", "pool-logreg")
    assert folds.pool(a)["n"] == folds.pool(b)["n"] == 26
    with pytest.raises(BottleneckError, match="fold 4 of 5 missing"):
        folds.pool(a[:4])
    with pytest.raises(BottleneckError, match="fold 1 again"):
        folds.pool([*a, a[1]])
    with pytest.raises(BottleneckError, match="seed 1"):
        folds.pool([*a[:4], b[4]])
    with pytest.raises(BottleneckError, match="cross-validated on different folds"):
        folds.same_folds({"a": folds.pool(a), "b": folds.pool(b)})
    csv = a[2].parent / "predictions.csv"
    csv.write_text("".join(csv.read_text().splitlines(keepends=True)[:-1]))  # a fold lost an image
    with pytest.raises(BottleneckError, match="does not hold the test images"):
        folds.pool(a)
    rep = json.loads(a[2].read_text())
    rep["test_set"]["sha256"] = data.split_digest([(p, r["true"]) for p, r in report.read_predictions(csv).items()])
    a[2].write_text(json.dumps(rep))  # ... and its report agrees: the images still do not cover the assignment
    with pytest.raises(BottleneckError, match="not the images their assignment was made of"):
        folds.pool(a)
    with pytest.raises(BottleneckError, match="no 'folds' record"):
        folds.pool([fit(str(cache), layer="pool", search=False, out=str(tmp_path / "c"))])


def test_fold_settings_are_checked_before_any_work(maps_cache, tmp_path):
    cache, tree = maps_cache
    for kwargs, words in (({"fold": 1}, "give --folds K too"), ({"folds": 3, "fold": 3}, "--fold must be in 0..2"),
                          ({"folds": 1}, "--folds must be at least 2"),
                          ({"folds": 3, "layer": "all"}, "drop --folds for them")):
        with pytest.raises(BottleneckError, match=words):
            fit(str(cache), out=str(tmp_path), **kwargs)
    with pytest.raises(BottleneckError, match="fewer than the 20 folds"):
        fit(str(cache), layer="pool", folds=20, out=str(tmp_path))
    with pytest.raises(BottleneckError, match="drop --test-fraction"):
        finetune(LITE, str(tree), folds=5, test_fraction=0.2, out=str(tmp_path))
    result = cli("fit", "--features", str(cache), "--fold", "2")
    assert result.returncode != 0 and "give --folds K too" in result.stderr and "Traceback" not in result.stderr


def test_an_experiment_with_folds_runs_each_fine_tune_and_fit_per_fold(tmp_path):
    from bottleneck import slurm

    path = tmp_path / "x.toml"
    path.write_text('[data]\npath = "data/x"\nfolds = 3\nsplit_seed = 4\n\n[[backbone]]\nmodel = "efficientnet_lite0"\n'
                    'layers = ["pool"]\n\n[fit]\nclassifiers = ["logreg", "knn"]\n\n'
                    '[[finetune]]\nmodel = "efficientnet_lite0"\nname = "ft"\n')
    exp = pipeline.load(path)
    assert [s.name for s in pipeline.steps(exp)] == ["extract-efficientnet_lite0", "fit-efficientnet_lite0",
                                                      "finetune-ft-fold0", "finetune-ft-fold1", "finetune-ft-fold2",
                                                      "compare"]
    fits = [pipeline.fit_report(a).parent.name for a in pipeline.fit_settings(exp, exp.backbones[0])]
    assert fits == [f"auto-{clf}-search-fold{i}" for clf in ("logreg", "knn") for i in range(3)]
    ft = pipeline.finetune_settings(exp, exp.finetunes[2])
    assert (ft.folds, ft.fold, ft.split_seed) == (3, 2, 4)
    assert Path(ft.out).name == "ft"  # finetune adds -fold2: the folder status and compare read
    assert pipeline.finetune_dir(exp, exp.finetunes[2]).name == "ft-fold2"
    jobs = {j.stage: j for j in slurm.plan(exp, slurm.SlurmOptions(array_size=1))}
    script = jobs["finetune-ft-fold2"].script
    assert "--folds 3" in script and "--fold 2" in script and "ft-fold2/checkpoint.pt" in script
    assert jobs["fit-efficientnet_lite0"].script.count("--folds 3") == 6
    for old, new, words in (("folds = 3", "folds = 1", "folds: must be at least 2"),
                            ("folds = 3", "folds = 3\ntest_fraction = 0.2", "drop test_fraction"),
                            ('name = "ft"', 'name = "ft"\ninit_head = "probe"', "saw its test images")):
        path.write_text(path.read_text().replace(old, new))
        with pytest.raises(BottleneckError, match=words):
            pipeline.load(path)
        path.write_text(path.read_text().replace(new, old))
