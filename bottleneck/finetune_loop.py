"""One fine-tuning run: its phases, optimiser, loop, checkpoints and early stopping.

A run trains the head alone (`head_epochs`, backbone frozen), then the unfrozen part with a lower
learning rate than the head. A checkpoint (a plain dict) is written atomically after every epoch,
and SIGTERM/SIGUSR1 (what Slurm sends before a time limit) save one mid-epoch and exit with code
75, so rerunning the same command resumes exactly. Under `torchrun` each process takes its share
of every batch (DistributedDataParallel). `finetune_top.TopRun` is the same run on cached maps.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from bottleneck import backbones, networks
from bottleneck.console import note, progress_bar
from bottleneck.errors import BottleneckError, Interrupted, write_error
from bottleneck.finetune_data import augment_batch
from bottleneck.views import tta_views

LABEL_SMOOTHING = 0.1

DATA_KEY = "dataset_fingerprint"  # in a run's settings: its data's fingerprint (run_args)


def describe_changes(changed: list[str]) -> str:
    """What differs, for a refusal: the settings by name, the data in words, or both."""
    settings = [k for k in changed if k != DATA_KEY]
    parts = [f"settings ({', '.join(settings)})"] if settings else []
    if DATA_KEY in changed:
        parts.append("data (the classes or images under its data folder changed since)")
    return " and ".join(parts)


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
            with torch.autocast(self.dev.type, dtype=networks.AUTOCAST.get(self.precision),
                                enabled=self.precision in networks.AUTOCAST):
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
        return networks.normalise(x, self.prep, self.dev)

    def probabilities(self, x: torch.Tensor, views: str) -> torch.Tensor:
        return networks.predict_proba(self.net, x, self.prep, self.dev, self.precision, views,
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
