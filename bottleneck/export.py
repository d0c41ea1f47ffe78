"""Export a trained model as one file that turns images into class probabilities: `bottleneck export`.

Whichever stage trained the model, the file takes a batch of images already resized and cropped
to the model's input (uint8 pixels, NCHW, RGB) and returns `probabilities` (one column per class)
and `label` (the index of the class `bottleneck predict` would name). Everything between is
inside: the normalisation, for a classifier of `fit` the backbone cut at its taps, the pooling
and concatenation of the taps and the pipeline's steps folded into torch layers (`folded.py`),
for a network of `finetune` (its top trained on cached maps or not) the network itself; an
image's views averaged where the model was trained on views. What must happen before (resize,
crop, interpolation) and the class names travel in the file's metadata and in FILE.json beside
it, so that a user needs only onnxruntime, numpy and Pillow (docs/deploy.md).

ONNX goes through torch's TorchScript-based exporter (`dynamo=False`), whose trace of the
backbone stops where `FeatureExtractor` stops (see onnx_bytes for the newer exporter); TorchScript
is the same trace saved with its metadata as an extra file. Before a file is kept, it is run on
other images than the trace saw and must give what the torch modules give; files are written
under a temporary name and renamed.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bottleneck import __version__, trained
from bottleneck.console import note
from bottleneck.errors import BottleneckError
from bottleneck.folded import fold
from bottleneck.store import atomic_write
from bottleneck.views import views_of

FORMATS = {"onnx": ".onnx", "torchscript": ".ts"}
EXTRA_FILE = "bottleneck.json"  # a TorchScript file's metadata
INSTALL_HINT = "install it with: pip install 'bottleneck[export]' (onnx, onnxscript and onnxruntime)"
OPSET = 17
SAME_WITHIN = 1e-4  # the written file against the torch modules, on probabilities


class Pixels(nn.Module):
    """uint8 (or float 0-255) NCHW pixels → the network's normalised float input, as networks.normalise."""

    def __init__(self, prep: dict):
        super().__init__()
        self.register_buffer("mean", torch.tensor(prep["mean"]).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(prep["std"]).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std


class ClassifierOnImages(nn.Module):
    """A classifier of `fit` on images: the backbone cut at its taps, then the folded pipeline;
    several views' probabilities averaged and labelled by their argmax, as predict does."""

    def __init__(self, extractor: nn.Module, taps: list[str], head: nn.Module, prep: dict, views: str):
        super().__init__()
        self.pixels, self.extractor, self.head = Pixels(prep), extractor, head
        self.taps, self.views = list(taps), views

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = []
        for view in views_of(images, self.views):
            found = self.extractor(self.pixels(view))
            outs.append(self.head(torch.cat([found[t] for t in self.taps], dim=1)))
        if len(outs) == 1:  # the classifier's own label (an SVM's decision)
            return outs[0][0].float(), outs[0][1]
        probs = torch.stack([p for p, _ in outs]).mean(0)
        return probs.float(), probs.argmax(1)


class NetworkOnImages(nn.Module):
    """A network of `finetune`: softmax probabilities, averaged over its test-time views."""

    def __init__(self, net: nn.Module, prep: dict, views: str):
        super().__init__()
        self.pixels, self.net, self.views = Pixels(prep), net, views

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = [self.net(self.pixels(view)).float().softmax(1) for view in views_of(images, self.views)]
        mean = torch.stack(probs).mean(0)
        return mean, mean.argmax(1)


def on_images(t: trained.Trained) -> nn.Module:
    """The model as one torch module from uint8 images to (probabilities, label), in float32."""
    if t.views.startswith("crops:"):
        raise BottleneckError(f"{t.path} averages {t.views} views (random resized crops), which export cannot "
                              "put into a file; fit or fine-tune it on views none, hflip, flips or dihedral")
    if t.kind == "network":
        return NetworkOnImages(t.network().float(), t.preprocessing, t.views).eval()
    net, prep = t.network().float().eval(), t.preprocessing
    with torch.no_grad():  # a classifier fitted on other taps than these would fail deep inside the trace
        found = net(Pixels(prep)(torch.zeros(1, 3, prep["size"], prep["size"], dtype=torch.uint8)))
    t.check_width(sum(found[tap].shape[1] for tap in t.taps), f"{t.model} at {', '.join(t.taps)}")
    return ClassifierOnImages(net, t.taps, fold(t.pipe, t.path), prep, t.views).eval()


def metadata(t: trained.Trained, fmt: str) -> dict:
    """What a user of the file needs: its input, its outputs, the preprocessing before it, the classes."""
    prep = t.preprocessing
    size = prep["size"]
    return {
        "format": trained.EXPORT_FORMAT, "file_format": fmt, "kind": t.kind, "model": t.model,
        "clf": t.meta.get("clf", "finetune") if t.kind == "classifier" else "finetune",
        "taps": t.taps if t.kind == "classifier" else None, "classes": t.classes, "views": t.views,
        "input": {"name": "images", "layout": "NCHW", "dtype": "uint8", "channels": "RGB", "height": size,
                  "width": size, "values": "pixels 0-255; the file normalises them"},
        "outputs": {"probabilities": "float32, images x classes, columns in the order of 'classes'",
                    "label": "int64, per image the index in 'classes' of the predicted class"},
        "preprocessing": {"resize": prep.get("resize"), "crop": prep.get("crop", True), "size": size,
                          "interpolation": prep["interpolation"], "mean": prep["mean"], "std": prep["std"]},
        "trained_precision": t.precision, "source": os.path.basename(t.path), "bottleneck_version": __version__,
    }


def export(model: str, *, format: str = "onnx", out: str | None = None, force: bool = False,
           trust: bool = False) -> Path:
    """Write `model` (model.skops of fit, model.pt of finetune) as one ONNX or TorchScript file, with
    its metadata in FILE.json beside it; returns the file's path.

    `out`: the file [default: the model's path with .onnx or .ts]; an existing one is replaced only
    with `force`. `trust`: also read a classifier that is a pickle (see trained.py).
    """
    if format not in FORMATS:
        raise BottleneckError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    model = os.fspath(model)
    path = Path(out) if out else Path(model).with_suffix(FORMATS[format])
    beside = path.with_name(path.name + ".json")
    if path.resolve() == Path(model).resolve():
        raise BottleneckError(f"--out {path} is the model itself; choose another file")
    if not force:
        for p in (path, beside):
            if p.exists():
                raise BottleneckError(f"{p} exists; pass --force (force=True) to replace it, or choose --out")
    if format == "onnx":
        _need_onnx()
    t = trained.load(model, trust)
    module = on_images(t)
    if t.precision in ("bf16", "fp16"):
        note(f"{model} computes in {t.precision}; the file computes in fp32, so its probabilities differ from "
             f"'bottleneck predict' by {t.precision}'s rounding (a few hundredths, docs/deploy.md)")
    meta = metadata(t, format)
    size = t.preprocessing["size"]
    example = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            data = (onnx_bytes if format == "onnx" else torchscript_bytes)(module, example, meta)
    except Exception as e:  # an operator the format lacks (timm's ViTs resize their position embeddings
        # antialiased away from their own input size), or a network whose forward cannot be traced
        other = "torchscript" if format == "onnx" else "onnx"
        raise BottleneckError(f"torch cannot write {t.model} as {format} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}); try --format {other}, or "
                              "another backbone") from None
    check_file(data, format, module, size, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    atomic_write(beside, (json.dumps(meta, indent=1) + "\n").encode())
    return path


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise BottleneckError(f"ONNX export needs the onnx package; {INSTALL_HINT}") from None


def onnx_bytes(module: nn.Module, example: torch.Tensor, meta: dict) -> bytes:
    """The module as an ONNX graph with a dynamic batch, its metadata in metadata_props."""
    import onnx

    buffer = io.BytesIO()
    batch = {0: "batch"}
    # The older exporter, though torch warns it is deprecated: the newer (dynamo=True) exports these modules too on
    # torch 2.14, but only in strict mode after a failed non-strict try, at five times the time and with pages of
    # output. When the older goes, dynamo=True with dynamic_shapes={"images": {0: Dim("batch")}} takes its place.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=["images"],
                          output_names=["probabilities", "label"],
                          dynamic_axes={"images": batch, "probabilities": batch, "label": batch})
    graph = onnx.load_from_string(buffer.getvalue())
    for key, value in {"bottleneck": json.dumps(meta), "classes": json.dumps(meta["classes"])}.items():
        graph.metadata_props.add(key=key, value=value)
    return graph.SerializeToString()


def torchscript_bytes(module: nn.Module, example: torch.Tensor, meta: dict) -> bytes:
    """The module traced to TorchScript, its metadata as the extra file bottleneck.json."""
    with warnings.catch_warnings():  # torch's notice that TorchScript is deprecated: the user asked for it
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module, (example,), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={EXTRA_FILE: json.dumps(meta)})
    return buffer.getvalue()


def check_file(data: bytes, fmt: str, module: nn.Module, size: int, path: Path) -> None:
    """The written graph on a batch of another size than the trace's must give what the modules give."""
    images = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = module(images)[0].numpy()
    if fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            got = torch.jit.load(io.BytesIO(data), map_location="cpu")(images)[0].numpy()
    else:
        try:
            import onnxruntime
        except ImportError:  # the graph cannot be run here; onnx's own checker still reads it
            import onnx

            onnx.checker.check_model(onnx.load_from_string(data))
            return
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        got = session.run(["probabilities"], {"images": images.numpy()})[0]
    worst = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
    if not worst <= SAME_WITHIN:
        raise BottleneckError(f"the exported {fmt} file for {path} does not compute what the model does (probabilities "
                              f"differ by {worst:.2g}); nothing was written: please report this with the model")
