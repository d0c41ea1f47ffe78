"""Every stage's settings, defined once.

Each stage (extract, fit, finetune) has one frozen dataclass. A field's default, help text,
allowed values and bounds live in its `setting(...)`, and from that one definition come:

- the Python signature, keyword-only after the required fields (`takes`);
- the command-line options (`bottleneck.cli` builds them from the fields);
- the keys of an experiment file and their type errors (`bottleneck.pipeline`);
- the command lines of Slurm jobs (`command_words`);
- the checks (`validate`), and the settings recorded in reports and checkpoints.

Adding an option to a stage is adding a field here and reading it in the stage. The sbatch
options of `run --slurm` are one more such dataclass (`SlurmOptions`).

This module loads no torch or scikit-learn: every command's --help reads it.
"""

import dataclasses
import functools
import inspect
import math
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields

from bottleneck.errors import BottleneckError
from bottleneck.views import parse_views

# The names of classifiers.TABLE, kept here so that settings (and every command's --help) load without
# scikit-learn; tests/test_startup.py checks the two agree.
CLASSIFIERS = ("logreg", "svm", "linear-svm", "mlp", "linear", "knn")
CLASSIFIER_CHOICES = ("auto", *CLASSIFIERS)  # auto: chosen by cross-validation (bottleneck.choose)
GPU_CLASSIFIERS = ("linear",)  # those of classifiers.TABLE with gpu=True: their Slurm fit jobs ask for a GPU
MEMORY_BUDGET_MB = 2048  # fit --memory-budget: features of a split the linear classifier holds in memory at once
POOLS = ("avg", "max", "flatten")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = ("float32", "float16")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
IMAGE_SIZE_HELP = "Network input N×N [default: the model's own]."
CROP_HELP = ("Resize the short side and centre-crop (the model's own pipeline), or resize the whole image "
             "[default: the whole image for images smaller than the input, else crop].")
INTERPOLATION_HELP = "Resampling [default: the model's own]."
VAL_FRACTION_HELP = "Validation fraction carved from train [default: 0.1 for data without splits, else none]."
TEST_FRACTION_HELP = "Test fraction carved from train [default: 0.25 for data without splits, else none]."
GROUP_PATTERN_HELP = ("Keep images of one group (a module, patient, object) on one side of every split and fold: a "
                      "regular expression whose first capture group, searched in each file name, names its group, "
                      "e.g. '^(.+)_cell' (a CSV manifest may give a group column instead).")
SPLIT_SEED_HELP = "Seed of the stratified split (the same for extract and finetune gives the same test images)."
FOLDS_HELP = ("Cross-validate: K stratified folds of all images (every split pooled), each in turn the test split, "
              "validation carved from the rest; the same K and --split-seed give fit and finetune the same folds.")
FOLD_HELP = "With --folds: run only fold I (0-based) [default: every fold, one run folder each, ending -foldI]."
TARGET_HELP = ("Two classes: an operating point, e.g. recall:defective=0.9 or precision:defective=0.95; the "
               "threshold on that class's probability meeting it on validation images is applied to the test "
               "images, and the report gives each class's recall and precision there.")


TARGET_MEASURES = ("recall", "precision")


def parse_target(text: str) -> tuple[str, str, float]:
    """'recall:defective=0.9' → ("recall", "defective", 0.9)."""
    measure, _, rest = text.partition(":")
    cls, _, value = rest.rpartition("=")
    try:
        goal = float(value)
    except ValueError:
        goal = math.nan
    if measure not in TARGET_MEASURES or not cls or not 0 < goal <= 1:
        raise BottleneckError(f"--target {text!r} is not MEASURE:CLASS=VALUE; write e.g. recall:defective=0.9 "
                              f"(MEASURE is {' or '.join(TARGET_MEASURES)}, VALUE above 0 and at most 1)")
    return measure, cls, goal


def check_target(target: str | None) -> None:
    if target is not None:
        try:
            parse_target(target)
        except BottleneckError as e:
            raise SettingError("target", str(e)) from None
# Never an experiment-file key: the file may be the untrusted input that names the pickle.
TRUST_HELP = ("Also read a classifier that is a pickle (a model.joblib from before model.skops, or from elsewhere); "
              "loading one runs any code it holds, so only for files you trust.")


class SettingError(BottleneckError):
    """A setting's value is wrong; `key` names the field, so an experiment file can point at its line."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def setting(default=MISSING, help: str = "", *, choices: tuple = (), low=None, high=None, flags: tuple = (),
            toml: bool | str = True, toml_list: bool = False, what: str | None = None):
    """One option of a stage.

    `flags`: its command-line names, the first one shown in errors ("--a/--b" for a boolean's
    two forms); by default `--field-name`. `toml`: False keeps it out of experiment files, a
    string is its key there ("[data] split_seed" for a key of the [data] table); `toml_list`: the
    file holds a list of values, one run each (`classifiers = ["logreg", "svm"]`). `what`: the
    word for the value in errors ("unknown classifier 'forest'"), by default the flag.
    """
    meta = {"help": help, "choices": tuple(choices), "low": low, "high": high, "flags": tuple(flags),
            "toml": toml, "toml_list": toml_list, "what": what}
    return field(default=default, metadata=meta)


class Settings:
    """What every stage's settings can do."""

    def validate(self):
        """Check every field (type, choices, bounds), then the stage's own rules; returns self."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            check_value(f, hints[f.name], getattr(self, f.name))
        self.check()
        return self

    def check(self) -> None:
        """Rules between fields; a stage overrides this."""

    def asdict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- the stages

@dataclass(frozen=True)
class ExtractSettings(Settings):
    model: str = setting(help="Backbone name (see 'bottleneck models'), or timm:ARCH.")
    data_dir: str = setting(help="ImageFolder tree (with or without train/val/test folders) or a CSV manifest "
                            "path,label[,split].", flags=("--data",), toml=False)
    layer: list[str] | None = setting(None, "Feature tap; repeat for several taps in one pass, or all [default: "
                                      "the last stages and the penultimate vector, see 'bottleneck models "
                                      "NAME'].", toml="layers")
    pool: str = setting("avg", "Pooling of spatial taps.", choices=POOLS, what="pooling")
    image_size: int | None = setting(None, IMAGE_SIZE_HELP, low=8)
    crop: bool | None = setting(None, CROP_HELP, flags=("--crop/--no-crop",))
    interpolation: str | None = setting(None, INTERPOLATION_HELP, choices=INTERPOLATIONS)
    views: str = setting("none", "Cache several views of each image: hflip (2), flips (4: horizontal, vertical, both), "
                         "dihedral (8: the flips and quarter turns, for images with no up) or crops:K (the image "
                         "and K - 1 random resized crops of it, the same seeded boxes for every image). fit trains "
                         "on every view and scores an image by averaging its views.")
    maps: str | None = setting(None, "Also keep this tap's unpooled maps (float16, views included), on which "
                               "'finetune --from-cache' trains the layers after it without running the network "
                               "below it again.")
    weights: str = setting("DEFAULT", "DEFAULT, an enum name (IMAGENET1K_V1), a state_dict file, or none "
                           "(random init).")
    out: str = setting("cache", "Cache folder.", toml=False)
    batch_size: int = setting(64, "Images per batch (and per saved block).", low=1, high=65536)
    workers: int | None = setting(None, "DataLoader worker processes [default: half the cores, at most 8].",
                                  low=0, high=256)
    device: str = setting("auto", "auto, cpu or cuda[:N].")
    decode: str = setting("cpu", "Where JPEGs are decoded and resized: cpu (PIL, in the loader's workers) or gpu "
                          "(nvjpeg on the extraction's GPU, a block at a time; other formats stay on the CPU, "
                          "and without CUDA torchvision.io decodes on the CPU).", choices=("cpu", "gpu"))
    precision: str = setting("auto", "Compute precision.", choices=PRECISIONS)
    dtype: str = setting("float32", "Storage type.", choices=DTYPES)
    shard: str = setting("0/1", "Compute shard I of N (0-based), e.g. 0/4.", toml=False)
    force: bool = setting(False, "Extract again even if a complete cache exists.", toml=False)
    val_fraction: float | None = setting(None, VAL_FRACTION_HELP, low=0.0, toml="[data] val_fraction")
    test_fraction: float | None = setting(None, TEST_FRACTION_HELP, low=0.0,
                                          toml="[data] test_fraction")
    split_seed: int = setting(0, SPLIT_SEED_HELP, low=0, toml="[data] split_seed")
    group_pattern: str | None = setting(None, GROUP_PATTERN_HELP, toml="[data] group_pattern")
    progress: bool = setting(True, "Show a progress bar.", toml=False)

    def check(self) -> None:
        try:
            parse_views(self.views)
        except BottleneckError as e:
            raise SettingError("views", str(e)) from None


@dataclass(frozen=True)
class FitSettings(Settings):
    features: str = setting(help="Feature cache (.h5) from 'bottleneck extract'.", toml=False)
    clf: str = setting("logreg", "Classifier; auto chooses among logreg, svm and mlp by cross-validation over "
                       "train + val, the cheapest within one standard error of the best (svm only up to "
                       "5,000 training rows; linear when the features exceed --memory-budget).",
                       choices=CLASSIFIER_CHOICES, toml="classifiers", toml_list=True,
                       what="classifier")
    layer: str | None = setting(None, "Tap to use; auto picks, of the cache's taps and all of them side by side "
                                "(concat), the one with the best validation score; concat fits on all taps; "
                                "select keeps the features of all taps most relevant to the classes (Head2Toe: "
                                "a group-lasso ranking, the fraction kept searched on validation); all fits one "
                                "classifier per tap [default: auto].", toml="layers", toml_list=True)
    search: bool = setting(True, "Tune the main hyperparameter on the validation split (or by CV), or keep "
                           "the fixed defaults; it costs seconds.", flags=("--search/--no-search",))
    class_weight: str | None = setting(None, "Weight classes by their inverse frequency.", choices=("balanced",))
    seed: int = setting(0, "Seed for hold-out splits, CV folds and the classifier.", low=0)
    folds: int | None = setting(None, FOLDS_HELP, low=2, toml="[data] folds")
    fold: int | None = setting(None, FOLD_HELP, low=0, toml=False)
    split_seed: int = setting(0, "With --folds: the seed of the fold assignment (finetune's --split-seed).", low=0,
                              toml="[data] split_seed")
    val_fraction: float | None = setting(None, "With --folds: the validation fraction carved from the other folds "
                                         "[default: 0.1].", low=0.0, toml="[data] val_fraction")
    out: str | None = setting(None, "Output folder [default: runs/fit/<cache name>].", toml=False)
    train_sizes: str | None = setting(None, "Learning curve: images per class, e.g. 10,25,50,100,all.", toml=False)
    force: bool = setting(False, "Replace a result of other settings in the same folder.", toml=False)
    reuse: bool = setting(False, "Keep a finished fit of the same settings and cache instead of fitting again, and "
                          "replace any other (what 'bottleneck run' does with its own folders).", toml=False)
    target: str | None = setting(None, TARGET_HELP + " The validation images are the val split, scored by the "
                                 "model trained on train alone, or else each training image scored by 5-fold CV.")
    memory_budget: float = setting(MEMORY_BUDGET_MB, "MB of features the linear classifier holds at once: a split "
                                   "larger than this is read from the cache in chunks and trained on by minibatch "
                                   "(other classifiers load every split whole).", low=0.01)

    def check(self) -> None:
        check_target(self.target)
        check_folds(self)
        if self.folds and (self.layer == "all" or self.train_sizes):
            raise SettingError("folds", "--folds scores one classifier per fold; a layer probe (--layer all) or a "
                               "learning curve (--train-sizes) takes the data's own split, so drop --folds for them")


@dataclass(frozen=True)
class FinetuneSettings(Settings):
    model: str = setting(help="Backbone name (see 'bottleneck models'), or timm:ARCH.")
    data_dir: str = setting(help="The same data as for extract.", flags=("--data",), toml=False)
    weights: str = setting("DEFAULT", "Starting weights: DEFAULT, an enum name, a file.")
    unfreeze: str = setting("all", "all, N (last N blocks) or from:TAP.")
    head_epochs: int | None = setting(None, "Epochs training the new head alone [default: 1, or 0 with "
                                      "--init-head].", low=0)
    init_head: str | None = setting(None, "LP-FT: start the new head from a linear probe, the model.skops of "
                                    "'bottleneck fit --clf logreg (or linear) --layer TAP' on this model's penultimate "
                                    "tap (standardisation folded in); the head-only epochs are then skipped.")
    trust: bool = setting(False, TRUST_HELP, toml=False)
    from_cache: str | None = setting(None, "Train only the layers after a tap, and the head, on the tap's maps in a "
                                     "cache made by 'extract --maps TAP' from this data, without decoding images or "
                                     "running the network below the tap; each epoch draws one of the cache's views "
                                     "per image (--augment none: the image itself), scoring averages them. The "
                                     "saved model is the whole network.")
    epochs: int = setting(8, "Epochs with the unfrozen part training too (at most: see --patience).", low=0)
    lr: float = setting(2e-3, "Learning rate of the head.", low=0.0)
    backbone_lr_mult: float = setting(0.25, "Backbone learning rate = lr × this.", low=0.0)
    optimizer: str = setting("adamw", "Optimiser.", choices=("adamw", "sgd"))
    schedule: str = setting("cosine", "Learning-rate schedule after a short warm-up.", choices=("cosine", "step"))
    augment: str = setting("light", "Training augmentation: light is horizontal and vertical flips; strong adds "
                           "quarter turns and brightness/contrast jitter, for images with no up (cells, slides, "
                           "satellite tiles), and test-time views over all 8 symmetries.",
                           choices=("none", "light", "strong"))
    patience: int = setting(4, "Stop after this many epochs without improvement on validation.", low=1)
    monitor: str = setting("loss", "Validation measure for early stopping and the best epoch.",
                           choices=("loss", "accuracy"))
    batch_size: int = setting(32, "Images per step (all processes together).", low=1)
    image_size: int | None = setting(None, IMAGE_SIZE_HELP, low=8)
    crop: bool | None = setting(None, CROP_HELP, flags=("--crop/--no-crop",))
    interpolation: str | None = setting(None, INTERPOLATION_HELP, choices=INTERPOLATIONS)
    tta: bool = setting(True, "Average predictions over flips when scoring.")
    restore_best: bool = setting(True, "End with the weights of the best validation epoch, or of the last.",
                                 flags=("--restore-best/--keep-last",))
    precision: str = setting("auto", "Compute precision.", choices=PRECISIONS)
    device: str = setting("auto", "auto, cpu or cuda[:N].")
    seed: int = setting(0, "Seed of data order, augmentation and the new head (not of the split: see "
                        "--split-seed).", low=0)
    deterministic: bool = setting(False, "Bit-identical reruns and resumes on one machine (deterministic torch, "
                                  "oneDNN, MKL).")
    max_images: int | None = setting(None, "Use at most N images per split (quick trials).", low=1)
    val_fraction: float | None = setting(None, VAL_FRACTION_HELP, low=0.0, toml="[data] val_fraction")
    test_fraction: float | None = setting(None, TEST_FRACTION_HELP, low=0.0,
                                          toml="[data] test_fraction")
    split_seed: int = setting(0, SPLIT_SEED_HELP, low=0, toml="[data] split_seed")
    group_pattern: str | None = setting(None, GROUP_PATTERN_HELP, toml="[data] group_pattern")
    folds: int | None = setting(None, FOLDS_HELP, low=2, toml="[data] folds")
    fold: int | None = setting(None, FOLD_HELP, low=0, toml=False)
    workers: int | None = setting(None, "Decoding worker processes.", low=0, high=256)
    out: str | None = setting(None, "Run folder [default: runs/finetune/MODEL]; rerunning with the same folder "
                              "resumes.", toml=False)
    progress: bool = setting(True, "Show progress bars.", toml=False)
    target: str | None = setting(None, TARGET_HELP + " The validation images are scored by the final model (the "
                                 "best epoch's, unless --keep-last).")

    def head_epochs_run(self) -> int:
        """Head-only epochs: as given, else none after --init-head (the probe is that phase) and one otherwise."""
        if self.head_epochs is not None:
            return self.head_epochs
        return 0 if self.init_head else 1

    def check(self) -> None:
        check_folds(self)
        if self.folds and self.test_fraction is not None:
            raise SettingError("test_fraction", "with --folds each fold is the test split in turn; drop "
                               "--test-fraction")
        if self.folds and self.max_images is not None:
            raise SettingError("max_images", "with --folds every image is a test image once; drop --max-images")
        if self.folds and self.init_head:  # a probe's splits are its cache's, not this fold's
            raise SettingError("init_head", "--init-head is not checked against a fold's test images; drop --folds "
                               "or --init-head")
        check_target(self.target)
        if self.epochs + self.head_epochs_run() == 0:
            raise SettingError("epochs", "nothing to train: --epochs and --head-epochs are both 0")
        if self.lr == 0:
            raise SettingError("lr", "--lr must be positive")
        if self.init_head is not None and not self.init_head.strip():  # "" was silently no LP-FT at all
            raise SettingError("init_head", "--init-head is empty; give the model.joblib of a logreg probe, or leave "
                               "it out")
        u = self.unfreeze
        if not (u == "all" or u.isdigit() or u.startswith("from:")):
            raise SettingError("unfreeze", f"--unfreeze must be all, a number of blocks, or from:TAP; not '{u}'")
        if self.from_cache:  # the cache fixed these when it was extracted
            for name in ("image_size", "crop", "interpolation", "max_images"):
                if getattr(self, name) is not None:
                    raise SettingError(name, f"--from-cache trains on the cache as it was extracted; "
                                       f"{flag(next(f for f in fields(self) if f.name == name))} does not apply")
            if u != "all":
                raise SettingError("unfreeze", "--from-cache trains every layer after the cache's tap; "
                                   "--unfreeze does not apply")


# --------------------------------------------------------------------------- Slurm

@dataclass(frozen=True)
class SlurmOptions(Settings):
    """sbatch settings of `run --slurm`, shared by every job; gres goes only to the jobs that use a GPU."""

    partition: str | None = setting(None, "Slurm partition.", toml=False)
    account: str | None = setting(None, "Slurm account.", toml=False)
    gres: str | None = setting(None, "GPUs for extraction and fine-tuning, e.g. gpu:1.", toml=False)
    time: str | None = setting(None, "Time limit per job, e.g. 02:00:00.", toml=False)
    mem: str | None = setting(None, "Memory per job, e.g. 32G.", toml=False)
    array_size: int = setting(4, "Extraction shards (tasks of the job array).", low=1, toml=False)
    setup: str | None = setting(None, "Shell lines run first in every job [default: activate this venv].",
                                toml=False)


def folder_name(tap: str, clf: str, search: bool, class_weight: str | None, seed: int, folds: dict | None = None,
                target: str | None = None) -> str:
    """The folder of one fit (here, not in classify, so that reading an experiment loads no
    scikit-learn): tap and classifier, then each setting that differs from the default
    (the target changes the report, not the model: it has no part in the name)."""
    parts = [tap, clf] + (["search"] if search else []) + ([f"cw-{class_weight}"] if class_weight else [])
    return "-".join(parts + ([f"seed{seed}"] if seed else []) + ([f"fold{folds['fold']}"] if folds else []))


def check_folds(s) -> None:
    """--fold picks one of --folds K."""
    if s.fold is not None and s.folds is None:
        raise SettingError("fold", "--fold picks one of K folds; give --folds K too")
    if s.fold is not None and s.fold >= s.folds:
        raise SettingError("fold", f"--fold must be in 0..{s.folds - 1} for --folds {s.folds}, not {s.fold}")


# --------------------------------------------------------------------------- one field

def flag(f: dataclasses.Field) -> str:
    """The option's main command-line name."""
    return (f.metadata["flags"] or ("--" + f.name.replace("_", "-"),))[0].split("/")[0]


def negative_flag(f: dataclasses.Field) -> str:
    """The command-line form that sets a boolean to false."""
    main = (f.metadata["flags"] or ("--" + f.name.replace("_", "-"),))[0]
    return main.split("/")[1] if "/" in main else "--no-" + main[2:]


def base_type(hint) -> tuple[type, bool]:
    """(type, optional) of an annotation: int | None → (int, True); list[str] → (list, False)."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return base_type(inner[0])[0], True
    return (typing.get_origin(hint) or hint), False


TYPE_WORDS = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
              list: "a list of strings"}


def type_problem(hint, value) -> str | None:
    """Why `value` does not fit the annotation, or None."""
    kind, optional = base_type(hint)
    if value is None:
        return None if optional else f"must be {TYPE_WORDS[kind]}, not None"
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is list:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, kind)
    return None if ok else f"must be {TYPE_WORDS[kind]}, not {_short(value)}"


def check_value(f: dataclasses.Field, hint, value) -> None:
    problem = type_problem(hint, value)
    if problem:
        raise SettingError(f.name, f"{flag(f)} {problem}")
    m = f.metadata
    if value is None:
        return
    if base_type(hint)[0] is float and not math.isfinite(value):  # NaN passes every bound: compared, it is False
        raise SettingError(f.name, f"{flag(f)} must be a finite number, not {value}")
    if m["choices"] and value not in m["choices"]:
        raise SettingError(f.name, f"unknown {m['what'] or flag(f)} {_short(value)}; choose one of "
                           f"{', '.join(m['choices'])}")
    low, high = m["low"], m["high"]
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (f"between {low} and {high}" if low is not None and high is not None else
                  f"at least {low}" if low is not None else f"at most {high}")
        raise SettingError(f.name, f"{flag(f)} must be {bounds}, not {value}")


def _short(value) -> str:
    """A value for an error message, cut to a line: a 10 MB string is not echoed back."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- what comes from the fields

def signature(cls) -> inspect.Signature:
    """The stage's Python signature: required fields first, every other keyword-only."""
    hints = typing.get_type_hints(cls)
    params = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[f.name])
              for f in fields(cls) if f.default is MISSING]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
               for f in fields(cls) if f.default is not MISSING]
    return inspect.Signature(params)


def takes(cls):
    """Turn `func(settings)` into `func(required, ..., *, option=default, ...)` over `cls`'s fields.

    The arguments are checked (`validate`) before the function runs; `func.settings` is `cls`.
    """
    sig = signature(cls)

    def wrap(func):
        @functools.wraps(func)
        def call(*args, **kwargs):
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as e:
                raise TypeError(f"{func.__name__}(): {e}") from None
            # Paths may come as pathlib objects (extract returns one); settings hold plain strings,
            # which reports, checkpoints and command lines store as they are.
            args = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in bound.arguments.items()}
            return func(cls(**args).validate())

        call.__signature__ = sig
        call.settings = cls
        return call

    return wrap


def toml_keys(cls, table: str | None = None) -> dict[str, dataclasses.Field]:
    """{key: field} of a stage's fields in an experiment file's own table (`table=None`) or in
    another table ("data")."""
    keys = {}
    for f in fields(cls):
        where = f.metadata["toml"]
        if where is False:
            continue
        name = f.name if where is True else where
        in_table, _, key = name.rpartition(" ")
        if in_table.strip("[]") == (table or ""):
            keys[key] = f
    return keys


def command_words(cls, args: dict) -> list[tuple[str, object]]:
    """(flag, value) pairs for the arguments that differ from their defaults, value None after a
    boolean's flag, so a command line shows what was chosen; the caller quotes values for its shell."""
    by_name = {f.name: f for f in fields(cls)}
    pairs = []
    for key, value in args.items():
        f = by_name[key]
        if value is None or (f.default is not MISSING and value == f.default and type(value) is type(f.default)):
            continue
        if isinstance(value, bool):
            pairs.append((flag(f) if value else negative_flag(f), None))
        else:
            pairs += [(flag(f), v) for v in (value if isinstance(value, (list, tuple)) else [value])]
    return pairs
