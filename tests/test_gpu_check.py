"""benchmarks/gpu_check.py's dry run: every step of the GPU check, tiny, on the CPU, in CI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_the_dry_run_runs_every_step_and_writes_one_table(tmp_path):
    out = tmp_path / "gpu_check.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = out.read_text()
    assert "dry run" in table.splitlines()[0]
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1] for line in table.splitlines()[4:]}
    for step in ("model-only ceiling, torch.compile off", "model-only ceiling, torch.compile on",
                 "extract, --decode cpu", "extract, --decode gpu", "fine-tune, 1 epoch, AMP",
                 "fine-tune under torchrun, 2 processes (gloo)"):
        assert rows[step] == "ok", table
    assert rows["linear probe on the cache"] in ("ok", "skipped"), table
    assert "decoded by torchvision.io" in table  # the GPU decoder's CPU fallback ran
