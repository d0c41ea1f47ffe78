"""The HDF5 feature cache: its layout, crash-safe writing, reading, verifying and merging.

Layout (docs/cache-format.md): root attributes describe how the features were made; one
group per split holds `paths`, `labels`, `view`, `features/<tap>` (N×D), `skipped` and, in a
cache made with `extract --maps TAP`, the tap's unpooled float16 maps `maps/<tap>`.

Crash safety comes from never writing the final file in place. Extraction writes each
finished block as its own small file in `<cache>.parts/` (write, then atomic rename);
the final HDF5 is assembled from the blocks into `<cache>.tmp`, marked complete, and only
then renamed to its name. A killed run leaves whole blocks behind and resumes from them.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import h5py
import numpy as np

from bottleneck.console import note
from bottleneck.errors import BottleneckError, write_error
from bottleneck.locks import WriteLock, held, is_stale

FORMAT = "bottleneck-features/1"
JSON_ATTRS = ("taps", "preprocessing", "classes", "versions", "split_info", "cost", "dims", "maps")
VOLATILE_ATTRS = ("cost", "created")  # differ between two runs that produce the same features
CHUNK_ROWS = 1024


# --------------------------------------------------------------------------- locking

class CacheLock(WriteLock):
    """The one writer of a cache holds `<cache>.lock` (bottleneck.locks)."""

    def __init__(self, cache: Path):
        super().__init__(Path(f"{cache}.lock"), str(cache))


def writer_running(cache: Path) -> bool | None:
    """True while an extract holds the cache's lock, False when none does, None if it cannot be told."""
    return held(Path(f"{cache}.lock"))


# --------------------------------------------------------------------------- blocks

class Parts:
    """Finished blocks of an extraction in progress: `<cache>.parts/<split>-<k>.npz`."""

    def __init__(self, cache: Path):
        self.dir = Path(f"{cache}.parts")

    def start(self, meta: dict) -> dict:
        """Create the folder, or return the meta of the run it already holds. What a damage made
        unreadable is done again, said once: blocks that do not open are computed again, and a
        meta.json that does not read starts the extraction over (its blocks cannot be trusted)."""
        meta_file = self.dir / "meta.json"
        if meta_file.is_file():
            old = self.meta()
            if old is None:
                note(f"{meta_file} is damaged; the interrupted extraction starts again")
            else:
                for block in self.damaged():
                    note(f"block {block} is damaged (truncated or empty); computing it again")
                    block.unlink()
            # Finished blocks fix the block size; with none yet (a first run that died, say out of
            # memory), the new run's batch size is taken.
            if old and old.get("fingerprint") == meta["fingerprint"] and any(self.dir.glob("*.npz")):
                return old
            self.remove()
        if self.dir.is_symlink() or (self.dir.exists() and not is_parts_folder(self.dir)):
            raise BottleneckError(f"{self.dir} is not a folder of blocks bottleneck wrote (a link, a file, or a "
                                  "folder holding other files); move it away, then rerun")
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(meta_file, json.dumps(meta).encode())
        return meta

    def meta(self) -> dict | None:
        """meta.json as written by start, or None when it is damaged (not JSON, or not its keys)."""
        try:
            meta = json.loads((self.dir / "meta.json").read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(meta, dict) and isinstance(meta.get("fingerprint"), str) and \
            isinstance(meta.get("block_rows"), int) and meta["block_rows"] >= 1
        return meta if ok else None

    def damaged(self) -> list[Path]:
        """Blocks that do not open as a block: truncated, emptied, or another file under a block's name."""
        return [p for p in sorted(self.dir.glob("*-[0-9][0-9][0-9][0-9][0-9][0-9][0-9].npz"))
                if not _readable_block(p)]

    def condition(self) -> str:
        """How far an interrupted extraction got, and what its rerun will do about damage."""
        if self.meta() is None:
            return "with a damaged meta.json: rerun its extract command to start it again"
        blocks, damaged = len(list(self.dir.glob("*.npz"))), len(self.damaged())
        bad = f" ({damaged} damaged: the rerun computes {'it' if damaged == 1 else 'them'} again)" if damaged else ""
        return f"after {blocks} blocks{bad}: rerun its extract command to resume"

    def block_path(self, split: str, k: int) -> Path:
        return self.dir / f"{split}-{k:07d}.npz"

    def has(self, split: str, k: int) -> bool:
        return self.block_path(split, k).is_file()

    def write(self, split: str, k: int, block: dict) -> None:
        target = self.block_path(split, k)
        tmp = target.with_suffix(f".tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **_flatten_block(block))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as e:  # a full disk: name the file, and leave no partial block behind
            tmp.unlink(missing_ok=True)
            raise write_error(e, target) from None

    def read(self, split: str, k: int) -> dict:
        with self._open(split, k) as z:
            try:
                return _unflatten_block({name: z[name] for name in z.files})
            except Exception as e:  # a flipped byte fails its CRC only when read
                raise self._damaged_block(split, k, e) from None

    def iter_blocks(self, split: str, blocks: list[int]) -> Iterator[dict]:
        for k in blocks:
            yield self.read(split, k)

    def summary(self, split: str, k: int) -> dict:
        """Images and seconds of one block, without reading its features (a multi-view block has
        one row per view of each image)."""
        with self._open(split, k) as z:
            try:
                views = int(z["view"].max()) + 1 if "view" in z.files and len(z["view"]) else 1
                return {"images": len(z["labels"]) // views + len(z["skipped_paths"]), "seconds": float(z["seconds"])}
            except Exception as e:
                raise self._damaged_block(split, k, e) from None

    def _open(self, split: str, k: int):
        try:
            return np.load(self.block_path(split, k), allow_pickle=False)
        except Exception as e:  # an empty file is an EOFError, which click once printed as "Aborted."
            raise self._damaged_block(split, k, e) from None

    def _damaged_block(self, split: str, k: int, e: Exception) -> BottleneckError:
        """A block that fails when read is removed (it is ours, and useless), so the rerun computes it again."""
        path = self.block_path(split, k)
        path.unlink(missing_ok=True)
        return BottleneckError(f"block {path} is damaged ({type(e).__name__}) and was removed; rerun the same "
                               "'bottleneck extract' command to compute it again and finish the cache")

    def remove(self) -> None:
        """Remove the blocks and the folder, if it is one bottleneck wrote (nothing else is touched)."""
        if not is_parts_folder(self.dir):
            return
        try:
            for entry in os.scandir(self.dir):
                os.unlink(entry.path)
            os.rmdir(self.dir)
        except OSError:  # a read-only folder, say: what stays is listed by `cache ls` and `cache clean`
            pass


# The names extraction writes inside `<cache>.parts`: its meta.json, blocks, and their temporaries.
_PARTS_ENTRY = re.compile(r"meta\.json(\.tmp\d+)?|(train|val|test)-\d{7}\.(npz|tmp\d+)")


def is_parts_folder(path: Path) -> bool:
    """Whether `path` is a `.parts` folder as extraction leaves it: a real folder (not a link) holding
    only plain files with the names extraction writes there."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            return False
        return all(_PARTS_ENTRY.fullmatch(e.name) and e.is_file(follow_symlinks=False) for e in os.scandir(path))
    except OSError:
        return False


def _readable_block(path: Path) -> bool:
    """Opens as a zip of arrays with a block's own names (its central directory is at the end: a cut is seen)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {"labels", "paths", "seconds"} <= set(z.files)
    except Exception:
        return False


def _flatten_block(block: dict) -> dict:
    flat = {f"features/{t}": v for t, v in block["features"].items()}
    flat |= {f"maps/{t}": v for t, v in block.get("maps", {}).items()}
    flat["labels"] = np.asarray(block["labels"], dtype=np.int64)
    flat["view"] = np.asarray(block.get("view", np.zeros(len(flat["labels"]))), dtype=np.int8)
    flat |= {k: np.asarray(block[k], dtype=str) for k in ("paths", "skipped_paths", "skipped_reasons")}
    flat["seconds"] = np.asarray(block.get("seconds", 0.0))
    return flat


def _unflatten_block(flat: dict) -> dict:
    block = {k: v for k, v in flat.items() if not k.startswith(("features/", "maps/"))}
    for group in ("features", "maps"):
        block[group] = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(group + "/")}
    block["seconds"] = float(block["seconds"])
    return block


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` under a temporary name, then rename: a crash never leaves half a file."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(e, path) from None


# --------------------------------------------------------------------------- writing

def write_cache(path: Path, attrs: dict, splits: dict[str, Iterable[dict]], dtype: str = "float32",
                rows: dict[str, int] | None = None, groups: dict[str, str] | None = None) -> Path:
    """Stream blocks into `<path>.tmp`, mark it complete, then rename it to `path`.

    `rows` (an upper bound of each split's rows) keeps the HDF5 chunks of small splits small;
    `groups` ({path: group}, from a grouped split) is kept so fit's folds keep groups whole too.
    """
    tmp = Path(f"{path}.tmp")
    tmp.unlink(missing_ok=True)
    # A failed write (full disk, quota) leaves h5py objects that complain when they are freed;
    # the error raised below says it all, so they are freed while their complaints are silenced.
    previous_hook, failure = sys.unraisablehook, None
    sys.unraisablehook = lambda _: None
    try:
        _write_file(tmp, attrs, splits, dtype, rows or {}, groups)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        failure = write_error(e, tmp)
    except BaseException as e:  # a damaged shard found mid-merge, an interrupt: no half file stays
        failure = e
    if failure:  # outside the except block, whose traceback kept the h5py objects alive
        gc.collect()
        tmp.unlink(missing_ok=True)
    sys.unraisablehook = previous_hook
    if failure:
        raise failure
    return path


def _write_file(tmp: Path, attrs: dict, splits: dict[str, Iterable[dict]], dtype: str, rows: dict,
                groups: dict[str, str] | None = None) -> None:
    with h5py.File(tmp, "w") as f:
        if groups:
            text = h5py.string_dtype()
            pairs = np.array(sorted(groups.items()), dtype=[("path", text), ("group", text)])
            ds = f.create_dataset("groups", data=pairs, dtype=pairs.dtype)
            ds.attrs["sha256"] = hashlib.sha256(_group_bytes(pairs)).hexdigest()
        for key, value in attrs.items():
            f.attrs[key] = json.dumps(value) if key in JSON_ATTRS else value
        f.attrs["format"] = FORMAT
        f.attrs["complete"] = False
        for split, blocks in splits.items():
            _write_split(f.create_group(split), blocks, attrs["taps"], attrs["dims"], dtype,
                         rows.get(split, CHUNK_ROWS), attrs.get("maps"))
        f.attrs["complete"] = True
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())


def _write_split(group: h5py.Group, blocks: Iterable[dict], taps: list[str], dims: dict, dtype: str,
                 split_rows: int, maps: dict | None = None) -> None:
    text = h5py.string_dtype()
    # Chunks of at most 4 MB, and no larger than the split: HDF5 allocates whole chunks, so a
    # 16-image cache would otherwise take 12 MB on disk.
    chunk = max(1, min(split_rows, CHUNK_ROWS))
    feats = {t: group.create_dataset(f"features/{t}", shape=(0, dims[t]), maxshape=(None, dims[t]), dtype=dtype,
                                     chunks=(max(1, min(chunk, 2**22 // (4 * dims[t]))), dims[t]))
             for t in taps}
    if maps:  # one image's map per chunk row block of at most 4 MB
        shape, row_bytes = tuple(maps["shape"]), 2 * int(np.prod(maps["shape"]))
        feats[f"maps/{maps['tap']}"] = group.create_dataset(
            f"maps/{maps['tap']}", shape=(0, *shape), maxshape=(None, *shape), dtype="float16",
            chunks=(max(1, min(chunk, 2**22 // row_bytes)), *shape))
    labels = group.create_dataset("labels", shape=(0,), maxshape=(None,), dtype="int64", chunks=(chunk,))
    paths = group.create_dataset("paths", shape=(0,), maxshape=(None,), dtype=text, chunks=(chunk,))
    # Which view of its image each row is (0 = the image itself); a cache without views has only 0.
    view = group.create_dataset("view", shape=(0,), maxshape=(None,), dtype="int8", chunks=(chunk,))
    skipped_rows: list[tuple[str, str]] = []
    # Checksums are taken as the rows stream in, so the written file is not read back.
    hashes = {ds.name: hashlib.sha256() for ds in [labels, paths, view, *feats.values()]}
    for block in blocks:
        n, n_new = labels.shape[0], len(block["labels"])
        views = block["view"] if "view" in block else np.zeros(n_new)
        for ds, values in [(labels, block["labels"]), (paths, block["paths"]), (view, views),
                           *[(ds, _block_values(block, key)) for key, ds in feats.items()]]:
            ds.resize(n + n_new, axis=0)
            if n_new:
                rows = np.asarray(values, dtype=object if ds is paths else ds.dtype)
                ds[n:] = rows
                hashes[ds.name].update(_row_bytes(rows))
        skipped_rows += zip(map(str, block["skipped_paths"]), map(str, block["skipped_reasons"]))
    skipped = np.array(skipped_rows, dtype=[("path", text), ("reason", text)])
    group.create_dataset("skipped", data=skipped, dtype=skipped.dtype)
    for ds in [labels, paths, view, *feats.values()]:
        ds.attrs["sha256"] = hashes[ds.name].hexdigest()


def _block_values(block: dict, key: str) -> np.ndarray:
    """A block's rows of a feature tap ("blocks.5") or of a tap's maps ("maps/blocks.5")."""
    group, _, tap = key.rpartition("/")
    return block[group or "features"][tap]


def _group_bytes(pairs: np.ndarray) -> bytes:
    return "".join(f"{_text(p)}\0{_text(g)}\n" for p, g in pairs).encode()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _row_bytes(rows: np.ndarray) -> bytes:
    """What a checksum covers: the raw values, or each string followed by a newline."""
    if rows.dtype.kind == "O":
        return "".join((r.decode() if isinstance(r, bytes) else r) + "\n" for r in rows).encode()
    return np.ascontiguousarray(rows).tobytes()


def _row_digest(rows: np.ndarray) -> str:
    """The checksum of a whole dataset's rows; numbers are hashed in place, not copied to bytes first."""
    return hashlib.sha256(_row_bytes(rows) if rows.dtype.kind == "O" else np.ascontiguousarray(rows)).hexdigest()


def _digest(ds: h5py.Dataset) -> str:
    h = hashlib.sha256()
    for start in range(0, ds.shape[0], CHUNK_ROWS):
        h.update(_row_bytes(ds[start:start + CHUNK_ROWS]))
    return h.hexdigest()


# --------------------------------------------------------------------------- reading

class FeatureStore:
    """Read access to a complete cache: `FeatureStore(path).features("train")`."""

    def __init__(self, path: str | os.PathLike, require_complete: bool = True, remember: bool | set[str] = False):
        """`remember`: keep each tap's features once read (or those of the taps in a set), so a stage that reads
        a tap for several purposes (fit: choosing the tap, the concatenation, the final fit, the check for
        near-twins) reads it from the file once."""
        self.path = Path(path)
        self._kept: dict[tuple[str, str], np.ndarray] | None = {} if remember else None
        self._remembered = remember
        if self.path.is_dir():
            raise BottleneckError(f"{path} is a folder; give a cache file (.h5), see 'bottleneck cache ls {path}'")
        if not self.path.is_file() and Path(f"{path}.parts").is_dir():
            state = {True: "is still being extracted; wait for that 'bottleneck extract' to finish",
                     False: "was interrupted; rerun its 'bottleneck extract' command to resume it",
                     None: "is being extracted or was interrupted; wait for it, or rerun its "
                           "'bottleneck extract' command to resume"}[writer_running(self.path)]
            raise BottleneckError(f"feature cache {path} is not finished: its extraction {state}")
        if not self.path.is_file():
            raise BottleneckError(f"feature cache {path} does not exist")
        try:
            self.file = h5py.File(self.path, "r")
        except OSError:
            raise BottleneckError(f"{path} is not a readable HDF5 file (truncated or damaged); "
                                  "delete it and run 'bottleneck extract' again") from None
        try:
            self.attrs = {k: _attr(self.path, k, v) for k, v in self.file.attrs.items()}
            if self.attrs.get("format") != FORMAT:
                raise BottleneckError(f"{path} is not a bottleneck feature cache (format "
                                      f"{self.attrs.get('format')!r}, expected {FORMAT!r})")
            if require_complete and not self.attrs.get("complete"):
                raise BottleneckError(f"{path} is incomplete (its extraction did not finish); rerun the same "
                                      "'bottleneck extract' command to finish it")
            self._check_schema()
        except BottleneckError:
            self.file.close()
            raise
        except OSError as e:  # a damaged chunk met while checking the labels
            self.file.close()
            raise _damaged(self.path, f"a dataset cannot be read ({str(e).splitlines()[0][:120]})") from None

    def _check_schema(self) -> None:
        """Shapes, types and ranges, from metadata and labels only (cheap at every open): an edited or
        foreign file is one error here, not a traceback or a wrong score later."""
        a = self.attrs
        def bad(what: str) -> BottleneckError:
            return _damaged(self.path, what)
        if not (isinstance(a.get("classes"), list) and len(a["classes"]) >= 1
                and all(isinstance(c, str) for c in a["classes"])):
            raise bad("its 'classes' attribute is not a list of class names")
        if not (isinstance(a.get("taps"), list) and a["taps"] and all(isinstance(t, str) for t in a["taps"])):
            raise bad("its 'taps' attribute is not a list of tap names")
        dims = a.get("dims")
        if dims is not None and not (isinstance(dims, dict) and set(dims) == set(a["taps"])
                                     and all(isinstance(d, int) and d > 0 for d in dims.values())):
            raise bad("its 'dims' attribute does not give a positive size for each tap")
        maps = a.get("maps")
        if maps is not None and not (isinstance(maps, dict) and maps.get("tap") in a["taps"]
                                     and isinstance(maps.get("shape"), list)
                                     and all(isinstance(d, int) and d > 0 for d in maps["shape"])):
            raise bad("its 'maps' attribute does not name one of its taps and the shape of its maps")
        for split in self.splits:
            g = self.file[split]
            for name in ("labels", "paths", "skipped", *[f"features/{t}" for t in a["taps"]]):
                if not isinstance(g.get(name), h5py.Dataset):
                    raise bad(f"split {split} has no dataset {name}")
            n = g["labels"].shape[0]
            if g["labels"].ndim != 1 or g["labels"].dtype.kind not in "iu":
                raise bad(f"{split}/labels are not integers")
            if g["paths"].shape != (n,) or g["paths"].dtype.kind not in "OSU":
                raise bad(f"{split}/paths are not {n} file names")
            if "view" in g and g["view"].shape != (n,):
                raise bad(f"{split}/view has {g['view'].shape[0]} rows, labels have {n}")
            for tap in a["taps"]:
                ds = g[f"features/{tap}"]
                if ds.ndim != 2 or ds.shape[0] != n or ds.dtype.kind != "f":
                    raise bad(f"{split}/features/{tap} is {ds.dtype} of shape {ds.shape}, expected floats of "
                              f"{n} rows")
                if dims is not None and ds.shape[1] != dims[tap]:
                    raise bad(f"{split}/features/{tap} has {ds.shape[1]} columns, its 'dims' say {dims[tap]}")
            if maps is not None:
                ds = g.get(f"maps/{maps['tap']}")
                if not isinstance(ds, h5py.Dataset) or ds.shape != (n, *maps["shape"]) or ds.dtype != np.float16:
                    raise bad(f"{split}/maps/{maps['tap']} is not float16 maps of shape {(n, *maps['shape'])}")
            labels = g["labels"][:]
            if n and (labels.min() < 0 or labels.max() >= len(a["classes"])):
                raise bad(f"{split}/labels hold {labels.min() if labels.min() < 0 else labels.max()}, outside the "
                          f"{len(a['classes'])} classes")

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._kept = {} if self._kept is not None else None
        self.file.close()

    @property
    def splits(self) -> list[str]:
        others = (s for s in self.file if s not in ("train", "val", "test") and isinstance(self.file[s], h5py.Group))
        return [s for s in ("train", "val", "test") if s in self.file] + sorted(others)

    @property
    def taps(self) -> list[str]:
        return self.attrs["taps"]

    @property
    def classes(self) -> list[str]:
        return self.attrs["classes"]

    def features(self, split: str, tap: str | None = None) -> np.ndarray:
        tap = tap or self.taps[-1]
        if tap not in self.taps:
            raise BottleneckError(f"{self.path} has no tap '{tap}'; it holds {', '.join(self.taps)}")
        if self._kept is None or (self._remembered is not True and tap not in self._remembered):
            return self._read_features(split, tap)
        if (split, tap) not in self._kept:
            x = self._read_features(split, tap)
            x.setflags(write=False)  # shared by every caller of this store: none may change it for the others
            self._kept[split, tap] = x
        return self._kept[split, tap]

    def _read_features(self, split: str, tap: str) -> np.ndarray:
        """A tap's features of a split, read from the file and checked."""
        ds = self._split(split)[f"features/{tap}"]
        x = ds[:]
        if not np.isfinite(x).all():  # one NaN makes a scaler, and so every prediction, NaN
            raise _damaged(self.path, f"{split}/features/{tap} holds NaN or inf")
        return self._checked(ds, x)

    @property
    def map_tap(self) -> str | None:
        """The tap whose unpooled maps the cache holds (extract --maps), or None."""
        return (self.attrs.get("maps") or {}).get("tap")

    def maps(self, split: str) -> np.ndarray:
        """The float16 maps of `map_tap`, one per row, as the next layer of the network reads them."""
        if self.map_tap is None:
            raise BottleneckError(f"{self.path} holds no unpooled maps; extract with --maps TAP to keep them")
        ds = self._split(split)[f"maps/{self.map_tap}"]
        x = ds[:]
        if not np.isfinite(x).all():
            raise _damaged(self.path, f"{split}/maps/{self.map_tap} holds NaN or inf")
        return self._checked(ds, x)

    def labels(self, split: str) -> np.ndarray:
        ds = self._split(split)["labels"]
        return self._checked(ds, ds[:])

    def paths(self, split: str) -> list[str]:
        ds = self._split(split)["paths"]
        return list(self._checked(ds, ds.asstr()[:]))

    @property
    def n_views(self) -> int:
        """Rows per image: 1, or the number of views of `extract --views`."""
        return int(self.attrs.get("n_views", 1))

    def views(self, split: str) -> np.ndarray:
        """The view index of each row (older caches, which have no views, hold zeros)."""
        g = self._split(split)
        return self._checked(g["view"], g["view"][:]) if "view" in g else np.zeros(g["labels"].shape[0], dtype=np.int8)

    def _checked(self, ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
        """`rows`, all of `ds` as just read, refused unless they match the checksum written with them: an
        edited or bit-rotted value would otherwise train and score to exit 0. The rows are hashed as
        they are in memory, so the file is not read twice."""
        if _row_digest(rows) != ds.attrs.get("sha256"):
            raise _damaged(self.path, f"{ds.name.lstrip('/')} does not match its checksum ('bottleneck cache verify' "
                           "lists every such dataset)")
        return rows

    def groups(self) -> dict[str, str] | None:
        """{path: group} of a cache extracted with groups (a manifest's group column or --group-pattern)."""
        if "groups" not in self.file:
            return None
        pairs = self.file["groups"][:]
        if hashlib.sha256(_group_bytes(pairs)).hexdigest() != self.file["groups"].attrs.get("sha256"):
            raise _damaged(self.path, "groups does not match its checksum")
        return {_text(p): _text(g) for p, g in pairs}

    def skipped(self, split: str) -> list[tuple[str, str]]:
        rows = self._split(split)["skipped"][:]
        return [(p.decode("utf-8", "replace"), r.decode("utf-8", "replace")) for p, r in rows]

    def _split(self, split: str) -> h5py.Group:
        if split not in self.file:
            raise BottleneckError(f"{self.path} has no split '{split}'; it holds {', '.join(self.splits)}")
        return self.file[split]

    def info(self) -> dict:
        splits = {}
        for s in self.splits:
            g = self.file[s]
            splits[s] = {"images": int(g["labels"].shape[0]) // self.n_views, "skipped": int(g["skipped"].shape[0]),
                         "per_class": (np.bincount(g["labels"][:], minlength=len(self.classes))
                                       // self.n_views).tolist()}
        return {"path": str(self.path), **self.attrs, "splits": splits,
                "skipped": {s: self.skipped(s) for s in self.splits if splits[s]["skipped"]},
                "bytes": self.path.stat().st_size}


def _damaged(path: Path, what: str) -> BottleneckError:
    return BottleneckError(f"{path} is damaged or was edited: {what}; delete it and run 'bottleneck extract' again")


def _attr(path: Path, key: str, value):
    if key not in JSON_ATTRS:
        return _plain(value)
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        raise _damaged(path, f"its attribute {key!r} is not valid JSON") from None


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    return value.decode() if isinstance(value, bytes) else value


def leftovers(folder: str | os.PathLike, interrupted: bool = False) -> list[Path]:
    """What in a cache folder no extraction will use again: blocks beside a finished cache,
    temporary files whose writer is gone, and lock files nobody holds; with `interrupted`, also
    the blocks of interrupted extractions (a rerun of their command would resume from them:
    after a change of data or settings, it never comes).

    Only the exact names extraction writes count, each only when it is what extraction leaves
    there (no link, no folder holding other files): a look-alike is someone else's.
    """
    found = []
    for parts in sorted(Path(folder).glob("*.h5.parts")):
        cache = cache_of(parts)
        if is_parts_folder(parts) and writer_running(cache) is False and (interrupted or is_complete(cache)):
            found.append(parts)
    for tmp in sorted(Path(folder).glob("*.h5.tmp")):
        if _is_cache_temporary(tmp) and writer_running(cache_of(tmp)) is False:
            found.append(tmp)
    return found + [lock for lock in sorted(Path(folder).glob("*.h5.lock")) if is_stale(lock)]


def _is_cache_temporary(path: Path) -> bool:
    """Whether `path` is a plain file as `write_cache` leaves it: empty or begun as HDF5."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return False
    return b"\x89HDF\r\n\x1a\n".startswith(head)


def cache_of(leftover: Path) -> Path:
    """The cache a leftover belongs to: x.h5.parts, x.h5.tmp and x.h5.lock → x.h5."""
    for suffix in (".parts", ".tmp", ".lock"):
        if leftover.name.endswith(".h5" + suffix):
            return leftover.with_name(leftover.name.removesuffix(suffix))
    return leftover


def remove(paths: list[Path]) -> list[Path]:
    """Remove leftovers, each while holding its cache's lock (a writer that started since they were
    found keeps its files) and only if it still is one; returns what is gone."""
    removed = []
    for path in paths:
        try:
            with CacheLock(cache_of(path)):  # leaving it removes a lock file nobody held
                if path.name.endswith(".parts"):
                    Parts(cache_of(path)).remove()
                elif path.name.endswith(".tmp") and _is_cache_temporary(path):
                    path.unlink()
        except (BottleneckError, OSError):
            pass
        if not os.path.lexists(path):
            removed.append(path)
    return removed


def is_complete(path: str | os.PathLike) -> bool:
    """A cheap check for reuse: the file opens, is ours and is marked complete."""
    try:
        FeatureStore(path).close()
        return True
    except BottleneckError:
        return False


def verify(path: str | os.PathLike) -> list[str]:
    """Problems found in a cache (an empty list means it is intact)."""
    try:
        store = FeatureStore(path)
    except BottleneckError as e:
        return [str(e)]
    problems = []
    with store:
        for split in store.splits:
            g = store.file[split]
            n = g["labels"].shape[0]
            datasets = {"labels": g["labels"], "paths": g["paths"], **({"view": g["view"]} if "view" in g else {}),
                        **{f"features/{t}": g[f"features/{t}"] for t in store.taps if f"features/{t}" in g},
                        **({f"maps/{store.map_tap}": g[f"maps/{store.map_tap}"]} if store.map_tap else {})}
            problems += [f"{split}: tap {t} is missing" for t in store.taps if f"features/{t}" not in g]
            for name, ds in datasets.items():
                if ds.shape[0] != n:
                    problems.append(f"{split}/{name} has {ds.shape[0]} rows, labels have {n}")
                try:
                    if _digest(ds) != ds.attrs.get("sha256"):
                        problems.append(f"{split}/{name} does not match its checksum (damaged)")
                    if name.startswith(("features/", "maps/")) and not all(
                            np.isfinite(ds[i:i + CHUNK_ROWS]).all() for i in range(0, n, CHUNK_ROWS)):
                        problems.append(f"{split}/{name} holds NaN or inf")
                except OSError as e:
                    problems.append(f"{split}/{name} cannot be read ({e})")
        try:
            store.groups()
        except (BottleneckError, OSError) as e:
            problems.append(str(e))
    return problems


def contents_equal(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two caches hold the same features, rows and metadata (timings aside)."""
    with FeatureStore(a) as x, FeatureStore(b) as y:
        ignore = set(VOLATILE_ATTRS) | {"shard"}
        if {k: v for k, v in x.attrs.items() if k not in ignore} != \
           {k: v for k, v in y.attrs.items() if k not in ignore} or x.splits != y.splits:
            return False
        for s in x.splits:
            names = ["labels", "paths", "skipped", *[f"features/{t}" for t in x.taps],
                     *([f"maps/{x.map_tap}"] if x.map_tap else [])]
            if any(not np.array_equal(x.file[s][n][:], y.file[s][n][:]) for n in names) or \
                    not np.array_equal(x.views(s), y.views(s)):
                return False
    return True


# --------------------------------------------------------------------------- merging

def merge(shards: list[str | os.PathLike], out: str | os.PathLike | None = None) -> Path:
    """Join the shards of one extraction (any order) into one complete cache."""
    stores = [FeatureStore(s) for s in shards]
    try:
        stores.sort(key=lambda st: _shard_of(st)[0])
        first = stores[0]
        n = _shard_of(first)[1]
        found = [_shard_of(st) for st in stores]
        if n == 1:
            raise BottleneckError(f"{first.path} is a whole cache, not a shard; nothing to merge")
        if found != [(i, n) for i in range(n)]:
            raise BottleneckError(f"shards do not form one whole set: have {[f'{i}/{k}' for i, k in found]}, "
                                  f"need 0/{n} to {n - 1}/{n} exactly once")
        for st in stores[1:]:
            if st.attrs["fingerprint"] != first.attrs["fingerprint"]:
                raise BottleneckError(f"{st.path} belongs to another extraction than {first.path} "
                                      "(model, weights, taps, pooling or data differ)")
            if st.attrs.get("block_rows") != first.attrs.get("block_rows"):
                raise BottleneckError(f"{st.path} was extracted with --batch-size {st.attrs.get('block_rows')}, "
                                      f"{first.path} with {first.attrs.get('block_rows')}; shards split whole "
                                      "batches, so all shards must use the same batch size")
        out = Path(out) if out else Path(str(first.path).split(".shard-")[0] + ".h5")
        if any(out.resolve() == st.path.resolve() for st in stores):
            raise BottleneckError(f"--out {out} is one of the shards; choose another file")
        out.parent.mkdir(parents=True, exist_ok=True)
        attrs = {k: v for k, v in first.attrs.items() if k not in ("complete", "format")}
        attrs["shard"] = "0/1"
        attrs["cost"] = _sum_costs([st.attrs.get("cost", {}) for st in stores])
        splits = {s: _shard_blocks(stores, s) for s in first.splits}
        with CacheLock(out):
            rows = {s: sum(st.file[s]["labels"].shape[0] for st in stores if s in st.file) for s in first.splits}
            return write_cache(out, attrs, splits, dtype=first.attrs.get("dtype", "float32"), rows=rows,
                               groups=first.groups())
    finally:
        for st in stores:
            st.close()


def _shard_of(store: FeatureStore) -> tuple[int, int]:
    i, n = str(store.attrs.get("shard", "0/1")).split("/")
    return int(i), int(n)


def _shard_blocks(stores: list[FeatureStore], split: str) -> Iterator[dict]:
    for st in stores:
        if split not in st.file:
            continue
        g = st.file[split]
        skipped = st.skipped(split)
        # Each shard's rows are checked against their checksums as they stream through, before the
        # merged file is renamed into place: an edited shard must not become a clean-looking cache.
        hashes = {name: hashlib.sha256() for name in ("labels", "paths", "view", *[f"features/{t}" for t in st.taps],
                                                      *([f"maps/{st.map_tap}"] if st.map_tap else [])) if name in g}
        for start in range(0, max(1, g["labels"].shape[0]), CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            first_block = start == 0
            features = {t: g[f"features/{t}"][rows] for t in st.taps}
            bad = next((t for t, x in features.items() if not np.isfinite(x).all()), None)
            if bad:
                raise _damaged(st.path, f"{split}/features/{bad} holds NaN or inf")
            maps = {st.map_tap: g[f"maps/{st.map_tap}"][rows]} if st.map_tap else {}
            if not all(np.isfinite(m).all() for m in maps.values()):
                raise _damaged(st.path, f"{split}/maps/{st.map_tap} holds NaN or inf")
            block = {"features": features, "maps": maps, "labels": g["labels"][rows],
                     "paths": np.asarray(g["paths"].asstr()[rows], dtype=object),
                     "view": g["view"][rows] if "view" in g else np.zeros(len(g["labels"][rows]), dtype=np.int8)}
            for name, h in hashes.items():
                group, _, key = name.rpartition("/")
                h.update(_row_bytes(block[group][key] if group else block[name]))
            yield block | {"paths": list(block["paths"]),
                           "skipped_paths": [p for p, _ in skipped] if first_block else [],
                           "skipped_reasons": [r for _, r in skipped] if first_block else []}
        for name, h in hashes.items():
            if h.hexdigest() != g[name].attrs.get("sha256"):
                raise _damaged(st.path, f"{split}/{name} does not match its checksum")


def _sum_costs(costs: list[dict]) -> dict:
    total = {k: costs[0][k] for k in ("device", "precision") if k in costs[0]}
    for key in ("wall_seconds", "compute_seconds", "images"):
        total[key] = sum(c.get(key, 0) for c in costs)
    if total.get("compute_seconds"):
        total["images_per_second"] = total["images"] / total["compute_seconds"]
    return total
