"""A view kind: which views of an image a cache stores, or test-time augmentation averages.

`none` (the image), `hflip` (2), `flips` (4: as is, horizontal, vertical, both), `dihedral` (8: the
flips and their transposes, for square images) and `crops:K` (the image and K - 1 random resized
crops, the same seeded boxes for every image). `extract --views` stores each image's views as
rows next to each other; fit scores an image by its views' mean probability; fine-tuning's
test-time views follow its training augmentation (`tta_views`); and `finetune --from-cache`
averages a cache's views as it trains on them. The name is parsed here once (`parse_views`), so
settings, extract, backbones, finetune and predict agree on what a view kind is and how many
views it makes. torch is imported only where views are made, so settings stay torch-free.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from bottleneck.errors import BottleneckError

VIEWS = {"none": 1, "hflip": 2, "flips": 4, "dihedral": 8}  # views per image, as test-time augmentation has them
MAX_CROPS = 64
CROP_SCALE, CROP_RATIO = (0.25, 1.0), (3 / 4, 4 / 3)  # of the image's area; width / height
TTA_OF_AUGMENT = {"none": "hflip", "light": "flips", "strong": "dihedral"}  # the symmetries training used


@dataclass(frozen=True)
class Views:
    """A --views value parsed once: its canonical name (crops:02 is crops:2, one cache) and views per image."""

    name: str
    count: int


def parse_views(views: str) -> Views:
    """A VIEWS name, or crops:K (the image and K - 1 seeded crops of it) with K in ASCII digits."""
    if views in VIEWS:
        return Views(views, VIEWS[views])
    k = re.fullmatch(r"crops:([0-9]+)", views)  # '²' is a digit to str.isdigit, and a traceback to int()
    if k and 2 <= int(k.group(1)) <= MAX_CROPS:
        return Views(f"crops:{int(k.group(1))}", int(k.group(1)))
    text = repr(views)  # cut to a line: a 10 MB string is not echoed back
    raise BottleneckError(f"unknown views {text if len(text) <= 80 else text[:77] + '...'}; choose one of "
                          f"{', '.join(VIEWS)} or crops:K (K from 2 to {MAX_CROPS})")


def n_views(views: str) -> int:
    """Views per image of a VIEWS name or of crops:K."""
    return parse_views(views).count


def tta_views(tta: bool, augment: str) -> str:
    """Test-time views: the symmetries training augmented with (all 8 of the square's for 'strong')."""
    return TTA_OF_AUGMENT[augment] if tta else "none"


def views_of(x, mode: str) -> list:
    """Views of an NCHW batch (a tensor): none, hflip, flips (h, v, both), dihedral (those, transposed)
    or crops:K (the batch and K - 1 random resized crops of it, the same boxes for every image)."""
    if mode == "none":
        return [x]
    if mode.startswith("crops:"):
        return [x] + [resized_crop(x, box) for box in crop_boxes(parse_views(mode).count - 1)]
    if mode == "hflip":
        return [x, x.flip(3)]
    flips = [x, x.flip(3), x.flip(2), x.flip(2).flip(3)]
    if mode == "dihedral" and x.shape[2] == x.shape[3]:
        flips += [v.transpose(2, 3) for v in flips]
    return flips


def cached_views(maps, mode: str):
    """The views of a cache's images × views × ... tensor to average: the first alone for "none"."""
    return maps[:, :1] if mode == "none" else maps


def crop_boxes(n: int, seed: int = 0) -> list[tuple[float, float, float, float]]:
    """`n` boxes (top, left, height, width as fractions of the image), drawn as RandomResizedCrop
    draws them, from a fixed seed: a cache of crops is the same whichever images or batches it
    holds, and a resumed extraction makes the same rows."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    boxes = []
    while len(boxes) < n:
        u, v = torch.rand(2, generator=gen).tolist()
        area = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u
        log_ratio = math.log(CROP_RATIO[0]) + math.log(CROP_RATIO[1] / CROP_RATIO[0]) * v
        h, w = math.sqrt(area / math.exp(log_ratio)), math.sqrt(area * math.exp(log_ratio))
        if h <= 1 and w <= 1:
            top, left = torch.rand(2, generator=gen).tolist()
            boxes.append((top * (1 - h), left * (1 - w), h, w))
    return boxes


def resized_crop(x, box: tuple[float, float, float, float]):
    """A box of a uint8 NCHW batch, resized back to the batch's size (bilinear, antialiased)."""
    import torch

    size = x.shape[2:]
    top, left = round(box[0] * size[0]), round(box[1] * size[1])
    h, w = max(1, round(box[2] * size[0])), max(1, round(box[3] * size[1]))
    part = x[:, :, top:top + h, left:left + w].float()
    out = torch.nn.functional.interpolate(part, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)
