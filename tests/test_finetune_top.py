"""finetune --from-cache: the layers after a tap trained on that tap's cached maps."""

import json

import numpy as np
import pytest
import torch
from conftest import make_tree

from bottleneck import data, networks, report, trained
from bottleneck.errors import BottleneckError
from bottleneck.extract import extract
from bottleneck.finetune import finetune
from bottleneck.finetune_top import cut, restore

LITE = "efficientnet_lite0"
TRUNK = ("conv_stem.", "bn1.", *[f"blocks.{i}." for i in range(6)])  # Lite0 up to blocks.5
QUICK = dict(batch_size=4, workers=0, progress=False, precision="fp32")


@pytest.fixture(scope="module")
def maps_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("top")
    tree = make_tree(root / "data", {"train": 8, "val": 2, "test": 3})
    cache = extract(LITE, str(tree), layer=["pool"], maps="blocks.5", views="flips", image_size=64,
                    out=str(root / "c"), batch_size=8, workers=0, precision="fp32", progress=False)
    return cache, tree


def test_a_top_trained_on_cached_maps_keeps_the_trunk_and_predicts_as_on_images(maps_cache, tmp_path):
    cache, tree = maps_cache
    out = tmp_path / "top"
    rep = json.loads(finetune(LITE, str(tree), from_cache=str(cache), epochs=2, restore_best=False, out=str(out),
                             **QUICK)
                     .read_text())
    assert rep["tap"] == "blocks.5" and rep["from_cache"]["views"] == "flips" and rep["n_test"] == 6
    assert rep["cache_cost_seconds"] > 0

    model = trained.load(str(out / "model.pt"))
    assert model.kind == "network" and model.views == "flips"
    saved = model.network().state_dict()
    pretrained = networks.build_model(LITE).state_dict()
    trunk = [k for k in saved if k.startswith(TRUNK)]
    assert trunk and all(torch.equal(saved[k], pretrained[k]) for k in trunk)  # running statistics too
    top = [k for k in saved if k.startswith(("blocks.6.", "conv_head."))]
    assert any(not torch.equal(saved[k], pretrained[k]) for k in top), "the top did not train"

    # The saved network on the test images (trunk and top, flips averaged) gives what training
    # scored from the cached maps, up to the maps' float16 rounding.
    recorded = report.read_predictions(out / "predictions.csv")
    paths = sorted(recorded)
    images = torch.stack([data.resize_crop(data.load_image(tree / p), model.preprocessing) for p in paths])
    probs, chosen = model.predict_batch(images, torch.device("cpu"))
    expected = np.array([[recorded[p]["probabilities"][c] for c in model.classes] for p in paths])
    np.testing.assert_allclose(probs, expected, atol=2e-3)
    assert [model.classes[i] for i in chosen] == [recorded[p]["predicted"] for p in paths]


def test_a_cache_without_maps_or_of_other_data_is_refused(maps_cache, tmp_path):
    cache, tree = maps_cache
    plain = extract(LITE, str(tree), layer=["pool"], image_size=64, out=str(tmp_path / "c"), batch_size=8,
                    workers=0, precision="fp32", progress=False)
    with pytest.raises(BottleneckError, match="holds no maps"):
        finetune(LITE, str(tree), from_cache=str(plain), out=str(tmp_path / "a"), **QUICK)
    other = make_tree(tmp_path / "other", {"train": 8, "val": 2, "test": 2})
    with pytest.raises(BottleneckError, match="other data"):
        finetune(LITE, str(other), from_cache=str(cache), out=str(tmp_path / "b"), **QUICK)
    with pytest.raises(BottleneckError, match="--image-size does not apply"):
        finetune(LITE, str(tree), from_cache=str(cache), image_size=96, out=str(tmp_path / "c2"), **QUICK)
    with pytest.raises(BottleneckError, match="efficientnet_lite0 maps, not resnet18"):
        finetune("resnet18", str(tree), from_cache=str(cache), weights="none", out=str(tmp_path / "d"), **QUICK)


def test_a_network_is_cut_only_where_its_layers_run_in_order():
    net = networks.build_model("resnet18", "none")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = net(x)
        removed = cut(net, "resnet18", "layer3", 64)  # a container: cut after its last block
        assert list(removed)[-1] == "layer3.1" and "layer4.0" not in removed
        restore(net, removed)
        torch.testing.assert_close(net(x), whole)
    # Inception v3 converts its input itself before the first layer: a cut network would apply
    # that conversion to the maps, so it is refused.
    with pytest.raises(BottleneckError, match="does not run its layers in order"):
        cut(networks.build_model("inception_v3", "none"), "inception_v3", "Mixed_6e", 299)


def test_lp_ft_of_the_top_starts_from_a_probe_on_the_same_cache(maps_cache, tmp_path):
    from bottleneck.classify import fit

    cache, tree = maps_cache
    probe_report = fit(str(cache), layer="pool", search=False, out=str(tmp_path / "fit"))
    probe = json.loads(probe_report.read_text())
    head = str(probe_report.parent / "model.skops")
    rep = json.loads(finetune(LITE, str(tree), from_cache=str(cache), init_head=head, epochs=1,
                              out=str(tmp_path / "top"), **QUICK).read_text())
    assert [h["phase"] for h in rep["history"]] == ["finetune"]  # the probe is the head-only phase
    assert rep["head_only"]["accuracy"] == probe["accuracy"]  # step 0 scores as the probe did
    # the probe's extraction is this run's own cache: counted once, in cache_cost_seconds
    assert rep["probe_cost_seconds"] == pytest.approx(probe["cost"]["fit_seconds"])


def test_evaluate_of_a_network_on_a_multi_view_cache_counts_images_not_views(maps_cache, tmp_path):
    """It once scored each of the 6 test images twice over a 'flips' cache: "test (12 images)"."""
    from bottleneck.predict import evaluate

    cache, tree = maps_cache
    run = json.loads(finetune(LITE, str(tree), from_cache=str(cache), epochs=1, out=str(tmp_path / "top"), **QUICK)
                     .read_text())
    rep = evaluate(str(tmp_path / "top" / "model.pt"), str(cache), out=str(tmp_path / "eval"))
    assert rep["n_test"] == 6 and rep["test_set"] == {k: v for k, v in run["test_set"].items() if k != "twins"}
    rows = (tmp_path / "eval" / "predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == 6 and len({r.split(",")[0] for r in rows}) == 6
    assert rep["accuracy"] == pytest.approx(run["accuracy"])  # the images training scored, and no others


def test_edited_maps_or_features_are_refused_before_training(maps_cache, tmp_path):
    """Zeroed maps, which 'cache verify' reports, once trained to exit 0: every read is checked now."""
    import shutil

    import h5py
    from conftest import cli

    from bottleneck.classify import fit

    cache, tree = maps_cache
    edited = {name: shutil.copy(cache, tmp_path / f"{name}.h5") for name in ("maps", "features")}
    with h5py.File(edited["maps"], "r+") as f:
        f["train/maps/blocks.5"][0] = 0  # one image's map: finite, plausible, wrong
    with h5py.File(edited["features"], "r+") as f:
        f["val/features/pool"][1, :5] = 0
    out = tmp_path / "top"
    result = cli("finetune", "--model", LITE, "--data", str(tree), "--from-cache", str(edited["maps"]),
                     "--epochs", "1", "--out", str(out), "--workers", "0", "--no-progress")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: " in result.stderr and "train/maps/blocks.5 does not match its checksum" in result.stderr
    assert not (out / "model.pt").exists() and not (out / "report.json").exists()
    with pytest.raises(BottleneckError, match="val/features/pool does not match its checksum"):
        fit(str(edited["features"]), layer="pool", search=False, out=str(tmp_path / "fit"))
    assert not (tmp_path / "fit").exists()


def test_a_probe_that_trained_on_the_runs_test_images_is_refused(tmp_path):
    """A probe fitted on a cache split with another --split-seed was once accepted: LP-FT then scored
    on test images its head had trained on."""
    import shutil

    from bottleneck.classify import fit

    data = make_tree(tmp_path / "data", {"all": 12}, split_folders=False)  # split by the seeds below
    common = dict(layer=["pool"], image_size=64, batch_size=8, workers=0, precision="fp32", progress=False)
    other_split = extract(LITE, str(data), split_seed=1, out=str(tmp_path / "c1"), **common)
    probe = fit(str(other_split), layer="pool", search=False, out=str(tmp_path / "fit")).parent / "model.skops"
    maps = extract(LITE, str(data), maps="blocks.5", out=str(tmp_path / "c0"), **common)
    overlap = r"--init-head .*: it trained on [1-6] of this run's 6 test images"
    with pytest.raises(BottleneckError, match=overlap):
        finetune(LITE, str(data), init_head=str(probe), epochs=1, image_size=64, out=str(tmp_path / "a"), **QUICK)
    with pytest.raises(BottleneckError, match=overlap):
        finetune(LITE, str(data), from_cache=str(maps), init_head=str(probe), epochs=1, out=str(tmp_path / "b"),
                 **QUICK)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    shutil.move(other_split, tmp_path / "moved.h5")  # nothing left to tell which images it trained on
    with pytest.raises(BottleneckError, match=r"its cache .* is gone or changed"):
        finetune(LITE, str(data), from_cache=str(maps), init_head=str(probe), epochs=1, out=str(tmp_path / "b"),
                 **QUICK)
    same_split = fit(str(maps), layer="pool", search=False, out=str(tmp_path / "fit0")).parent / "model.skops"
    rep = json.loads(finetune(LITE, str(data), init_head=str(same_split), epochs=1, image_size=64,
                              out=str(tmp_path / "c"), **QUICK).read_text())
    assert rep["params"]["init_head"] == str(same_split)  # the same data and splits: accepted
