"""LP-FT: start a fine-tune's new head as a linear probe fitted by `fit --clf logreg` (or `linear`).

Kumar et al. (ICLR 2022): training the head first on frozen features, then the whole network,
distorts the pretrained features less than training both from a random head. `read_probe` reads
the probe through `trained.load_classifier` (never the fit stage) and refuses one that cannot be
the head of this run: another model, tap, weights, classes or preprocessing, or a probe that saw
the run's test images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bottleneck import backbones, preprocess
from bottleneck import report as reports
from bottleneck.errors import BottleneckError
from bottleneck.trained import load_classifier

PROBES = ("logreg", "linear")  # softmax regressions on standardised features: a head is their weights


def read_probe(path: str, model: str, weights: str, classes: list[str], prep: dict,
               test: RunTest | None = None, trust: bool = False) -> dict:
    """The weight matrix and bias of a softmax-regression probe (logreg or linear), standardisation folded in, as
    {"weight": K×D, "bias": K}: the new head then starts as that probe (Kumar et al., ICLR 2022).

    The probe must come from this model's penultimate tap (the head's input), the same weights,
    classes and preprocessing; anything else would start the head from another function. Given the
    run's `test` images, it must not have trained on any of them (`check_probe_images`).
    """
    try:
        probe = load_classifier(path, trust)
    except BottleneckError as e:
        raise BottleneckError(f"--init-head: {e}") from None
    prov, scaler, clf = probe.meta, probe.pipe.named_steps.get("scale"), probe.pipe.named_steps["clf"]
    spec = backbones.get_spec(model)
    ref = backbones.resolve_weights(model, weights)
    problems = [
        (prov.get("clf") not in PROBES, f"it is a {prov.get('clf')}, not a linear probe (fit --clf logreg or "
                                        "--clf linear)"),
        (prov.get("model") != model, f"it was fitted on {prov.get('model')} features, not {model}'s"),
        (prov.get("tap") != spec.default_tap, f"it was fitted on tap {prov.get('tap')}; the head reads "
                                              f"{spec.default_tap} (fit --layer {spec.default_tap})"),
        (prov.get("weights") != ref.id, "its backbone weights differ from --weights"),
        (prov.get("classes") != classes, "its classes differ from this data's"),
        (len(clf.classes_) != len(classes), "it was fitted without every class"),
        (preprocess.complete(prov["preprocessing"]) != prep,
         f"its preprocessing ({prov.get('preprocessing')}) differs from this run's ({prep}); give the same "
         "--image-size/--crop/--interpolation"),
    ]
    for bad, why in problems:
        if bad:
            raise BottleneckError(f"--init-head {path}: {why}")
    if test is not None:
        check_probe_images(path, prov, test)
    w = clf.coef_ / scaler.scale_  # logits = W (x - mean) / scale + b = (W / scale) x + (b - W / scale · mean)
    b = clf.intercept_ - w @ scaler.mean_
    if len(w) == 1:  # binary: one logit for class 1; softmax over (-z/2, z/2) is sigmoid(z)
        w, b = np.vstack([-w / 2, w / 2]), np.array([-b[0] / 2, b[0] / 2])
    order = np.argsort(clf.classes_)
    return {"weight": torch.tensor(w[order], dtype=torch.float32), "bias": torch.tensor(b[order], dtype=torch.float32)}


@dataclass(frozen=True)
class RunTest:
    """The test images of a run: its data's fingerprint, the root of its paths and the paths."""

    dataset_fingerprint: str | None
    root: str
    paths: list[str]


def check_probe_images(path: str, prov: dict, test: RunTest) -> None:
    """Refuse a probe that trained or was tuned on any of the run's test images: the LP-FT score would
    then count images its head had already seen (a probe fitted with another --split-seed did).

    The same data in the same splits (one fingerprint covers every file's split) shares its test
    images by construction; otherwise the images the probe trained on are read from its cache."""
    if prov.get("dataset_fingerprint") and prov.get("dataset_fingerprint") == test.dataset_fingerprint:
        return
    seen = probe_images(prov)
    if seen is None:
        raise BottleneckError(f"--init-head {path}: it was fitted on other data or other splits than this run's, "
                              f"and its cache {prov.get('cache')} is gone or changed, so the images it trained on "
                              "cannot be checked against this run's test images; fit the probe on a cache of this "
                              "data with the same --split-seed and fractions")
    mine = {_absolute(test.root, p) for p in test.paths}
    both = sorted(mine & seen)
    if both:
        raise BottleneckError(f"--init-head {path}: it trained on {len(both)} of this run's {len(mine)} test images "
                              f"(e.g. {both[0]}), so LP-FT would be scored on images its head has seen; fit the probe "
                              "on a cache of this data with the same --split-seed and fractions as this run")


def probe_images(prov: dict) -> set[str] | None:
    """The images (absolute paths) of the splits a probe was trained or tuned on, from the cache it was
    fitted on; None when that cache is gone or is not the one it was fitted on."""
    from bottleneck.store import FeatureStore

    try:
        with FeatureStore(prov["cache"]) as st:
            if st.attrs.get("fingerprint") != prov.get("fingerprint"):
                return None
            splits = [s for s in prov.get("trained_on", ["train", "val"]) if s in st.splits]
            return {_absolute(st.attrs["data_root"], p) for s in splits for p in st.paths(s)}
    except (BottleneckError, KeyError, TypeError):
        return None


def _absolute(root: str, path: str) -> str:
    return os.path.realpath(os.path.join(root, path))


def probe_cost(path: str, counted_cache: str | None = None) -> float | None:
    """Fit and extraction seconds of the probe an LP-FT run started from, from the report beside it;
    not the extraction of `counted_cache` (a fingerprint), which the run counts itself."""
    try:
        rep = reports.read_report(Path(path).parent / "report.json")
        own = rep.extra["cache"]["fingerprint"] == counted_cache
        return rep.cost_seconds - (rep.shared_seconds if own else 0.0)
    except (BottleneckError, KeyError, TypeError, ValueError):
        return None


def init_head(net: nn.Module, head: str, probe: dict) -> None:
    layer = net.get_submodule(head)
    if not isinstance(layer, nn.Linear) or tuple(layer.weight.shape) != tuple(probe["weight"].shape):
        raise BottleneckError(f"--init-head needs a linear head of shape {tuple(probe['weight'].shape)}; this "
                              f"model's is {layer}")
    with torch.no_grad():
        layer.weight.copy_(probe["weight"])
        layer.bias.copy_(probe["bias"])
