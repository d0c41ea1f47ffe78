import csv
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from bottleneck import backbones, networks, store
from bottleneck.classify import fit
from bottleneck.data import resize_crop
from bottleneck.errors import BottleneckError, WeightsUnavailable
from bottleneck.extract import extract
from bottleneck.predict import predict
from bottleneck.weights import weights_available

COURSE_MODELS = {"vgg16", "vgg19", "resnet18", "resnet50", "resnet101", "resnet152", "inception_v3",
                 "densenet121", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "alexnet",
                 "googlenet", "squeezenet1_1", "xception", "efficientnet_lite0"}
LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def test_registry_holds_every_course_model_and_each_describes_itself():
    assert set(backbones.REGISTRY) == COURSE_MODELS | set(LITES)
    for name in backbones.REGISTRY:
        d = backbones.describe(name)
        assert d["default_tap"] in d["taps"] and all(dim > 0 for dim in d["taps"].values())
        assert d["params"] > 1e6


def test_named_taps_have_the_classic_dimensions():
    vgg = backbones.describe("vgg16")["taps"]
    assert (vgg["pool5"], vgg["fc6"], vgg["fc7"]) == (512, 4096, 4096)
    assert backbones.describe("vgg16", pool="flatten")["taps"]["pool5"] == 7 * 7 * 512
    assert backbones.describe("resnet50")["taps"] == {"layer1": 256, "layer2": 512, "layer3": 1024,
                                                      "layer4": 2048, "avgpool": 2048}
    assert backbones.describe("efficientnet_lite0")["taps"]["pool"] == 1280
    assert backbones.describe("efficientnet_lite2")["taps"]["blocks.6"] == 352  # lite2 is 1.1× wider


def test_each_model_gets_its_own_preprocessing():
    assert backbones.preprocessing("inception_v3")["size"] == 299
    assert backbones.preprocessing("xception")["size"] == 299
    assert backbones.preprocessing("xception")["mean"] == [0.5, 0.5, 0.5]
    assert backbones.preprocessing("efficientnet_lite0")["mean"] == [0.5, 0.5, 0.5]
    assert backbones.preprocessing("efficientnet_lite0")["interpolation"] == "bicubic"
    # The sizes the Lite weights were trained at (TensorFlow's efficientnet_lite_builder), as timm has them.
    assert [backbones.preprocessing(n)["size"] for n in LITES] == [224, 240, 260]
    assert all(backbones.preprocessing(n)["std"] == [0.5, 0.5, 0.5] for n in LITES)
    vgg = backbones.preprocessing("vgg16")
    assert vgg["mean"] == list(backbones.IMAGENET_MEAN) and vgg["std"] == list(backbones.IMAGENET_STD)
    assert (vgg["size"], vgg["resize"]) == (224, 256)


def test_real_forward_matches_described_dims_and_stops_at_the_last_tap():
    model = networks.build_model("resnet18", "none")
    calls = []
    model.layer4.register_forward_hook(lambda *a: calls.append("layer4"))
    ex = networks.FeatureExtractor(model, "resnet18", ["layer2", "layer1"], pool="max")
    feats = ex(torch.rand(2, 3, 64, 64))
    assert list(feats) == ["layer1", "layer2"]  # network order, whatever the request order
    assert feats["layer1"].shape == (2, 64) and feats["layer2"].shape == (2, 128)
    assert calls == []  # layer4 never ran: the network is truncated after layer2


def test_several_taps_in_one_pass_equal_separate_passes():
    model = networks.build_model("resnet18", "none")
    x = torch.rand(2, 3, 64, 64)
    both = networks.FeatureExtractor(model, "resnet18", ["layer3", "avgpool"])(x)
    model2 = networks.build_model("resnet18", "none")
    model2.load_state_dict(model.state_dict())
    alone = networks.FeatureExtractor(model2, "resnet18", ["avgpool"])(x)
    torch.testing.assert_close(both["avgpool"], alone["avgpool"])


def _top_classes(logits: torch.Tensor, k: int) -> list[str]:
    from torchvision.models import ResNet18_Weights

    names = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    return [names[i] for i in logits.topk(k).indices.tolist()]


@pytest.mark.parametrize("name", LITES)
def test_lite_weights_see_a_cat_in_chelsea_and_coffee_in_a_cup(name):
    from skimage import data as skdata

    model = networks.build_model(name)  # the package's tensors, mapped in order, every shape checked
    prep = backbones.preprocessing(name)
    mean, std = torch.tensor(prep["mean"]).view(1, 3, 1, 1), torch.tensor(prep["std"]).view(1, 3, 1, 1)

    def top(image, k):
        x = resize_crop(Image.fromarray(image), prep)[None].float() / 255
        with torch.no_grad():
            return _top_classes(model((x - mean) / std)[0], k)

    top3 = top(skdata.chelsea(), 3)
    assert {"tabby", "tiger cat", "Egyptian cat"} & set(top3), top3
    assert {"cup", "espresso"} & set(top(skdata.coffee(), 5))


def test_offline_missing_weights_fail_in_seconds_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    ref = backbones.resolve_weights("vgg16")
    assert ref.path.startswith(str(tmp_path)) and not weights_available(ref)
    started = time.monotonic()
    with pytest.raises(WeightsUnavailable) as e:
        networks.build_model("vgg16", ref)  # this machine has no route to download.pytorch.org
    assert time.monotonic() - started < 15
    assert "bottleneck weights fetch vgg16" in str(e.value) and ref.path in str(e.value)


def test_weights_from_a_state_dict_file(tmp_path):
    model = networks.build_model("resnet18", "none")
    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    loaded = networks.build_model("resnet18", str(tmp_path / "ckpt.pth"))
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    ref = backbones.resolve_weights("resnet18", str(tmp_path / "ckpt.pth"))
    assert ref.id.startswith("file:ckpt.pth:sha256:")
    with pytest.raises(BottleneckError, match="not a state_dict for resnet50"):
        networks.build_model("resnet50", str(tmp_path / "ckpt.pth"))


def test_named_enum_weights_and_bad_names():
    assert backbones.resolve_weights("resnet50", "IMAGENET1K_V1").id == "torchvision:ResNet50_Weights.IMAGENET1K_V1"
    assert backbones.resolve_weights("resnet50").id == "torchvision:ResNet50_Weights.IMAGENET1K_V2"
    with pytest.raises(BottleneckError, match="unknown weights 'IMAGENET9K'"):
        backbones.resolve_weights("resnet50", "IMAGENET9K")
    with pytest.raises(BottleneckError, match="did you mean 'resnet50'"):
        backbones.get_spec("resnet5O")
    with pytest.raises(BottleneckError, match="has no tap 'pool9'"):
        backbones.resolve_taps("vgg16", ["pool9"])


def test_pooling_modes():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    assert np.allclose(networks.pool_features(x, "avg")[0], [1.5, 5.5, 9.5])
    assert np.allclose(networks.pool_features(x, "max")[0], [3, 7, 11])
    assert networks.pool_features(x, "flatten").shape == (2, 12)


def test_timm_names_take_taps_head_and_preprocessing_from_timm():
    spec = backbones.get_spec("timm:convnext_atto")
    assert list(spec.taps) == ["stages.0", "stages.1", "stages.2", "stages.3", "pool"]
    assert (spec.default_tap, spec.head) == ("pool", "head.fc")
    convnext = backbones.describe("timm:convnext_atto")
    assert convnext["taps"] == {"stages.0": 40, "stages.1": 80, "stages.2": 160, "stages.3": 320, "pool": 320}
    assert convnext["preprocessing"]["mean"] == list(backbones.IMAGENET_MEAN)
    vit = backbones.describe("timm:vit_tiny_patch16_224")
    assert list(vit["taps"]) == [f"blocks.{i}" for i in range(12)] + ["pool"] and set(vit["taps"].values()) == {192}
    assert vit["preprocessing"] == {"size": 224, "resize": 248, "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5],
                                    "std": [0.5, 0.5, 0.5]}
    # Swin's stages are NHWC: pooled over positions, each stage gives its channel count.
    swin = backbones.describe("timm:swin_tiny_patch4_window7_224")["taps"]
    assert swin == {"layers.0": 96, "layers.1": 192, "layers.2": 384, "layers.3": 768, "pool": 768}
    assert backbones.resolve_weights("timm:convnext_atto").id == "timm:convnext_atto.d2_in1k"
    assert backbones.resolve_weights("timm:convnext_atto", "none").id == "none"
    assert backbones.file_name("timm:convnext_atto") == "timm-convnext_atto"


def test_unknown_timm_names_are_clear_errors():
    with pytest.raises(BottleneckError, match="did you mean 'timm:convnext_atto'"):
        backbones.get_spec("timm:convnext_attto")
    with pytest.raises(BottleneckError, match="no pretrained tag 'in99k' for convnext_atto"):
        backbones.get_spec("timm:convnext_atto.in99k")
    with pytest.raises(BottleneckError, match="has no tap 'stages.9'; its taps are stages.0"):
        backbones.resolve_taps("timm:convnext_atto", ["stages.9"])


@pytest.mark.parametrize("arch, size", [("convnext_atto", 64), ("vit_tiny_patch16_224", 224)])
def test_timm_pool_tap_is_timms_pre_logits_vector(arch, size):
    name = f"timm:{arch}"
    model = networks.build_model(name, "none")
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        want = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(networks.FeatureExtractor(model, name, ["pool"])(x)["pool"], want)


@pytest.mark.parametrize("arch, tap", [("convnext_atto", "stages.2"), ("vit_tiny_patch16_224", "blocks.5")])
def test_timm_models_extract_fit_and_predict_end_to_end(tree, tmp_path, arch, tap):
    name = f"timm:{arch}"
    cache = extract(name, str(tree), layer=["pool", tap], weights="none", out=str(tmp_path / "c"), batch_size=8,
                    workers=0, precision="fp32", progress=False)
    assert cache.name.startswith(f"timm-{arch}-{tap}+pool-avg-")  # no ':' in a file name
    with store.FeatureStore(cache) as st:
        assert st.attrs["model"] == name and st.attrs["weights"] == "none" and st.taps == [tap, "pool"]
        assert st.features("train", tap).shape[0] == 12 and np.isfinite(st.features("test", "pool")).all()
    report = fit(str(cache), out=str(tmp_path / "fit"))
    rep = json.loads(report.read_text())
    assert rep["model"] == name and rep["tap"] == "pool" and rep["n_test"] == 6
    with open(report.with_name("predictions.csv"), newline="") as f:
        fitted = {row["path"].rsplit("/", 1)[1]: row["predicted"] for row in csv.DictReader(f)}
    # predict rebuilds the same (seeded) random network from the classifier's provenance
    rows = predict(str(report.with_name("model.skops")), [str(tree / "test")])
    assert {r["path"].rsplit("/", 1)[1]: r["label"] for r in rows} == fitted


@pytest.mark.parametrize("name, size, smallest, above", [
    ("vgg16", 16, 32, None),  # five poolings leave nothing of 16 px
    ("timm:convnext_atto", 9, 32, None),
    ("timm:vit_tiny_patch16_224", 100, 16, 112),  # multiples of its 16-px patch only
])
def test_an_image_size_the_network_cannot_take_is_one_error_naming_the_smallest_that_works(
        tree, tmp_path, name, size, smallest, above):
    nearest = f", the nearest above {size} is {above} px" if above else ""
    with pytest.raises(BottleneckError, match=f"cannot take {size} px input .*the smallest size that works is "
                                              f"{smallest} px{nearest}: pass --image-size {above or smallest}"):
        backbones.check_input_size(name, size)
    backbones.check_input_size(name, above or smallest)  # and that size runs
    if name == "vgg16":  # before any work: no weights fetched, no cache begun
        with pytest.raises(BottleneckError, match="smallest size that works is 32 px"):
            extract(name, str(tree), image_size=size, weights="none", out=str(tmp_path / "c"), progress=False)
        assert not (tmp_path / "c").exists()
