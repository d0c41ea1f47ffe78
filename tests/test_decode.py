"""extract --decode gpu: JPEGs decoded by torchvision.io on the extraction's device. Without CUDA
the same code decodes on the CPU, which is what runs here; on a GPU node benchmarks/gpu_check.py
runs it with nvjpeg."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bottleneck import data, decode
from bottleneck.extract import extract
from bottleneck.store import FeatureStore

LITE = "efficientnet_lite0"
PREP = {"size": 224, "resize": 256, "crop": True, "interpolation": "bicubic"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photographs as JPEG (colour, grey, one with an EXIF rotation), a PNG, and a JPEG cut short."""
    from skimage import data as sk

    root = tmp_path_factory.mktemp("decode") / "data"
    images = {"train/cat/chelsea.jpg": sk.chelsea(), "train/cat/astronaut.jpg": sk.astronaut(),
              "train/cat/grey.jpg": sk.camera(), "train/thing/coffee.jpg": sk.coffee(),
              "train/thing/rocket.png": sk.rocket(), "train/thing/cells.jpg": sk.immunohistochemistry(),
              "test/cat/rotated.jpg": sk.chelsea(), "test/thing/hubble.jpg": sk.hubble_deep_field()}
    for name, pixels in images.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(pixels)
        if name.endswith("rotated.jpg"):  # stored sideways, shown upright by any viewer that reads EXIF
            exif = Image.Exif()
            exif[0x0112] = 6
            im.transpose(Image.Transpose.ROTATE_90).save(root / name, quality=90, exif=exif)
        else:
            im.save(root / name, quality=90)
    whole = (root / "train/thing/coffee.jpg").read_bytes()
    (root / "test/thing/cut.jpg").write_bytes(whole[: len(whole) // 3])  # starts as a JPEG, ends early
    return root


def test_device_decoding_matches_pil_to_rounding(photos):
    paths = sorted(str(p.relative_to(photos)) for p in photos.rglob("*.*"))
    dataset = decode.RawImages(str(photos), paths, PREP)
    items, reasons = decode.collate([dataset[i] for i in range(len(paths))])
    assert sum(kind == "jpeg" for kind, _ in items) == len(paths) - 1  # all but the PNG travel as bytes
    images, reasons = decode.decode_block(items, reasons, PREP, torch.device("cpu"))
    cpu = data.ImageDataset(str(photos), paths, PREP)
    for i, path in enumerate(paths):
        expected, reason = cpu[i]
        if "cut" in path:  # PIL refuses it too; neither passes a half-decoded image on
            assert reason and reasons[i] and not images[i].any()
            continue
        assert not reasons[i], (path, reasons[i])
        diff = (images[i].int() - expected.int()).abs()
        # libjpeg-turbo under both, torchvision's antialiased resampling against PIL's: rounding only
        # (measured: at most 2 levels, mean 0.01); a missed EXIF rotation would be far off
        assert diff.max() <= 4 and diff.float().mean() < 0.1, (path, diff.max(), diff.float().mean())


def test_extract_decode_gpu_falls_back_to_the_cpu_and_is_another_cache(photos, tmp_path):
    kwargs = dict(layer=["pool"], batch_size=4, workers=0, progress=False, precision="fp32")
    pil = extract(LITE, str(photos), out=str(tmp_path), **kwargs)
    tv = extract(LITE, str(photos), out=str(tmp_path), decode="gpu", **kwargs)
    assert pil != tv  # decoded elsewhere: not the same pixels, so not the same cache
    with FeatureStore(pil) as a, FeatureStore(tv) as b:
        assert b.attrs["decoded_by"] == "torchvision.io" and "decoded_by" not in a.attrs
        for split in ("train", "test"):
            assert a.paths(split) == b.paths(split) and (a.labels(split) == b.labels(split)).all()
            x, y = a.features(split, "pool"), b.features(split, "pool")
            cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
            assert cos.min() > 0.98, cos
        assert "test/thing/cut.jpg" not in b.paths("test")  # skipped, as the PIL path skips it
