"""The machine a stage runs on: device, precision, workers, determinism, versions, memory.

Every stage that computes with torch asks here, so the same names mean the same thing in
extract, finetune and predict.
"""

from __future__ import annotations

import ctypes
import os
import platform

import numpy as np
import torch

from bottleneck.errors import BottleneckError
from bottleneck.settings import PRECISIONS


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BottleneckError(f"--device {device} was asked for but no CUDA GPU is visible here; "
                              "use --device cpu or --device auto")
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise BottleneckError(f"unknown --device '{device}'; choose auto, cpu or cuda[:N]")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bf16 where the hardware computes it natively, else fp16 on GPUs, else fp32."""
    if precision not in PRECISIONS:  # callers other than the stages' settings: predict's loaders
        raise BottleneckError(f"unknown --precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def apply_precision(precision: str) -> None:
    """fp32 means fp32: no TF32 shortcuts in GPU convolutions and matrix products."""
    if precision == "fp32":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False


def default_workers() -> int:
    return max(1, min(8, usable_cpus() // 2))


def usable_cpus() -> int:
    """The CPUs this process may run on (a Slurm job's allocation, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 2


def workers(asked: int | None) -> int:
    """Decoding worker processes: the default, or as many as asked up to one per usable CPU (more only
    compete for the same cores, and torch warns about each DataLoader)."""
    if asked is None:
        return default_workers()
    if asked > usable_cpus():
        from bottleneck.console import note

        note(f"--workers {asked}: this process may use {usable_cpus()} CPUs; using {usable_cpus()} workers")
        return usable_cpus()
    return asked


def versions() -> dict:
    import h5py
    import torchvision

    from bottleneck import __version__

    found = {"bottleneck": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
             "torchvision": torchvision.__version__, "h5py": h5py.__version__, "numpy": np.__version__}
    try:
        import timm

        found["timm"] = timm.__version__
    except ImportError:
        pass
    return found


def release_freed_memory() -> None:
    """Give the heap pages that finished blocks freed back to the system (glibc only).

    A block's activations are freed when it is done, but glibc keeps the pages, and over a
    long run the kept pages had grown the process by half a gigabyte. Trimming after every
    block cost 8 % in speed (the next block faults the pages in again); every TRIM_SECONDS
    bounds the growth for a fraction of that."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL(None)  # the C library the interpreter already uses
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # glibc has it; macOS and musl have nothing to trim


_LIBC = _load_libc()
TRIM_SECONDS = 10.0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    return f"cpu: {model}, {os.cpu_count()} cores"


def make_deterministic() -> None:
    """Every switch for bit-identical reruns on one machine, not only torch's own. With torch's
    alone, one CPU run in about 300 came out different in the 7th digit; oneDNN's deterministic
    attribute (no atomics) and MKL's reproducible mode (fixed code path and thread count) are
    the documented remaining sources of run-to-run variation."""
    # MKL reads these at its first call, so they must be set before any arithmetic runs.
    os.environ.setdefault("MKL_CBWR", "AUTO")
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.mkldnn.deterministic = True


# --------------------------------------------------------------------------- distributed

def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def setup_distributed() -> tuple[int, int]:
    """(rank, world size); under torchrun this joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", 0)), world
