"""Using a saved classifier: evaluate re-scores it on a cache, predict labels new images."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import cli

from bottleneck import trained
from bottleneck.classify import fit
from bottleneck.errors import BottleneckError
from bottleneck.extract import extract
from bottleneck.predict import evaluate, predict


def test_saved_pipeline_predicts_the_same_in_a_fresh_process(cache, tmp_path):
    report = fit(str(cache[0]), clf="svm", layer="pool", out=str(tmp_path))
    model = report.parent / "model.skops"
    pipe = trained.load(model).pipe
    assert pipe.bottleneck_["model"] == "efficientnet_lite0" and pipe.bottleneck_["tap"] == "pool"
    from bottleneck.store import FeatureStore

    with FeatureStore(cache[0]) as st:
        x = st.features("test", "pool")
    np.save(tmp_path / "x.npy", x)
    code = ("import numpy as np, sys; from bottleneck.trained import load; p = load(sys.argv[1]).pipe; "
            "np.save(sys.argv[3], p.predict_proba(np.load(sys.argv[2])))")
    subprocess.run([sys.executable, "-c", code, str(model), str(tmp_path / "x.npy"), str(tmp_path / "p.npy")],
                   check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), pipe.predict_proba(x))


def test_evaluate_matches_the_report_and_refuses_other_caches(cache, tmp_path):
    rep = json.loads(fit(str(cache[0]), clf="logreg", layer="pool", search=False, out=str(tmp_path)).read_text())
    model = tmp_path / "pool-logreg" / "model.skops"
    assert evaluate(str(model), str(cache[0]))["accuracy"] == rep["accuracy"]
    other = extract("squeezenet1_1", str(cache[1]), weights="none", out=str(tmp_path / "c"), batch_size=16,
                    workers=0, progress=False)
    with pytest.raises(BottleneckError, match="does not match"):
        evaluate(str(model), str(other))


def test_predict_labels_images_and_reports_unreadable_ones(cache, tmp_path):
    fit(str(cache[0]), clf="logreg", layer="pool", search=False, out=str(tmp_path))
    model = str(tmp_path / "pool-logreg" / "model.skops")
    (tmp_path / "broken.jpg").write_text("not an image")
    images = [str(cache[1] / "test" / "dogs" / "test_000.png"), str(tmp_path / "broken.jpg")]
    rows = predict(model, images)
    assert rows[0]["label"] == "dogs" and rows[0]["error"] is None and len(rows[0]["top"]) == 2
    assert rows[1]["label"] is None and "cannot identify" in rows[1]["error"]
    result = cli("predict", model, *images, "--format", "csv", "--top-k", "2")
    assert result.returncode == 0 and result.stdout.splitlines()[1].split(",")[1] == "dogs"
    assert result.stdout.splitlines()[1].split(",")[4].startswith("dogs 0.")  # the top k, not only the label
    assert "; cats 0." in result.stdout.splitlines()[1]


def test_evaluate_on_a_split_it_was_trained_on_says_so(cache, tmp_path):
    fit(str(cache[0]), clf="logreg", layer="pool", out=str(tmp_path))  # searched, refit on train + val
    model = str(tmp_path / "pool-logreg-search" / "model.skops")
    assert "caveat" not in evaluate(model, str(cache[0]), split="test")
    rep = evaluate(model, str(cache[0]), split="val", out=str(tmp_path / "ev"))
    assert "trained or tuned on the val split" in rep["caveat"]
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["caveat"] == rep["caveat"]
    assert (tmp_path / "ev" / "predictions.csv").is_file() and rep["test_set"]["split"] == "val"
    result = cli("evaluate", model, "--features", str(cache[0]), "--split", "val")
    assert result.returncode == 0 and "trained or tuned on the val split" in result.stderr


def test_predict_refuses_a_weights_file_replaced_since_fitting(cache, tmp_path):
    import torch

    from bottleneck import networks

    weights = tmp_path / "squeeze.pt"
    torch.save(networks.build_model("squeezenet1_1", "none").state_dict(), weights)
    path = extract("squeezenet1_1", str(cache[1]), weights=str(weights), out=str(tmp_path / "c"), batch_size=16,
                   workers=0, progress=False)
    model = str(fit(str(path), clf="logreg", out=str(tmp_path / "fit")).parent / "model.skops")
    image = [str(cache[1] / "test" / "dogs" / "test_000.png")]
    assert predict(model, image)[0]["error"] is None
    state = torch.load(weights, weights_only=True)
    state["features.0.weight"] += 0.1
    torch.save(state, weights)  # other weights under the same name
    with pytest.raises(BottleneckError, match="backbone weights changed since this classifier was fitted"):
        predict(model, image)




def test_python_arguments_of_the_wrong_type_are_one_error_naming_them(tmp_path):
    import bottleneck

    cases = [(lambda: bottleneck.evaluate(None, "c.h5"), r"evaluate\(\): model must be a string, not None"),
             (lambda: bottleneck.evaluate("m.joblib", "c.h5", out=5), r"evaluate\(\): out must be a string, not 5"),
             (lambda: bottleneck.predict("m.joblib", ["a.png"], top_k="3"),
              r"predict\(\): top_k must be an integer, not '3'"),
             (lambda: bottleneck.predict("m.joblib", "a.png"), r"predict\(\): images must be a list of strings")]
    for call, message in cases:  # each was a raw TypeError from deep inside
        with pytest.raises(BottleneckError, match=message):
            call()
    with pytest.raises(BottleneckError, match="model file .* does not exist"):  # pathlib paths are welcome
        bottleneck.evaluate(tmp_path / "m.joblib", tmp_path / "c.h5")
