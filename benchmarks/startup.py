"""Start-up of the commands a user types first, against an empty Python, as a markdown table.

    python benchmarks/startup.py --runs 7
    PYTHONPATH=/tmp/before python benchmarks/startup.py   # another checkout of the package

Each command runs in a new process `--runs` times; the table gives the median wall time and its
excess over `python -c pass`. `status` reads a small run folder written here (one backbone,
nothing run), `cache ls` an empty folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXPERIMENT = '[data]\npath = "data/none"\n\n[[backbone]]\nmodel = "resnet18"\n'


def bottleneck_command() -> list[str]:
    """The installed entry point beside this interpreter, else the package run as a module."""
    script = Path(sys.executable).with_name("bottleneck")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "bottleneck"]


def commands(scratch: Path) -> dict[str, list[str]]:
    (scratch / "cache").mkdir()
    (scratch / "run").mkdir()
    (scratch / "run" / "experiment.toml").write_text(EXPERIMENT)
    cli = bottleneck_command()
    return {"python -c pass": [sys.executable, "-c", "pass"],
            "python -c \"import bottleneck\"": [sys.executable, "-c", "import bottleneck"],
            "bottleneck --help": cli + ["--help"],
            "bottleneck models --help": cli + ["models", "--help"],
            "bottleneck cache ls EMPTY": cli + ["cache", "ls", str(scratch / "cache")],
            "bottleneck status RUN": cli + ["status", str(scratch / "run")]}


def median_seconds(argv: list[str], runs: int, cwd: Path) -> float:
    """Run where no checkout lies: `python -c` puts the working folder first on sys.path."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return statistics.median(times)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="Runs per command; the median is reported.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        timings = {name: median_seconds(argv, args.runs, Path(tmp)) for name, argv in commands(Path(tmp)).items()}
    base = timings["python -c pass"]
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; median of {args.runs} runs; "
          f"package from {os.environ.get('PYTHONPATH') or 'the installed one'}\n")
    print("| command | median s | over `python -c pass` s |\n|---|---|---|")
    for name, seconds in timings.items():
        print(f"| `{name}` | {seconds:.2f} | {seconds - base:+.2f} |")


if __name__ == "__main__":
    main()
