"""A trained model, whichever stage made it, behind one small interface.

`fit` writes a classifier on cached features (`model.skops`, a scikit-learn Pipeline with its
provenance in `.bottleneck_`); `finetune` writes a whole network (`model.pt`, weights and plain
metadata). `load` reads either and checks it before use: what it says it is must be what it
holds, or it is refused with one line. `evaluate`, `predict` and `finetune --init-head` use
nothing else, so none imports the stage that trained the model. A classifier's scores on a
cache's rows, an image's views averaged (`predict_images`), are here too, for fit and evaluate alike.

Loading a model file never runs code from it. `model.skops` is read by skops, which builds only
the types named in TRUSTED_TYPES (and numpy arrays and plain values) and refuses a file holding
any other; `model.pt` is read as tensors and plain values only. A pickle (`model.joblib` from
before skops, or a file from elsewhere) runs code chosen by whoever wrote it, so it is read only
with `trust=True` (`--trust`), which says the user trusts the file.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bottleneck import backbones, networks
from bottleneck.data import describe_error
from bottleneck.errors import BottleneckError
from bottleneck.views import views_of
from bottleneck.weights import WeightsRef

NETWORK_FORMAT = "bottleneck-finetuned/1"
EXPORT_FORMAT = "bottleneck-export/1"  # the metadata of a file written by export
# Every type beyond skops's own trusted ones (numpy, plain values, most of scikit-learn) that the
# pipelines of classifiers.TABLE hold once fitted, as single, concatenated (EqualTaps) or selected
# (SelectRelevant) taps; tests/test_trained.py fits every one and fails on a type missing here.
TRUSTED_TYPES = [
    "bottleneck.classifiers.EqualTaps",
    "bottleneck.classifiers.PlattSVC",
    "bottleneck.classifiers.SelectRelevant",
    "bottleneck.linear.LinearProbe",
    "sklearn.calibration._CalibratedClassifier",  # svm and linear-svm: the calibrated SVM and its sigmoids
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",  # knn on narrow features keeps a k-d tree
    "sklearn.neighbors._kd_tree.KDTree",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",  # mlp keeps its optimiser's state
]
TRUST_HINT = ("fit it again with 'bottleneck fit' (which writes model.skops), or pass --trust (trust=True) if you "
              "trust whoever wrote the file: loading a pickle runs any code it holds")
PROVENANCE_KEYS = ("model", "weights", "pool", "preprocessing", "precision", "classes", "tap", "clf")


@dataclass
class Trained:
    path: str
    kind: str  # "classifier" (fit) or "network" (finetune)
    model: str  # the backbone's name
    classes: list[str]  # in the order of predict_proba's columns
    preprocessing: dict
    precision: str
    views: str  # views of each image whose probabilities are averaged
    trained_on: list[str]
    meta: dict  # a classifier's provenance, or a network's saved metadata
    pipe: object | None = None
    net: nn.Module | None = None  # the fine-tuned network, or the backbone cut at the classifier's taps

    @property
    def taps(self) -> list[str]:
        """The cache taps a classifier reads, in order (classifiers from before `concat` record one)."""
        return self.meta.get("taps") or [self.meta["tap"]]

    def check_width(self, width: int, source: str) -> None:
        """Features of another width than the classifier was fitted on would be a crash or a wrong score."""
        expected = getattr(self.pipe, "n_features_in_", width)
        if width != expected:
            raise BottleneckError(f"{self.path} expects {expected} features per image, {source} gives {width}; "
                                  "it was not fitted on these taps")

    def network(self) -> nn.Module:
        """The network that turns images into what the model scores: the fine-tuned network itself, or
        the backbone cut at the classifier's taps (built on first use: it may need its weights)."""
        if self.net is None:
            self.net = networks.FeatureExtractor(networks.build_model(self.model, same_weights(self.meta)),
                                                  self.model, self.taps, self.meta["pool"])
        return self.net

    def predict_batch(self, images_u8: torch.Tensor, dev: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, chosen column) for a uint8 NCHW batch, views averaged as at training."""
        net = self.network()
        if self.kind == "network":
            probs = networks.predict_proba(net, images_u8, self.preprocessing, dev, self.precision, self.views)
            probs = probs.numpy()
            return probs, probs.argmax(axis=1)
        outs = [networks.run_batch(net, v, self.preprocessing, dev, self.precision)
                for v in views_of(images_u8, self.views)]
        feats = [torch.cat([out[t] for t in self.taps], dim=1).float().cpu().numpy() for out in outs]
        self.check_width(feats[0].shape[1], f"{self.model} at {', '.join(self.taps)}")
        if len(feats) == 1:
            # The classifier's own label, as evaluate scores it: an SVM decides by its decision
            # function, which its calibrated probabilities can disagree with near the boundary.
            return self.pipe.predict_proba(feats[0]), np.searchsorted(self.pipe.classes_, self.pipe.predict(feats[0]))
        probs = sum(self.pipe.predict_proba(f) for f in feats) / len(feats)  # scored by the views' mean, as fit did
        return probs, probs.argmax(axis=1)


def same_weights(prov: dict) -> WeightsRef:
    """The backbone weights a classifier was fitted on features of, refused if they changed since
    (a weights file replaced under the same name gives other features, and silently other labels)."""
    ref = backbones.resolve_weights(prov["model"], prov.get("weights_arg", "DEFAULT"))
    if prov.get("weights") and ref.id != prov["weights"]:
        raise BottleneckError(f"the backbone weights changed since this classifier was fitted: it was fitted on "
                              f"features of {prov['weights']}, and {prov.get('weights_arg')} is now {ref.id}; "
                              "extract and fit again with the new weights, or restore the old file")
    return ref


def load(path: str | os.PathLike, trust: bool = False) -> Trained:
    """A classifier written by fit or a network written by finetune, told apart by content and
    checked, as a Trained. A pickle is unpickled only with `trust` (it may run any code)."""
    if not Path(path).is_file():
        raise BottleneckError(f"model file {path} does not exist")
    # A .pt file is only ever read as tensors (a pickle named .pt is refused, never unpickled).
    if str(path).endswith(".pt") or (zipfile.is_zipfile(path) and not is_skops(path)):
        return load_network(path)
    return load_classifier(path, trust)


def is_skops(path: str | os.PathLike) -> bool:
    """A skops file is a zip archive with a schema.json (a torch archive has none)."""
    try:
        with zipfile.ZipFile(path) as z:
            return "schema.json" in z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def read_pipeline(path: str | os.PathLike, trust: bool = False):
    """The object a classifier file holds, built without running code from the file: a skops file
    holding only TRUSTED_TYPES, or with `trust` a pickle (joblib)."""
    if is_skops(path):
        return _read_skops(path)
    if trust is not True:  # only an explicit yes: trust="no" from a caller's config is no
        raise BottleneckError(f"{path} is not a model.skops written by 'bottleneck fit' but a pickle (an older "
                              f"model.joblib, or a file from elsewhere) or another file; {TRUST_HINT}")
    import joblib

    try:
        return joblib.load(path)
    except Exception as e:
        raise BottleneckError(f"{path} is not a readable classifier file ({describe_error(e)}); "
                              "fit it again with 'bottleneck fit'") from None


def _read_skops(path: str | os.PathLike):
    import skops.io

    try:
        untrusted = sorted(set(skops.io.get_untrusted_types(file=path)) - set(TRUSTED_TYPES))
        if untrusted:
            raise BottleneckError(f"{path} holds types that bottleneck fit never writes ({', '.join(untrusted)}), "
                                  "and building them could run code; fit it again with 'bottleneck fit'")
        return skops.io.load(path, trusted=TRUSTED_TYPES)
    except BottleneckError:
        raise
    except Exception as e:
        raise BottleneckError(f"{path} is not a readable classifier file ({describe_error(e)}); "
                              "fit it again with 'bottleneck fit'") from None


def load_classifier(path: str | os.PathLike, trust: bool = False) -> Trained:
    """A fitted Pipeline written by 'bottleneck fit'; its provenance must describe the estimator it
    is attached to (same steps as fit builds, every class known), or it is refused."""
    from sklearn.pipeline import Pipeline

    if not Path(path).is_file():
        raise BottleneckError(f"classifier file {path} does not exist")
    pipe = read_pipeline(path, trust)
    prov = getattr(pipe, "bottleneck_", None)
    if not isinstance(prov, dict) or not isinstance(pipe, Pipeline) or not hasattr(pipe, "predict_proba"):
        raise BottleneckError(f"{path} was not written by 'bottleneck fit'")
    missing = [k for k in PROVENANCE_KEYS if k not in prov]
    if missing or not isinstance(prov["classes"], list) or not isinstance(prov["preprocessing"], dict):
        raise BottleneckError(f"{path}: its provenance lacks {', '.join(missing) or 'well-formed classes'}; "
                              "fit it again with 'bottleneck fit'")
    if not _same_steps(pipe, prov):
        raise BottleneckError(f"{path}: its estimator is not the {prov['clf']} pipeline that 'bottleneck fit' "
                              "builds (a provenance copied onto another estimator?); fit it again")
    known = np.asarray(getattr(pipe, "classes_", []))
    if not len(known) or known.dtype.kind not in "iu" or known.min() < 0 or known.max() >= len(prov["classes"]):
        raise BottleneckError(f"{path}: its estimator's classes {known.tolist()} are not indices of its "
                              f"{len(prov['classes'])} classes; fit it again")
    return Trained(str(path), "classifier", prov["model"], [prov["classes"][c] for c in known],
                   prov["preprocessing"], prov["precision"], prov.get("views", "none"),
                   prov.get("trained_on", ["train", "val"]), prov, pipe=pipe)


def _same_steps(pipe, prov: dict) -> bool:
    from bottleneck.classifiers import make_classifier

    taps = prov.get("taps") or [prov["tap"]]
    try:
        fresh = make_classifier(prov["clf"], dims=(1,) * len(taps), select=prov["tap"] == "select")
    except BottleneckError:
        return False
    # Step names, not types: classifiers fitted by older versions (an SVC before PlattSVC) still load.
    return [n for n, _ in pipe.steps] == [n for n, _ in fresh.steps]


def load_network(path: str | os.PathLike) -> Trained:
    """A network saved by finetune (weights only, never code) and its metadata."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BottleneckError(f"{path} is not a readable fine-tuned model ({type(e).__name__})") from None
    if not isinstance(saved, dict) or saved.get("format") != NETWORK_FORMAT:
        raise BottleneckError(f"{path} was not written by 'bottleneck finetune'")
    meta = {k: v for k, v in saved.items() if k != "model"}
    missing = [k for k in ("arch", "classes", "preprocessing", "precision", "tta") if k not in meta]
    if missing or not isinstance(meta["preprocessing"], dict):
        raise BottleneckError(f"{path}: its metadata lacks {', '.join(missing) or 'a preprocessing dict'}; "
                              "fine-tune it again")
    try:
        net = networks.build_model(meta["arch"], "none")
        networks.replace_head(net, meta["arch"], len(meta["classes"]))
        net.load_state_dict(saved["model"])
    except (KeyError, TypeError, RuntimeError, BottleneckError) as e:
        raise BottleneckError(f"{path}: its weights do not match its metadata ({describe_error(e)}); "
                              "fine-tune it again") from None
    return Trained(str(path), "network", meta["arch"], meta["classes"], meta["preprocessing"], meta["precision"],
                   meta["tta"], meta.get("trained_on", ["train"]), meta, net=net.eval())


# --------------------------------------------------------------------------- a classifier on cached rows

def predict_images(pipe, x: np.ndarray, y: np.ndarray, paths: list[str], n_classes: int):
    """(paths, labels, predictions, probabilities) per image. The rows of one image (its views,
    from `extract --views`) are scored by their mean probability; an image with one row keeps
    the classifier's own label (an SVM's decision can disagree with its calibrated probability)."""
    probs = class_probabilities(pipe, x, n_classes)
    if len(set(paths)) == len(paths):
        if hasattr(x, "plan"):  # rows read in chunks (bottleneck.linear): the linear classifier labels by argmax
            return paths, y, probs.argmax(1), probs
        return paths, y, pipe.predict(x), probs
    return mean_over_views(paths, y, probs)


def mean_over_views(paths: list[str], y: np.ndarray, probs: np.ndarray):
    """(paths, labels, predictions, probabilities), one per image, each the mean of its rows' probabilities."""
    n_classes = probs.shape[1]
    first: dict[str, int] = {}
    group = np.array([first.setdefault(p, len(first)) for p in paths])
    mean = np.zeros((len(first), n_classes))
    np.add.at(mean, group, probs)
    mean /= np.bincount(group)[:, None]
    at = np.unique(group, return_index=True)[1]  # the first row of each image
    return list(first), y[at], mean.argmax(1), mean


def class_probabilities(pipe, x: np.ndarray, n_classes: int) -> np.ndarray:
    """predict_proba with a column for every class of the cache, in its order (predict_proba's own
    columns are only the classes seen in training)."""
    full = np.zeros((len(x), n_classes))
    columns = np.asarray(pipe.classes_, dtype=int)
    if hasattr(x, "plan"):  # rows of a split larger than fit's memory budget, read in chunks (bottleneck.linear)
        for positions in x.plan():
            full[positions[:, None], columns] = pipe.predict_proba(x.read(positions))
        return full
    full[:, columns] = pipe.predict_proba(x)
    return full
