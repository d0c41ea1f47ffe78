"""Test images that are copies or near-copies of training images: the similarity search that
`bottleneck audit` runs in full, and the quick check that `fit` and `finetune` run on every
result so that a leak is never silent.

Two measures, each with a threshold measured on real images (benchmarks/audit_threshold.py,
docs/audit.md): the cosine similarity of penultimate features centred on the training mean, which
finds crops, and the correlation of 8 x 8 grey thumbnails of the files, which finds rescaled and
re-encoded copies; identical file bytes are an exact copy. Similarities are computed a block of
rows at a time, so 60,000 images never need an n x n matrix.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image

from bottleneck.stats import wilson

# Cosine similarity of centred Lite0 penultimate features at or above which two images are
# called near-twins. Measured by benchmarks/audit_threshold.py on real images (docs/audit.md):
# resized, re-encoded and slightly cropped copies score above it, distinct images below.
DEFAULT_THRESHOLD = 0.80
# Correlation of 8 × 8 grey thumbnails at or above which a pair is a rescaled or re-encoded copy
# (benchmarks/audit_threshold.py: such copies score 0.995 and more; distinct photographs at most
# 0.94, distinct solar cells, which all look alike, above it for 1 % of them).
PIXEL_THRESHOLD = 0.995
THUMB_PX = 8
BLOCK_CELLS = 2 ** 24  # similarities held at once (64 MB of float32), whatever the number of images
# Above this share of test images with a near-twin in train, fit, finetune and compare warn. With
# no leak the check finds about 1 % by construction (NEIGHBOUR_QUANTILE), and on a few hundred test
# images that share's 95 % interval stays below 3 %.
WARN_SHARE = 0.03
WARN_TWINS = 3  # and at least this many: one twin among a dozen test images is no pattern
# The quick check looks at this many test images at most (a seeded sample above it, with the
# share's interval): a few seconds at 50,000 training images, whatever the test set's size.
CHECKED_AT_MOST = 2000
# A test image counts as a twin only when it is closer to a training image than 99 % of training
# images are to their nearest other training image (neighbour_bar).
NEIGHBOUR_QUANTILE = 0.99


def nearest(query: np.ndarray, reference: np.ndarray, skip: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(index, similarity) of each query row's most similar reference row by cosine similarity,
    computed BLOCK_CELLS similarities at a time; `skip` gives, per query row, a reference row it
    may not pick (itself, when the queries are reference rows)."""
    q, r = unit_rows(query), unit_rows(reference)
    step = max(1, BLOCK_CELLS // max(1, len(r)))
    index = np.empty(len(q), dtype=np.int64)
    best = np.empty(len(q), dtype=np.float32)
    for a in range(0, len(q), step):
        sims = q[a:a + step] @ r.T
        if skip is not None:
            sims[np.arange(len(sims)), skip[a:a + step]] = -np.inf
        index[a:a + step] = sims.argmax(axis=1)
        best[a:a + step] = sims[np.arange(len(sims)), index[a:a + step]]
    return index, best


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))


def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def file_signatures(paths: list[str], root: str | None) -> tuple[list[str | None], np.ndarray]:
    """(sha256 of each file's bytes, its 8 × 8 grey thumbnail, box-averaged with the mean removed),
    from one read of each file. A file that cannot be read has no digest and a zero thumbnail (moved
    data is no reason to stop: the features still find the near-twins)."""
    from bottleneck.data import load_image

    digests: list[str | None] = [None] * len(paths)
    thumbs = np.zeros((len(paths), THUMB_PX * THUMB_PX), dtype=np.float32)
    for i, p in enumerate(paths):
        full = Path(root or "") / p
        try:
            if not stat.S_ISREG(os.stat(full).st_mode):  # a pipe would block the read
                continue
            raw = full.read_bytes()
        except OSError:
            continue
        digests[i] = hashlib.sha256(raw).hexdigest()
        try:
            img = load_image(io.BytesIO(raw)).convert("L").resize((THUMB_PX, THUMB_PX), Image.BOX)
        except Exception:  # undecodable: the digest and the features still speak for it
            continue
        a = np.asarray(img, dtype=np.float32).ravel()
        thumbs[i] = a - a.mean()
    return digests, thumbs


def sample(n: int, seed: int = 0) -> np.ndarray:
    """The test images the quick check looks at: all of them, or CHECKED_AT_MOST drawn with `seed`."""
    if n <= CHECKED_AT_MOST:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, CHECKED_AT_MOST, replace=False))


def neighbour_bar(reference: np.ndarray, floor: float, seed: int = 0) -> tuple[float, float]:
    """(bar, q): q is how close training images come to each other (the NEIGHBOUR_QUANTILE of each
    sampled training row's similarity to its nearest other training row), and the bar a test image
    must reach to count as a twin is the larger of q and `floor`. Where all images look alike
    (solar cells, one module's neighbours), distinct images pass a fixed threshold; a copy is
    closer to its original than training images come to each other."""
    if len(reference) < 2:
        return floor, float("nan")
    rows = sample(len(reference), seed)
    _, sims = nearest(reference[rows], reference, skip=rows)
    q = float(np.quantile(sims, NEIGHBOUR_QUANTILE))
    return max(floor, q), q


def check(found: np.ndarray, total: int, by: str, threshold: float, bar: float, q: float) -> dict:
    """The record a report keeps of a quick check: how many of the checked test images have a
    twin in train, their share with its 95 % interval, and the bar they had to reach."""
    k, n = int(found.sum()), int(len(found))
    return {"by": by, "threshold": threshold, "bar": round(bar, 4),
            "train_neighbours": None if np.isnan(q) else round(q, 4),  # None: fewer than 2 training images
            "checked": n, "of": total, "twins": k, "share": round(k / n, 4) if n else 0.0,
            "share_ci": [round(v, 4) for v in wilson(k, n)] if n else None}


def check_features(train_x: np.ndarray, test_x: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                   seed: int = 0) -> dict:
    """The quick check on cached features (one row per image): test rows whose nearest training
    row, both centred on the training mean, is at or above the bar (neighbour_bar)."""
    train_x = np.asarray(train_x, dtype=np.float32)
    centre = train_x.mean(axis=0)
    bar, q = neighbour_bar(train_x - centre, threshold, seed)
    rows = sample(len(test_x), seed)
    _, sims = nearest(np.asarray(test_x, dtype=np.float32)[rows] - centre, train_x - centre)
    return check(sims >= bar, len(test_x), "features", threshold, bar, q)


def check_cache(st, train_paths: list[str], test_paths: list[str], seed: int = 0,
                budget: int | None = None) -> dict:
    """The quick check of a fit's train and test images on the cache's penultimate features (the
    tap the audit's threshold was measured on; the first view of each image). With a `budget`
    (bytes) that the training features exceed, they are read in chunks of at most that size."""
    tap = "pool" if "pool" in st.taps else st.taps[-1]
    where = {}  # path → (split, row) of its first view
    for k, split in enumerate(st.splits):
        first = np.flatnonzero(st.views(split) == 0)
        paths = st.paths(split)
        where.update((paths[i], (k, i)) for i in first)
    train = np.array([where[p] for p in dict.fromkeys(train_paths)])
    test = np.array([where[p] for p in dict.fromkeys(test_paths)])
    width = st.file[st.splits[0]][f"features/{tap}"].shape[1]
    if budget is None or len(train) * width * 4 <= budget:
        x = {k: st.features(split, tap) for k, split in enumerate(st.splits)}
        rows = lambda at: np.stack([x[k][i] for k, i in at])  # noqa: E731
        return check_features(rows(train), rows(test), seed=seed) | {"tap": tap}
    return check_streamed(st, tap, train, test, seed, budget) | {"tap": tap}


def check_streamed(st, tap: str, train: np.ndarray, test: np.ndarray, seed: int, budget: int) -> dict:
    """check_features on training features read in chunks of at most `budget` bytes (linear.Rows): one
    pass for their mean and the sampled training rows, one for the nearest training row of those and
    of the sampled test rows."""
    from bottleneck.linear import Rows

    reference = Rows(st, [tap], list(st.splits), train[:, 0], train[:, 1], budget)
    chunks = reference.plan()
    own = sample(len(train), seed)  # training rows whose nearest other training row sets the bar
    total, own_x = np.zeros(reference.width), np.empty((len(own), reference.width), dtype=np.float32)
    for c in chunks:
        x = reference.read(c)
        total += x.sum(axis=0, dtype=np.float64)
        at = {int(p): j for j, p in enumerate(c)}
        for i in np.flatnonzero(np.isin(own, c)):
            own_x[i] = x[at[int(own[i])]]
    centre = (total / len(train)).astype(np.float32)
    picked = test[sample(len(test), seed)]
    tested = Rows(st, [tap], list(st.splits), picked[:, 0], picked[:, 1], budget)
    test_x = np.empty((len(picked), reference.width), dtype=np.float32)
    for c in tested.plan():
        test_x[c] = tested.read(c)
    q = unit_rows(np.concatenate([own_x, test_x]) - centre)
    best = np.full(len(q), -np.inf, dtype=np.float32)
    for c in chunks:
        sims = q @ unit_rows(reference.read(c) - centre).T
        at = {int(p): j for j, p in enumerate(c)}
        for i, p in enumerate(own):  # a sampled training row may not pick itself
            if int(p) in at:
                sims[i, at[int(p)]] = -np.inf
        best = np.maximum(best, sims.max(axis=1))
    q99 = float(np.quantile(best[:len(own)], NEIGHBOUR_QUANTILE))
    bar = max(DEFAULT_THRESHOLD, q99)
    return check(best[len(own):] >= bar, len(test), "features", DEFAULT_THRESHOLD, bar, q99)


def check_files(train_paths: list[str], test_paths: list[str], root: str | None, seed: int = 0) -> dict:
    """The quick check on the image files: test images with the same bytes as a training image, or
    whose thumbnail correlates with one at the bar (neighbour_bar, at least PIXEL_THRESHOLD)."""
    rows = sample(len(test_paths), seed)
    digests, thumbs = file_signatures(train_paths, root)
    bar, q = neighbour_bar(thumbs, PIXEL_THRESHOLD, seed)
    own_digests, own = file_signatures([test_paths[i] for i in rows], root)
    _, sims = nearest(own, thumbs)
    readable = np.abs(own).sum(axis=1) > 0
    known = set(digests) - {None}
    exact = np.array([d in known for d in own_digests], dtype=bool)
    return check(exact | (readable & (sims >= bar)), len(test_paths), "files", PIXEL_THRESHOLD, bar, q)


def warning(found: dict | None) -> str | None:
    """A sentence for a check whose share is above WARN_SHARE (and count at least WARN_TWINS), else None."""
    if not found or found["share"] <= WARN_SHARE or found["twins"] < WARN_TWINS:
        return None
    sampled = f" (a sample of {found['checked']} of {found['of']})" if found["checked"] < found["of"] else ""
    what = "similar features" if found["by"] == "features" else "a copy of the file or its thumbnail"
    return (f"{found['share']:.0%} of the test images{sampled} have a near-twin in train by {what}, closer "
            f"to it than training images come to each other, and the test accuracy is likely flattered "
            f"by them. Run 'bottleneck audit' on the cache to list them, and "
            f"'bottleneck compare --without-twins audit.json' to score without them")
