"""What fine-tuning does to images: splits, decoding into memory, augmentation.

Training images are decoded once and kept as one uint8 tensor per split (a small-data tool:
elpv at 224 px is 0.4 GB), so epochs cost only the network. Augmentation (and the test-time
views of views.py) work on uint8 batches and are drawn from explicitly seeded generators, so a resumed run sees
exactly the images an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np
import torch

from bottleneck import data
from bottleneck.console import note, progress_bar
from bottleneck.errors import BottleneckError

MAX_IMAGE_BYTES = 8 << 30  # decoded training images are kept in memory


def load_splits(data_dir: str, val_fraction: float | None, test_fraction: float | None, split_seed: int,
                max_images: int | None, group_pattern: str | None = None) -> tuple[dict, list[str], dict, str, dict]:
    """train/val/test sample lists, split by data.load_manifest exactly as extract splits them;
    a validation split the data lacks is carved from train by the same function."""
    m = data.ensure_splits(data.load_manifest(data_dir, val_fraction, test_fraction, split_seed, group_pattern),
                           ("val", "test"),
                           split_seed)
    splits = dict(m.splits)
    if max_images:  # for quick trials and tests: the first images of each split, in seeded order
        rng = np.random.default_rng(split_seed)
        splits = {s: sorted(v[i] for i in rng.permutation(len(v))[:max_images]) for s, v in splits.items()}
    return splits, m.classes, dict(m.split_info), m.root, m.groups


def fold_tensors(images: dict, paths: dict, k: int, fold: int, seed: int, val_fraction: float | None,
                 classes: list[str], groups: dict[str, str] | None = None) -> tuple[dict, dict, dict]:
    """(images, paths, record): every split's (inputs, labels) pooled and dealt into fold `fold`'s
    train, val and test by data.fold_splits, as fit deals a cache's rows. A fine-tune needs a
    validation split, so a val_fraction of 0 takes the default, as ensure_splits does."""
    x = torch.cat([images[s][0] for s in images])
    y = torch.cat([images[s][1] for s in images])
    every = [p for s in images for p in paths[s]]
    parts, record = data.fold_splits(list(zip(every, y.tolist())), k, fold, seed, val_fraction or None, classes,
                                     groups or None)
    row = {p: i for i, p in enumerate(every)}
    chosen = {s: torch.tensor([row[p] for p, _ in samples], dtype=torch.long) for s, samples in parts.items()}
    return ({s: (x[i], y[i]) for s, i in chosen.items()}, {s: [p for p, _ in parts[s]] for s in parts}, record)


def load_images(root: str, samples: list, prep: dict, workers: int | None, progress: bool):
    """Decode a split once into a uint8 N×3×H×W tensor, labels and paths (bad files are dropped, with a warning)."""
    n, size = len(samples), prep["size"]
    if n * 3 * size * size > MAX_IMAGE_BYTES:
        raise BottleneckError(f"fine-tuning keeps decoded images in memory and {n} images at {size} px need "
                              f"{n * 3 * size * size / 2**30:.1f} GiB; pass --max-images or a smaller --image-size")
    from bottleneck.runtime import default_workers

    dataset = data.ImageDataset(root, [p for p, _ in samples], prep)
    loader = torch.utils.data.DataLoader(dataset, batch_size=64,
                                         num_workers=default_workers() if workers is None else workers)
    images, keep = torch.empty(n, 3, size, size, dtype=torch.uint8), []
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("decoding", total=n)
        i = 0
        for batch, reasons in loader:
            images[i:i + len(batch)] = batch
            for j, reason in enumerate(reasons):
                if reason:
                    note(f"skipped {samples[i + j][0]}: {reason}")
                else:
                    keep.append(i + j)
            i += len(batch)
            bar.advance(task, len(batch))
    labels = torch.tensor([lab for _, lab in samples], dtype=torch.long)
    return images[keep], labels[keep], [samples[i][0] for i in keep]


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """Flips (light), plus 90° rotations and brightness/contrast jitter (strong); uint8 in, uint8 out."""
    if mode == "none":
        return x
    n = len(x)
    flip_h = torch.rand(n, generator=gen) < 0.5
    flip_v = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip_h.view(-1, 1, 1, 1), x.flip(3), x)
    x = torch.where(flip_v.view(-1, 1, 1, 1), x.flip(2), x)
    if mode == "strong":
        turn = torch.rand(n, generator=gen) < 0.5
        if x.shape[2] == x.shape[3]:
            x = torch.where(turn.view(-1, 1, 1, 1), x.transpose(2, 3), x)  # with the flips: all 8 symmetries
        gain = 1 + (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 0.4
        shift = (torch.rand(n, 1, 1, 1, generator=gen) - 0.5) * 40
        x = (x.float() * gain + shift).clamp_(0, 255).to(torch.uint8)
    return x
