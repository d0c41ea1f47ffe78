"""Stage: fine-tune the pretrained network itself, on the same data and splits as extract.

The recipe: replace the head for the dataset's classes; train the head alone with the
backbone frozen (`head_epochs`); then unfreeze the chosen part and train it with a lower
learning rate than the head. Frozen BatchNorm layers stay in eval mode. Augmentation touches
the training split only. Early stopping watches the validation split and the best weights
are restored at the end.

Long jobs survive: a checkpoint (a plain dict) is written atomically after every epoch, and
SIGTERM/SIGUSR1 (what Slurm sends before a time limit) save one mid-epoch and exit with
code 75. Rerunning the same command in the same `out` resumes. Under `torchrun` training
runs with DistributedDataParallel, each process taking its share of every batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bottleneck import backbones, data, locks, preprocess, runtime
from bottleneck import report as reports
from bottleneck.console import note, progress_bar
from bottleneck.errors import BottleneckError, Interrupted, write_error
from bottleneck.finetune_data import augment_batch, fold_tensors, load_images, load_splits, tta_views
from bottleneck.locks import WriteLock
from bottleneck.runtime import (
    apply_precision,
    device_name,
    make_deterministic,
    resolve_device,
    resolve_precision,
    versions,
)
from bottleneck.scores import target_class
from bottleneck.settings import FinetuneSettings, takes
from bottleneck.trained import NETWORK_FORMAT, load_classifier

LABEL_SMOOTHING = 0.1


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
    return run.finish(*data, time.perf_counter() - started)


def image_run(s: FinetuneSettings, args: dict, dev: torch.device, prec: str, rank: int, world: int,
              out_dir: Path) -> tuple[Run, tuple]:
    """A run on decoded images, and what its report needs: classes, split_info, data root, test paths
    and the report's extra keys."""
    model, progress = s.model, s.progress
    splits, classes, split_info, root = load_splits(s.data_dir, s.val_fraction, s.test_fraction, s.split_seed,
                                                    s.max_images)
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
        images, paths, folds = fold_tensors(images, paths, s.folds, s.fold, s.split_seed, s.val_fraction, classes)
    net = backbones.build_model(model, s.weights)
    head = backbones.replace_head(net, model, len(classes), s.seed)
    if s.init_head:
        test = RunTest(args[DATA_KEY], root, paths["test"])
        init_head(net, head, read_probe(s.init_head, model, s.weights, classes, prep, test, s.trust))
    net = net.to(dev, memory_format=torch.channels_last)
    run = Run(args, net, head, images, prep, dev, prec, rank, world, out_dir)
    return run, (classes, split_info, root, paths["test"],
                 {"preprocessing": prep, "preprocessing_rule": why, "folds": folds,
                  "probe_cost_seconds": probe_cost(s.init_head) if s.init_head else None})


@contextlib.contextmanager
def stop_before_training():
    """SIGTERM/SIGUSR1 while images decode: nothing is worth saving yet, but the exit code must
    still be 75, as during training, so that a Slurm job script requeues the job."""
    def stop(signum, frame):
        raise Interrupted(f"{signal.Signals(signum).name} received while decoding images, before training; "
                          "nothing to save: rerun the same command to start again")

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


DATA_KEY = "dataset_fingerprint"  # in a run's settings: its data's fingerprint (run_args)


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
    return data.dataset_fingerprint(data.load_manifest(s.data_dir, s.val_fraction, s.test_fraction, s.split_seed))


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


def describe_changes(changed: list[str]) -> str:
    """What differs, for a refusal: the settings by name, the data in words, or both."""
    settings = [k for k in changed if k != DATA_KEY]
    parts = [f"settings ({', '.join(settings)})"] if settings else []
    if DATA_KEY in changed:
        parts.append("data (the classes or images under its data folder changed since)")
    return " and ".join(parts)


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


# --------------------------------------------------------------------------- LP-FT

def read_probe(path: str, model: str, weights: str, classes: list[str], prep: dict,
               test: RunTest | None = None, trust: bool = False) -> dict:
    """The weight matrix and bias of a logistic-regression probe, standardisation folded in, as
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
        (prov.get("clf") != "logreg", f"it is a {prov.get('clf')}, not a logreg probe (fit --clf logreg)"),
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


# --------------------------------------------------------------------------- distributed

def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def setup_distributed() -> tuple[int, int]:
    """(rank, world size); under torchrun this joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", 0)), world


# --------------------------------------------------------------------------- training

@dataclass
class TrainState:
    """Where a run stands; a checkpoint holds it as a plain dict, so a resumed run continues exactly."""

    epoch: int = 0  # finished epochs
    step: int = 0  # finished steps of the current epoch
    history: list[dict] = field(default_factory=list)  # one row of losses and accuracies per epoch
    best_score: float | None = None  # of the monitored validation measure
    best_epoch: int | None = None
    best_model: dict | None = None  # its weights, restored at the end
    bad_epochs: int = 0  # epochs since the best, for early stopping
    head_only: dict | None = None  # test predictions before the backbone trained (the head-only model)
    train_seconds: float = 0.0
    train_images: int = 0

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # shallow: the weights are not copied

    @classmethod
    def from_dict(cls, d: dict, path: Path) -> TrainState:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise BottleneckError(f"checkpoint {path} holds a state this version does not know "
                                  f"({', '.join(sorted(unknown))}); delete it to start over")
        return cls(**d)


class Run:
    """One fine-tuning run: its model, optimiser, history and checkpoints."""

    def __init__(self, args: dict, net: nn.Module, head: str, images: dict, prep: dict, dev: torch.device,
                 precision: str, rank: int, world: int, out: Path):
        self.args, self.net, self.head, self.images, self.prep = args, net, head, images, prep
        self.dev, self.precision, self.rank, self.world, self.out = dev, precision, rank, world, out
        self.model = net
        self.scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
        self.state = TrainState()
        self.opt = self.sched = self.opt_phase = None
        self.stop_signal = None
        self.total = args["head_epochs"] + args["epochs"]

    # -- phases ---------------------------------------------------------------
    def phase(self, epoch: int) -> str:
        return "head" if epoch < self.args["head_epochs"] else "finetune"

    def set_trainable(self, phase: str) -> None:
        params = list(self.net.named_parameters())
        first = len(params) if phase == "head" else first_unfrozen(self.net, self.args, self.head)
        for i, (name, p) in enumerate(params):
            p.requires_grad = name.startswith(self.head + ".") or i >= first

    def make_optimizer(self, phase: str) -> None:
        a = self.args
        head = [p for n, p in self.net.named_parameters() if n.startswith(self.head + ".")]
        body = [p for n, p in self.net.named_parameters() if p.requires_grad and not n.startswith(self.head + ".")]
        groups = [{"params": head, "lr": a["lr"]}]
        if body:
            groups.append({"params": body, "lr": a["lr"] * a["backbone_lr_mult"]})
        if a["optimizer"] == "adamw":
            self.opt = torch.optim.AdamW(groups, weight_decay=0.05)
        else:
            self.opt = torch.optim.SGD(groups, momentum=0.9, nesterov=True, weight_decay=1e-4)
        steps = self.steps_per_epoch() * (a["head_epochs"] if phase == "head" else a["epochs"])
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(a["schedule"], steps, phase))

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.images["train"][1]) / self.args["batch_size"])

    # -- checkpoints ------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        ckpt = {"format": "bottleneck-checkpoint/1", "args": self.args, "model": self.net.state_dict(),
                "optimizer": self.opt.state_dict(), "lr_scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(), "phase": self.opt_phase,
                "rng": torch.get_rng_state(), "state": self.state.as_dict()}
        self.out.mkdir(parents=True, exist_ok=True)
        save_atomic(ckpt, self.checkpoint_path())

    def load_checkpoint(self) -> dict | None:
        path = self.checkpoint_path()
        if not path.is_file():
            return None
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise BottleneckError(f"checkpoint {path} cannot be read ({type(e).__name__}); delete it to "
                                  "start over") from None
        if ckpt.get("format") != "bottleneck-checkpoint/1" or ckpt.get("args") != self.args:
            changed = [k for k in self.args if ckpt.get("args", {}).get(k) != self.args[k]]
            raise BottleneckError(f"{self.out} holds a run with other {describe_changes(changed) or 'format'}; "
                                  "use another --out or delete it")
        self.net.load_state_dict(ckpt["model"])
        self.state = TrainState.from_dict(ckpt["state"], path)
        torch.set_rng_state(ckpt["rng"])
        self.scaler.load_state_dict(ckpt["scaler"])
        note(f"resuming {self.out} at epoch {self.state.epoch + 1}, step {self.state.step}")
        return ckpt

    # -- the loop ---------------------------------------------------------------
    def train(self, progress: bool) -> None:
        ckpt = self.load_checkpoint()
        previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        try:
            with progress_bar(enabled=progress) as bar:
                self._loop(ckpt, bar)
        finally:
            signal.signal(signal.SIGTERM, previous[0])
            signal.signal(signal.SIGUSR1, previous[1])

    def _on_signal(self, signum, frame) -> None:
        self.stop_signal = signal.Signals(signum).name

    def _loop(self, ckpt: dict | None, bar) -> None:
        current = None
        note(f"training: {self.steps_per_epoch()} steps per epoch, {self.total} epochs at most")
        while self.state.epoch < self.total and not self.stopped_early():
            epoch = self.state.epoch
            phase = self.phase(epoch)
            if phase != current:
                self.start_phase(phase, ckpt)
                current, ckpt = phase, None
            self.train_epoch(epoch, bar)
            self.end_epoch(epoch, phase)
            if self.stopped_early():
                note(f"early stop after epoch {epoch + 1}: no improvement in {self.args['patience']} epochs")
        if self.args["restore_best"] and self.state.best_model is not None:
            self.net.load_state_dict(self.state.best_model)

    def stopped_early(self) -> bool:
        """Whether the last finished epoch, a fine-tuning one, ran out of patience. Read from the
        state, not decided in the loop, so a run resumed after its early stop stops there too."""
        return self.state.epoch > self.args["head_epochs"] and self.state.bad_epochs >= self.args["patience"]

    def start_phase(self, phase: str, ckpt: dict | None) -> None:
        if phase == "finetune" and (self.args["head_epochs"] or self.args["init_head"]) and \
                self.state.head_only is None:
            head_only = self.evaluate("test")  # the course's before/after comparison (LP-FT: the probe's)
            self.state.head_only = {k: v for k, v in head_only.items() if k != "probs"}
        self.set_trainable(phase)
        if self.world > 1:  # wrapped after freezing: DDP syncs only the parameters that train
            self.model = nn.parallel.DistributedDataParallel(self.net)
        self.make_optimizer(phase)
        self.opt_phase = phase  # the phase the optimiser state belongs to, for checkpoints
        if ckpt is not None and ckpt["phase"] == phase:
            self.opt.load_state_dict(ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["lr_scheduler"])

    def train_epoch(self, epoch: int, bar) -> None:
        a = self.args
        y_all = self.images["train"][1]
        order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(a["seed"] * 100003 + epoch))
        steps = self.steps_per_epoch()
        task = bar.add_task(f"epoch {epoch + 1}/{self.total} ({self.phase(epoch)})", total=steps)
        bar.advance(task, self.state.step)
        set_train_mode(self.net)
        for step in range(self.state.step, steps):
            tick = time.perf_counter()
            idx = order[step * a["batch_size"]:(step + 1) * a["batch_size"]]
            gen = torch.Generator().manual_seed(a["seed"] * 7919 + epoch * 100003 + step)
            x = self.train_inputs(idx, gen)
            idx = idx[self.rank::self.world]
            y = y_all[idx].to(self.dev)
            with torch.autocast(self.dev.type, dtype=backbones.AUTOCAST.get(self.precision),
                                enabled=self.precision in backbones.AUTOCAST):
                loss = F.cross_entropy(self.model(x).float(), y, label_smoothing=LABEL_SMOOTHING)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            self.sched.step()
            self.state.step = step + 1
            self.state.train_seconds += time.perf_counter() - tick
            self.state.train_images += len(idx) * self.world
            bar.advance(task)
            if self.stop_signal:
                self.save_checkpoint()
                raise Interrupted(f"{self.stop_signal} received: checkpoint saved at epoch {epoch + 1}, step "
                                  f"{step + 1} in {self.checkpoint_path()}; rerun the same command to resume")
        bar.remove_task(task)

    def train_inputs(self, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """This process's share of a training batch, augmented and normalised on the device. The whole
        batch is augmented first: any number of processes sees the images one process would."""
        x = augment_batch(self.images["train"][0][idx], self.args["augment"], gen)[self.rank::self.world]
        return backbones.normalise(x, self.prep, self.dev)

    def probabilities(self, x: torch.Tensor, views: str) -> torch.Tensor:
        return backbones.predict_proba(self.net, x, self.prep, self.dev, self.precision, views,
                                       self.args["batch_size"] * 2)

    def end_epoch(self, epoch: int, phase: str) -> None:
        train = self.evaluate("train", limit=len(self.images["val"][1]), views="none")
        val = self.evaluate("val", views="none")
        self.state.history.append({"epoch": epoch + 1, "phase": phase, "train_loss": train["loss"],
                                      "train_accuracy": train["accuracy"], "val_loss": val["loss"],
                                      "val_accuracy": val["accuracy"]})
        score = -val["loss"] if self.args["monitor"] == "loss" else val["accuracy"]
        if self.state.best_score is None or score > self.state.best_score:
            self.state.best_score, self.state.bad_epochs, self.state.best_epoch = score, 0, epoch + 1
            self.state.best_model = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        else:
            self.state.bad_epochs += 1
        note(f"epoch {epoch + 1} ({phase}): train loss {train['loss']:.3f}, val loss {val['loss']:.3f}, "
             f"val accuracy {val['accuracy']:.3f}")
        self.state.epoch, self.state.step = epoch + 1, 0
        self.save_checkpoint()

    def tta_views(self) -> str:
        return tta_views(self.args["tta"], self.args["augment"])

    @torch.no_grad()
    def evaluate(self, split: str, limit: int | None = None, views: str | None = None) -> dict:
        """Loss, accuracy and predictions on a split (with the run's test-time augmentation by default)."""
        x_all, y_all = self.images[split]
        if limit:  # a fixed slice of the training split, to watch training loss cheaply
            x_all, y_all = x_all[:limit], y_all[:limit]
        probs = self.probabilities(x_all, views or self.tta_views())
        y_pred = probs.argmax(1)
        loss = F.nll_loss(torch.log(probs.clamp_min(1e-12)), y_all).item()
        return {"loss": loss, "accuracy": float((y_pred == y_all).float().mean()), "y_pred": y_pred.tolist(),
                "y_true": y_all.tolist(), "probs": probs}

    # -- the end -----------------------------------------------------------------
    def finish(self, classes: list[str], split_info: dict, root: str, test_paths: list[str], extra: dict,
               wall: float) -> Path:
        final = self.evaluate("test")
        point = None
        if self.args.get("target"):  # chosen on val by the model as it ends (the best epoch's, unless --keep-last)
            val = self.evaluate("val")
            point = reports.operating_point(self.args["target"], classes,
                                            (np.array(val["y_true"]), val["probs"].numpy()),
                                            "validation split, scored by the final model",
                                            np.array(final["y_true"]), final["probs"].numpy())
        rep = build_report(self, classes, split_info, final, wall, point)
        rep.data_root, rep.preprocessing, rep.folds = root, extra.pop("preprocessing"), extra.pop("folds")
        rep.tap = extra.pop("tap", None)  # a top on cached maps: the tap they were cut at
        rep.extra |= extra
        rep.test_set = reports.test_set("test", test_paths, final["y_true"], classes)
        reports.write_predictions(self.out, test_paths, final["y_true"], final["y_pred"], final["probs"].numpy(),
                                  classes)
        save_atomic({"format": NETWORK_FORMAT, "model": self.whole_network(), "arch": self.args["model"],
                     "classes": classes, "preprocessing": self.prep, "precision": self.precision,
                     "tta": self.tta_views(), "head": self.head, "weights": self.args["weights"],
                     "trained_on": ["train", "val"],  # val chose the epoch: its score is optimistic too
                     "versions": versions()}, self.out / "model.pt")
        reports.plot_history(self.state.history, self.out / "learning_curve.png", title=f"{self.args['model']}")
        path = rep.write(self.out)
        self.checkpoint_path().unlink(missing_ok=True)
        return path


    def whole_network(self) -> dict:
        """The weights of the whole network, as model.pt holds them."""
        return self.net.state_dict()


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save under a temporary name, then rename: a crash or a full disk never leaves half a file."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # two writers never share a temporary file
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (RuntimeError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise write_error(e, path) from None


def first_unfrozen(net: nn.Module, args: dict, head: str) -> int:
    """Index (in parameter order) of the first trainable backbone parameter in phase two."""
    names = [n for n, _ in net.named_parameters()]
    spec = args["unfreeze"]
    if spec == "all":
        return 0
    if spec.startswith("from:"):
        module = backbones.get_spec(args["model"]).taps[spec.removeprefix("from:")].module
        return next(i for i, n in enumerate(names) if n.startswith(module + "."))
    blocks = trunk_blocks(net, head)
    n = min(int(spec), len(blocks))
    if n == 0:
        return len(names)
    return next(i for i, name in enumerate(names) if name.startswith(blocks[-n] + "."))


def trunk_blocks(net: nn.Module, head: str) -> list[str]:
    """Top-level blocks holding parameters, containers opened one level (features.0, blocks.3)."""
    found = []
    for name, child in net.named_children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            found += [f"{name}.{sub}" for sub, m in child.named_children() if any(True for _ in m.parameters())]
        elif any(True for _ in child.parameters()):
            found.append(name)
    return [b for b in found if not (head + ".").startswith(b + ".")]


def set_train_mode(net: nn.Module) -> None:
    """Train mode, except BatchNorm layers whose parameters are frozen: their statistics stay put."""
    net.train()
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def lr_factor(schedule: str, steps: int, phase: str):
    """Head phase: constant. Fine-tune phase: 5 % linear warm-up, then cosine to zero (or step ×0.1)."""
    warm = max(1, steps // 20)

    def factor(step: int) -> float:
        if phase == "head":
            return 1.0
        if step < warm:
            return (step + 1) / warm
        done = (step - warm) / max(1, steps - warm)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
        return 0.1 ** int(done * 3)

    return factor


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
