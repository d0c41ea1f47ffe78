"""The `bottleneck` command: a thin typer layer over the library functions of the same names."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from bottleneck import backbones, data, store
from bottleneck.console import err
from bottleneck.errors import BottleneckError

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


@app.command()
def extract(
    model: Annotated[str, typer.Option(help="Backbone name (see 'bottleneck models').")],
    data_dir: Annotated[Path, typer.Option("--data", help="ImageFolder tree (with or without "
                                           "train/val/test folders) or a CSV manifest path,label[,split].")],
    layer: Annotated[list[str] | None, typer.Option(help="Feature tap; repeat for several taps "
                                                       "in one pass. Default: the model's penultimate.")] = None,
    pool: Annotated[str, typer.Option(help="Pooling of spatial taps: avg, max or flatten.")] = "avg",
    weights: Annotated[str, typer.Option(help="DEFAULT, an enum name (IMAGENET1K_V1), a state_dict "
                                         "file, or none (random init).")] = "DEFAULT",
    out_dir: Annotated[Path, typer.Option("--out", help="Cache folder.")] = Path("cache"),
    batch_size: Annotated[int, typer.Option(help="Images per batch (and per saved block).")] = 64,
    workers: Annotated[int | None, typer.Option(help="DataLoader worker processes "
                                                   "[default: half the cores, at most 8].")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
    precision: Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16 compute.")] = "auto",
    dtype: Annotated[str, typer.Option(help="Storage type: float32 or float16.")] = "float32",
    shard: Annotated[str, typer.Option(help="Compute shard I of N (0-based), e.g. 0/4.")] = "0/1",
    force: Annotated[bool, typer.Option(help="Extract again even if a complete cache exists.")] = False,
    val_fraction: Annotated[float, typer.Option(help="Validation fraction for data without splits.")] = 0.0,
    test_fraction: Annotated[float, typer.Option(help="Test fraction for data without splits.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the stratified split.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Extract features of a folder of labelled images into an HDF5 cache; prints its path last."""
    from bottleneck.extract import extract as run

    path = run(model, str(data_dir), layer, pool, weights, str(out_dir), batch_size, workers, device,
               precision, dtype, shard, force, val_fraction, test_fraction, seed, progress)
    out.print(str(path))


@app.command()
def fit(
    features: Annotated[Path, typer.Option(help="Feature cache (.h5) from 'bottleneck extract'.")],
    clf: Annotated[str, typer.Option(help="logreg, svm, linear-svm, mlp or knn.")] = "logreg",
    layer: Annotated[str | None, typer.Option(help="Tap to use [default: the cache's last]; "
                                                 "'all' fits one classifier per tap.")] = None,
    search: Annotated[bool, typer.Option(help="Tune the main hyperparameter by validation or CV.")] = False,
    class_weight: Annotated[str | None, typer.Option(help="'balanced' to weight classes.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for hold-out splits, CV folds and the classifier.")] = 0,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder "
                                                    "[default: runs/fit/<cache name>].")] = None,
    train_sizes: Annotated[str | None, typer.Option(help="Learning curve: images per class, "
                                                       "e.g. 10,25,50,100,all.")] = None,
) -> None:
    """Train a classifier on cached features; writes model.joblib and report.json, prints its path last."""
    from bottleneck.classify import fit as run

    path = run(str(features), clf, layer, search, class_weight, seed, str(out_dir) if out_dir else None,
               train_sizes)
    out.print(str(path))


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="model.joblib written by 'bottleneck fit'.")],
    features: Annotated[Path, typer.Option(help="A compatible feature cache.")],
    split: Annotated[str, typer.Option(help="Split to score.")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Re-score a saved classifier on a compatible cache."""
    from bottleneck.predict import evaluate as run

    rep = run(str(model), str(features), split)
    if as_json:
        out.print(json.dumps(rep, indent=1))
        return
    out.print(f"{rep['clf']} on {rep['model']} {rep['tap']}, {split} ({rep['n_test']} images): accuracy "
              f"{rep['accuracy']:.4f}, balanced {rep['balanced_accuracy']:.4f}, macro-F1 {rep['macro_f1']:.4f}")


@app.command()
def predict(
    images: Annotated[list[str], typer.Argument(help="[MODEL.joblib] then image files or folders.")],
    imagenet: Annotated[bool, typer.Option(help="Use the backbone's own ImageNet classes, no classifier.")] = False,
    model: Annotated[str, typer.Option(help="Backbone for --imagenet.")] = "efficientnet_lite0",
    weights: Annotated[str, typer.Option(help="Weights for --imagenet.")] = "DEFAULT",
    fmt: Annotated[str, typer.Option("--format", help="table, csv or json.")] = "table",
    top_k: Annotated[int, typer.Option(help="Classes shown per image.")] = 3,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
) -> None:
    """Label images with a saved classifier (same backbone, tap and preprocessing), or with ImageNet."""
    from bottleneck.predict import predict as run

    if fmt not in ("table", "csv", "json"):
        raise BottleneckError(f"unknown --format '{fmt}'; choose table, csv or json")
    clf = None if imagenet else images[0]
    files = images if imagenet else images[1:]
    rows = run(clf, files, top_k, imagenet, model, weights, device=device)
    if fmt == "json":
        out.print(json.dumps(rows, indent=1))
    elif fmt == "csv":
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(["path", "label", "probability", "error"])
        for r in rows:
            w.writerow([r["path"], r["label"] or "", f"{r['probability']:.4f}" if r["label"] else "", r["error"] or ""])
    else:
        table = Table("image", "prediction", f"top {top_k}")
        for r in rows:
            top = ", ".join(f"{c} {p:.2f}" for c, p in r["top"])
            table.add_row(r["path"], r["label"] or f"unreadable: {r['error']}", top)
        out.print(table)


@app.command()
def models(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the backbones: taps with dims, input size, parameters, weights on this machine."""
    rows = []
    for name in backbones.REGISTRY:
        d = backbones.describe(name)
        ref = backbones.resolve_weights(name)
        rows.append(d | {"weights": ref.id, "weights_available": backbones.weights_available(ref)})
    if as_json:
        out.print(json.dumps(rows, indent=1))
        return
    table = Table("model", "taps (dim), * = default", "input", "params", "weights here")
    for r in rows:
        taps = ", ".join(f"{'*' if t == r['default_tap'] else ''}{t} ({d})" for t, d in r["taps"].items())
        table.add_row(r["name"], taps, str(r["input_size"]), f"{r['params'] / 1e6:.1f}M",
                      "yes" if r["weights_available"] else "no")
    out.print(table)


@weights_app.command("fetch")
def weights_fetch(names: Annotated[list[str], typer.Argument(help="Model names.")],
                  weights: Annotated[str, typer.Option(help="Which weights.")] = "DEFAULT") -> None:
    """Download pretrained weights into the torch/timm caches (TORCH_HOME is honoured)."""
    for name in names:
        ref = backbones.fetch_weights(backbones.resolve_weights(name, weights))
        out.print(f"{name}: {ref.path or 'no file needed'}")


@data_app.command("elpv")
def data_elpv(out_dir: Annotated[Path, typer.Option("--out", help="Folder to write.")] = Path("data/elpv"),
              seed: Annotated[int, typer.Option(help="Seed of the split.")] = 0) -> None:
    """Write the elpv solar-cell images as train/val/test class folders (links, not copies)."""
    m = data.write_elpv(out_dir, seed)
    for split, samples in m.splits.items():
        counts = [sum(1 for _, lab in samples if lab == i) for i in range(len(m.classes))]
        err.print(f"{split}: " + ", ".join(f"{c} {n}" for c, n in zip(m.classes, counts)))
    out.print(str(out_dir))


@cache_app.command("ls")
def cache_ls(folder: Annotated[Path, typer.Argument(help="Cache folder.")] = Path("cache")) -> None:
    """List the caches in a folder, finished and in progress."""
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
        cache = Path(str(parts).removesuffix(".parts"))
        try:
            with store.CacheLock(cache):
                state = f"interrupted after {blocks} blocks: rerun its extract command to resume"
        except BottleneckError:
            state = f"being written ({blocks} blocks so far)"
        table.add_row(cache.name, "", "", "", "", state)
    out.print(table)


@cache_app.command("info")
def cache_info(path: Annotated[Path, typer.Argument(help="Cache file.")],
               as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Splits, counts, taps and dims, skipped files, and how the features were made."""
    with store.FeatureStore(path) as st:
        info = st.info()
    if as_json:
        out.print(json.dumps(info, indent=1))
        return
    out.print(f"{path}\n  model {info['model']}  weights {info['weights']}  pool {info['pool']}  "
              f"precision {info['precision']}  dtype {info['dtype']}")
    out.print("  taps " + ", ".join(f"{t} ({info['dims'][t]})" for t in info["taps"]))
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
    out.print(str(store.merge([str(s) for s in shards], out_path)))


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
