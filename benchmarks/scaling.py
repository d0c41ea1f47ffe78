"""Extraction time and peak memory at 1k, 10k and 60k images (CIFAR-10 as PNG files).

    python benchmarks/scaling.py [--sizes 1000,10000,60000] [--repeats 3] [--model efficientnet_lite0]

Each run is `bottleneck extract` in a fresh process, as a user starts it, with a CSV manifest
of the first N images (5/6 of them from the training set, 1/6 from the test set). Time is
wall time of the whole command. Memory is the peak resident set of the extract process
(from the kernel, exact) and the peak proportional set size of it and its decoding workers
together (sampled every 0.2 s; shared library pages split between processes, not counted
twice). Medians of --repeats runs. The
cache of the largest size is kept (in --out) for benchmarks/fit_time.py. Prints a markdown
table and writes it to --out/scaling.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bottleneck.data import load_manifest, write_cifar10


def write_subset(data: Path, n: int, into: Path) -> Path:
    """A CSV manifest of the first n images: 5/6 train, 1/6 test, absolute paths (CIFAR-10 is
    written to `data` first if it is not there)."""
    if not data.is_dir():
        write_cifar10(data)
    into.mkdir(parents=True, exist_ok=True)
    m = load_manifest(data)
    n_test = n // 6
    rows = [(os.path.join(m.root, rel), m.classes[label], split)
            for split, k in (("train", n - n_test), ("test", n_test))
            for rel, label in sorted(m.splits[split], key=lambda s: Path(s[0]).name)[:k]]
    path = into / f"cifar10-{n}.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "split"), *rows])
    return path


def tree_pss(pid: int) -> int:
    """Proportional set size of a process and its descendants: shared pages (the torch
    libraries every worker maps) are split between the processes, not counted in each."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
        except (OSError, StopIteration):
            pass
    return total


def timed_extract(model: str, manifest: Path, out: Path) -> tuple[float, int, int]:
    """Wall seconds, peak RSS of the extract process, and peak PSS of it and its workers together."""
    cmd = [sys.executable, "-m", "bottleneck", "extract", "--model", model, "--data", str(manifest),
           "--out", str(out), "--force", "--no-progress"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0

    def sample() -> None:
        nonlocal peak
        while proc.returncode is None:
            peak = max(peak, tree_pss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"extract failed on {manifest}:\n{stderr}")
    return seconds, usage.ru_maxrss * 1024, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,60000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--data", default="data/cifar10", help="written with 'bottleneck data cifar10' if missing")
    parser.add_argument("--out", default="runs/bench-scaling")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    sizes = [int(s) for s in args.sizes.split(",")]
    lines = [f"machine: {platform.machine()}, {os.cpu_count()} cores; model {args.model}; "
             f"median of {args.repeats} runs", "",
             "| images | wall s | img/s overall | img/s since previous size | peak RSS of extract MB "
             "| peak PSS with workers MB | cache MB |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    previous = None
    for n in sizes:
        manifest = write_subset(data, n, out)
        cache_dir = out / f"cache-{n}"
        runs = [timed_extract(args.model, manifest, cache_dir) for _ in range(args.repeats)]
        seconds = statistics.median(r[0] for r in runs)
        rss_mb = statistics.median(r[1] for r in runs) / 2**20
        pss_mb = statistics.median(r[2] for r in runs) / 2**20
        cache_mb = sum(f.stat().st_size for f in cache_dir.glob("*.h5")) / 1e6
        marginal = f"{(n - previous[0]) / (seconds - previous[1]):.1f}" if previous else "–"
        line = (f"| {n} | {seconds:.1f} | {n / seconds:.1f} | {marginal} | {rss_mb:.0f} | {pss_mb:.0f} "
                f"| {cache_mb:.0f} |")
        print(line, flush=True)
        lines.append(line)
        previous = (n, seconds)
        if n != max(sizes):
            shutil.rmtree(cache_dir)
    (out / "scaling.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
