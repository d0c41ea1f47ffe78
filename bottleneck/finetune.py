"""Stage: fine-tune the pretrained network itself, on the same data and splits as extract.

The recipe: replace the head for the dataset's classes; train the head alone with the
backbone frozen (`head_epochs`); then unfreeze the chosen part and train it with a lower
learning rate than the head. Frozen BatchNorm layers stay in eval mode. Augmentation touches
the training split only. Early stopping watches the validation split and the best weights
are restored at the end.

Long jobs survive: a checkpoint is written after every epoch and a signal before a time limit
saves one mid-epoch (finetune_loop.py); rerunning the same command in the same `out` resumes, and
a finished run of the same settings and data is returned as it is. This module is the stage:
its settings, its data (images here, cached maps in finetune_top.py), the run, and the report.
LP-FT's probe is read in finetune_probe.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from bottleneck import backbones, data, leaks, locks, networks, preprocess, runtime
from bottleneck import report as reports
from bottleneck.console import note, warn
from bottleneck.errors import BottleneckError
from bottleneck.finetune_data import fold_tensors, load_images, load_splits
from bottleneck.finetune_loop import DATA_KEY, Run, describe_changes, save_atomic, stop_before_training
from bottleneck.finetune_probe import RunTest, init_head, probe_cost, read_probe
from bottleneck.locks import WriteLock
from bottleneck.runtime import (
    apply_precision,
    device_name,
    local_rank,
    make_deterministic,
    resolve_device,
    resolve_precision,
    setup_distributed,
    versions,
)
from bottleneck.scores import target_class
from bottleneck.settings import FinetuneSettings, takes
from bottleneck.trained import NETWORK_FORMAT


@takes(FinetuneSettings)
def finetune(s: FinetuneSettings) -> Path:
    """Fine-tune `model` on `data_dir`; returns the path of OUT/report.json.

    The splits come from the same function, fractions and `split_seed` as extract's, so both
    paths are scored on the same test images; `seed` drives only training (order, augmentation,
    the new head), so repeats over seeds keep the test set. `folds=K` trains on fold `fold` (or
    on each fold in turn) of all images, as fit does, in OUT-foldI.
    """
    if s.folds and s.fold is None:  # every fold in turn, each its own run
        return [finetune.__wrapped__(dataclasses.replace(s, fold=i)) for i in range(s.folds)][-1]
    args = run_args(s)
    validate(args)
    out_dir = Path(s.out) if s.out else Path("runs") / "finetune" / backbones.file_name(s.model)
    if s.folds:
        out_dir = out_dir.with_name(f"{out_dir.name}-fold{s.fold}")
    if (out_dir / "report.json").is_file():
        return finished_run(out_dir, args)
    # One run per folder: a second one would share its checkpoint. Only the first process of a
    # multi-GPU run takes the lock; the others write nothing but through it.
    first = int(os.environ.get("RANK", "0")) == 0
    with WriteLock(locks.beside(out_dir), str(out_dir)) if first else contextlib.nullcontext():
        if (out_dir / "report.json").is_file():  # finished by another process while we waited
            return finished_run(out_dir, args)
        return _finetune(s, args, out_dir)


def _finetune(s: FinetuneSettings, args: dict, out_dir: Path) -> Path:
    started = time.perf_counter()
    rank, world = setup_distributed()
    dev = resolve_device(f"cuda:{local_rank()}" if s.device == "auto" and torch.cuda.is_available() else s.device)
    if s.deterministic:
        make_deterministic()
    prec = resolve_precision(s.precision, dev)
    apply_precision(prec)
    if s.from_cache:
        from bottleneck.finetune_top import top_run

        run, data = top_run(s, args, dev, prec, rank, world, out_dir)
    else:
        run, data = image_run(s, args, dev, prec, rank, world, out_dir)
    if s.target:  # before any training: a target this data cannot have is refused at once
        target_class(s.target, data[0])
    run.train(s.progress and rank == 0)
    if rank != 0:
        return out_dir / "report.json"
    return finish(run, *data, time.perf_counter() - started)


def image_run(s: FinetuneSettings, args: dict, dev: torch.device, prec: str, rank: int, world: int,
              out_dir: Path) -> tuple[Run, tuple]:
    """A run on decoded images, and what its report needs: classes, split_info, data root, test paths
    and the report's extra keys."""
    model, progress = s.model, s.progress
    splits, classes, split_info, root, groups = load_splits(s.data_dir, s.val_fraction, s.test_fraction,
                                                            s.split_seed, s.max_images, s.group_pattern)
    prep, why = preprocess.choose(model, root, [p for p, _ in splits["train"]], s.image_size, s.crop,
                                  s.interpolation)
    note(preprocess.describe(prep, why))
    images, paths = {}, {}
    workers = runtime.workers(s.workers)
    with stop_before_training():
        for split, samples in splits.items():
            note(f"decoding {split}: {len(samples)} images")
            x, y, paths[split] = load_images(root, samples, prep, workers, progress and rank == 0)
            images[split] = (x, y)
    folds = None
    if s.folds:
        images, paths, folds = fold_tensors(images, paths, s.folds, s.fold, s.split_seed, s.val_fraction, classes,
                                            groups)
    twins = leaks.check_files(paths["train"], paths["test"], root) if rank == 0 else None
    if warning := leaks.warning(twins):
        warn(warning)
    net = networks.build_model(model, s.weights)
    head = networks.replace_head(net, model, len(classes), s.seed)
    if s.init_head:
        test = RunTest(args[DATA_KEY], root, paths["test"])
        init_head(net, head, read_probe(s.init_head, model, s.weights, classes, prep, test, s.trust))
    net = net.to(dev, memory_format=torch.channels_last)
    run = Run(args, net, head, images, prep, dev, prec, rank, world, out_dir)
    return run, (classes, split_info, root, paths["test"],
                 {"preprocessing": prep, "preprocessing_rule": why, "folds": folds, "twins": twins,
                  "probe_cost_seconds": probe_cost(s.init_head) if s.init_head else None})




def run_args(s: FinetuneSettings) -> dict:
    """The settings a run is made of (checkpoints and reports hold them); where it is written,
    its workers and its progress bars do not change it, nor does --trust. The data's fingerprint is one
    of them: the same folder with a class or an image added is other data. A target is kept only when
    given, so runs and checkpoints made before targets existed still match."""
    return {k: v for k, v in s.asdict().items() if k not in ("out", "workers", "progress", "trust")
            and not (k == "target" and v is None)} | {"head_epochs": s.head_epochs_run(), DATA_KEY: data_fingerprint(s)}


def data_fingerprint(s: FinetuneSettings) -> str | None:
    """The fingerprint a cache of this data and these splits records (data.dataset_fingerprint: every
    file's path, label, split, size and time); None for data not there (yet: run writes built-in data
    after its checks), which reading the data refuses later."""
    if not Path(s.data_dir).exists():
        return None
    return data.dataset_fingerprint(data.load_manifest(s.data_dir, s.val_fraction, s.test_fraction, s.split_seed,
                                                       s.group_pattern))


def changed_settings(out: Path, args: dict) -> list[str]:
    """The settings in which the finished run in `out` differs from `args`; [] when the same."""
    path = out / "report.json"
    try:
        rep = reports.read_report(path)
        before = rep.settings | {"model": rep.model, "data_dir": rep.extra["data"]}
    except (BottleneckError, KeyError, TypeError):
        raise BottleneckError(f"{path} is not a readable fine-tuning report; delete {out} to train again") from None
    if DATA_KEY not in before:  # a run from before fingerprints were recorded: only its data's path can be compared
        note(f"{out} was trained before runs recorded their data's fingerprint: a change of the files under "
             f"{args['data_dir']} since then is not detected")
        before[DATA_KEY] = args[DATA_KEY]
    return [k for k in args if before.get(k) != args[k]]


def finished_run(out: Path, args: dict) -> Path:
    """The report of a finished run in `out` made with these very settings and data; any other is refused."""
    path = out / "report.json"
    changed = changed_settings(out, args)
    if changed:
        raise BottleneckError(f"{out} holds a finished run with other {describe_changes(changed)}; use another "
                              "--out, or delete it to train again")
    note(f"{out} already holds this finished run; delete it to train again")
    return path


def validate(a: dict) -> None:
    """What the settings cannot check alone: the model exists and has the tap of from:TAP."""
    backbones.get_spec(a["model"])
    if a["unfreeze"].startswith("from:"):
        backbones.resolve_taps(a["model"], [a["unfreeze"].removeprefix("from:")])


def finish(run: Run, classes: list[str], split_info: dict, root: str, test_paths: list[str], extra: dict,
           wall: float) -> Path:
    """Score the trained run on test, write its predictions, model.pt, learning curve and report;
    returns the report's path."""
    final = run.evaluate("test")
    point = None
    if run.args.get("target"):  # chosen on val by the model as it ends (the best epoch's, unless --keep-last)
        val = run.evaluate("val")
        point = reports.operating_point(run.args["target"], classes,
                                        (np.array(val["y_true"]), val["probs"].numpy()),
                                        "validation split, scored by the final model",
                                        np.array(final["y_true"]), final["probs"].numpy())
    rep = build_report(run, classes, split_info, final, wall, point)
    rep.data_root, rep.preprocessing, rep.folds = root, extra.pop("preprocessing"), extra.pop("folds")
    rep.tap = extra.pop("tap", None)  # a top on cached maps: the tap they were cut at
    rep.extra |= extra
    rep.test_set = reports.test_set("test", test_paths, final["y_true"], classes, split_info.get("groups"),
                                    extra.pop("twins", None))
    reports.write_predictions(run.out, test_paths, final["y_true"], final["y_pred"], final["probs"].numpy(),
                              classes)
    save_atomic({"format": NETWORK_FORMAT, "model": run.whole_network(), "arch": run.args["model"],
                 "classes": classes, "preprocessing": run.prep, "precision": run.precision,
                 "tta": run.tta_views(), "head": run.head, "weights": run.args["weights"],
                 "trained_on": ["train", "val"],  # val chose the epoch: its score is optimistic too
                 "versions": versions()}, run.out / "model.pt")
    reports.plot_history(run.state.history, run.out / "learning_curve.png", title=f"{run.args['model']}")
    path = rep.write(run.out)
    run.checkpoint_path().unlink(missing_ok=True)
    return path


def build_report(run: Run, classes: list[str], split_info: dict, final: dict, wall: float,
                 point: dict | None = None) -> reports.Report:
    s, a = run.state, run.args
    head_only = s.head_only
    peak = (torch.cuda.max_memory_allocated(run.dev) if run.dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    speed = round(s.train_images / s.train_seconds, 2) if s.train_seconds else None
    return reports.Report(
        stage="finetune", model=a["model"], tap=None, clf="finetune", classes=classes,
        settings={k: v for k, v in a.items() if k not in ("model", "data_dir")}, trained_on=["train", "val"],
        n_train=len(run.images["train"][1]), n_test=len(final["y_true"]),
        **reports.metrics(np.array(final["y_true"]), np.array(final["y_pred"]), classes, final["probs"].numpy(),
                          point and point["class"]),
        operating_point=point, validation=reports.best_epoch_score(s.best_epoch, s.history),
        cost={"wall_seconds": round(wall, 1), "device": device_name(run.dev),
              "device_seconds": round(s.train_seconds, 1), "images_per_second": speed,
              "epochs_run": len(s.history), "peak_memory_mb": round(peak / 2**20),
              "precision": run.precision, "processes": run.world},
        extra={"split_info": split_info, "n_val": len(run.images["val"][1]),
               "head_only": None if head_only is None else
               reports.metrics(np.array(head_only["y_true"]), np.array(head_only["y_pred"]), classes),
               "best_epoch": s.best_epoch, "history": s.history, "data": a["data_dir"]})
