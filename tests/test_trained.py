"""One loader for trained models: a classifier from fit and a network from finetune behave alike."""

import shutil

import numpy as np
import pytest
import torch
from conftest import make_tree

from bottleneck import trained
from bottleneck.classify import fit
from bottleneck.errors import BottleneckError
from bottleneck.extract import extract
from bottleneck.finetune import finetune
from bottleneck.store import FeatureStore


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    tree = make_tree(root / "data", {"train": 6, "val": 2, "test": 3})
    cache = extract("squeezenet1_1", str(tree), layer=["fire9"], out=str(root / "c"), batch_size=8, workers=0,
                    progress=False, weights="none")
    clf = fit(str(cache), layer="fire9", search=False, out=str(root / "fit")).parent / "model.joblib"
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
