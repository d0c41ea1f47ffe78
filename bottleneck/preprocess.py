"""How images become network input: the model's own pipeline, fitted to the images at hand.

A pretrained model comes with the pipeline it was trained with (timm's or torchvision's
config): resize the short side, centre-crop the input size, an interpolation, a
normalisation. That pipeline was chosen for ImageNet photos. Whether to crop depends on the
images, and `choose` decides it from a sample of the training images unless told:

- A centre crop drops the border (a quarter of the area at 224/256). For images at least as
  large as the input that is the model's own practice and costs nothing measurable (elpv:
  no difference beyond noise). For images smaller than the input the crop cuts away content
  the picture cannot spare (CIFAR-10: the whole image is better on every deep tap). So small
  images are resized whole; others keep the crop.
- The interpolation stays the model's own: bilinear instead of bicubic upsampling of 32-px
  images measured no better (CIFAR-10: slightly worse on every deep tap).

docs/results.md has the measurements (benchmarks/preprocessing.py). The result is a plain
dict (`size`, `resize`, `crop`, `interpolation`, `mean`, `std`) stored with every cache,
classifier and checkpoint, so prediction applies exactly what training saw.
"""

from __future__ import annotations

import os
import statistics
import warnings

from PIL import Image

from bottleneck import backbones

SAMPLE = 64   # images whose size is read (headers only) to decide


def pipeline(model: str, image_size: int | None = None, crop: bool = True,
             interpolation: str | None = None) -> dict:
    """The model's preprocessing with the given choices; `image_size` scales its resize with it."""
    prep = backbones.preprocessing(model) | {"crop": crop}
    if image_size:
        prep["resize"] = round(image_size * prep["resize"] / prep["size"])
        prep["size"] = image_size
    if not crop:
        prep["resize"] = prep["size"]
    if interpolation:
        prep["interpolation"] = interpolation
    return prep


def choose(model: str, root: str, paths: list[str], image_size: int | None = None, crop: bool | None = None,
           interpolation: str | None = None) -> tuple[dict, str]:
    """(preprocessing, why) for these images: `crop` left None is decided from the sizes of a
    sample of `paths` (relative to `root`); `why` is empty when nothing was decided."""
    why = ""
    if image_size is not None:
        backbones.check_input_size(model, image_size)  # before any work: vgg16 at 16 px failed mid-extraction
    if crop is None:
        size = image_size or backbones.preprocessing(model)["size"]
        crop, why = crop_rule(sample_shape(root, paths), size)
    return pipeline(model, image_size, crop, interpolation), why


def crop_rule(shape: tuple[int, float] | None, size: int) -> tuple[bool, str]:
    """(crop?, why) from the images' median short side (and aspect ratio, reported)."""
    if shape is None:
        return True, "centre crop: no image sizes could be read"
    short, ratio = shape
    if short < size:
        return False, f"whole image: images ({short} px) are smaller than the {size} px input"
    return True, f"centre crop: images ({short} px, aspect {ratio:.2f}) are at least the {size} px input"


def sample_shape(root: str, paths: list[str]) -> tuple[int, float] | None:
    """Median short side and median long/short ratio of up to SAMPLE images spread over `paths`."""
    step = max(1, len(paths) // SAMPLE)
    shorts, ratios = [], []
    for rel in paths[::step][:SAMPLE]:
        try:
            with warnings.catch_warnings():  # a corrupt EXIF block or a huge image is decoding's to report
                warnings.simplefilter("ignore")
                with Image.open(os.path.join(root, rel)) as img:  # reads the header only
                    w, h = img.size
        except Exception:  # an unreadable file is extract's to report, not this sample's
            continue
        if min(w, h) > 0:
            shorts.append(min(w, h))
            ratios.append(max(w, h) / min(w, h))
    if not shorts:
        return None
    return int(statistics.median(shorts)), float(statistics.median(ratios))


def describe(prep: dict, why: str = "") -> str:
    """'preprocessing: whole image → 224 px, bicubic (why)' or 'preprocessing: resize 256, centre
    crop 224 px, bicubic'."""
    how = (f"resize {prep['resize']}, centre crop {prep['size']} px" if prep.get("crop", True)
           else f"whole image → {prep['size']} px")
    return f"preprocessing: {how}, {prep['interpolation']}" + (f" ({why})" if why else "")


def complete(prep: dict) -> dict:
    """A preprocessing dict with every key: caches and models from before the crop choice existed
    were cropped."""
    return {**prep, "crop": prep.get("crop", True)}
