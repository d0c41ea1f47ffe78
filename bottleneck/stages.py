"""The stages, each declared once: the command line, the package's functions, `run`, `status` and
the Slurm plan are all made from `STAGES`.

A stage is a module with one public entry function over a settings dataclass (`settings.takes`)
and its row here. Its module is imported only when the stage runs, so reading this list (as
every `--help` does) loads no torch or scikit-learn.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bottleneck import settings


def cache_made(files: tuple[Path, ...]) -> str:
    """An extraction's record of the cache it wrote."""
    made = files[0].read_text().strip() if files[0].is_file() else ""
    return f"done: {made}" if made else "missing"


def reports_made(files: tuple[Path, ...]) -> str:
    """Fits: how many of their report.json files exist."""
    n = sum(p.is_file() for p in files)
    return f"{'done: ' if n == len(files) else ''}{n}/{len(files)} reports"


def run_made(files: tuple[Path, ...]) -> str:
    """A fine-tune: finished (its report.json), interrupted (its checkpoint beside it) or not started."""
    report = files[0]
    return ("done: report.json" if report.is_file() else
            "checkpoint" if (report.parent / "checkpoint.pt").is_file() else "missing")


def comparison_made(files: tuple[Path, ...]) -> str:
    return f"done: {files[0].name}" if files[0].is_file() else "missing"


def fit_needs_gpu(call) -> bool:
    """A fit asks for a GPU when its classifier trains on one (`linear`); the others use the CPU cores alone."""
    return call.clf in settings.GPU_CLASSIFIERS


@dataclass(frozen=True)
class Stage:
    """One stage: `bottleneck COMMAND` runs bottleneck.MODULE.FUNCTION over SETTINGS."""

    command: str  # the command, and the package's name for the function
    settings: type | None  # its settings dataclass; None: compare, whose options are its own
    module: str
    function: str
    help: str  # the command's --help
    output: Callable[[tuple[Path, ...]], str]  # `status`'s word on what a step of it left on disk
    needs_gpu: bool | Callable[[object], bool] = False  # its Slurm jobs ask for --gres: always, or when a call's
    # settings say so (one call that does is enough for the step's job)
    requeues: bool = False  # exits 75 after saving a checkpoint: its Slurm job requeues itself and resumes
    shards: bool = False  # --shard I/N: a Slurm job array, then a job merging the shards
    after_failures: bool = False  # its Slurm job runs when jobs before it failed too (it shows what finished)

    def asks_gpu(self, calls: tuple) -> bool:
        """Whether the job running these calls of the stage asks for a GPU."""
        return any(map(self.needs_gpu, calls)) if callable(self.needs_gpu) else self.needs_gpu

    def entry(self) -> Callable:
        """The stage's function (this imports its module)."""
        return getattr(importlib.import_module(f"bottleneck.{self.module}"), self.function)


STAGES = (
    Stage("extract", settings.ExtractSettings, "extract", "extract",
          "Extract features of a folder of labelled images into an HDF5 cache; prints its path last.",
          cache_made, needs_gpu=True, shards=True),
    Stage("fit", settings.FitSettings, "classify", "fit",
          "Train a classifier on cached features; writes model.skops, predictions.csv and report.json.\n\n"
          "Prints the report's path last.", reports_made, needs_gpu=fit_needs_gpu),
    Stage("finetune", settings.FinetuneSettings, "finetune", "finetune",
          "Fine-tune the network on the same data and splits; prints the report's path last.\n\n"
          "SIGTERM or SIGUSR1 save a checkpoint and exit with code 75; the same command resumes.",
          run_made, needs_gpu=True, requeues=True),
    Stage("compare", None, "compare", "compare",
          "Compare fixed-feature classifiers and fine-tuning on the same test images: accuracy with 95 % intervals, "
          "paired differences, cost and a three-way verdict (better, equivalent within --margin, or inconclusive "
          "with the difference the test images could detect); contenders are chosen on validation, never on the "
          "test images. Writes comparison.{md,csv,json,png} and report.html.", comparison_made,
          after_failures=True),
)
BY_COMMAND = {s.command: s for s in STAGES}
