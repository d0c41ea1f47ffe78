"""A whole experiment from one TOML file: extract → fit → finetune → compare.

The file names a dataset, backbones with their taps, the classifiers to fit on every tap,
fine-tuning runs and a run folder (`docs/pipelines.md`). `run` performs the stages in order
on this machine; `bottleneck.slurm` turns the same stages into batch jobs. Each stage keeps
its own way of skipping finished work: a complete cache is reused, a fit whose report was
made from the same cache is kept, a finished fine-tune returns at once and an interrupted
one resumes from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import typing
from dataclasses import dataclass, field
from pathlib import Path

from bottleneck import backbones, settings
from bottleneck.console import note
from bottleneck.errors import BottleneckError
from bottleneck.stages import BY_COMMAND, Stage

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib

BUILTIN_DATA = ("elpv",)


def _keys(cls, table: str | None = None) -> dict:
    """{key: type} of a stage's settings in an experiment file's table, from the stage's one definition."""
    hints = typing.get_type_hints(cls)
    return {key: list[str] if f.metadata["toml_list"] else hints[f.name]
            for key, f in settings.toml_keys(cls, table).items()}


# key → type of every table; None: checked where it is read.
TOP_KEYS = {"name": str, "out": str, "cache": str}
DATA_KEYS = {"path": str, "builtin": str, "labels": str} | _keys(settings.ExtractSettings, "data") \
    | _keys(settings.FitSettings, "data") | _keys(settings.FinetuneSettings, "data")  # folds: fit's and finetune's
BACKBONE_KEYS = {"name": str, "fit": None} | _keys(settings.ExtractSettings)
FIT_KEYS = _keys(settings.FitSettings) | {"seeds": None}
FINETUNE_KEYS = {"name": str} | _keys(settings.FinetuneSettings) | {"seeds": None}
COMPARE_KEYS = {"reference": str, "challenger": str, "margin": float}  # as `bottleneck compare`'s options
TABLES = {"data": DATA_KEYS, "backbone": BACKBONE_KEYS, "fit": FIT_KEYS, "finetune": FINETUNE_KEYS,
          "compare": COMPARE_KEYS}


@dataclass
class Experiment:
    """A parsed, checked experiment file. Paths are relative to where the command runs."""

    file: Path
    name: str
    out: Path
    cache: Path
    data: dict
    backbones: list[dict] = field(default_factory=list)
    fit: dict | None = None
    compare: dict = field(default_factory=dict)
    finetunes: list[dict] = field(default_factory=list)
    trust: bool = False  # run --trust: fine-tunes may read a pickled init_head (never a key of the file itself)


# --------------------------------------------------------------------------- reading

def load(path: str | Path) -> Experiment:
    """Read and check an experiment file; a problem is an error naming the key and its line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BottleneckError(f"experiment file {path} does not exist") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BottleneckError(f"{path} is not valid TOML: {e}") from None
    where = _Locator(path, text)

    for key in doc:
        if key not in TOP_KEYS and key not in TABLES:
            raise where.error(None, 0, key, f"unknown key; expected {', '.join([*TOP_KEYS, *TABLES])}")
    for key, kind in TOP_KEYS.items():
        if key in doc:
            _check_type(where, None, 0, key, doc[key], kind)
    name = doc.get("name", path.stem)
    _check_name(where, None, 0, name)
    exp = Experiment(file=path, name=name, out=Path(doc.get("out", f"runs/{name}")),
                     cache=Path(doc.get("cache", "cache")), data=_data_table(where, doc.get("data")))
    exp.backbones = [_backbone(where, i, t) for i, t in enumerate(_array(where, doc, "backbone"))]
    _unique_names(where, "backbone", exp.backbones)
    if "fit" in doc:
        exp.fit = _fit_table(where, doc["fit"], exp.backbones)
    exp.finetunes = [ft for i, t in enumerate(_array(where, doc, "finetune")) for ft in _finetune(where, i, t)]
    exp.finetunes = [f for ft in exp.finetunes for f in _per_fold(ft, exp.data["folds"])]
    _unique_names(where, "finetune", exp.finetunes)
    for i, t in enumerate(_array(where, doc, "finetune")):
        if t.get("init_head") == PROBE and exp.data["folds"]:
            raise where.error("finetune", i, "init_head", f"\"{PROBE}\" with [data] folds would start every fold "
                              "from one probe that saw its test images; drop init_head or folds")
        _check_init_head(where, i, t)
        if t.get("init_head") == PROBE and probed_backbone(exp, t["model"]) is None:
            spec = backbones.get_spec(t["model"])
            raise where.error("finetune", i, "init_head", f"\"{PROBE}\" starts the head from the logreg probe on "
                              f"{t['model']}'s {spec.default_tap} tap, but no [[backbone]] of model {t['model']} "
                              f"extracts {spec.default_tap}")
    for i, t in enumerate(_array(where, doc, "finetune")):
        if "from_cache" in t:
            _check_maps_backbone(where, i, t, exp)
    if "compare" in doc:
        if not isinstance(doc["compare"], dict):
            raise where.error(None, 0, "compare", "write a [compare] table (reference, challenger, margin)")
        _check_keys(where, "compare", 0, doc["compare"], COMPARE_KEYS)
        exp.compare = doc["compare"]
    if not exp.backbones and not exp.finetunes:
        raise where.error(None, 0, None, "defines no [[backbone]] and no [[finetune]]; nothing to run")
    return exp


def _check_init_head(where: _Locator, i: int, t: dict) -> None:
    """init_head is "probe" or a classifier file that exists now: a missing one would fail only when
    its job runs, after every stage before it (`run --slurm --dry-run` checks nothing else)."""
    head = t.get("init_head")
    if head is not None and head != PROBE and not Path(head).is_file():
        raise where.error("finetune", i, "init_head", f"{head!r} is not a file; give \"{PROBE}\" (the logreg probe "
                          "this experiment fits) or the model.joblib of 'bottleneck fit --clf logreg'")


def _check_maps_backbone(where: _Locator, i: int, t: dict, exp: Experiment) -> None:
    """from_cache names a [[backbone]] of the same model that keeps a tap's maps."""
    bb = next((b for b in exp.backbones if b["name"] == t["from_cache"]), None)
    if bb is None:
        raise where.error("finetune", i, "from_cache", f"names no [[backbone]] of this file; give the name of one "
                          f"with maps = \"TAP\" (its names: {', '.join(b['name'] for b in exp.backbones) or 'none'})")
    if not bb.get("maps") or bb["model"] != t["model"]:
        raise where.error("finetune", i, "from_cache", f"[[backbone]] '{bb['name']}' must be of model {t['model']} "
                          "and keep a tap's maps (maps = \"TAP\")")


def _data_table(where: _Locator, t) -> dict:
    if not isinstance(t, dict):
        raise where.error(None, 0, "data", "a [data] table with path = \"FOLDER\" is required")
    if "seed" in t:  # its old name, which read as the training seed of [fit] and [[finetune]]
        raise where.error("data", 0, "seed", "is now split_seed (the seed of the split; the training seed is "
                          "[fit] or [[finetune]] seed): rename the key")
    _check_keys(where, "data", 0, t, DATA_KEYS)
    if "path" not in t:
        raise where.error("data", 0, None, "needs path = \"FOLDER\" (an image tree or CSV manifest)")
    if t.get("builtin", BUILTIN_DATA[0]) not in BUILTIN_DATA:
        raise where.error("data", 0, "builtin", f"unknown dataset '{t['builtin']}'; built in: "
                          f"{', '.join(BUILTIN_DATA)}")
    if "labels" in t and (t.get("builtin") != "elpv" or t["labels"] not in ("2", "4", "type")):
        raise where.error("data", 0, "labels", "is elpv's labelling, \"2\", \"4\" or \"type\" (with builtin = "
                          "\"elpv\")")
    if "folds" in t and t["folds"] < 2:
        raise where.error("data", 0, "folds", f"must be at least 2, not {t['folds']}")
    if "folds" in t and "test_fraction" in t:
        raise where.error("data", 0, "test_fraction", "with folds every fold is the test split in turn; drop "
                          "test_fraction")
    return {"val_fraction": None, "test_fraction": None, "split_seed": 0, "folds": None} | t


def _backbone(where: _Locator, i: int, t: dict) -> dict:
    _check_keys(where, "backbone", i, t, BACKBONE_KEYS)
    if "model" not in t:
        raise where.error("backbone", i, None, "needs model = \"NAME\" (see 'bottleneck models')")
    bb = _stage_values(where, "backbone", i, t, settings.ExtractSettings)
    bb["name"] = t.get("name", backbones.file_name(t["model"]))
    bb["fit"] = _backbone_fit(where, i, t.get("fit", True))
    _check_name(where, "backbone", i, bb["name"])
    with where.blame("backbone", i, "model"):
        backbones.get_spec(bb["model"])
    with where.blame("backbone", i, "layers"):
        bb["layers"] = backbones.resolve_taps(bb["model"], t.get("layers"), bb["pool"])
    return bb


def _backbone_fit(where: _Locator, i: int, value) -> bool | list[str]:
    """[[backbone]] fit: true ([fit]'s classifiers), false (none: a cache made for a fine-tune's
    maps) or a list of some of them (["logreg"] where the others would take long on many views)."""
    from bottleneck.settings import CLASSIFIER_CHOICES as names  # the names alone: no scikit-learn to read a file

    if isinstance(value, bool) or (isinstance(value, list) and value and all(v in names for v in value)):
        return value
    raise where.error("backbone", i, "fit", f"must be true, false or a list of classifiers ({', '.join(names)}),"
                      f" not {value!r}")


def _fit_table(where: _Locator, t, bbs: list[dict]) -> dict:
    if not isinstance(t, dict):
        raise where.error(None, 0, "fit", "must be a table: [fit]")
    _check_keys(where, "fit", 0, t, FIT_KEYS)
    if not bbs:
        raise where.error("fit", 0, None, "fits classifiers on cached features, but no [[backbone]] extracts any")
    fit = _stage_values(where, "fit", 0, t, settings.FitSettings)
    fit["classifiers"] = t.get("classifiers", ["logreg"])
    fit["layers"] = t.get("layers", ["auto"])  # the tap chosen on validation, never on the test images
    for clf in fit["classifiers"]:
        _stage_values(where, "fit", 0, t, settings.FitSettings, {"clf": clf})
    fit["seeds"] = _seeds(where, "fit", 0, t) or [fit["seed"]]
    for bb in (b for b in bbs if b["fit"]):
        missing = [tap for tap in fit["layers"] if tap not in bb["layers"] and tap not in ("auto", "concat", "select")]
        if missing:
            raise where.error("fit", 0, "layers", f"backbone '{bb['name']}' does not extract "
                              f"{', '.join(missing)}; add it to that backbone's layers (or use auto, concat)")
    return fit


def _finetune(where: _Locator, i: int, t: dict) -> list[dict]:
    """One fine-tune, or one per seed of `seeds = [...]`, each named NAME-seedN."""
    _check_keys(where, "finetune", i, t, FINETUNE_KEYS)
    if "model" not in t:
        raise where.error("finetune", i, None, "needs model = \"NAME\" (see 'bottleneck models')")
    with where.blame("finetune", i, "model"):
        backbones.get_spec(t["model"])
    _check_name(where, "finetune", i, t.get("name", t["model"]))
    _stage_values(where, "finetune", i, t, settings.FinetuneSettings)
    ft = {"name": backbones.file_name(t["model"])} | t
    seeds = _seeds(where, "finetune", i, t)
    if "seed" in t and seeds:
        raise where.error("finetune", i, "seeds", "give seed or seeds, not both")
    ft.pop("seeds", None)
    return [ft | {"name": f"{ft['name']}-seed{n}", "seed": n} for n in seeds] if seeds else [ft]


def _per_fold(ft: dict, folds: int | None) -> list[dict]:
    """With [data] folds = K, a fine-tune is K runs, NAME-fold0 to NAME-fold{K-1}, each its own stage and job."""
    return [ft | {"name": f"{ft['name']}-fold{i}", "fold": i} for i in range(folds)] if folds else [ft]


def _stage_values(where: _Locator, table: str, i: int, t: dict, cls, chosen: dict | None = None) -> dict:
    """The table's settings over the stage's defaults, {key: value}, checked by the stage's own
    `validate` (choices, bounds, rules) with the key's line in any error. Lists of runs
    (`classifiers`) are checked one value at a time through `chosen`."""
    keys = {k: f for k, f in settings.toml_keys(cls).items() if not f.metadata["toml_list"]}
    values = {k: f.default for k, f in keys.items() if f.default is not dataclasses.MISSING}
    values |= {k: v for k, v in t.items() if k in keys}
    args = {f.name: "" for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}  # paths come later
    args |= {keys[k].name: v for k, v in values.items()} | (chosen or {})
    try:
        cls(**args).validate()
    except settings.SettingError as e:
        key = next((k for k, f in settings.toml_keys(cls).items() if f.name == e.key), None)
        raise where.error(table, i, key, str(e)) from None
    return values


def _seeds(where: _Locator, table: str, i: int, t: dict) -> list[int] | None:
    """`seeds = [0, 1, 2]`: the configuration is run once per seed; compare reports the spread."""
    if "seeds" not in t:
        return None
    seeds = t["seeds"]
    if not (isinstance(seeds, list) and seeds and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                                      for n in seeds) and len(set(seeds)) == len(seeds)):
        raise where.error(table, i, "seeds", f"must be a list of distinct non-negative integers, not {seeds!r}")
    return seeds


def _array(where: _Locator, doc: dict, key: str) -> list[dict]:
    value = doc.get(key, [])
    if isinstance(value, dict):
        raise where.error(None, 0, key, f"write [[{key}]] (double brackets): there may be several")
    return value


def _check_name(where: _Locator, table: str | None, i: int, name: str) -> None:
    """Names become folders of the run and parts of job scripts: each must be one plain folder name on one line."""
    problem = ("holds a control character" if not name.isprintable() else
               "holds a path separator" if "/" in name or "\\" in name else
               "is not a folder name" if name.strip() in ("", ".", "..") else None)
    if problem:
        raise where.error(table, i, "name", f"{name!r} {problem}; a name becomes a folder and a job name, so set "
                          "name = \"...\" to letters, digits, '-', '_' and '.'")


def _unique_names(where: _Locator, table: str, tables: list[dict]) -> None:
    seen = set()
    for i, t in enumerate(tables):
        if t["name"] in seen:
            raise where.error(table, i, None, f"a second [[{table}]] named '{t['name']}'; give it its own "
                              "name = \"...\" so its results get their own folder")
        seen.add(t["name"])


def _check_keys(where: _Locator, table: str, i: int, t: dict, allowed: dict) -> None:
    for key, value in t.items():
        if key not in allowed:
            raise where.error(table, i, key, f"unknown key; expected one of {', '.join(allowed)}")
        if allowed[key] is not None:
            _check_type(where, table, i, key, value, allowed[key])


def _check_type(where: _Locator, table: str | None, i: int, key: str, value, kind) -> None:
    problem = settings.type_problem(kind, value)
    if problem:
        raise where.error(table, i, key, problem)


class _Locator:
    """Finds the line of a key in the file's text, so an error can point at it."""

    def __init__(self, path: Path, text: str):
        self.path, self.lines = path, text.splitlines()

    def line(self, table: str | None, index: int, key: str | None) -> int | None:
        current, seen = None, {}
        for n, raw in enumerate(self.lines, 1):
            line = raw.split("#", 1)[0].strip()
            header = re.fullmatch(r"\[\[?\s*([\w.-]+)\s*\]\]?", line)
            if header:
                current = header.group(1)
                seen[current] = seen.get(current, -1) + 1
                if table is None and key == current:  # an unknown table is reported at its header
                    return n
                if key is None and current == table and seen[current] == index:
                    return n
                continue
            if current == table and seen.get(table, 0) == index and key is not None \
                    and re.match(rf'"?{re.escape(key)}"?\s*=', line):
                return n
        return None

    def error(self, table: str | None, index: int, key: str | None, message: str) -> BottleneckError:
        n = self.line(table, index, key)
        at = f"{self.path}, line {n}" if n else str(self.path)
        name = f"[{table}]" if table in ("data", "fit") else f"[[{table}]] #{index + 1}" if table else ""
        what = " ".join(x for x in (name, key) if x)
        return BottleneckError(f"{at}: {what + ': ' if what else ''}{message}")

    def blame(self, table: str, index: int, key: str) -> _Blame:
        return _Blame(self, table, index, key)


class _Blame:
    """Re-raises a BottleneckError from a check with the file, line and key in front of it."""

    def __init__(self, where: _Locator, table: str, index: int, key: str):
        self.where, self.table, self.index, self.key = where, table, index, key

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, e, tb) -> bool:
        if isinstance(e, BottleneckError):
            raise self.where.error(self.table, self.index, self.key, str(e)) from None
        return False


# --------------------------------------------------------------------------- the stages

PROBE = "probe"  # [[finetune]] init_head = "probe": LP-FT from this experiment's own linear probe


def stage_settings(cls, table: dict, data: dict | None = None, **given) -> settings.Settings:
    """A stage's settings from an experiment table (its keys, from the settings' own `toml` names) and [data]
    (the split keys the stage takes), under what the experiment itself fixes (`given`: paths, one tap)."""
    own = {f.name: table[key] for key, f in settings.toml_keys(cls).items()
           if key in table and not f.metadata["toml_list"]}
    shared = {f.name: data[key] for key, f in settings.toml_keys(cls, "data").items() if data and key in data}
    return cls(**(own | shared | given)).validate()


def extract_settings(exp: Experiment, bb: dict) -> settings.ExtractSettings:
    """One backbone's extraction: its table's settings, the experiment's data and cache folder."""
    return stage_settings(settings.ExtractSettings, bb, exp.data, data_dir=exp.data["path"], out=str(exp.cache))


def fit_settings(exp: Experiment, bb: dict) -> list[settings.FitSettings]:
    """The fits of one backbone's cache, every tap × classifier × seed (× fold), and the linear probe an
    LP-FT fine-tune starts from. Their cache is read from the extraction's record when they run."""
    runs = []
    if exp.fit and bb["fit"]:
        clfs = exp.fit["classifiers"] if bb["fit"] is True else bb["fit"]
        runs = [stage_settings(settings.FitSettings, exp.fit, features="", clf=clf, layer=tap, seed=seed,
                               out=str(exp.out / "fit" / bb["name"]), reuse=True, **fold)
                for tap in exp.fit["layers"] for clf in clfs for seed in exp.fit["seeds"] for fold in fold_args(exp)]
    if any(probed_backbone(exp, ft["model"]) is bb for ft in exp.finetunes if ft.get("init_head") == PROBE):
        probe = probe_settings(exp, bb)
        runs += [] if probe in runs else [probe]
    return runs


def fold_args(exp: Experiment) -> list[dict]:
    """fit()'s fold arguments: one {} without [data] folds, else one per fold."""
    k = exp.data["folds"]
    if not k:
        return [{}]
    return [{"folds": k, "fold": i, "split_seed": exp.data["split_seed"], "val_fraction": exp.data["val_fraction"]}
            for i in range(k)]


def probed_backbone(exp: Experiment, model: str) -> dict | None:
    """The first [[backbone]] of `model` that extracts its penultimate tap (the new head's input)."""
    tap = backbones.get_spec(model).default_tap
    return next((bb for bb in exp.backbones if bb["model"] == model and tap in bb["layers"]), None)


def probe_settings(exp: Experiment, bb: dict) -> settings.FitSettings:
    """The logistic-regression probe on the penultimate tap that LP-FT starts from; it shares its
    folder with [fit]'s fits, so it takes [fit]'s search and target."""
    table = {k: exp.fit[k] for k in ("search", "target") if k in exp.fit} if exp.fit else {}
    return stage_settings(settings.FitSettings, table, features="", clf="logreg",
                          layer=backbones.get_spec(bb["model"]).default_tap, out=str(exp.out / "fit" / bb["name"]),
                          reuse=True)


def fit_report(s: settings.FitSettings) -> Path:
    folds = {"fold": s.fold} if s.folds else None
    name = settings.folder_name(s.layer, clf=s.clf, search=s.search, class_weight=s.class_weight, seed=s.seed,
                                folds=folds)
    return Path(s.out) / name / "report.json"


def finetune_settings(exp: Experiment, ft: dict) -> settings.FinetuneSettings:
    """One [[finetune]] run: [data] decides its splits, as it does extract's; init_head = "probe" becomes
    the path of the probe this experiment fits, from_cache the cache its backbone's extraction wrote
    (the record's path until it has run: the step reads the record when it runs)."""
    given = {"fold": ft.get("fold"), "trust": exp.trust}
    if ft.get("init_head") == PROBE:
        from bottleneck.classify import CLASSIFIER_FILE

        probe = fit_report(probe_settings(exp, probed_backbone(exp, ft["model"])))
        given["init_head"] = str(probe.parent / CLASSIFIER_FILE)
    if ft.get("from_cache"):
        record = cache_record(exp, maps_backbone(exp, ft))
        given["from_cache"] = record.read_text().strip() if record.is_file() else str(record)
    out = finetune_dir(exp, ft)
    if exp.data["folds"]:  # finetune adds -foldI to the folder it is given
        out = out.with_name(out.name.removesuffix(f"-fold{ft['fold']}"))
    return stage_settings(settings.FinetuneSettings, ft, exp.data, data_dir=exp.data["path"], out=str(out), **given)


def maps_backbone(exp: Experiment, ft: dict) -> dict | None:
    """The [[backbone]] whose cached maps a from_cache fine-tune trains on."""
    return next((bb for bb in exp.backbones if bb["name"] == ft.get("from_cache")), None)


def finetune_dir(exp: Experiment, ft: dict) -> Path:
    return exp.out / "finetune" / ft["name"]


def cache_record(exp: Experiment, bb: dict) -> Path:
    """The file in the run folder that names the cache a backbone's extraction wrote."""
    return exp.out / "caches" / f"{bb['name']}.path"


def prepare_data(exp: Experiment) -> None:
    """Write a built-in dataset to its path unless it is already there."""
    from bottleneck import data  # torch: only where a built-in dataset is written

    builtin, path = exp.data.get("builtin"), Path(exp.data["path"])
    if builtin == "elpv" and not (path / "train").is_dir():
        note(f"writing the elpv images to {path}")
        data.write_elpv(path, exp.data["split_seed"], exp.data.get("labels", "2"))


def save_copy(exp: Experiment) -> None:
    """Keep the experiment file beside its results; `bottleneck status` reads it from there."""
    exp.out.mkdir(parents=True, exist_ok=True)
    target = exp.out / "experiment.toml"
    if not target.exists() or not target.samefile(exp.file):
        shutil.copyfile(exp.file, target)


@dataclass(frozen=True)
class Step:
    """One step of an experiment, a stage on one table: `run` calls it here, `run --slurm` makes it a
    job, `status` reports it."""

    name: str  # extract-<backbone>, fit-<backbone>, finetune-<name>, compare
    stage: Stage
    calls: tuple  # the stage's settings, one per call of its function (compare: its keyword arguments)
    outputs: tuple[Path, ...]  # what it leaves on disk, read by its stage's `output` for status
    after: tuple[str, ...] = ()  # steps whose outputs it reads
    reads: tuple[tuple[str, Path], ...] = ()  # (setting, record): a path an earlier step wrote, read as it runs
    record: Path | None = None  # where it writes the path its function returns, for the steps that read it
    purpose: str = ""  # what it does, in a line
    table: dict | None = None  # its [[backbone]] or [[finetune]] table


def steps(exp: Experiment) -> list[Step]:
    """Every step of an experiment, in an order that runs each after what it reads: the one list
    behind local runs, Slurm plans and status."""
    found = []
    for bb in exp.backbones:
        record = cache_record(exp, bb)
        found.append(Step(f"extract-{bb['name']}", BY_COMMAND["extract"], (extract_settings(exp, bb),), (record,),
                          record=record, purpose=f"Extract {bb['model']} features ({', '.join(bb['layers'])})",
                          table=bb))
        fits = fit_settings(exp, bb)
        if fits:
            what = ", ".join(dict.fromkeys(f"{s.clf} on {s.layer}" for s in fits))
            found.append(Step(f"fit-{bb['name']}", BY_COMMAND["fit"], tuple(fits), tuple(map(fit_report, fits)),
                              (f"extract-{bb['name']}",), (("features", record),),
                              purpose=f"Fit {what} of the {bb['model']} cache", table=bb))
    for ft in exp.finetunes:
        probed = probed_backbone(exp, ft["model"]) if ft.get("init_head") == PROBE else None
        cached = maps_backbone(exp, ft)
        after = (f"fit-{probed['name']}",) if probed else (f"extract-{cached['name']}",) if cached else ()
        found.append(Step(f"finetune-{ft['name']}", BY_COMMAND["finetune"], (finetune_settings(exp, ft),),
                          (finetune_dir(exp, ft) / "report.json",), after,  # LP-FT: after its probe
                          (("from_cache", cache_record(exp, cached)),) if cached else (),
                          purpose=f"Fine-tune {ft['model']} on {exp.data['path']}", table=ft))
    ends = tuple(s.name for s in found if s.stage.command in ("fit", "finetune"))
    return found + [Step("compare", BY_COMMAND["compare"], ({"run_dirs": [str(exp.out)]} | exp.compare,),
                         (exp.out / "comparison.md",), ends or tuple(s.name for s in found),
                         purpose="Put every report of the run side by side")]


def arguments(call, progress: bool | None = None) -> dict:
    """The keyword arguments of one call of a stage's function; `progress`, where given, for the
    stages that show progress bars."""
    if not isinstance(call, settings.Settings):  # compare: its arguments as they are
        return dict(call)
    args = call.asdict()
    return args | ({"progress": progress} if progress is not None and "progress" in args else {})


def run_step(exp: Experiment, step: Step, progress: bool = True) -> Path:
    """Run one step here; each skips what it finds done (a complete cache, a fit of the same settings
    from the same cache, a finished fine-tune of the same settings)."""
    note(f"{step.name}: {step.purpose}")
    run = step.stage.entry()
    known = {name: record.read_text().strip() for name, record in step.reads}  # written by the steps before
    for call in step.calls:
        result = run(**arguments(call, progress) | known)
    if step.record:
        step.record.parent.mkdir(parents=True, exist_ok=True)
        step.record.write_text(f"{result}\n")
    return result


def run(experiment: str | Path, *, force: bool = False, progress: bool = True, trust: bool = False) -> Path:
    """Run every stage of an experiment on this machine, skipping finished ones; returns comparison.md.

    A fine-tune whose folder holds a finished run of other settings is refused before anything
    runs (the folder keeps describing what it holds); `force` deletes that run and redoes it.
    `trust`: fine-tunes may read an init_head that is a pickle (see trained.py).
    """
    exp = dataclasses.replace(load(experiment), trust=trust)
    check_finished(exp, force)
    prepare_data(exp)
    save_copy(exp)
    for step in steps(exp):
        result = run_step(exp, step, progress)
    return result


def check_finished(exp: Experiment, force: bool = False) -> None:
    """Refuse (or, with `force`, delete) finished fine-tunes made with other settings than the file's."""
    from bottleneck.finetune import changed_settings, describe_changes, run_args

    for ft in exp.finetunes:
        out = finetune_dir(exp, ft)
        if not (out / "report.json").is_file():
            continue
        changed = changed_settings(out, run_args(finetune_settings(exp, ft)))
        if changed and not force:
            raise BottleneckError(f"{out} holds a finished fine-tune of [[finetune]] '{ft['name']}' made with other "
                                  f"{describe_changes(changed)}; rerun with --force to redo it, or give the "
                                  "table a new name")
        if changed:
            note(f"--force: deleting {out}, made with other {describe_changes(changed)}")
            shutil.rmtree(out)
