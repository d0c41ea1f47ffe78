"""Cache I/O: float32 against float16 storage: file size, read throughput into numpy, accuracy.

    python benchmarks/cache_io.py [--taps blocks.4,pool] [--repeats 5]

Extracts elpv EfficientNet-Lite0 features twice (float32 and float16 storage, the same
bf16-computed values), times reading every split's features into numpy (median of
--repeats, the file in the page cache: the figure bounds what fit waits for) and fits
logistic regression on each. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from bottleneck.classify import fit
from bottleneck.data import write_elpv
from bottleneck.extract import extract
from bottleneck.store import FeatureStore


def read_all(path) -> tuple[float, int]:
    started = time.perf_counter()
    nbytes = 0
    with FeatureStore(path) as st:
        for split in st.splits:
            for tap in st.taps:
                nbytes += st.features(split, tap).nbytes
    return time.perf_counter() - started, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--taps", default="blocks.4,pool")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", default="data/elpv")
    parser.add_argument("--out", default="runs/bench-io")
    args = parser.parse_args()
    if not os.path.isdir(args.data):
        write_elpv(args.data)
    taps = args.taps.split(",")
    print("| storage | file MB | read MB/s (in memory) | read s | " +
          " | ".join(f"logreg test accuracy, {t}" for t in taps) + " |")
    print("|---|---|---|---|" + "---|" * len(taps))
    for dtype in ("float32", "float16"):
        path = extract("efficientnet_lite0", args.data, layer=taps, dtype=dtype, progress=False)
        times = [read_all(path) for _ in range(args.repeats)]
        seconds, nbytes = statistics.median(t for t, _ in times), times[0][1]
        accuracy = [json.loads(fit(str(path), layer=tap, out=f"{args.out}/{dtype}").read_text())["accuracy"]
                    for tap in taps]
        print(f"| {dtype} | {os.path.getsize(path) / 1e6:.1f} | {nbytes / 1e6 / seconds:.0f} | {seconds:.3f} | " +
              " | ".join(f"{a:.3f}" for a in accuracy) + " |", flush=True)


if __name__ == "__main__":
    main()
