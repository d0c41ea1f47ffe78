"""Extraction throughput: `bottleneck extract` against a naive loop and the model-only ceiling.

    python benchmarks/extract_throughput.py [--models resnet50,efficientnet_lite0] [--sizes 128,384] [--repeats 3]
                                            [--device cpu|cuda]

Same images (elpv), same model, same run. Each figure is images/s in steady state: the
difference in time between two dataset sizes, so start-up (imports, model build, worker
start) cancels out. Medians of --repeats runs. Prints a markdown table.

- naive: the tutorial way, fp32, default memory format, torchvision ImageFolder + a plain
  DataLoader, each batch moved to the device, features gathered in a Python list and saved
  at the end.
- ceiling: the same network at the best precision the device offers (bf16 + channels-last
  where supported) on tensors already in the device's memory: no decoding, no I/O, no copy.
- bottleneck: `bottleneck.extract(...)` with its defaults, writing the HDF5 cache.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bottleneck import backbones, networks
from bottleneck.data import write_elpv
from bottleneck.errors import BottleneckError
from bottleneck.extract import extract
from bottleneck.runtime import device_name, resolve_device, resolve_precision


def subset(data: Path, n: int, into: Path) -> Path:
    """The first n train images of elpv as a one-split class-folder tree (links)."""
    files = sorted((data / "train").rglob("*.png"))[:n]
    for f in files:
        target = into / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.realpath(f), target)
    return into


def naive(model: str, folder: Path, device: torch.device, batch_size: int = 32) -> float:
    from torchvision import datasets, transforms

    prep = backbones.preprocessing(model)
    tf = transforms.Compose([transforms.Resize(prep["resize"]), transforms.CenterCrop(prep["size"]),
                             transforms.ToTensor(), transforms.Normalize(prep["mean"], prep["std"])])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), tf), batch_size=batch_size)
    net = networks.FeatureExtractor(networks.build_model(model, "none"), model, None).to(device)
    started = time.perf_counter()
    feats = []
    with torch.no_grad():
        for x, _ in loader:
            feats.append(net(x.to(device))[backbones.get_spec(model).default_tap].cpu().numpy())
    np.save(folder.parent / "naive.npy", np.concatenate(feats))
    return time.perf_counter() - started


def ceiling(model: str, n: int, device: torch.device, batch_size: int = 64) -> float:
    prep = backbones.preprocessing(model)
    precision = resolve_precision("auto", device)
    net = networks.FeatureExtractor(networks.build_model(model, "none"), model, None)
    net = net.to(device, memory_format=torch.channels_last)
    images = torch.randint(0, 255, (batch_size, 3, prep["size"], prep["size"]), dtype=torch.uint8, device=device)
    for shape in {batch_size, n % batch_size or batch_size}:  # warm-up: build kernels for both batch shapes
        networks.run_batch(net, images[:shape], prep, device, precision)
    synchronize(device)
    started = time.perf_counter()
    for start in range(0, n, batch_size):
        networks.run_batch(net, images[: min(batch_size, n - start)], prep, device, precision)
    synchronize(device)  # GPU work is queued: the clock stops when it is done, not when it is queued
    return time.perf_counter() - started


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(model: str, folder: Path, out: Path, device: torch.device) -> float:
    started = time.perf_counter()
    extract(model, str(folder), weights="none", out=str(out), device=str(device), force=True, progress=False)
    return time.perf_counter() - started


def steady_rate(seconds_small: list[float], seconds_large: list[float], n_small: int, n_large: int) -> float:
    return (n_large - n_small) / (statistics.median(seconds_large) - statistics.median(seconds_small))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,efficientnet_lite0")
    parser.add_argument("--sizes", default="128,384")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", default="data/elpv")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (as extract's --device)")
    args = parser.parse_args()
    try:
        device = resolve_device(args.device)
    except BottleneckError as e:
        parser.error(str(e))
    if not os.path.isdir(args.data):
        write_elpv(args.data)
    n_small, n_large = (int(s) for s in args.sizes.split(","))
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    folders = {n: subset(Path(args.data), n, work / f"n{n}") for n in (n_small, n_large)}
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, device "
          f"{device_name(device)}, precision {resolve_precision('auto', device)}; sizes {n_small} and {n_large} "
          f"images, median of {args.repeats}\n")
    print("| model | naive img/s | bottleneck img/s | model-only ceiling img/s | bottleneck / ceiling "
          "| bottleneck / naive |\n|---|---|---|---|---|---|")
    for model in args.models.split(","):
        runs = {"naive": lambda n, m=model: naive(m, folders[n], device),
                "ours": lambda n, m=model: ours(m, folders[n], work / "cache", device),
                "ceiling": lambda n, m=model: ceiling(m, n, device)}
        rates = {}
        for name, run in runs.items():
            times = {n: [run(n) for _ in range(args.repeats)] for n in (n_small, n_large)}
            rates[name] = steady_rate(times[n_small], times[n_large], n_small, n_large)
        print(f"| {model} | {rates['naive']:.1f} | {rates['ours']:.1f} | {rates['ceiling']:.1f} | "
              f"{rates['ours'] / rates['ceiling']:.2f} | {rates['ours'] / rates['naive']:.2f} |", flush=True)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
