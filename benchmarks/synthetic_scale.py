"""A synthetic cache at ImageNet size, written as extraction writes one, then verified and fitted.

    python benchmarks/synthetic_scale.py [--rows 1280000] [--classes 1000] [--dim 1280] [--shards 4]
                                         [--test-rows N] [--memory-budget 2048] [--classifiers linear]
                                         [--logreg-up-to 100000] [--out runs/bench-synthetic]

Writes `--rows` training rows (and `--test-rows` test rows, by default a tenth, at most 50,000 and
at least one per class) of `--dim` float16 features in `--classes` classes: each row is its class's
centre times `--signal` plus unit Gaussian noise, drawn block by block from fixed seeds, so the
same options give the same cache. The rows go through the store's own writer
(`store.write_cache`) as `--shards` shard caches, as `extract --shard I/N` leaves them, which
`store.merge` (what `bottleneck cache merge` runs) joins into one cache; `store.verify` then
checks every checksum. benchmarks/linear_probe.py fits and compares the classifiers on it, each
in a process of its own (logreg only up to --logreg-up-to rows: it needs the whole matrix in
memory). Prints and writes to --out/synthetic-ROWS.md the seconds of each step, the peak RSS of
writing and merging, and linear_probe.py's table.

Run it at growing sizes (--rows 10000, 100000, 1280000) to see how the cost grows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bottleneck import store

BLOCK_ROWS = 8192


def cache_attrs(args: argparse.Namespace, shard: int) -> dict:
    """What extraction records in a cache, for features nobody extracted; one fingerprint for every shard."""
    recipe = {k: getattr(args, k) for k in ("rows", "test_rows", "classes", "dim", "signal", "seed")}
    fingerprint = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    return {"model": "synthetic", "weights": "synthetic", "weights_arg": "none", "taps": ["pool"],
            "dims": {"pool": args.dim}, "pool": "avg", "preprocessing": {"image_size": 224, "synthetic": recipe},
            "precision": "fp32", "dtype": "float16", "classes": [f"c{c:04d}" for c in range(args.classes)],
            "split_info": {"source": "benchmarks/synthetic_scale.py"}, "dataset_fingerprint": fingerprint,
            "data_root": str(Path(args.out).resolve()), "versions": {}, "fingerprint": fingerprint,
            "shard": f"{shard}/{args.shards}", "block_rows": BLOCK_ROWS, "cost": {"images": 0, "wall_seconds": 0.0}}


def blocks(args: argparse.Namespace, split: str, start: int, stop: int, centres: np.ndarray) -> Iterator[dict]:
    """Rows start..stop of a split, in blocks the store writes one at a time (memory stays flat)."""
    for a in range(start, stop, BLOCK_ROWS):
        b = min(a + BLOCK_ROWS, stop)
        index = np.arange(a, b)
        labels = index % args.classes  # every class in every split once a split has as many rows
        rng = np.random.default_rng([args.seed, split == "test", a])
        x = centres[labels] * args.signal + rng.standard_normal((b - a, args.dim), dtype=np.float32)
        yield {"features": {"pool": x.astype(np.float16)}, "labels": labels,
               "paths": [f"{split}/c{c:04d}/{i:08d}.png" for c, i in zip(labels, index)],
               "skipped_paths": [], "skipped_reasons": []}


def write_shards(args: argparse.Namespace, folder: Path) -> list[Path]:
    centres = np.random.default_rng(args.seed).standard_normal((args.classes, args.dim), dtype=np.float32)
    sizes = {"train": args.rows, "test": args.test_rows}
    paths = []
    for i in range(args.shards):
        path = folder / f"synthetic-{args.rows}.shard-{i}-of-{args.shards}.h5"
        # Shards split whole blocks, as extraction's do; the last may be shorter.
        span = {s: (_edge(n, i, args.shards), _edge(n, i + 1, args.shards)) for s, n in sizes.items()}
        splits = {s: blocks(args, s, a, b, centres) for s, (a, b) in span.items()}
        store.write_cache(path, cache_attrs(args, i), splits, dtype="float16",
                          rows={s: b - a for s, (a, b) in span.items()})
        paths.append(path)
    return paths


def _edge(n: int, i: int, shards: int) -> int:
    """Where shard i begins: whole blocks of BLOCK_ROWS rows dealt out as extraction deals them."""
    n_blocks = -(-n // BLOCK_ROWS)
    return min(n, i * n_blocks // shards * BLOCK_ROWS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_280_000)
    parser.add_argument("--test-rows", type=int)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--signal", type=float, default=0.1, help="class centres' scale against unit noise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--memory-budget", type=float, default=2048.0, help="fit --memory-budget, MB")
    parser.add_argument("--classifiers", default="linear")
    parser.add_argument("--logreg-up-to", type=int, default=100_000)
    parser.add_argument("--keep-shards", action="store_true")
    parser.add_argument("--out", default="runs/bench-synthetic")
    args = parser.parse_args()
    args.test_rows = args.test_rows or max(args.classes, min(50_000, args.rows // 10))
    if args.rows < args.classes:
        raise SystemExit(f"--rows must be at least --classes ({args.classes}): every class needs a training row")
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    steps = {}
    started = time.perf_counter()
    shards = write_shards(args, folder)
    steps["write shards"] = time.perf_counter() - started
    started = time.perf_counter()
    cache = store.merge([str(p) for p in shards], folder / f"synthetic-{args.rows}.h5")
    steps["merge"] = time.perf_counter() - started
    writer_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if not args.keep_shards:
        for p in shards:
            p.unlink()
    started = time.perf_counter()
    problems = store.verify(cache)
    steps["verify"] = time.perf_counter() - started
    if problems:
        raise SystemExit(f"{cache} failed verification: {problems}")
    size = cache.stat().st_size
    lines = [f"{args.rows:,} train + {args.test_rows:,} test rows × {args.dim} float16, {args.classes} classes, "
             f"{args.shards} shards: {size / 2**30:.2f} GB on disk ({args.rows * args.dim * 4 / 2**30:.2f} GB of "
             "training features as float32)", "",
             "| step | seconds |", "|---|---|", *[f"| {k} | {v:.1f} |" for k, v in steps.items()], "",
             f"peak RSS writing, merging: {writer_peak:.0f} MB", ""]
    print("\n".join(lines), flush=True)
    classifiers = [c for c in args.classifiers.split(",") if c != "logreg" or args.rows <= args.logreg_up_to]
    if classifiers:
        bench = Path(__file__).with_name("linear_probe.py")
        cmd = [sys.executable, str(bench), "--cache", str(cache), "--classifiers", ",".join(classifiers),
               "--memory-budget", str(args.memory_budget), "--out", str(folder / f"fit-{args.rows}")]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        print(done.stdout, flush=True)
        lines.append(done.stdout)
    (folder / f"synthetic-{args.rows}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
