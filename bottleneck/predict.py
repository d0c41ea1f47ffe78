"""Use a trained model: re-score it on a cache (evaluate) or label new images (predict).

Both read the model through bottleneck.trained, whichever stage made it.
"""

from __future__ import annotations

import os
import typing
from pathlib import Path

import numpy as np
import torch

from bottleneck import backbones, data, exported, networks, settings, trained
from bottleneck import report as reports
from bottleneck.console import progress_bar
from bottleneck.errors import BottleneckError
from bottleneck.runtime import resolve_device
from bottleneck.store import FeatureStore

COMPATIBLE_KEYS = ("model", "weights", "pool", "preprocessing", "classes")


def evaluate(model: str, features: str, *, split: str = "test", out: str | None = None, trust: bool = False) -> dict:
    """Metrics of a saved classifier (or fine-tuned network) on one split of a compatible cache.

    With `out`, writes report.json and predictions.csv there. A split the model was trained on
    is scored all the same, but the result says so: it measures memory, not generalisation.
    `trust`: also read a classifier that is a pickle (it may run any code; see trained.py).
    """
    model, features, split, out = checked(evaluate, model=model, features=features, split=split, out=out).values()
    t = trained.load(model, trust)
    scored = evaluate_finetuned if t.kind == "network" else evaluate_classifier
    about, paths, y_true, y_pred, probs = scored(t, features, split)
    classes = about["classes"]
    rep = reports.Report(stage="evaluate", split=split, n_test=int(len(y_true)), **about,
                         **reports.metrics(y_true, y_pred, classes, np.asarray(probs)),
                         test_set=reports.test_set(split, paths, y_true, classes), extra={"features": str(features)})
    if split in rep.trained_on:
        rep.caveat = (f"the model was trained or tuned on the {split} split: this score measures how well it "
                      "remembers those images, not how it does on new ones")
    if out:
        reports.write_predictions(Path(out), paths, y_true, y_pred, probs, classes)
        rep.write(Path(out))
    return rep.to_dict()


def checked(func, **args) -> dict:
    """The arguments, each of its annotated type, as the settings-backed stages check theirs
    (`evaluate(None, ...)` and `predict(..., top_k="3")` were TypeErrors from deep inside); paths
    may be pathlib objects."""
    hints = typing.get_type_hints(func)
    plain = {}
    for name, value in args.items():
        value = os.fspath(value) if isinstance(value, os.PathLike) else value
        if isinstance(value, (list, tuple)):
            value = [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
        problem = settings.type_problem(hints[name], value)
        if problem:
            raise BottleneckError(f"{func.__name__}(): {name} {problem}")
        plain[name] = value
    return plain


def evaluate_classifier(t: trained.Trained, features: str, split: str) -> tuple[dict, list[str], np.ndarray,
                                                                                np.ndarray, np.ndarray]:
    """What names a classifier in a report (model, tap, clf, classes, trained_on), and its test paths,
    labels, predictions and probabilities on `split`."""
    model, pipe, prov = t.path, t.pipe, t.meta
    with FeatureStore(features) as st:
        for key in COMPATIBLE_KEYS:
            if st.attrs.get(key) != prov.get(key):
                raise BottleneckError(f"{features} does not match {model}: its {key} is {st.attrs.get(key)!r}, "
                                      f"the classifier was trained on {prov.get(key)!r}")
        taps = t.taps  # several for a fit on concatenated taps
        missing = [t for t in taps if t not in st.taps]
        if missing:
            raise BottleneckError(f"{features} has no tap '{missing[0]}', which {model} was trained on")
        if split not in st.splits:
            raise BottleneckError(f"{features} has no split '{split}'; it holds {', '.join(st.splits)}")
        x, y, paths = np.hstack([st.features(split, tap) for tap in taps]), st.labels(split), st.paths(split)
        t.check_width(x.shape[1], f"{features} at {', '.join(taps)}")
        # The same images in the same splits (another precision or tap set of them too), or the same cache.
        same_cache = (st.attrs.get("dataset_fingerprint"), st.attrs.get("split_info")) == \
            (prov.get("dataset_fingerprint"), prov.get("split_info")) if "dataset_fingerprint" in prov else \
            st.attrs.get("fingerprint") == prov.get("fingerprint")
    # Older classifiers do not record their training splits: assume the usual train (+ val).
    trained_on = prov.get("trained_on", ["train", "val"]) if same_cache else []
    # a cache's views averaged
    paths, y, y_pred, probs = trained.predict_images(pipe, x, y, paths, len(prov["classes"]))
    about = {"model": prov["model"], "tap": prov["tap"], "clf": prov["clf"], "classes": prov["classes"],
             "trained_on": trained_on}
    return about, paths, y, y_pred, probs


def evaluate_finetuned(t: trained.Trained, features: str, split: str, device: str = "auto"
                       ) -> tuple[dict, list, np.ndarray, np.ndarray, np.ndarray]:
    """A fine-tuned network scored on the images a cache lists for `split` (read from disk); returns
    as evaluate_classifier does."""
    model, net, meta = t.path, t.net, t.meta
    with FeatureStore(features) as st:
        if st.classes != meta["classes"]:
            raise BottleneckError(f"{features} has classes {st.classes}, {model} was trained on {meta['classes']}")
        if split not in st.splits:
            raise BottleneckError(f"{features} has no split '{split}'; it holds {', '.join(st.splits)}")
        root, (paths, y) = st.attrs["data_root"], one_row_per_image(st.paths(split), st.labels(split))
    dev = resolve_device(device)
    loader = torch.utils.data.DataLoader(data.ImageDataset(root, paths, meta["preprocessing"]), batch_size=64)
    batches, reasons = zip(*loader)
    failed = [(p, r) for p, r in zip(paths, (r for rs in reasons for r in rs)) if r]
    if failed:  # a missing image scored as a black placeholder would be a wrong score, not a skipped one
        raise BottleneckError(f"{len(failed)} of the {len(paths)} {split} images listed by {features} cannot be read "
                              f"under {root} (e.g. {failed[0][0]}: {failed[0][1]}); was the data moved?")
    images = torch.cat(batches)
    probs = networks.predict_proba(net.to(dev, memory_format=torch.channels_last), images, meta["preprocessing"],
                                    dev, meta["precision"], meta["tta"]).numpy()
    about = {"model": meta["arch"], "tap": None, "clf": "finetune", "classes": meta["classes"],
             "trained_on": meta.get("trained_on", ["train"])}
    return about, paths, y, probs.argmax(1), probs


def one_row_per_image(paths: list[str], labels: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The first row of each image: a multi-view cache lists an image once per view, but a network
    scores the image itself, once, averaging its own test-time views (counting views as images
    would narrow the interval and change the test set's hash)."""
    first: dict[str, int] = {}
    for i, p in enumerate(paths):
        first.setdefault(p, i)
    rows = list(first.values())
    return [paths[i] for i in rows], labels[rows]


def image_files(inputs: list[str]) -> list[str]:
    """Files named directly, and every non-hidden file under named folders (sorted)."""
    files = []
    for item in inputs:
        if os.path.isdir(item):
            for dirpath, dirnames, names in os.walk(item):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                files += [os.path.join(dirpath, n) for n in sorted(names) if not n.startswith(".")]
        elif os.path.lexists(item):
            files.append(item)  # a broken file named directly gets a reason row like any other
        else:
            raise BottleneckError(f"{item} does not exist")
    if not files:
        raise BottleneckError("no images given")
    return files


def predict(model: str | None, images: list[str], *, top_k: int = 3, imagenet: bool = False,
            backbone: str = "efficientnet_lite0", weights: str = "DEFAULT", batch_size: int = 32,
            device: str = "auto", progress: bool = True, trust: bool = False) -> list[dict]:
    """Label images with a saved classifier, a file of `export` (ONNX, or TorchScript with `trust`), or
    with imagenet=True the backbone's own ImageNet head.

    Each row holds path, label, probability and the top-k; an unreadable file gets a row with
    its error instead, and the others still get predictions. `trust` as for evaluate.
    """
    model, images, top_k, imagenet, backbone, weights, batch_size, device, progress = checked(
        predict, model=model, images=images, top_k=top_k, imagenet=imagenet, backbone=backbone, weights=weights,
        batch_size=batch_size, device=device, progress=progress).values()
    if top_k < 1:
        raise BottleneckError("--top-k must be at least 1")
    dev = resolve_device(device)
    if imagenet:
        from torchvision.models import ResNet18_Weights

        t = trained.Trained("", "network", backbone, ResNet18_Weights.IMAGENET1K_V1.meta["categories"],
                            backbones.preprocessing(backbone), "fp32", "none", [], {},
                            net=networks.build_model(backbone, weights))
    elif model is None:
        raise BottleneckError("give a classifier (model.skops or model.pt) or --imagenet")
    elif exported.is_exported(model):  # a file of 'bottleneck export', checked before it is shipped
        t = exported.load(model, trust, dev.type)
    else:
        t = trained.load(model, trust)
    if not isinstance(t, exported.Exported):
        t.net = t.network().to(dev, memory_format=torch.channels_last)
    classes, prep = t.classes, t.preprocessing
    files = image_files(images)
    dataset = data.ImageDataset("", files, prep)
    rows = []
    with progress_bar(enabled=progress) as bar:  # on stderr: the table or CSV on stdout stays clean
        task = bar.add_task("predicting", total=len(files))
        for images_u8, reasons in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            probs, chosen = t.predict_batch(images_u8, dev)
            if imagenet and probs.shape[1] != len(classes):  # a timm: model trained on ImageNet-21k, or headless
                raise BottleneckError(f"{backbone} outputs {probs.shape[1]} classes, not ImageNet's "
                                      f"{len(classes)}; --imagenet needs a model with an ImageNet-1k classifier")
            for p, c, reason in zip(probs, chosen, reasons):
                rows.append(_row(files[len(rows)], p, int(c), reason, classes, top_k))
            bar.advance(task, len(reasons))
    return rows


def _row(path: str, probs: np.ndarray, chosen: int, reason: str, classes: list[str], k: int) -> dict:
    if reason:
        return {"path": path, "label": None, "probability": None, "top": [], "error": reason}
    order = np.argsort(-probs)[:k]
    top = [(classes[i], float(probs[i])) for i in order]
    return {"path": path, "label": classes[chosen], "probability": float(probs[chosen]), "top": top,
            "error": None}
