"""A file written by `bottleneck export`, run as predict runs a model: `bottleneck predict FILE.onnx IMAGES`.

An ONNX file is run by onnxruntime (the `export` extra); it holds operators and arrays, no code.
A TorchScript file holds a program in TorchScript, so, like a pickle, it is run only with
`trust`. Either gives its metadata (classes, preprocessing) from inside the file, so a file
checked here is the file that is shipped, without the JSON beside it.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from bottleneck.errors import BottleneckError
from bottleneck.trained import EXPORT_FORMAT

EXTRA_FILE = "bottleneck.json"  # as export writes it
ONNX_HINT = "install onnxruntime with: pip install 'bottleneck[export]'"


def is_exported(path: str | os.PathLike) -> bool:
    """An ONNX file (by its name), or a TorchScript archive holding export's metadata."""
    if str(path).endswith(".onnx"):
        return True
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith(f"/extra/{EXTRA_FILE}") for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class Exported:
    """An exported file with the interface predict uses: classes, preprocessing, predict_batch."""

    def __init__(self, path: str, meta: dict, run):
        self.path, self.meta, self._run = path, meta, run
        self.classes, self.preprocessing = meta["classes"], meta["preprocessing"]

    def predict_batch(self, images_u8: torch.Tensor, dev: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, chosen column) for a uint8 NCHW batch."""
        probs, label = self._run(images_u8.contiguous())
        return np.asarray(probs, dtype=np.float64), np.asarray(label)


def load(path: str | os.PathLike, trust: bool = False, device: str = "cpu") -> Exported:
    """An exported ONNX or TorchScript file, ready to label images."""
    path = os.fspath(path)
    if not Path(path).is_file():
        raise BottleneckError(f"exported file {path} does not exist")
    if str(path).endswith(".onnx"):
        return _load_onnx(path, device)
    if trust is not True:
        raise BottleneckError(f"{path} is a TorchScript file: it holds a program, which runs when it is loaded; "
                              "pass --trust (trust=True) if you trust whoever wrote it, or run its ONNX export")
    try:
        extra = {EXTRA_FILE: ""}
        with warnings.catch_warnings():  # torch's notice that TorchScript is deprecated
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(path, map_location="cpu", _extra_files=extra)
        meta = json.loads(extra[EXTRA_FILE])
    except Exception as e:
        raise BottleneckError(f"{path} is not a readable TorchScript file of 'bottleneck export' "
                              f"({type(e).__name__})") from None

    def run(images):
        with torch.no_grad():
            probs, label = module(images)
        return probs.numpy(), label.numpy()

    return Exported(path, _checked(meta, path), run)


def _load_onnx(path: str, device: str) -> Exported:
    try:
        import onnxruntime
    except ImportError:
        raise BottleneckError(f"running {path} needs onnxruntime; {ONNX_HINT}") from None
    providers = ["CPUExecutionProvider"]
    if device != "cpu" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = onnxruntime.InferenceSession(path, providers=providers)
        meta = json.loads(session.get_modelmeta().custom_metadata_map["bottleneck"])
    except Exception as e:
        raise BottleneckError(f"{path} is not a readable ONNX file of 'bottleneck export' "
                              f"({type(e).__name__})") from None

    def run(images):
        return session.run(["probabilities", "label"], {"images": images.numpy()})

    return Exported(path, _checked(meta, path), run)


def _checked(meta, path: str) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT or not isinstance(meta.get("classes"), list):
        raise BottleneckError(f"{path} was not written by 'bottleneck export'")
    return meta
