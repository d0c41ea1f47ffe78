"""What reduced precision changes: fp32 vs bf16 compute, float32 vs float16 storage.

    python benchmarks/precision.py [--images 6000] [--model efficientnet_lite0]

On the first N CIFAR-10 images (5/6 train, 1/6 test, as benchmarks/scaling.py), extract the
`pool` features three ways: fp32 compute, bf16 compute, and bf16 compute stored as float16.
Against the fp32 features: the relative L2 difference per image (median and largest), the
lowest cosine similarity; then logistic regression (its defaults) on each: test accuracy
and how many test predictions differ from fp32's. Prints a markdown table and writes it to
--out/precision.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np
from scaling import write_subset

from bottleneck import trained
from bottleneck.classify import fit
from bottleneck.extract import extract
from bottleneck.store import FeatureStore

WAYS = {"fp32 compute, float32 storage": ("fp32", "float32"),
        "bf16 compute, float32 storage": ("bf16", "float32"),
        "bf16 compute, float16 storage": ("bf16", "float16")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--data", default="data/cifar10")
    parser.add_argument("--out", default="runs/bench-precision")
    args = parser.parse_args()
    out = Path(args.out)
    manifest = write_subset(Path(args.data), args.images, out)
    results = {}
    for name, (precision, dtype) in WAYS.items():
        cache = extract(args.model, str(manifest), out=str(out / "cache"), precision=precision, dtype=dtype,
                        progress=False)
        report = fit(str(cache), out=str(out / "fit" / name.replace(" ", "-").replace(",", "")))
        with FeatureStore(cache) as st:
            feats = np.concatenate([st.features(s).astype(np.float64) for s in ("train", "test")])
            predicted = trained.load(report.parent / "model.skops").pipe.predict(st.features("test"))
        results[name] = {"features": feats, "predicted": predicted,
                         "accuracy": json.loads(report.read_text())["accuracy"]}
    base = results["fp32 compute, float32 storage"]
    lines = [f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.model} `pool`, "
             f"{args.images} CIFAR-10 images", "",
             "| features | median relative L2 difference | largest | lowest cosine "
             "| logreg test accuracy | test predictions unlike fp32's |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        diff = np.linalg.norm(r["features"] - base["features"], axis=1) / np.linalg.norm(base["features"], axis=1)
        cos = (r["features"] * base["features"]).sum(1) / (
            np.linalg.norm(r["features"], axis=1) * np.linalg.norm(base["features"], axis=1))
        lines.append(f"| {name} | {np.median(diff):.2e} | {diff.max():.2e} | {cos.min():.5f} | "
                     f"{r['accuracy']:.4f} | {int((r['predicted'] != base['predicted']).sum())} |")
    print("\n".join(lines))
    (out / "precision.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
