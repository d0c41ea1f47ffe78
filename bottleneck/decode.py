"""JPEG decoding on the extraction's device (`extract --decode gpu`).

On a GPU node the CPU is often what limits extraction: a few cores decode and resize JPEGs for
a GPU that waits. With `--decode gpu` the loader's workers only read each file's bytes, and the
main process decodes a block's JPEGs in one call of `torchvision.io.decode_jpeg` on the GPU
(nvjpeg), then resizes and crops them there with the same rule as the CPU path
(`data.fit_to_input`). Other formats (PNG, TIFF, ...) and JPEGs nvjpeg refuses are decoded on the
CPU as usual. Without CUDA the same code decodes on the CPU with torchvision.io (slower than
the workers' PIL path; it exists so that the GPU path's logic runs in every test).

The pixels differ from PIL's by rounding (another decoder, another resampling kernel), so the
cache records where it was decoded and a cache decoded elsewhere is another cache.
"""

from __future__ import annotations

import io
import os
import stat

import torch

from bottleneck import data
from bottleneck.errors import Interrupted

JPEG_MAGIC = b"\xff\xd8\xff"


def decoder(device: torch.device) -> str:
    """What decodes JPEGs with --decode gpu on `device`: recorded in the cache and its fingerprint."""
    return "nvjpeg" if device.type == "cuda" else "torchvision.io"


class RawImages(torch.utils.data.Dataset):
    """Yields ((kind, tensor), reason): ("jpeg", the file's bytes) to be decoded on the device a
    block at a time, or ("image", the uint8 CHW image) for any other file, decoded and resized
    here as data.ImageDataset does; reason is '' when the file could be read."""

    def __init__(self, root: str, paths: list[str], prep: dict):
        self.root, self.paths, self.prep = root, paths, prep

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[tuple[str, torch.Tensor], str]:
        full = os.path.join(self.root, self.paths[i])
        try:
            if not stat.S_ISREG(os.stat(full).st_mode):
                raise ValueError("not a regular file")
            with open(full, "rb") as f:
                raw = f.read()
            if raw[:3] == JPEG_MAGIC:
                return ("jpeg", torch.frombuffer(bytearray(raw), dtype=torch.uint8)), ""
            return ("image", data.resize_crop(data.load_image(io.BytesIO(raw)), self.prep)), ""
        except Interrupted:
            raise
        except Exception as e:  # as ImageDataset: an undecodable file is skipped with its reason
            return ("image", blank(self.prep)), data.describe_error(e)


def blank(prep: dict) -> torch.Tensor:
    return torch.zeros(3, prep["size"], prep["size"], dtype=torch.uint8)


def collate(batch: list) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """A block as lists: the files' bytes differ in length, so they cannot be stacked."""
    return [item for item, _ in batch], [reason for _, reason in batch]


def decode_block(items: list[tuple[str, torch.Tensor]], reasons: list[str], prep: dict,
                 device: torch.device) -> tuple[torch.Tensor, list[str]]:
    """(uint8 NCHW images on `device`, reasons): the block's JPEGs decoded together on `device`,
    each resized and cropped there; a file that fails gets a blank image and its reason."""
    reasons = list(reasons)
    jpegs = [i for i, (kind, _) in enumerate(items) if kind == "jpeg" and not reasons[i]]
    decoded = dict(zip(jpegs, decode_jpegs([items[i][1] for i in jpegs], device)))
    out = []
    for i, (_, x) in enumerate(items):
        if i in decoded:
            img = decoded[i]
            try:
                if isinstance(img, Exception):
                    img = fallback(x, prep, device)  # a JPEG nvjpeg refuses (CMYK, progressive...): PIL's turn
                else:
                    img = data.fit_to_input(checked(img), prep)
            except Interrupted:
                raise
            except Exception as e:
                img, reasons[i] = blank(prep).to(device), data.describe_error(e)
            out.append(img)
        else:
            out.append(x.to(device))
    return torch.stack(out), reasons


def decode_jpegs(raw: list[torch.Tensor], device: torch.device) -> list:
    """Decoded RGB images, or the exception of each that failed: one call for the block, and
    one per file only if the block's call fails (one bad file fails the whole call)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not raw:
        return []
    kw = {"mode": ImageReadMode.RGB, "device": device, "apply_exif_orientation": True}
    try:
        return list(decode_jpeg(raw, **kw))
    except RuntimeError:
        pass
    out = []
    for r in raw:
        try:
            out.append(decode_jpeg(r, **kw))
        except RuntimeError as e:
            out.append(e)
    return out


def fallback(raw: torch.Tensor, prep: dict, device: torch.device) -> torch.Tensor:
    return data.resize_crop(data.load_image(io.BytesIO(raw.numpy().tobytes())), prep).to(device)


def checked(img: torch.Tensor) -> torch.Tensor:
    if min(img.shape[-2:]) < data.MIN_SIDE:
        raise ValueError(f"image is {img.shape[-1]}x{img.shape[-2]} pixels, below {data.MIN_SIDE}x{data.MIN_SIDE}")
    return img
