"""Every CUDA-specific path of bottleneck in one command, with one Markdown table to keep.

    python benchmarks/gpu_check.py --out gpu_check.md             # on a CUDA machine: under 8 minutes on one GPU
    python benchmarks/gpu_check.py --dry-run --out gpu_check.md   # anywhere: every step, tiny, on the CPU

Steps, each timed and reported as ok, failed (with the error) or skipped (with the reason), so
one broken path never hides the others:

1. model-only ceiling: EfficientNet-Lite0 on tensors already on the device, at `--precision
   auto` and channels-last, with torch.compile off and on;
2. extraction (`bottleneck.extract`) of synthetic JPEGs with PIL decoding in the workers, and
   with `--decode gpu` (nvjpeg; the CPU fallback in a dry run), against that ceiling;
3. one fine-tuning epoch with AMP (`--precision auto`), its images/s and peak memory;
4. the same epoch under `torchrun` with one process per GPU over NCCL (gloo in a dry run);
5. the linear probe (`fit --clf linear`) on the extracted cache, on the device, where that
   classifier exists.

Weights are random (`--weights none`): speed does not depend on them, and nothing needs to be
downloaded or carried to the GPU machine but this repository (docs/benchmarks.md, "GPU check").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MODEL = "efficientnet_lite0"


def make_jpegs(root: Path, n: int, classes: int = 2, seed: int = 0) -> Path:
    """n smooth random 320 × 240 JPEGs in train/val/test class folders (70/10/20)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        split = "train" if i % 10 < 7 else "val" if i % 10 < 8 else "test"
        folder = root / split / f"class{i // 10 % classes}"  # every split gets every class
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((320, 240), Image.BICUBIC).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceiling(device: torch.device, n: int, batch: int, compiled: bool, dry: bool) -> dict:
    from bottleneck import backbones, networks
    from bottleneck.runtime import resolve_precision

    prep = backbones.preprocessing(MODEL)
    precision = resolve_precision("auto", device)
    net = networks.FeatureExtractor(networks.build_model(MODEL, "none"), MODEL, None)
    net = net.to(device, memory_format=torch.channels_last).eval()
    if compiled:  # a dry run only checks that the graph is captured: inductor's C++ build is the GPU's business
        net = torch.compile(net, backend="aot_eager" if dry else "inductor")
    images = torch.randint(0, 255, (batch, 3, prep["size"], prep["size"]), dtype=torch.uint8, device=device)
    started = time.perf_counter()
    networks.run_batch(net, images, prep, device, precision)  # warm-up, and compilation
    synchronize(device)
    warm = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(max(1, n // batch)):
        networks.run_batch(net, images, prep, device, precision)
    synchronize(device)
    rate = max(1, n // batch) * batch / (time.perf_counter() - started)
    return {"figure": f"{rate:.0f} img/s", "note": f"{precision}, first batch {warm:.1f} s", "rate": rate}


def extraction(data: Path, out: Path, device: torch.device, decode: str, batch: int, workers: int) -> dict:
    from bottleneck.extract import extract
    from bottleneck.store import FeatureStore

    started = time.perf_counter()
    path = extract(MODEL, str(data), weights="none", out=str(out / decode), device=str(device), decode=decode,
                   layer=["pool"], batch_size=batch, workers=workers, progress=False)
    seconds = time.perf_counter() - started
    with FeatureStore(path) as st:
        n = sum(len(st.labels(s)) for s in st.splits)
        by = st.attrs.get("decoded_by", "PIL in the workers")
    return {"figure": f"{n / seconds:.0f} img/s", "note": f"{n} images, decoded by {by}, {seconds:.1f} s with start-up",
            "cache": str(path)}


def finetune_args(data: Path, out: Path, device: torch.device, batch: int, workers: int) -> list[str]:
    return ["finetune", "--model", MODEL, "--data", str(data), "--weights", "none", "--epochs", "1",
            "--head-epochs", "0", "--batch-size", str(batch), "--workers", str(workers), "--device",
            "auto" if device.type == "cuda" else "cpu", "--out", str(out), "--no-progress"]


def finetune_epoch(data: Path, out: Path, device: torch.device, batch: int, workers: int, ranks: int = 0) -> dict:
    """One epoch in a process of its own: plain, or under torchrun with `ranks` processes."""
    args = finetune_args(data, out, device, batch, workers)
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "bottleneck", *args] if ranks else [sys.executable, "-m", "bottleneck", *args])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        said = [line for line in done.stderr.splitlines() if "rror" in line] or [f"exit {done.returncode}"]
        raise RuntimeError(said[-1].strip())
    cost = json.loads((out / "report.json").read_text())["cost"]
    return {"figure": f"{cost['images_per_second']} img/s",
            "note": f"{cost['precision']}, {cost['processes']} process(es), peak {cost['peak_memory_mb']} MB, "
                    f"{cost['device']}"}


def linear_probe(cache: str, out: Path) -> dict:
    from bottleneck.classifiers import TABLE
    from bottleneck.classify import fit

    if "linear" not in TABLE:
        return {"status": "skipped", "note": "this version has no 'linear' classifier"}
    started = time.perf_counter()
    report = json.loads(fit(cache, clf="linear", layer="pool", out=str(out)).read_text())
    return {"figure": f"{time.perf_counter() - started:.1f} s",
            "note": f"test accuracy {report['accuracy']:.3f} (random weights: a path check, not a score)"}


def run_step(rows: list[dict], name: str, step) -> dict:
    started = time.perf_counter()
    try:
        row = {"status": "ok"} | step()
    except Exception as e:  # one broken path must not hide the others
        traceback.print_exc()
        row = {"status": "failed", "note": f"{type(e).__name__}: {str(e)[:200]}"}
    row |= {"step": name, "seconds": time.perf_counter() - started}
    rows.append(row)
    print(f"{name}: {row['status']} {row.get('figure', '')} {row.get('note', '')}", file=sys.stderr, flush=True)
    return row


def table(rows: list[dict], device: torch.device, dry: bool) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    head = [f"GPU check on {name}, {os.cpu_count()} cores, torch {torch.__version__}, CUDA {torch.version.cuda}"
            + (" (dry run: every step tiny, on the CPU)" if dry else ""), "",
            "| step | status | figure | note | s |", "|---|---|---|---|---|"]
    return "\n".join(head + [f"| {r['step']} | {r['status']} | {r.get('figure', '')} | {r.get('note', '')} | "
                             f"{r['seconds']:.0f} |" for r in rows]) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("gpu_check.md"), help="Markdown table to write.")
    ap.add_argument("--dry-run", action="store_true", help="Every step, tiny, on the CPU (what CI runs).")
    ap.add_argument("--images", type=int, default=2000, help="Synthetic JPEGs to extract and fine-tune on.")
    ap.add_argument("--work", type=Path, help="Scratch folder [default: a temporary one].")
    a = ap.parse_args()
    dry = a.dry_run or not torch.cuda.is_available()
    if not a.dry_run and dry:
        print("no CUDA device: running the dry run", file=sys.stderr)
    device = torch.device("cpu" if dry else "cuda")
    n, batch, workers = (24, 8, 0) if dry else (a.images, 128, min(8, os.cpu_count() or 1))
    gpus = 2 if dry else torch.cuda.device_count()  # two gloo processes stand in for NCCL's in a dry run
    with tempfile.TemporaryDirectory() as tmp:
        work = a.work or Path(tmp)
        data = make_jpegs(work / "data", n)
        rows: list[dict] = []
        for compiled in (False, True):
            run_step(rows, f"model-only ceiling, torch.compile {'on' if compiled else 'off'}",
                     lambda c=compiled: ceiling(device, 4 * n if dry else 20 * batch, batch, c, dry))
        cached = {}
        for decode in ("cpu", "gpu"):
            row = run_step(rows, f"extract, --decode {decode}",
                           lambda d=decode: extraction(data, work / "cache", device, d, batch, workers))
            cached.setdefault("path", row.get("cache"))
        run_step(rows, "fine-tune, 1 epoch, AMP", lambda: finetune_epoch(data, work / "ft", device, batch, workers))
        run_step(rows, f"fine-tune under torchrun, {gpus} processes ({'gloo' if dry else 'NCCL'})",
                 lambda: finetune_epoch(data, work / "ddp", device, batch, workers, ranks=gpus))
        run_step(rows, "linear probe on the cache",
                 lambda: linear_probe(cached["path"], work / "fit") if cached.get("path") else
                 {"status": "skipped", "note": "no cache: extraction failed"})
    text = table(rows, device, dry)
    a.out.write_text(text)
    print(text)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
