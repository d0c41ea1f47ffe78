"""The near-twin threshold of `bottleneck audit`, measured on real images.

    python benchmarks/audit_threshold.py --data data/elpv [--originals 300] [--distinct 300]

Takes `--originals` images of a real dataset as the training split and puts into the test split
copies of each made the ways copies arise (rescaled: half size, or double for images under
128 px; re-encoded as JPEG at quality 60; cropped to the central 90 %; cropped to 90 % at a
corner; rescaled and re-encoded),
beside `--distinct` other images of the same data. Extracts EfficientNet-Lite0 penultimate
features, matches every test image to its most similar training image as the audit does, and
prints the similarities of copies and of distinct images, with what each threshold finds.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from bottleneck.audit import DEFAULT_THRESHOLD, PIXEL_THRESHOLD, find_twins, image_rows
from bottleneck.data import load_manifest
from bottleneck.extract import extract
from bottleneck.store import FeatureStore


def rescaled(im: Image.Image) -> Image.Image:
    """Half size, or twice the size for images under 128 px (a 16-px copy of a 32-px image is no copy)."""
    f = 0.5 if min(im.size) >= 128 else 2.0
    return im.resize((round(im.width * f), round(im.height * f)), Image.BICUBIC)


KINDS = {
    "rescaled": rescaled,
    "jpeg q60": lambda im: im,
    "jpeg q90": lambda im: im,
    "crop 95 % corner": lambda im: im.crop((0, 0, round(im.width * 0.95), round(im.height * 0.95))),
    "crop 90 % centre": lambda im: im.crop((im.width // 20, im.height // 20, im.width - im.width // 20,
                                             im.height - im.height // 20)),
    "crop 90 % corner": lambda im: im.crop((0, 0, im.width * 9 // 10, im.height * 9 // 10)),
    "rescaled + jpeg q60": rescaled,
}
JPEG = {"jpeg q60": 60, "jpeg q90": 90, "rescaled + jpeg q60": 60}
DEFAULT, PIXELS = DEFAULT_THRESHOLD, PIXEL_THRESHOLD  # chosen from these tables (docs/audit.md)
THRESHOLDS = (0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95)


def make_tree(source: str, out: Path, originals: int, distinct: int, seed: int) -> None:
    """train/<class>/o<i>.png, test/<class>/c<kind>-<i>.(png|jpg) and test/<class>/d<i>.png."""
    m = load_manifest(source)
    samples = sorted(s for split in m.splits.values() for s in split)
    order = np.random.default_rng(seed).permutation(len(samples))
    picked = [samples[i] for i in order[:originals + distinct]]
    for i, (rel, label) in enumerate(picked):
        im = Image.open(Path(m.root) / rel).convert("RGB")
        cls = m.classes[label]
        if i >= originals:
            save(im, out / "test" / cls / f"d{i}.png")
            continue
        save(im, out / "train" / cls / f"o{i}.png")
        for k, (kind, make) in enumerate(KINDS.items()):
            name = f"c{k}-{i}.{'jpg' if kind in JPEG else 'png'}"
            save(make(im), out / "test" / cls / name, quality=JPEG.get(kind, 95))


def kind_of(name: str) -> str:
    return "distinct" if name.startswith("d") else list(KINDS)[int(name[1:].split("-")[0])]


def save(im: Image.Image, path: Path, quality: int = 95) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, quality=quality) if path.suffix == ".jpg" else im.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/elpv")
    parser.add_argument("--originals", type=int, default=300)
    parser.add_argument("--distinct", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-audit")
    parser.add_argument("--reuse", action="store_true", help="Measure the tree and cache already in --out.")
    a = parser.parse_args()
    out = Path(a.out)
    if not a.reuse:
        shutil.rmtree(out, ignore_errors=True)
        make_tree(a.data, out / "tree", a.originals, a.distinct, a.seed)
    cache = extract("efficientnet_lite0", str(out / "tree"), layer=["pool"], out=str(out / "cache"), progress=False)
    with FeatureStore(cache) as st:
        rows = image_rows(st, "pool")
        root = st.attrs["data_root"]
    matches = find_twins(rows, -1.0, root)
    by_kind: dict[str, list] = {}
    for t in matches:
        name = Path(t.path).name
        kind = kind_of(name)
        right = kind == "distinct" or Path(t.train_path).stem == "o" + name.split("-")[1].split(".")[0]
        by_kind.setdefault(kind, []).append((t.similarity, t.pixels or 0.0, right))
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")),
                 platform.processor())
    print(f"{a.data}: {a.originals} originals, {a.distinct} distinct images, seed {a.seed}; {model}\n")
    print(f"| test images | n | nearest by features is its original | features ≥ {DEFAULT}: found | features: "
          f"min / 5th pct / median | thumbnails ≥ {PIXELS}: found | either: found |")
    print("|---|---|---|---|---|---|---|")
    for kind, v in sorted(by_kind.items(), key=lambda kv: [*KINDS, "distinct"].index(kv[0])):
        f, px = np.array([r[0] for r in v]), np.array([r[1] for r in v])
        right = "" if kind == "distinct" else f"{np.mean([r[2] for r in v]):.1%}"
        print(f"| {kind} | {len(v)} | {right} | {(f >= DEFAULT).mean():.1%} | {f.min():.3f} / "
              f"{np.percentile(f, 5):.3f} / {np.median(f):.3f} | {(px >= PIXELS).mean():.1%} | "
              f"{((f >= DEFAULT) | (px >= PIXELS)).mean():.1%} |")
    copies = [r for k, v in by_kind.items() if k != "distinct" for r in v]
    distinct = by_kind.get("distinct", [])
    print(f"\n| features threshold | copies found (either rule) | distinct images flagged (of {len(distinct)}) |")
    print("|---|---|---|")
    for t in THRESHOLDS:
        found = np.mean([r[0] >= t or r[1] >= PIXELS for r in copies])
        flagged = sum(r[0] >= t or r[1] >= PIXELS for r in distinct)
        print(f"| {t:.2f} | {found:.1%} | {flagged} |")


if __name__ == "__main__":
    main()
