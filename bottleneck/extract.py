"""Stage 1: run a truncated pretrained CNN over labelled images into an HDF5 feature cache.

The cache's name is a fingerprint of everything that determines its contents, so the
same command reuses a finished cache instantly and a changed input never reuses a stale
one. Work is done in blocks of one batch, each saved as soon as it is computed: a run
killed at any moment resumes where it stopped and ends with the same file.
"""

from __future__ import annotations

import glob
import hashlib
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from bottleneck import backbones, data, decode, networks, preprocess, runtime, store
from bottleneck.console import note, progress_bar, warn
from bottleneck.errors import BottleneckError
from bottleneck.runtime import apply_precision, resolve_device, resolve_precision
from bottleneck.settings import ExtractSettings, takes
from bottleneck.views import n_views, parse_views, views_of
from bottleneck.weights import WeightsRef, fetch_weights, weights_arg


@takes(ExtractSettings)
def extract(s: ExtractSettings) -> Path:
    """Extract features of every image under `data_dir`; returns the cache's path.

    Data without its own splits is split by `data.split_samples` (fractions default to 0.1 and
    0.25), the same function finetune and fit use, so all three score the same test images.
    """
    started = time.perf_counter()
    views = parse_views(s.views).name  # one spelling, one cache: crops:02 is crops:2
    model, pool, dtype, batch_size, force, progress = s.model, s.pool, s.dtype, s.batch_size, s.force, s.progress
    taps = backbones.resolve_taps(model, s.layer, pool)
    if s.maps and s.maps not in taps:  # its pooled features come with its maps
        taps = backbones.resolve_taps(model, [*taps, s.maps], pool)
    dev = resolve_device(s.device)
    prec = resolve_precision(s.precision, dev)
    shard_i, shard_n = parse_shard(s.shard)
    manifest = data.load_manifest(s.data_dir, s.val_fraction, s.test_fraction, s.split_seed, s.group_pattern)
    ref = backbones.resolve_weights(model, s.weights)
    every = sorted(p for samples in manifest.splits.values() for p, _ in samples)
    prep, why = preprocess.choose(model, manifest.root, every, s.image_size, s.crop, s.interpolation)
    decoded_by = decode.decoder(dev) if s.decode == "gpu" else None
    attrs = cache_attrs(model, ref, taps, pool, prep, prec, dtype, manifest, views, s.maps, decoded_by) | {
        "preprocessing_rule": why}
    path = cache_path(s.out, model, taps, pool, attrs["fingerprint"], shard_i, shard_n, views, s.maps)

    if path.is_file() and not force and store.is_complete(path):
        note(f"reusing complete cache {path} (use --force to extract again)")
        blocks = Path(f"{path}.parts")  # left by a writer killed between renaming the cache and cleaning up
        if blocks.is_dir():
            store.remove([blocks])  # under the cache's lock: kept if a writer holds it
        return path
    note_other_interrupted(path)
    with store.CacheLock(path):
        parts = store.Parts(path)
        if force:  # the old cache stays readable until the new one is renamed over it
            parts.remove()
        elif path.is_file() and store.is_complete(path):  # finished by another process meanwhile
            return path
        block_rows = parts.start({"fingerprint": attrs["fingerprint"], "block_rows": batch_size})["block_rows"]
        if block_rows != batch_size:
            note(f"resuming with the batch size of the interrupted run ({block_rows})")
        plan = block_plan(manifest, block_rows, shard_i, shard_n)
        todo = {s: [k for k in ks if not parts.has(s, k)] for s, ks in plan.items()}
        if any(todo.values()):
            fetch_weights(ref)
            note(preprocess.describe(prep, why))
            net = networks.build_model(model, ref)
            extractor = networks.FeatureExtractor(net, model, taps, pool, s.maps)
            workers = runtime.workers(s.workers)
            setup = time.perf_counter() - started
            if decoded_by:
                note(f"decoding JPEGs with {decoded_by} on {runtime.device_name(dev)}")
            run_blocks(extractor, manifest, todo, block_rows, parts, attrs["preprocessing"], dev, prec,
                       workers, progress, batch_size, views, on_device=bool(decoded_by))
        else:
            setup = 0.0
        attrs |= {"shard": f"{shard_i}/{shard_n}", "block_rows": block_rows,
                  "dims": dims_of(parts, plan, taps, model, pool),
                  **({"maps": {"tap": s.maps, "shape": map_shape(parts, plan, s.maps)}} if s.maps else {}),
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        attrs["cost"] = extraction_cost(parts, plan, dev, prec, setup)
        blocks = {s: parts.iter_blocks(s, ks) for s, ks in plan.items()}
        rows = {split: n_views(views) * sum(len(block_samples(manifest, split, k, block_rows)) for k in ks)
                for split, ks in plan.items()}
        store.write_cache(path, attrs, blocks, dtype, rows, manifest.groups or None)
        parts.remove()
        with store.FeatureStore(path) as st:
            skipped = sum(s["skipped"] for s in st.info()["splits"].values())
        if skipped:
            warn(f"skipped {skipped} files that would not decode; 'bottleneck cache info {path}' lists them")
    return path


def note_other_interrupted(path: Path) -> None:
    """Blocks of an interrupted extraction of the same model and taps whose data or settings then
    changed are never resumed; say so, once, where they lie."""
    if ".shard-" in path.name:
        return
    stem = path.name.rsplit("-", 1)[0]  # the name without its fingerprint
    others = [p for p in path.parent.glob(f"{glob.escape(stem)}-*.h5.parts") if p.name != f"{path.name}.parts"]
    if others:
        note(f"{path.parent} also holds {len(others)} interrupted extraction{'s' if len(others) > 1 else ''} of "
             f"{stem} for other data or settings; 'bottleneck cache clean --interrupted {path.parent}' removes them")


def parse_shard(shard: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        raise BottleneckError(f"--shard must look like I/N (e.g. 0/4), not '{shard}'") from None
    if not 0 <= i < n:
        raise BottleneckError(f"--shard {shard}: I must be in 0..N-1")
    return i, n


def cache_attrs(model: str, ref: WeightsRef, taps: list[str], pool: str, prep: dict, precision: str,
                dtype: str, manifest: data.Manifest, views: str = "none", maps: str | None = None,
                decoded_by: str | None = None) -> dict:
    """The metadata a later stage needs; everything but versions goes into the fingerprint."""
    multi = {"views": views, "n_views": n_views(views)} if views != "none" else {}  # older caches' fingerprints stay
    multi |= {"maps": {"tap": maps}} if maps else {}  # the maps' shape is added once the first block shows it
    multi |= {"decoded_by": decoded_by} if decoded_by else {}  # PIL's, in the workers, when absent
    attrs = multi | {"model": model, "weights": ref.id, "taps": taps, "pool": pool,
             "preprocessing": prep, "precision": precision, "dtype": dtype,
             "classes": manifest.classes, "split_info": manifest.split_info,
             "dataset_fingerprint": data.dataset_fingerprint(manifest), "data_root": manifest.root,
             "weights_arg": weights_arg(ref)}
    key = {k: v for k, v in attrs.items() if k not in ("data_root", "weights_arg")} | {"format": store.FORMAT}
    attrs["fingerprint"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    attrs["versions"] = runtime.versions()
    return attrs


def cache_path(out: str, model: str, taps: list[str], pool: str, fingerprint: str,
               shard_i: int = 0, shard_n: int = 1, views: str = "none", maps: str | None = None) -> Path:
    name = f"{backbones.file_name(model)}-{'+'.join(taps)}-{pool}" \
           f"{'' if views == 'none' else '-' + backbones.file_name(views)}" \
           f"{'-maps' if maps else ''}-{fingerprint[:12]}"
    if shard_n > 1:
        name += f".shard-{shard_i}-of-{shard_n}"
    return Path(out) / f"{name}.h5"


def block_plan(manifest: data.Manifest, rows: int, shard_i: int, shard_n: int) -> dict[str, list[int]]:
    """Blocks (of `rows` images) per split that this shard computes; shards split whole blocks."""
    plan = {}
    for split, samples in manifest.splits.items():
        n_blocks = -(-len(samples) // rows)
        plan[split] = list(range(shard_i * n_blocks // shard_n, (shard_i + 1) * n_blocks // shard_n))
    return plan


def block_samples(manifest: data.Manifest, split: str, k: int, rows: int) -> list[tuple[str, int]]:
    """The (path, label) pairs of block k of a split."""
    return manifest.splits[split][k * rows:(k + 1) * rows]


def run_blocks(extractor: networks.FeatureExtractor, manifest: data.Manifest, todo: dict[str, list[int]],
               rows: int, parts: store.Parts, prep: dict, device: torch.device, precision: str,
               workers: int, progress: bool, batch_size: int | None = None, views: str = "none",
               on_device: bool = False) -> None:
    """Compute the missing blocks, saving each as soon as it is done; the network sees at most
    `batch_size` images at once (a resumed run keeps its blocks' size but may ask for less).
    With `views`, each image gives one row per view, the image's rows next to each other.
    With `on_device`, the workers read JPEGs' bytes and `device` decodes them (bottleneck.decode)."""
    apply_precision(precision)
    extractor = extractor.to(device, memory_format=torch.channels_last)
    # One loader over every split's missing blocks, each batch exactly one block: the decoding
    # workers are forked once, from a small process, rather than again for each split from one
    # grown by the split before (their copy-on-write pages then add up).
    jobs = [(split, k) for split, blocks in todo.items() for k in blocks]
    paths: list[str] = []
    batches = []
    for split, k in jobs:
        chosen = block_samples(manifest, split, k, rows)
        batches.append(list(range(len(paths), len(paths) + len(chosen))))
        paths += [p for p, _ in chosen]
    dataset = (decode.RawImages if on_device else data.ImageDataset)(manifest.root, paths, prep)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=decode.collate if on_device else None,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task("extracting", total=len(paths))
        tick = trimmed = time.perf_counter()
        for (split, k), (images, reasons) in zip(jobs, loader):
            if on_device:
                images, reasons = decode.decode_block(images, reasons, prep, device)
            # image-major rows: an image's views next to each other (no copy without views)
            viewed = images if views == "none" else torch.stack(views_of(images, views), 1).flatten(0, 1)
            feats = forward(extractor, viewed, prep, device, precision, batch_size or rows)
            block = make_block(feats, reasons, block_samples(manifest, split, k, rows), n_views(views))
            for path, reason in zip(block["skipped_paths"], block["skipped_reasons"]):
                warn(f"skipped {path}: {reason}")
            now = time.perf_counter()
            block["seconds"] = now - tick
            tick = now
            parts.write(split, k, block)
            bar.advance(task, len(reasons))
            if now - trimmed > runtime.TRIM_SECONDS:
                runtime.release_freed_memory()
                trimmed = now


def forward(extractor: networks.FeatureExtractor, images: torch.Tensor, prep: dict, device: torch.device,
            precision: str, batch_size: int) -> dict[str, torch.Tensor]:
    """The taps of a block's images, `batch_size` at a time; running out of memory is an error
    that says what to do, not an allocator's traceback."""
    try:
        chunks = [networks.run_batch(extractor, images[i:i + batch_size], prep, device, precision)
                  for i in range(0, len(images), batch_size)]
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        raise BottleneckError(f"out of memory running {min(batch_size, len(images))} images at once on "
                              f"{runtime.device_name(device)}; rerun with a smaller --batch-size (finished "
                              "blocks are kept)") from None
    return {t: torch.cat([c[t] for c in chunks]) for t in chunks[0]}


def make_block(feats: dict[str, torch.Tensor], reasons: list[str], samples: list[tuple[str, int]],
               n_views: int = 1) -> dict:
    ok = np.array([r == "" for r in reasons], dtype=bool)
    rows = np.repeat(ok, n_views)  # each image's views, next to each other
    maps = {t.removeprefix("maps/"): v.cpu().numpy()[rows] for t, v in feats.items() if t.startswith("maps/")}
    if not all(np.isfinite(m).all() for m in maps.values()):
        raise BottleneckError("a map holds values beyond float16's range (±65504); these maps cannot be kept")
    return {"features": {t: v.cpu().numpy()[rows] for t, v in feats.items() if not t.startswith("maps/")},
            "maps": maps,
            "labels": np.repeat([lab for _, lab in samples], n_views).astype(np.int64)[rows],
            "paths": [p for (p, _), good in zip(samples, ok) if good for _ in range(n_views)],
            "view": np.tile(np.arange(n_views, dtype=np.int8), len(samples))[rows],
            "skipped_paths": [p for (p, _), good in zip(samples, ok) if not good],
            "skipped_reasons": [r for r in reasons if r]}


def dims_of(parts: store.Parts, plan: dict, taps: list[str], model: str, pool: str) -> dict[str, int]:
    for split, blocks in plan.items():
        if blocks:
            feats = parts.read(split, blocks[0])["features"]
            return {t: int(feats[t].shape[1]) for t in taps}
    return {t: backbones.describe(model, pool)["taps"][t] for t in taps}


def map_shape(parts: store.Parts, plan: dict, tap: str) -> list[int]:
    """The shape of one row's map of `tap`, from the first block."""
    for split, blocks in plan.items():
        if blocks:
            return list(parts.read(split, blocks[0])["maps"][tap].shape[1:])
    raise BottleneckError("no images to extract")


def extraction_cost(parts: store.Parts, plan: dict, device: torch.device, precision: str, setup: float) -> dict:
    seconds = images = 0
    for split, blocks in plan.items():
        for k in blocks:
            b = parts.summary(split, k)
            seconds += b["seconds"]
            images += b["images"]
    return {"device": runtime.device_name(device), "precision": precision, "images": images,
            "compute_seconds": round(seconds, 3), "wall_seconds": round(seconds + setup, 3),
            "images_per_second": round(images / seconds, 2) if seconds else None}
