"""The linear classifier (bottleneck.linear): chunks within the budget, the streamed fit equal to the
in-memory one, its model used by predict, evaluate and --init-head, its accuracy near logreg's."""

import json
import tracemalloc

import numpy as np
import pytest

from bottleneck import linear, trained
from bottleneck.classifiers import make_classifier
from bottleneck.classify import fit
from bottleneck.errors import BottleneckError
from bottleneck.linear import MB, ArrayRows, LinearProbe, Rows, fit_streamed
from bottleneck.predict import evaluate, predict
from bottleneck.store import FeatureStore

BUDGET = 64 * 1024  # bytes: a few rows of the test cache's two taps (1,392 floats a row)


def _read_all(rows):
    """Every chunk of one pass, with the positions it holds."""
    return [(p, rows.read(p)) for p in rows.plan()]


def test_chunks_never_exceed_the_budget_and_cover_each_row_once(cache):
    with FeatureStore(cache[0]) as st:
        whole = np.hstack([st.features("train", t) for t in st.taps])
        rows = Rows.of_split(st, "train", st.taps, BUDGET)
        picked = rows[np.random.default_rng(0).permutation(len(rows))[:20]]  # a held-out subset, as a fold picks
        for r, expected in ((rows, whole), (picked, whole[picked.row])):
            chunks = _read_all(r)
            assert len(chunks) > 2 and all(x.nbytes <= BUDGET and x.dtype == np.float32 for _, x in chunks)
            got = np.zeros_like(expected)
            for p, x in chunks:
                got[p] = x
            assert sorted(np.concatenate([p for p, _ in chunks]).tolist()) == list(range(len(r)))
            np.testing.assert_array_equal(got, expected)
        # What a pass allocates, the window read from the file included, stays within the budget.
        tracemalloc.start()
        try:
            for p in rows.plan():
                rows.read(p)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= BUDGET


def test_chunk_size_follows_the_budget():
    assert linear.rows_per_chunk(1000, 16_000) == 1
    assert linear.rows_per_chunk(1000, 160_000) == 10
    assert linear.rows_per_chunk(10**9, 1) == 1  # one row at the least


def _xy(st, split="train", tap="pool"):
    return st.features(split, tap), st.labels(split)


def test_the_streamed_fit_equals_the_in_memory_fit(cache):
    with FeatureStore(cache[0]) as st:
        x, y = _xy(st)
        x_test = st.features("test", "pool")
        streamed = fit_streamed(make_classifier("linear"), Rows.of_split(st, "train", ["pool"], BUDGET), y)
        in_memory = fit_streamed(make_classifier("linear"), ArrayRows(x, BUDGET), y)
        again = fit_streamed(make_classifier("linear"), Rows.of_split(st, "train", ["pool"], BUDGET), y)
    np.testing.assert_array_equal(streamed.predict_proba(x_test), in_memory.predict_proba(x_test))
    np.testing.assert_array_equal(streamed.predict_proba(x_test), again.predict_proba(x_test))  # same seed
    assert streamed.steps[-1][1].solver_ == "minibatch"
    # The scaler fitted in one streaming pass is the scaler fitted on the whole array.
    whole = make_classifier("linear").fit(x, y)
    np.testing.assert_allclose(streamed.named_steps["scale"].mean_, whole.named_steps["scale"].mean_, rtol=1e-6)
    np.testing.assert_allclose(streamed.named_steps["scale"].scale_, whole.named_steps["scale"].scale_, rtol=1e-5)
    # Full-batch L-BFGS in memory and minibatch over chunks reach the same labels.
    assert whole.steps[-1][1].solver_ == "lbfgs"
    assert (whole.predict(x_test) == streamed.predict(x_test)).mean() >= 0.9


def test_the_fit_stage_streams_a_split_over_the_budget_and_each_chunk_stays_within_it(cache, tmp_path, monkeypatch):
    sizes = []
    read = Rows.read

    def counted(self, positions, hashes=None):
        x = read(self, positions, hashes)
        sizes.append(x.nbytes)
        return x

    monkeypatch.setattr(Rows, "read", counted)
    budget_mb = BUDGET / MB
    small = json.loads(fit(str(cache[0]), clf="linear", layer="pool", search=False, memory_budget=budget_mb,
                           out=str(tmp_path / "s")).read_text())
    assert small["linear"]["streamed"] and small["linear"]["solver"] == "minibatch"
    assert sizes and max(sizes) <= BUDGET
    sizes.clear()
    whole = json.loads(fit(str(cache[0]), clf="linear", layer="pool", search=False,
                           out=str(tmp_path / "w")).read_text())
    assert not whole["linear"]["streamed"] and whole["linear"]["solver"] == "lbfgs" and not sizes
    # The same images, labels and predictions (path, true, predicted) either way.
    a = (tmp_path / "s" / "pool-linear" / "predictions.csv").read_text()
    b = (tmp_path / "w" / "pool-linear" / "predictions.csv").read_text()
    assert [r.split(",")[:3] for r in a.splitlines()] == [r.split(",")[:3] for r in b.splitlines()]


def test_a_linear_model_round_trips_through_predict_and_evaluate(cache, tmp_path):
    rep = json.loads(fit(str(cache[0]), clf="linear", layer="pool", search=False, out=str(tmp_path)).read_text())
    model = tmp_path / "pool-linear" / "model.skops"
    t = trained.load(model)  # no --trust: every type it holds is trusted
    assert isinstance(t.pipe.steps[-1][1], LinearProbe) and t.meta["clf"] == "linear"
    assert evaluate(str(model), str(cache[0]))["accuracy"] == rep["accuracy"]
    rows = predict(str(model), [str(cache[1] / "test" / "dogs" / "test_000.png")], progress=False)
    assert rows[0]["label"] == "dogs" and rows[0]["error"] is None


def test_a_linear_probe_starts_an_lp_ft_head(cache, tmp_path):
    import torch

    from bottleneck import data, networks
    from bottleneck.extract import extract
    from bottleneck.finetune_probe import init_head, read_probe

    # Features in fp32, as the network computes them below: the probe's probabilities are then the head's.
    features = extract("efficientnet_lite0", str(cache[1]), layer=["pool"], image_size=64, precision="fp32",
                       out=str(tmp_path / "c"), batch_size=16, workers=0, progress=False)
    fit(str(features), clf="linear", layer="pool", search=False, out=str(tmp_path))
    probe = tmp_path / "pool-linear" / "model.skops"
    with FeatureStore(features) as st:
        x, paths, prep = st.features("test", "pool"), st.paths("test"), st.attrs["preprocessing"]
    expected = trained.load(probe).pipe.predict_proba(x)
    net = networks.build_model("efficientnet_lite0")
    head = networks.replace_head(net, "efficientnet_lite0", 2, seed=0)
    init_head(net, head, read_probe(str(probe), "efficientnet_lite0", "DEFAULT", ["cats", "dogs"], prep))
    images = torch.stack([data.resize_crop(data.load_image(cache[1] / p), prep) for p in paths])
    got = networks.predict_proba(net.eval(), images, prep, torch.device("cpu"), "fp32", "none").numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)  # step 0 of LP-FT is the probe


def test_its_accuracy_is_close_to_logregs(cache, tmp_path):
    scores = {clf: json.loads(fit(str(cache[0]), clf=clf, layer="blocks.4", search=False,
                                  out=str(tmp_path)).read_text())["accuracy"] for clf in ("logreg", "linear")}
    assert scores["linear"] >= scores["logreg"] - 0.1, scores
    # On harder data than the cache's two colours: ten overlapping classes, scaled as fit scales them.
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 32))
    y = rng.integers(0, 10, 1500)
    x = centres[y] + 2.5 * rng.normal(size=(1500, 32))
    acc = {clf: (make_classifier(clf).fit(x[:1000], y[:1000]).predict(x[1000:]) == y[1000:]).mean()
           for clf in ("logreg", "linear")}
    assert acc["linear"] >= acc["logreg"] - 0.03, acc


def test_its_strength_is_chosen_on_held_out_rows_and_it_is_deterministic():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2], 40)
    x = rng.normal(size=(120, 50)) + 0.7 * np.eye(3, 50)[y] * 3
    a, b = LinearProbe(seed=3).fit(x, y), LinearProbe(seed=3).fit(x, y)
    np.testing.assert_array_equal(a.coef_, b.coef_)
    assert a.strength_ in a.strengths and a.coef_.shape == (3, 50) and a.intercept_.shape == (3,)
    assert a.validation_accuracy_[list(a.strengths).index(a.strength_)] == a.validation_accuracy_.max()
    held = linear.holdout_mask(np.repeat([0, 1], [10, 1]), 0.1, 0)
    assert held.sum() == 1 and not held[-1]  # a class of one row keeps it for training
    with pytest.raises(BottleneckError, match="train only by the linear classifier on taps"):
        fit_streamed(make_classifier("logreg"), ArrayRows(x, BUDGET), y)


def test_a_streamed_fit_refuses_an_edited_cache(cache, tmp_path):
    import shutil

    import h5py

    edited = tmp_path / "edited.h5"
    shutil.copy(cache[0], edited)
    with h5py.File(edited, "r+") as f:
        f["train/features/pool"][3, 5] += 1.0  # finite, so only its checksum tells
    with FeatureStore(edited) as st:
        rows, y = Rows.of_split(st, "train", ["pool"], BUDGET), st.labels("train")
        with pytest.raises(BottleneckError, match="train/features/pool does not match its checksum"):
            fit_streamed(make_classifier("linear"), rows, y)
    with FeatureStore(cache[0]) as st:  # the cache as written passes
        rows = Rows.of_split(st, "train", st.taps, BUDGET)
        pipe = fit_streamed(make_classifier("linear", dims=tuple(rows.dims)), rows, st.labels("train"))
    assert pipe.named_steps["scale"].n_samples_seen_ == len(rows)

