"""One loader for trained models: a classifier from fit and a network from finetune behave alike."""

import json
import pickle
import shutil

import joblib
import numpy as np
import pytest
import torch
from conftest import cli, make_tree

from bottleneck import trained
from bottleneck.classifiers import TABLE, make_classifier
from bottleneck.classify import fit, provenance, save_classifier, tap_dims
from bottleneck.errors import BottleneckError
from bottleneck.extract import extract
from bottleneck.finetune import finetune
from bottleneck.predict import evaluate
from bottleneck.store import FeatureStore


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    tree = make_tree(root / "data", {"train": 6, "val": 2, "test": 3})
    cache = extract("squeezenet1_1", str(tree), layer=["fire7", "fire9"], out=str(root / "c"), batch_size=8,
                    workers=0, progress=False, weights="none")
    clf = fit(str(cache), layer="fire9", search=False, out=str(root / "fit")).parent / "model.skops"
    net = finetune("squeezenet1_1", str(tree), weights="none", head_epochs=1, epochs=0, batch_size=4, workers=0,
                   progress=False, precision="fp32", image_size=64, out=str(root / "ft")).parent / "model.pt"
    return tree, cache, clf, net


def test_both_kinds_load_and_a_pickle_named_pt_is_never_unpickled(models, tmp_path):
    tree, cache, clf, net = models
    shutil.copy(clf, tmp_path / "classifier.pt")
    shutil.copy(net, tmp_path / "network.joblib")
    a, b = trained.load(clf), trained.load(tmp_path / "network.joblib")  # a torch archive, whatever its name
    assert (a.kind, b.kind) == ("classifier", "network")
    with pytest.raises(BottleneckError, match="not a readable fine-tuned model"):
        trained.load(tmp_path / "classifier.pt")  # a .pt is read as tensors only: a pickle is never unpickled
    assert a.classes == b.classes == ["cats", "dogs"] and a.taps == ["fire9"]
    assert b.preprocessing["size"] == 64 and a.preprocessing["size"] == 224
    with pytest.raises(BottleneckError, match="does not exist"):
        trained.load(tmp_path / "nope.joblib")


# --------------------------------------------------------------------------- no code from a model file

class Payload:
    """What a hostile model file holds: unpickling it opens (creates) a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_crafted_pickle_is_never_run_by_any_command_without_trust(models, tmp_path):
    """predict, evaluate, finetune --init-head and run's [[finetune]] init_head refuse a pickle
    with one line, and its payload never runs; with trust it would (the payload is live)."""
    tree, cache, clf, net = models
    marker = tmp_path / "ran"
    crafted = tmp_path / "model.joblib"
    joblib.dump(Payload(marker), crafted)
    (tmp_path / "probe.pkl").write_bytes(pickle.dumps(Payload(marker)))
    exp = tmp_path / "e.toml"
    exp.write_text(f'name = "e"\nout = "{tmp_path / "run"}"\n[data]\npath = "{tree}"\n'
                   f'[[finetune]]\nmodel = "squeezenet1_1"\nweights = "none"\ninit_head = "{crafted}"\n'
                   'epochs = 1\nbatch_size = 4\nworkers = 0\nimage_size = 64\n')
    quick = ["--weights", "none", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--image-size", "64",
             "--no-progress"]
    commands = {"predict": ["predict", "{m}", str(tree / "test")],
                "evaluate": ["evaluate", "{m}", "--features", str(cache)],
                "finetune": ["finetune", "--model", "squeezenet1_1", "--data", str(tree), "--init-head", "{m}",
                             "--out", str(tmp_path / "ft"), *quick],
                "run": ["run", str(exp), "--no-progress"]}
    for name, args in commands.items():
        # Every command reads through one loader: the plain pickle once is enough.
        for model in [crafted, tmp_path / "probe.pkl"] if name == "predict" else [crafted]:
            result = cli(*(str(model) if a == "{m}" else a for a in args))
            assert not marker.exists(), (name, model)  # the payload never ran
            assert result.returncode == 1 and "Traceback" not in result.stderr, (name, result.stderr)
            assert "not a model.skops written by 'bottleneck fit' but a pickle" in result.stderr, (name, result.stderr)
            assert "pass --trust" in result.stderr, (name, result.stderr)
    with pytest.raises(BottleneckError, match="pass --trust"):
        trained.load(crafted, trust="no")  # only an explicit True trusts
    assert not marker.exists()
    with pytest.raises(BottleneckError, match="was not written by 'bottleneck fit'"):
        trained.load(crafted, trust=True)
    assert marker.exists()  # trusted, the very same file runs its payload


def test_an_experiment_file_cannot_trust_a_pickle_itself(models, tmp_path):
    tree = models[0]
    exp = tmp_path / "e.toml"
    exp.write_text(f'name = "e"\n[data]\npath = "{tree}"\n[[finetune]]\nmodel = "squeezenet1_1"\n'
                   'init_head = "x.joblib"\ntrust = true\n')
    result = cli("run", str(exp))
    assert result.returncode == 1 and "trust: unknown key" in result.stderr, result.stderr


def test_a_skops_file_with_types_fit_never_writes_is_refused(models, tmp_path):
    import os

    import skops.io

    skops.io.dump({"run": os.system, "args": ["touch", str(tmp_path / "ran")]}, tmp_path / "model.skops")
    with pytest.raises(BottleneckError, match=r"holds types that bottleneck fit never writes \(.*system"):
        trained.load(tmp_path / "model.skops", trust=True)  # --trust is for pickles: a skops file stays checked
    (tmp_path / "junk.skops").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(BottleneckError, match="pass --trust"):
        trained.load(tmp_path / "junk.skops")


def test_an_old_model_joblib_works_with_trust(models, tmp_path):
    tree, cache, clf, net = models
    old = tmp_path / "model.joblib"
    joblib.dump(trained.load(clf).pipe, old)  # what fit wrote before model.skops
    images = [str(tree / "test")]
    result = cli("predict", str(old), *images, "--format", "json")
    assert result.returncode == 1 and "pass --trust" in result.stderr
    result = cli("predict", str(old), *images, "--format", "json", "--trust")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(cli("predict", str(clf), *images, "--format", "json").stdout)
    result = cli("evaluate", str(old), "--features", str(cache), "--json", "--trust")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["accuracy"] == evaluate(str(clf), str(cache))["accuracy"]


def test_fit_reuse_and_compare_never_unpickle_a_model_file(models, tmp_path):
    """A fit folder from before model.skops (or with a planted pickle) is fitted again by --reuse, its
    pickle removed unread; compare reads only reports."""
    from bottleneck.compare import compare

    tree, cache, clf, net = models
    report = fit(str(cache), layer="fire9", search=False, out=str(tmp_path / "fit"))
    marker = tmp_path / "ran"
    (report.parent / "model.skops").unlink()
    joblib.dump(Payload(marker), report.parent / "model.joblib")
    assert fit(str(cache), layer="fire9", search=False, out=str(tmp_path / "fit"), reuse=True) == report
    assert (report.parent / "model.skops").is_file() and not (report.parent / "model.joblib").exists()
    joblib.dump(Payload(marker), report.parent / "model.joblib")
    compare([str(tmp_path / "fit")], out=str(tmp_path / "cmp"))
    assert not marker.exists()


@pytest.mark.parametrize("clf, tap", [("svm", "fire9"), ("mlp", "fire9"), ("linear-svm", "fire9"), ("knn", "fire9"),
                                      ("linear", "fire9"),
                                      ("logreg", "concat"), ("logreg", "select")])
def test_a_saved_classifier_loads_safely_and_predicts_identically(models, tmp_path, clf, tap):
    """Fitted as fit fits it, saved by fit's own save path, read back through skops with only
    TRUSTED_TYPES."""
    from bottleneck.store import FeatureStore

    cache = models[1]
    with FeatureStore(cache) as st:
        taps = st.taps if tap in ("concat", "select") else [tap]
        x = {s: np.hstack([st.features(s, t) for t in taps]) for s in ("train", "test")}
        pipe = make_classifier(clf, 0, None, tap_dims(st, tap), select=tap == "select").fit(x["train"],
                                                                                            st.labels("train"))
        pipe.bottleneck_ = provenance(st, tap, clf)
    save_classifier(pipe, tmp_path / "model.skops")
    t = trained.load(tmp_path / "model.skops")
    assert t.kind == "classifier" and t.meta == pipe.bottleneck_ and t.taps == taps
    np.testing.assert_array_equal(t.pipe.predict_proba(x["test"]), pipe.predict_proba(x["test"]))
    np.testing.assert_array_equal(t.pipe.predict(x["test"]), pipe.predict(x["test"]))


@pytest.mark.parametrize("width", [6, 40])  # knn keeps a k-d tree on narrow features, none on wide ones
def test_every_classifier_holds_only_trusted_types(tmp_path, width):
    """TRUSTED_TYPES names every type beyond skops's own that fit's pipelines hold: a new entry of
    classifiers.TABLE that needs another fails here, not in a user's predict."""
    import skops.io

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, width)), np.repeat([0, 1, 2], 20)
    for clf in TABLE:
        for dims, select in (((width,), False), ((2, width - 2), False), ((2, width - 2), True)):
            skops.io.dump(make_classifier(clf, 0, None, dims, select).fit(x, y), tmp_path / "m.skops")
            extra = set(skops.io.get_untrusted_types(file=tmp_path / "m.skops")) - set(trained.TRUSTED_TYPES)
            assert not extra, (clf, dims, select)


def test_a_classifier_scores_images_as_its_cache_scores_them(models):
    tree, cache, clf, net = models
    t = trained.load(clf)
    with FeatureStore(cache) as st:
        x, paths = st.features("test", "fire9"), st.paths("test")
    images = torch.stack([_image(tree / p, t.preprocessing) for p in paths])
    probs, chosen = t.predict_batch(images, torch.device("cpu"))
    np.testing.assert_allclose(probs, t.pipe.predict_proba(x), atol=1e-4)
    assert chosen.tolist() == np.searchsorted(t.pipe.classes_, t.pipe.predict(x)).tolist()
    with pytest.raises(BottleneckError, match="expects 512 features per image, .* gives 7"):
        t.check_width(7, "a test")


def test_a_network_scores_images_with_its_own_test_time_views(models):
    tree, cache, clf, net = models
    t = trained.load(net)
    images = torch.stack([_image(p, t.preprocessing) for p in sorted((tree / "test" / "cats").iterdir())])
    probs, chosen = t.predict_batch(images, torch.device("cpu"))
    assert probs.shape == (3, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert t.views == "flips" and chosen.tolist() == probs.argmax(1).tolist()


def _image(path, prep):
    from bottleneck import data

    return data.resize_crop(data.load_image(path), prep)
