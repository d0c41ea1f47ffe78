"""Audit a feature cache: test images that are twins of training images, labels the features
do not believe, and a map of the data. Nothing is changed: the audit lists, the user decides.

Three checks, all on what extract already cached (docs/audit.md):

- Twins across splits. Each val and test image is matched to its most similar training image
  twice (bottleneck.leaks): by cosine similarity of the penultimate features, centred on the
  training mean (raw pooled activations are all positive, which makes every pair look alike),
  which finds crops; and by the correlation of 8 × 8 grey thumbnails of the files, which finds
  rescaled and re-encoded copies that the network, on small images, sees differently. A pair at
  or above either threshold is a near-twin; identical file bytes are an exact copy.
- Likely label errors. A cheap probe (standardise, PCA, logistic regression) scores every image
  out of fold; confident learning (Northcutt, Jiang and Chuang, JAIR 2021) flags an image when
  the probe is confident, by each class's own threshold, that it belongs to another class. The
  flagged images are ranked by how little probability the probe gives their label.
- A map: the first two principal components of the same features, coloured by class, with
  the flagged images marked.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bottleneck.errors import BottleneckError, write_error
from bottleneck.leaks import DEFAULT_THRESHOLD, PIXEL_THRESHOLD, cosine, file_signatures, nearest
from bottleneck.store import FeatureStore, atomic_write

PROBE_DIMS = 256  # the label probe works on this many principal components: minutes, not hours, at 60,000 images

@dataclass
class Twin:
    """A val or test image and its most similar training image."""

    split: str
    path: str
    train_path: str
    similarity: float  # of the features (to `train_path`, the nearest by features or, if closer, by pixels)
    pixels: float | None  # of the thumbnails; None where a file could not be read
    exact: bool
    same_label: bool


@dataclass
class Suspect:
    """An image whose given label the out-of-fold probe does not believe."""

    split: str
    path: str
    given: str
    suggested: str
    p_given: float
    p_suggested: float


@dataclass
class Audit:
    cache: str
    tap: str
    threshold: float
    images: dict[str, int]
    data_root: str | None = None
    pixel_threshold: float = PIXEL_THRESHOLD
    twins: list[Twin] = field(default_factory=list)
    twin_share: dict[str, float] = field(default_factory=dict)
    suspects: list[Suspect] = field(default_factory=list)
    probe: dict = field(default_factory=dict)
    map: dict = field(default_factory=dict)

    def asdict(self) -> dict:
        return asdict(self)


def audit(features: str | os.PathLike, *, tap: str | None = None, threshold: float = DEFAULT_THRESHOLD,
          folds: int = 5, seed: int = 0, out: str | os.PathLike | None = None) -> Path:
    """Audit a cache; writes audit.json and audit.png into `out` (default runs/audit/<cache name>)
    and returns the JSON's path."""
    if not 0 < threshold <= 1:
        raise BottleneckError(f"--threshold must be in (0, 1], not {threshold}")
    with FeatureStore(features) as st:
        tap = tap or ("pool" if "pool" in st.taps else st.taps[-1])
        rows = image_rows(st, tap)
        root = st.attrs.get("data_root")
        classes = st.classes
    result = Audit(str(features), tap, threshold, {s: len(r["paths"]) for s, r in rows.items()}, root)
    if "train" in rows:
        result.twins = find_twins(rows, threshold, root)
        result.twin_share = {s: sum(t.split == s for t in result.twins) / len(rows[s]["paths"])
                             for s in rows if s != "train"}
    result.suspects, result.probe = find_suspects(rows, classes, folds, seed)
    result.map = data_map(rows)
    folder = Path(out) if out else Path("runs/audit") / Path(features).stem
    return write_audit(folder, result, rows, classes)


def image_rows(st: FeatureStore, tap: str) -> dict[str, dict]:
    """{split: {"x", "y", "paths"}} with one row per image: the first view (the image itself) of a
    cache of several views."""
    out = {}
    for split in st.splits:
        x, y, paths = st.features(split, tap), st.labels(split), st.paths(split)
        keep = st.views(split) == 0
        out[split] = {"x": x[keep].astype(np.float32), "y": y[keep], "paths": [p for p, k in zip(paths, keep) if k]}
    return out


# --------------------------------------------------------------------------- twins

def find_twins(rows: dict[str, dict], threshold: float, root: str | None,
               pixel_threshold: float = PIXEL_THRESHOLD) -> list[Twin]:
    """The val and test images whose nearest training image is at or above `threshold` by features or
    `pixel_threshold` by thumbnails, or has the same file bytes; most similar first."""
    train = rows["train"]
    centre = train["x"].mean(axis=0)
    digests, thumbs = file_signatures(train["paths"], root)
    by_digest = {d: i for i, d in enumerate(digests) if d}
    twins = []
    for split, r in rows.items():
        if split == "train":
            continue
        index, sims = nearest(r["x"] - centre, train["x"] - centre)
        digests_here, own = file_signatures(r["paths"], root)
        p_index, p_sims = nearest(own, thumbs)
        readable = np.abs(own).sum(axis=1) > 0
        for k in range(len(index)):
            j, sim = int(index[k]), float(sims[k])
            pixels = float(p_sims[k]) if readable[k] else None
            exact_j = by_digest.get(digests_here[k]) if digests_here[k] else None
            if exact_j is not None:
                j = exact_j
            elif pixels is not None and pixels >= pixel_threshold and sim < threshold:
                j = int(p_index[k])  # a copy the thumbnails found: name its original
            if sim >= threshold or exact_j is not None or (pixels is not None and pixels >= pixel_threshold):
                sim_j = sim if j == index[k] else cosine(r["x"][k] - centre, train["x"][j] - centre)
                twins.append(Twin(split, r["paths"][k], train["paths"][j], round(sim_j, 4),
                                  None if pixels is None else round(pixels, 4), exact_j is not None,
                                  bool(r["y"][k] == train["y"][j])))
    return sorted(twins, key=lambda t: (not t.exact, -max(t.similarity, t.pixels or 0), t.path))


# --------------------------------------------------------------------------- label errors

def out_of_fold_probabilities(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each image's class probabilities from a probe that never saw it: standardise, PCA to
    PROBE_DIMS, logistic regression, over stratified folds."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    k = min(folds, int(np.bincount(y).min()))
    if k < 2:
        raise BottleneckError("a class has a single image: label errors need at least two images of every class")
    probs = np.zeros((len(y), int(y.max()) + 1))
    dims = min(PROBE_DIMS, x.shape[1], len(y) - len(y) // k - 1)
    for train, held in StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y):
        probe = make_pipeline(StandardScaler(), PCA(dims, random_state=seed), StandardScaler(),
                              LogisticRegression(C=0.1, max_iter=2000))
        probe.fit(x[train], y[train])
        probs[np.ix_(held, probe.classes_)] = probe.predict_proba(x[held])
    return probs


def confident_errors(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the images confident learning calls mislabelled, least believed label first.

    A class's threshold is the mean probability the probe gives it on the images labelled with
    it; an image is counted in class j when its probability of j reaches j's threshold (the
    likeliest such j), and flagged when that j is not its given label."""
    n_classes = probs.shape[1]
    thresholds = np.array([probs[y == c, c].mean() if (y == c).any() else 1.0 for c in range(n_classes)])
    above = probs >= thresholds
    counted = np.where(above.any(axis=1), np.where(above, probs, -1).argmax(axis=1), -1)
    flagged = np.flatnonzero((counted >= 0) & (counted != y))
    return flagged[np.argsort(probs[flagged, y[flagged]], kind="stable")]


def find_suspects(rows: dict[str, dict], classes: list[str], folds: int, seed: int) -> tuple[list[Suspect], dict]:
    """Every image of every split scored out of fold; the flagged ones, least believed first."""
    splits = list(rows)
    x = np.concatenate([rows[s]["x"] for s in splits])
    y = np.concatenate([rows[s]["y"] for s in splits]).astype(np.int64)
    where = [(s, p) for s in splits for p in rows[s]["paths"]]
    probs = out_of_fold_probabilities(x, y, folds, seed)
    flagged = confident_errors(probs, y)
    suspects = []
    for i in flagged.tolist():
        other = probs[i].copy()
        other[y[i]] = -1
        j = int(other.argmax())
        suspects.append(Suspect(where[i][0], where[i][1], classes[y[i]], classes[j], round(float(probs[i, y[i]]), 4),
                                round(float(probs[i, j]), 4)))
    probe = {"method": "confident learning (Northcutt et al. 2021) on out-of-fold logistic regression",
             "folds": min(folds, int(np.bincount(y).min())), "seed": seed, "images": len(y),
             "accuracy": round(float((probs.argmax(axis=1) == y).mean()), 4), "flagged": len(suspects)}
    return suspects, probe


# --------------------------------------------------------------------------- map

def data_map(rows: dict[str, dict]) -> dict:
    """The first two principal components of the features of every image (centred, scaled by
    the training spread), and the share of the variance they hold."""
    x = np.concatenate([r["x"] for r in rows.values()]).astype(np.float64)
    x = (x - x.mean(axis=0)) / np.maximum(x.std(axis=0), 1e-12)
    cov = x.T @ x / max(1, len(x) - 1)
    values, vectors = np.linalg.eigh(cov)
    top = vectors[:, ::-1][:, :2]
    xy = x @ top
    return {"method": "pca", "explained": [round(float(v / values.sum()), 4) for v in values[::-1][:2]],
            "points": np.round(xy, 3).tolist()}


# --------------------------------------------------------------------------- output

def write_audit(folder: Path, result: Audit, rows: dict[str, dict], classes: list[str]) -> Path:
    """audit.png, then audit.json (last: a folder holding it is finished)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        plot_map(folder / "audit.png", result, rows, classes)
    except OSError as e:
        raise write_error(e, folder) from None
    path = folder / "audit.json"
    atomic_write(path, json.dumps(result.asdict(), indent=1).encode())
    return path


def plot_map(path: Path, result: Audit, rows: dict[str, dict], classes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xy = np.array(result.map["points"])
    y = np.concatenate([r["y"] for r in rows.values()])
    paths = [p for r in rows.values() for p in r["paths"]]
    split = np.array([s for s, r in rows.items() for _ in r["paths"]])
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for c, name in enumerate(classes[:20]):
        for s, marker in (("train", "."), ("val", "+"), ("test", "x")):
            m = (y == c) & (split == s)
            if m.any():
                ax.scatter(xy[m, 0], xy[m, 1], s=6 if s == "train" else 14, marker=marker, color=cmap(c % cmap.N),
                           alpha=0.5, label=f"{name} ({s})")
    at = {p: i for i, p in enumerate(paths)}
    for items, colour, label in ((result.twins, "red", "twin of a training image"),
                                 (result.suspects[:50], "black", "suspect label")):
        idx = [at[t.path] for t in items if t.path in at]
        if idx:
            ax.scatter(xy[idx, 0], xy[idx, 1], s=60, facecolors="none", edgecolors=colour, linewidths=1.2,
                       label=label)
    e = result.map["explained"]
    ax.set_xlabel(f"PC 1 ({e[0]:.0%} of variance)")
    ax.set_ylabel(f"PC 2 ({e[1]:.0%})")
    ax.set_title(f"{Path(result.cache).name}: {result.tap}")
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
