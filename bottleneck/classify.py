"""Stage 2: classical classifiers on cached features, trained in seconds.

Every classifier is a scikit-learn Pipeline (scaling, then the estimator) saved with skops as
`model.skops`, which loads without running code from the file (bottleneck.trained reads it;
`bottleneck.trained.load(path).pipe` gives it back in a user's own code). Its provenance (cache
fingerprint, model, weights, tap, pooling, preprocessing, classes, versions) rides along as
the fitted attribute `bottleneck_`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import sklearn
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import Pipeline

from bottleneck import choose, data, leaks, locks
from bottleneck import report as reports
from bottleneck.classifiers import TABLE, Sizes, check_size, grid, make_classifier, suited
from bottleneck.console import note, warn
from bottleneck.errors import BottleneckError, write_error
from bottleneck.linear import MB, Rows, fit_pipeline, is_lazy
from bottleneck.locks import WriteLock
from bottleneck.scores import target_class
from bottleneck.settings import FitSettings, folder_name, takes
from bottleneck.store import FeatureStore
from bottleneck.trained import class_probabilities, mean_over_views, predict_images


@takes(FitSettings)
def fit(s: FitSettings) -> Path:
    """Train a classifier on a cache's features; returns the path of its report.json.

    `layer`: a tap; "auto" (the default) picks, of the cache's taps and their concatenation, the
    one with the best validation score (5-fold CV on train when there is no validation split, fewer
    folds for classes of fewer than 5 images);
    "concat" fits on every tap side by side, each standardised and weighted equally; "select" keeps
    the features of all taps most relevant to the classes (Head2Toe; the fraction searched with the
    classifier's grid); "all" fits
    one classifier per tap (a layer probe). `train_sizes="10,50,all"` refits on that many
    training images per class (a learning curve). Each result gets a folder named by what
    distinguishes it; one holding a result of other settings is refused unless `force`.

    `folds=K`: the cache's images, every split pooled, in K folds (data.fold_splits); fold
    `fold`, or each fold in turn, is the test split, and its folder ends -foldI. Returns the
    last fold's report; bottleneck.folds.pool reads them back as one set of predictions.
    """
    if s.folds and s.fold is None:
        return [_fit(dataclasses.replace(s, fold=i)) for i in range(s.folds)][-1]
    return _fit(s)


def _fit(s: FitSettings) -> Path:
    features, layer = s.features, s.layer or "auto"
    # A split larger than the budget stays in the cache, read in chunks, for a classifier that can train so.
    budget = int(s.memory_budget * MB) if s.clf == "auto" or TABLE[s.clf].streams else None
    # Each tap is read from the file once, however many candidates (taps, concat, the final fit) use it. Only
    # auto reads every tap twice; it holds every tap at once for concat anyway, where --layer all would hold
    # them all only to keep them. pool, which the check for near-twins reads too, is kept whatever --layer does.
    with FeatureStore(features, remember=True if layer == "auto" else {"pool"}) as st:
        if layer not in LAYER_MODES and layer not in st.taps:
            raise BottleneckError(f"{features} has no tap '{layer}'; it holds {', '.join(st.taps)} "
                                  f"(or use {', '.join(LAYER_MODES)})")
        if s.target:  # before any training: a target this data cannot have is refused at once
            target_class(s.target, st.classes)
        out_dir = Path(s.out) if s.out else Path("runs") / "fit" / Path(features).stem
        settings = {"clf": s.clf, "search": s.search, "class_weight": s.class_weight, "seed": s.seed}
        if s.folds:
            settings["folds"] = {"k": s.folds, "fold": s.fold, "seed": s.split_seed, "val_fraction": s.val_fraction}
        if s.target:  # recorded only when given, so reports written without it still match for --reuse
            settings["target"] = s.target
        if s.clf == "auto" and (layer == "all" or s.train_sizes):
            raise BottleneckError("--clf auto chooses one classifier for one fit; name a classifier for "
                                  f"{'--layer all' if layer == 'all' else '--train-sizes'}")
        if layer == "all":
            paths = [finished_fit(out_dir / folder_name(tap, **settings), settings | {"tap": tap}, st, s.reuse)
                     or fit_one(st, tap, settings, out_dir / folder_name(tap, **settings), s.force or s.reuse,
                                budget=budget)
                     for tap in st.taps]
            return layer_probe(paths, out_dir, folder_name("layers", **settings))
        if s.train_sizes:
            tap = choose_tap(st, settings, budget)[0] if layer == "auto" else layer
            return learning_curve(st, tap, s.clf, s.train_sizes, s.class_weight, s.seed, out_dir, budget)
        out = out_dir / folder_name(layer, **settings)
        done = finished_fit(out, settings | {"tap": layer}, st, s.reuse)
        if done:
            return done
        choice, clf_choice = None, None
        if s.clf == "auto":  # the tap with the cheapest classifier, then the classifier on that tap
            clf_choice = choose_classifier(st, settings, layer, budget)
            layer, choice = clf_choice.pop("tap"), clf_choice.pop("layer_choice")
            budget = budget if clf_choice["chosen"] == "linear" else None
        elif layer == "auto":
            layer, choice = choose_tap(st, settings, budget)
        return fit_one(st, layer, settings, out, s.force or s.reuse, choice, budget, clf_choice)


def finished_fit(out: Path, settings: dict, st: FeatureStore, reuse: bool) -> Path | None:
    """With `reuse`, the report of a finished fit in `out` made with these settings from this very
    cache (the fit stage's own "already done?" check, for run and for Slurm jobs alike)."""
    path = out / "report.json"
    if not reuse or not path.is_file() or not (out / CLASSIFIER_FILE).is_file():  # a fit from before model.skops
        return None
    try:
        rep = reports.read_report(path)
        same = rep.settings == settings and rep.extra["cache"]["fingerprint"] == st.attrs["fingerprint"]
    except (BottleneckError, KeyError, TypeError):
        return None
    if same:
        note(f"{settings['clf']} on {settings['tap']}: done before ({path})")
    return path if same else None


CLASSIFIER_FILE = "model.skops"  # read by bottleneck.trained; model.joblib (a pickle) before
LAYER_MODES = ("auto", "concat", "select", "all")
CONCAT, SELECT = "concat", "select"


def taps_of(tap: str, st_taps: list[str]) -> list[str]:
    """The cache taps a fit reads: one, or every tap for "concat" and "select"."""
    return list(st_taps) if tap in (CONCAT, SELECT) else [tap]


def choose_tap(st: FeatureStore, settings: dict, budget: int | None = None) -> tuple[str, dict]:
    """(tap, how it was chosen): of the cache's taps and their concatenation, the one whose
    classifier scores best by repeated cross-validation over train + val (bottleneck.choose), as
    the final fit trains it (with the search when on); a simpler candidate within one standard
    error of the best is kept instead (a single tap before the concatenation, the deeper of two
    taps). Test images never take part. Rows read in chunks (a split over --memory-budget) are
    scored on validation alone.
    """
    if len(st.taps) == 1:
        return st.taps[0], {"by": "the cache's only tap", "scores": {}, "chosen": st.taps[0]}
    candidates = [*reversed(st.taps), CONCAT]  # simplest first
    started = time.perf_counter()
    clf, seed = settings["clf"], settings["seed"]
    scores, folds, how = {}, None, None
    for tap in candidates:
        d = split_data(st, tap, seed, settings.get("folds"), budget)
        pipe = make_classifier(clf, seed, settings["class_weight"], tap_dims(st, tap))
        if is_lazy(d["train"][0]):
            chosen = search_streamed(pipe, clf, d, st.classes)[1]
            scores[tap], how = np.array([chosen["cv_accuracy"]]), chosen["cv"]
            continue
        x, y, tap_folds = cv_rows(d, seed)
        if folds is None:  # every candidate holds the same images in the same order: one set of folds
            folds, how = tap_folds, cv_name(tap_folds, "val" in d)
        scores[tap] = candidate_scores(pipe, clf, x, y, folds, grid(clf) if settings["search"] else {}, st.classes)
    choice = choose.one_se_choice(scores, candidates) | {"by": how,
                                                         "seconds": round(time.perf_counter() - started, 3)}
    note(choose.describe(choice, "tap"))
    return choice["chosen"], choice


def choose_classifier(st: FeatureStore, settings: dict, layer: str, budget: int | None) -> dict:
    """`--clf auto`: of choose.AUTO_CLASSIFIERS, the one that scores best by the repeated
    cross-validation over train + val (each with its search, when on), or the cheapest within one
    standard error of it; on the tap `layer` names, or that logreg chooses for --layer auto.
    Features over the memory budget leave only the classifier that streams them (linear)."""
    logreg = settings | {"clf": "logreg"}
    tap, layer_choice = choose_tap(st, logreg) if layer == "auto" else (layer, None)
    started = time.perf_counter()
    d = split_data(st, tap, settings["seed"], settings.get("folds"), budget)
    if is_lazy(d["train"][0]):
        return {"chosen": "linear", "by": "the features exceed --memory-budget; only linear reads them in chunks",
                "scores": {}, "tap": tap, "layer_choice": layer_choice}
    x, y, folds = cv_rows(d, settings["seed"])
    candidates = [c for c in choose.AUTO_CLASSIFIERS if c != "svm" or len(y) <= choose.AUTO_SVM_ROWS]
    scores = {}
    for clf in candidates:
        pipe = make_classifier(clf, settings["seed"], settings["class_weight"], tap_dims(st, tap), select=tap == SELECT)
        tried = grid(clf, select=tap == SELECT) if settings["search"] else {}
        scores[clf] = candidate_scores(pipe, clf, x, y, folds, tried, st.classes)
    choice = choose.one_se_choice(scores, candidates) | {"by": cv_name(folds, "val" in d), "tap": tap,
                                                          "layer_choice": layer_choice,
                                                          "seconds": round(time.perf_counter() - started, 3)}
    if len(candidates) < len(choose.AUTO_CLASSIFIERS):
        choice["left_out"] = {"svm": f"{len(y)} training rows, above {choose.AUTO_SVM_ROWS}: an RBF SVM would take "
                                     "minutes per fold"}
    note(choose.describe(choice, "classifier"))
    return choice


def candidate_scores(pipe: Pipeline, clf: str, x: np.ndarray, y: np.ndarray, folds: list, tried: dict,
                     classes: list[str]) -> np.ndarray:
    """A candidate's accuracy on each fold, as the final fit would train it: with the search's best
    setting when there is a grid to search (every candidate gets the same search, so the best of a
    grid flatters each alike), else with its defaults."""
    pipe, points = suited(clf, pipe, tried, Sizes.of(y, *(y[train] for train, _ in folds)), classes)
    if len(points) == 1 and not points[0]:
        return choose.fold_scores(pipe, x, y, folds)
    search = GridSearchCV(pipe, points, cv=folds, n_jobs=-1, scoring="accuracy", refit=False).fit(x, y)
    best = search.best_index_
    return np.array([search.cv_results_[f"split{i}_test_score"][best] for i in range(len(folds))])


def cv_rows(d: dict, seed: int) -> tuple[np.ndarray, np.ndarray, list]:
    """Train and val rows together and the repeated folds every choice is scored on (an image's
    views, and a group's images, stay in one fold)."""
    x, y, paths = choose.pooled(d)
    return x, y, choose.repeated_folds(y, groups_of(d, paths), cv_folds(y, paths), seed)


def cv_name(folds: list, with_val: bool) -> str:
    """How a choice was scored, for the report: "2 × 5-fold stratified CV on train + val"."""
    k = len(folds) // choose.REPEATS
    return f"{choose.REPEATS} × {k}-fold stratified CV on train{' + val' if with_val else ''}"


def save_classifier(pipe: Pipeline, path: Path) -> None:
    """skops.io.dump under a temporary name, then rename: a full disk never leaves half a model."""
    import skops.io

    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        skops.io.dump(pipe, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(e, path) from None


def split_data(st: FeatureStore, tap: str, seed: int, folds: dict | None = None, budget: int | None = None) -> dict:
    """{split: (features, labels, paths)} from the cache (every tap side by side for "concat");
    data.split_samples holds out a test split when the cache has none, exactly as finetune would
    on the same data. With `folds` ({"k", "fold", "seed", "val_fraction"}) every split is pooled
    and data.fold_splits makes train, val and test of that fold; d["folds"] records which.
    With a `budget` (bytes), a split whose features exceed it is `linear.Rows`, read later in chunks."""
    taps = taps_of(tap, st.taps)
    lazy = lazy_splits(st, taps, budget, pooled=bool(folds))
    d = {s: (Rows.of_split(st, s, taps, budget) if s in lazy else np.hstack([st.features(s, t) for t in taps]),
             st.labels(s), st.paths(s)) for s in st.splits}
    groups = st.groups()
    if folds:
        d = fold_data(st, d, folds, groups)
    elif "test" not in d:
        source = "train" if "train" in d else st.splits[0]
        x, y, paths = d.pop(source)
        split_seed = st.attrs.get("split_info", {}).get("seed", 0)  # the split's seed, never the classifier's
        images = list(dict.fromkeys(zip(paths, y.tolist())))  # one pair per image, whatever its views
        parts = data.split_samples(images, 0.0, data.DEFAULT_TEST_FRACTION, split_seed, groups)
        rows: dict[str, list[int]] = {}
        for i, p in enumerate(paths):
            rows.setdefault(p, []).append(i)
        for name in ("train", "test"):
            idx = np.array([i for p, _ in parts[name] for i in rows[p]], dtype=int)
            d[name] = (x[idx], y[idx], [paths[i] for i in idx])
        d["holdout"] = {"from": source, "test_fraction": data.DEFAULT_TEST_FRACTION, "seed": split_seed,
                        "by": "bottleneck.data.split_samples"}
        if not len(d["test"][1]):
            raise BottleneckError(f"{st.path} has no test split and too few images per class to hold one out")
    d["groups"] = groups
    if "train" not in d:
        raise BottleneckError(f"{st.path} has no train split to fit on")
    for split in ("train", "test"):
        _check_every_class_in(st, split, d[split][1])
    return d


def lazy_splits(st: FeatureStore, taps: list[str], budget: int | None, pooled: bool = False) -> set[str]:
    """The splits whose features, as float32, exceed `budget` bytes (all of them when `pooled` into folds
    and their sum does); none without a budget."""
    if budget is None:
        return set()
    size = {s: st.file[s]["labels"].shape[0] * sum(st.file[s][f"features/{t}"].shape[1] for t in taps) * 4
            for s in st.splits}
    if pooled:
        return set(size) if sum(size.values()) > budget else set()
    return {s for s, n in size.items() if n > budget}


def fold_data(st: FeatureStore, d: dict, folds: dict, groups: dict[str, str] | None = None) -> dict:
    """The cache's rows, every split pooled, regrouped into one fold's train, val and test (an
    image's views stay together)."""
    xs = [v[0] for v in d.values()]
    x = Rows.concat(xs) if is_lazy(xs[0]) else np.concatenate(xs)
    y = np.concatenate([v[1] for v in d.values()])
    paths = [p for v in d.values() for p in v[2]]
    images = list(dict.fromkeys(zip(paths, y.tolist())))  # one pair per image, whatever its views
    parts, record = data.fold_splits(images, folds["k"], folds["fold"], folds["seed"], folds["val_fraction"],
                                     st.classes, groups)
    rows: dict[str, list[int]] = {}
    for i, p in enumerate(paths):
        rows.setdefault(p, []).append(i)
    regrouped = {}
    for name, samples in parts.items():
        idx = np.array([i for p, _ in samples for i in rows[p]], dtype=int)
        regrouped[name] = (x[idx], y[idx], [paths[i] for i in idx])
    return regrouped | {"folds": record}


def _check_every_class_in(st: FeatureStore, split: str, labels: np.ndarray) -> None:
    """Every class must be in train (a classifier cannot learn an absent class) and in test (an
    absent class would go unscored), whichever way the cache came to lack it."""
    missing = sorted(set(range(len(st.classes))) - set(np.unique(labels).tolist()))
    if missing:
        skipped = len(st.skipped(split)) if split in st.splits else 0
        raise BottleneckError(f"the {split} split of {st.path} holds no image of class {st.classes[missing[0]]!r}"
                              + (f" ({skipped} of its files were skipped as unreadable)" if skipped else "")
                              + "; extract again from data with images of every class in every split")


def check_previous(out: Path, settings: dict, fingerprint: str, force: bool) -> None:
    """Refuse to replace a result made with other settings or from another cache, unless forced."""
    path = out / "report.json"
    if force or not path.is_file():
        return
    try:
        old = reports.read_report(path)
        before = {"settings": old.settings, "cache": (old.extra.get("cache") or {}).get("fingerprint")}
    except (BottleneckError, AttributeError):
        before = {}
    now = {"settings": settings, "cache": fingerprint}
    changed = [k for k in now if before.get(k) != now[k]]
    if changed:
        raise BottleneckError(f"{out} already holds a fit with other {' and '.join(changed)}; pass --force "
                              "to replace it, or --out another folder")


def fit_one(st: FeatureStore, tap: str, settings: dict, out: Path, force: bool = False,
            choice: dict | None = None, budget: int | None = None, clf_choice: dict | None = None) -> Path:
    d = split_data(st, tap, settings["seed"], settings.get("folds"), budget)
    with WriteLock(locks.beside(out), str(out)):  # one writer per result folder
        return _fit_locked(st, tap, settings | {"tap": "auto" if choice else tap}, out, force, choice, d, budget,
                           clf_choice)


def _fit_locked(st: FeatureStore, tap: str, settings: dict, out: Path, force: bool, choice: dict | None,
                d: dict, budget: int | None = None, clf_choice: dict | None = None) -> Path:
    search, class_weight, seed = (settings[k] for k in ("search", "class_weight", "seed"))
    clf = clf_choice["chosen"] if clf_choice else settings["clf"]  # settings keep "auto", as asked
    (x, y, _), (x_test, y_test, test_paths) = d["train"], d["test"]
    check_previous(out, settings, st.attrs["fingerprint"], force)
    pipe = make_classifier(clf, seed, class_weight, tap_dims(st, tap), select=tap == SELECT)
    tried = grid(clf, select=tap == SELECT)
    scored = len(y_test) + (len(d["val"][1]) if "val" in d else 0)
    if too_long := check_size(clf, Sizes.of(y), sum(tap_dims(st, tap)), scored):  # refuses what takes hours
        warn(too_long)
    started = time.perf_counter()
    chosen, trained_on = {}, ["train"]
    if search:
        pipe, chosen, x, y = search_params(pipe, clf, d, seed, tried, st.classes)
        trained_on += ["val"] if len(y) > len(d["train"][1]) else []  # refit on train + val
    else:
        pipe = suited(clf, pipe, {}, Sizes.of(y), st.classes)[0]
        fit_pipeline(pipe, x, y)
    fit_seconds = time.perf_counter() - started
    started = time.perf_counter()
    test_paths, y_test, y_pred, probs = predict_images(pipe, x_test, y_test, test_paths, len(st.classes))
    predict_seconds = time.perf_counter() - started
    point = None
    if settings.get("target"):
        *validation, how = validation_probabilities(pipe, d, seed, len(st.classes))
        point = reports.operating_point(settings["target"], st.classes, validation, how, y_test, probs)
    pipe.bottleneck_ = provenance(st, tap, clf) | {"trained_on": trained_on, "holdout": d.get("holdout"),
                                                   "folds": d.get("folds")}
    grouped = st.attrs.get("split_info", {}).get("groups")
    twins = leaks.check_cache(st, d["train"][2], test_paths, seed, budget)
    if warning := leaks.warning(twins):
        warn(warning)
    rep = reports.Report(
        stage="fit", model=st.attrs["model"], tap=tap, clf=clf, settings=settings, classes=st.classes,
        preprocessing=st.attrs.get("preprocessing"), estimator_params=estimator_params(pipe),
        folds=d.get("folds"), trained_on=trained_on,
        test_set=reports.test_set("test", test_paths, y_test, st.classes, grouped, twins),
        data_root=st.attrs.get("data_root"), n_train=int(len(y)) // st.n_views, n_test=int(len(y_test)),
        **reports.metrics(y_test, y_pred, st.classes, probs, point and point["class"]), operating_point=point,
        cost={"fit_seconds": round(fit_seconds, 4), "predict_seconds": round(predict_seconds, 4),
              # choosing the tap and classifier by CV: part of what this result cost
              "choice_seconds": round(sum((c or {}).get("seconds", 0.0) for c in (choice, clf_choice)), 3),
              "extraction": st.attrs.get("cost", {})},
        validation=validation_score(pipe, d, chosen, len(st.classes)),
        extra={"layer_choice": choice, "clf_choice": clf_choice, "taps": taps_of(tap, st.taps),
               "views": st.attrs.get("views", "none"),
               "search": {"grid": {k: [_plain(v) for v in vs] for k, vs in tried.items()},
                          "chosen": chosen} if search else None,
               "holdout": d.get("holdout"), "cache": {"path": str(st.path), "fingerprint": st.attrs["fingerprint"]},
               "linear": linear_fit(pipe, x)})
    out.mkdir(parents=True, exist_ok=True)
    # The old report goes first and the new one comes last: a report present always describes the
    # model and predictions beside it, even when the writer is killed between two files.
    (out / "report.json").unlink(missing_ok=True)
    save_classifier(pipe, out / CLASSIFIER_FILE)
    (out / "model.joblib").unlink(missing_ok=True)  # a pickle of an earlier fit here no longer describes the result
    reports.write_predictions(out, test_paths, y_test, y_pred, probs, st.classes)
    path = rep.write(out)
    lo, hi = rep.accuracy_ci
    note(f"{clf} on {tap}: test accuracy {rep.accuracy:.3f} (95 % CI {lo:.3f}-{hi:.3f}), balanced "
         f"{rep.balanced_accuracy:.3f} (fit {_duration(fit_seconds)})")
    return path


def linear_fit(pipe: Pipeline, x) -> dict | None:
    """How the linear classifier trained: its solver, each L2 strength's held-out accuracy and the one kept."""
    probe = pipe.steps[-1][1]
    if not hasattr(probe, "strength_"):
        return None
    return {"solver": probe.solver_, "streamed": is_lazy(x), "strength": probe.strength_,
            "held_out_accuracy": dict(zip(map(str, probe.strengths_.tolist()), probe.validation_accuracy_.tolist()))}


def validation_score(pipe: Pipeline, d: dict, chosen: dict, n_classes: int) -> dict | None:
    """The score by which compare chooses among contenders, never the test images': the search's on the
    validation split (or by CV on train); without a search, the fitted model's on the validation split,
    which it did not train on; None when there is neither."""
    if chosen.get("cv_accuracy") is not None:
        return {"accuracy": chosen["cv_accuracy"], "by": chosen["cv"]}
    if "val" not in d:
        return None
    _, y_val, y_pred, _ = predict_images(pipe, *d["val"], n_classes)
    return {"accuracy": float(np.mean(np.asarray(y_val) == np.asarray(y_pred))), "by": "validation split"}


def validation_probabilities(pipe: Pipeline, d: dict, seed: int, n_classes: int):
    """(labels, probabilities, how) of images the classifier did not train on, to choose a threshold on.

    The final model may have trained on val (the search refits on train + val), so the classifier
    with its chosen settings is refitted on train alone and scores the val split; without a val
    split, each training image is scored by the fold of a stratified CV that left it out (an
    image's views stay in one fold).
    """
    x, y, paths = d["train"]
    if "val" in d:
        xv, yv, pv = d["val"]
        _, yv, _, pv_probs = predict_images(fit_pipeline(clone(pipe), x, y), xv, yv, pv, n_classes)
        return yv, pv_probs, "validation split, scored by the classifier refitted on train alone"
    folds = StratifiedGroupKFold(cv_folds(y, paths), shuffle=True, random_state=seed)
    probs = np.zeros((len(y), n_classes))
    for train, held in folds.split(np.zeros((len(y), 1)), y, groups=groups_of(d, paths)):
        probs[held] = class_probabilities(fit_pipeline(clone(pipe), x[train], y[train]), x[held], n_classes)
    _, y_img, _, p_img = mean_over_views(paths, y, probs)
    return y_img, p_img, f"{folds.n_splits}-fold stratified CV on train, each image scored by the fold that left it out"


def tap_dims(st: FeatureStore, tap: str) -> tuple[int, ...]:
    return tuple(int(st.attrs["dims"][t]) for t in taps_of(tap, st.taps))


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def search_params(pipe: Pipeline, clf: str, d: dict, seed: int, grid: dict, classes: list[str]):
    """Grid search by repeated cross-validation over train + val (bottleneck.choose; an empty grid
    scores the classifier's fixed settings the same way), then a refit on train + val. Each setting
    is suited to the smallest training fold (classifiers.suited): tiny classes get fewer calibration
    folds or neighbours, not a crash."""
    if is_lazy(d["train"][0]):
        return search_streamed(pipe, clf, d, classes)
    x, y, folds = cv_rows(d, seed)
    pipe, points = suited(clf, pipe, grid, Sizes.of(y, *(y[train] for train, _ in folds)), classes)
    grid = GridSearchCV(pipe, points, cv=folds, n_jobs=-1, scoring="accuracy", refit=True)
    grid.fit(x, y)
    chosen = {k.removeprefix("clf__"): _plain(v) for k, v in grid.best_params_.items()}
    chosen["cv"] = cv_name(folds, "val" in d)
    chosen["cv_accuracy"] = float(grid.best_score_)
    chosen["cv_sd"] = round(float(grid.cv_results_["std_test_score"][grid.best_index_]), 4)
    return grid.best_estimator_, chosen, x, y


def search_streamed(pipe: Pipeline, clf: str, d: dict, classes: list[str]):
    """search_params for training rows read in chunks (linear): the strength is chosen inside the fit, which is
    scored on the validation split or, without one, on its own held-out tenth of train. It trains on train
    alone: a refit on train + val would be one more pass over the cache."""
    x, y, _ = d["train"]
    pipe = fit_pipeline(suited(clf, pipe, {}, Sizes.of(y), classes)[0], x, y)
    if "val" in d:
        _, yv, pred, _ = predict_images(pipe, *d["val"], len(classes))
        score, how = float(np.mean(np.asarray(yv) == np.asarray(pred))), "validation split"
    else:
        score, how = float(pipe.steps[-1][1].validation_accuracy_.max()), "held-out tenth of train"
    return pipe, {"cv": how, "cv_accuracy": score}, x, y


def groups_of(d: dict, paths: list[str]) -> list[str]:
    """The group of each row: its image's group in a grouped cache, else the image itself."""
    groups = d.get("groups") or {}
    return [groups.get(p, p) for p in paths]


def _splits(cv, x: np.ndarray, y: np.ndarray):
    return cv.split(x, y) if hasattr(cv, "split") else cv


def cv_folds(y: np.ndarray, paths: list[str]) -> int:
    """5 folds, or as many as the smallest class has training images (2 at the least)."""
    images = dict(zip(paths, y.tolist()))  # one label per image, whatever its views
    smallest = min(np.bincount(list(images.values())).tolist() or [0])
    if smallest < 2:
        raise BottleneckError("a class has fewer than 2 training images, too few to choose a tap or setting by "
                              "cross-validation; add images or a val split, or pass --no-search and --layer TAP")
    return min(5, smallest)


def estimator_params(pipe: Pipeline) -> dict:
    """The estimator's plain-valued parameters (nested ones flattened, objects left out)."""
    params = {k.removeprefix("clf__"): _plain(v) for k, v in pipe.get_params().items() if k.startswith("clf__")}
    return {k: v for k, v in params.items() if isinstance(v, (int, float, str, bool, list, type(None)))}


def provenance(st: FeatureStore, tap: str, clf: str) -> dict:
    a = st.attrs
    keys = ("model", "weights", "weights_arg", "pool", "preprocessing", "precision", "classes", "fingerprint",
            "dataset_fingerprint", "split_info")
    return {k: a.get(k) for k in keys} | {"tap": tap, "taps": taps_of(tap, st.taps), "clf": clf, "cache": str(st.path),
                                          "views": a.get("views", "none"),
                                          "versions": a.get("versions", {}) | {"sklearn": sklearn.__version__}}


def _plain(v):
    if isinstance(v, tuple):
        return list(v)
    return v.item() if isinstance(v, np.generic) else v


def layer_probe(paths: list[Path], out: Path, name: str = "layers") -> Path:
    rows = [reports.read_report(p) for p in paths]
    table = [{"tap": r.tap, "accuracy": r.accuracy, "balanced_accuracy": r.balanced_accuracy,
              "macro_f1": r.macro_f1} for r in rows]
    reports.plot_curve([r["tap"] for r in table], [r["accuracy"] for r in table], "tap", out / f"{name}.png",
                       title=f"{rows[0].model} {rows[0].clf}: test accuracy by layer")
    return _write_table(out / f"{name}.json", table)


def learning_curve(st: FeatureStore, tap: str, clf: str, sizes: str, class_weight: str | None, seed: int,
                   out: Path, budget: int | None = None) -> Path:
    d = split_data(st, tap, seed, budget=budget)
    (x, y, paths), (x_test, y_test, test_paths) = d["train"], d["test"]
    try:
        wanted = [None if s.strip() == "all" else int(s) for s in sizes.split(",")]
        if any(n is not None and n < 1 for n in wanted):  # 0 once meant "all", -25 was accepted
            raise ValueError
    except ValueError:
        raise BottleneckError(f"--train-sizes must be positive numbers per class or 'all', e.g. 10,50,all; "
                              f"not '{sizes}'") from None
    rng = np.random.default_rng(seed)
    image = np.unique(paths, return_inverse=True)[1]  # a row's image: its views are drawn together
    first = np.unique(image, return_index=True)[1]
    order = {c: rng.permutation(first[y[first] == c]) for c in np.unique(y)}
    table = []
    for n in wanted:
        chosen = np.concatenate([o[:n] if n else o for o in order.values()])
        idx = np.flatnonzero(np.isin(image, image[chosen]))
        pipe = make_classifier(clf, seed, class_weight, tap_dims(st, tap), select=tap == SELECT)
        pipe = fit_pipeline(suited(clf, pipe, {}, Sizes.of(y[idx]), st.classes)[0], x[idx], y[idx])
        _, y_true, y_pred, _ = predict_images(pipe, x_test, y_test, test_paths, len(st.classes))
        m = reports.metrics(y_true, y_pred, st.classes)
        table.append({"per_class": n or "all", "n_train": int(len(chosen)), "accuracy": m["accuracy"],
                      "balanced_accuracy": m["balanced_accuracy"]})
        note(f"{n or 'all'} per class ({len(chosen)} images): test accuracy {m['accuracy']:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    # Named by everything that makes it: a second curve of other sizes (or seed) once replaced the first.
    name = "learning_curve-" + "-".join([folder_name(tap, clf, False, class_weight, seed),
                                         *(str(n or "all") for n in wanted)])
    reports.plot_curve([r["n_train"] for r in table], [r["accuracy"] for r in table], "training images",
                       out / f"{name}.png", title=f"{st.attrs['model']} {tap} {clf}", log_x=True)
    return _write_table(out / f"{name}.json", table)


def _write_table(path: Path, table: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1))
    keys = list(table[0])
    note("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in table:
        note("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    return path
