"""Latency of an exported ONNX file against `bottleneck predict` on the same images, same machine.

    python benchmarks/export_latency.py MODEL IMAGE_DIR [--limit 200] [--repeats 3] [--threads N]

MODEL is a model.skops of fit or a model.pt of finetune; it is exported to ONNX once (the export's
time is reported too). Then, on the first --limit files under IMAGE_DIR (sorted), each timed
--repeats times and the median kept:

- `predict MODEL`: bottleneck.predict on the model, in this process (decoding, batches of 32, CPU);
- `predict FILE.onnx`: the same call on the exported file (the same decoding, onnxruntime);
- one image at a time, the model alone (decoded images already in memory): the model's torch path
  (Trained.predict_batch) against the ONNX session, median milliseconds per image;
- a fresh process labelling one image, as a user or a cron job waits for it: `python -m bottleneck
  predict MODEL IMAGE` against docs/deploy.md's plain-Python recipe (Pillow, numpy, onnxruntime).

Prints a markdown table for docs/benchmarks.md and writes it to --out/export_latency.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bottleneck import data, exported, trained
from bottleneck.export import export
from bottleneck.predict import image_files, predict

RECIPE = Path(__file__).resolve().parents[1] / "docs" / "deploy.md"


def timed(func, repeats: int) -> float:
    """The median wall seconds of `func()` over `repeats` calls, after one untimed call (lazy loading, caches)."""
    func()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def recipe_script(folder: Path) -> Path:
    """docs/deploy.md's classify.py, as a user would copy it, beside the exported file."""
    text = RECIPE.read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    path = folder / "classify.py"
    path.write_text(code)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("images")
    parser.add_argument("--limit", type=int, default=200, help="images used, the first under IMAGE_DIR")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]")
    parser.add_argument("--out", default="runs/bench-export")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = image_files([args.images])[:args.limit]

    started = time.perf_counter()
    onnx = export(args.model, out=str(out / "model.onnx"), force=True)
    export_seconds = time.perf_counter() - started

    whole_model = timed(lambda: predict(args.model, files, device="cpu", progress=False), args.repeats)
    whole_onnx = timed(lambda: predict(str(onnx), files, device="cpu", progress=False), args.repeats)

    t, e = trained.load(args.model), exported.load(onnx)
    t.net = t.network().to(memory_format=torch.channels_last)  # as predict runs it
    images = [data.resize_crop(data.load_image(f), t.preprocessing)[None] for f in files]
    cpu = torch.device("cpu")
    per_model = timed(lambda: [t.predict_batch(x, cpu) for x in images], args.repeats) / len(images)
    per_onnx = timed(lambda: [e.predict_batch(x, cpu) for x in images], args.repeats) / len(images)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        script = recipe_script(folder)
        for name in ("model.onnx", "model.onnx.json"):
            os.symlink((out / name).resolve(), folder / name)
        one = os.path.abspath(files[0])
        cold_model = timed(lambda: subprocess.run([sys.executable, "-m", "bottleneck", "predict", args.model, one,
                                                   "--device", "cpu", "--no-progress"], check=True,
                                                  capture_output=True), args.repeats)
        cold_onnx = timed(lambda: subprocess.run([sys.executable, str(script), one], cwd=folder, check=True,
                                                 capture_output=True), args.repeats)

    n = len(files)
    lines = [f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads); model {args.model} ({t.kind}, {t.model}); {n} images of "
             f"{args.images}; median of {args.repeats}; export took {export_seconds:.1f} s", "",
             "| what | bottleneck predict on the model | the exported ONNX file | ratio |", "|---|---|---|---|",
             f"| {n} images, decoding included (s) | {whole_model:.2f} | {whole_onnx:.2f} | "
             f"{whole_model / whole_onnx:.2f} |",
             f"| one image at a time, model only (ms per image) | {per_model * 1e3:.1f} | {per_onnx * 1e3:.1f} | "
             f"{per_model / per_onnx:.2f} |",
             f"| a fresh process labelling one image (s) | {cold_model:.2f} (python -m bottleneck predict) | "
             f"{cold_onnx:.2f} (docs/deploy.md's recipe) | {cold_model / cold_onnx:.2f} |"]
    table = "\n".join(lines) + "\n"
    print(table)
    (out / "export_latency.md").write_text(table)


if __name__ == "__main__":
    main()
