"""The `linear` classifier: multinomial softmax regression in torch, for caches larger than memory.

scikit-learn's logistic regression needs the whole matrix in memory and fits one penalty at a
time; at ImageNet size (1.28 M × 1,280, 6.5 GB as float32, 1,000 classes) that is hours on CPU.
The practice of large linear probes (CLIP's torch L-BFGS, DINOv2's many heads in one pass) is
followed here: several L2 strengths are trained at once, one weight tensor each, stacked, and
the one scoring best on a held-out part of the training rows is kept.

Two ways to train, one model: features that fit the memory budget are trained full-batch with
L-BFGS; a split larger than the budget is never loaded: `Rows` reads it from the cache in chunks
of a size derived from the budget, the scaler is fitted in one streaming pass (partial_fit) and
the weights by minibatch Adam over the chunks. Both run on CUDA when present, else on the CPU
with torch's threads, and are deterministic for a given seed. The fitted estimator holds only
numpy arrays and plain values, so skops saves and loads it like any other.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from bottleneck.errors import BottleneckError
from bottleneck.settings import MEMORY_BUDGET_MB

MB = 2**20
STRENGTHS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # L2 penalties on the mean loss, trained together
LOGIT_BLOCK_BYTES = 64 * MB  # logits of all strengths for one block of rows: bounds L-BFGS's working memory


def rows_per_chunk(width: int, budget_bytes: int) -> int:
    """Rows of one chunk: the chunk as float32, the window of the file it is cut from, and the two copies
    scaling makes (the per-tap weights of a concatenation give float64) together stay within the budget."""
    return max(1, int(budget_bytes) // (4 * 4 * width))


# --------------------------------------------------------------------------- rows read in chunks

class ArrayRows:
    """Rows already in memory, cut into chunks as `Rows` cuts a cache (an in-memory fit by minibatch)."""

    def __init__(self, x: np.ndarray, budget_bytes: int):
        self.x, self.budget_bytes = x, budget_bytes

    def __len__(self) -> int:
        return len(self.x)

    @property
    def width(self) -> int:
        return self.x.shape[1]

    def plan(self) -> list[np.ndarray]:
        step = rows_per_chunk(self.width, self.budget_bytes)
        return [np.arange(a, min(a + step, len(self))) for a in range(0, len(self), step)]

    def read(self, positions: np.ndarray) -> np.ndarray:
        return np.asarray(self.x[positions], dtype=np.float32)


class Rows:
    """Rows of a cache (of one or several splits, every tap of `taps` side by side), read only in
    chunks of at most `budget_bytes` as float32: a split larger than memory is never held whole.

    Row i is row `row[i]` of split `splits[part[i]]`. Indexing with an array gives the rows it
    picks (a held-out test split, a fold), still unread."""

    def __init__(self, store, taps: list[str], splits: list[str], part: np.ndarray, row: np.ndarray,
                 budget_bytes: int, whole: bool = False):
        self.store, self.taps, self.splits, self.whole = store, list(taps), list(splits), whole
        self.part, self.row = np.asarray(part, dtype=np.int32), np.asarray(row, dtype=np.int64)
        self.budget_bytes = budget_bytes
        self.dims = [store.file[splits[0]][f"features/{t}"].shape[1] for t in self.taps]

    @classmethod
    def of_split(cls, store, split: str, taps: list[str], budget_bytes: int) -> Rows:
        n = store.file[split]["labels"].shape[0]
        return cls(store, taps, [split], np.zeros(n), np.arange(n), budget_bytes, whole=True)

    def __len__(self) -> int:
        return len(self.row)

    @property
    def width(self) -> int:
        return sum(self.dims)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.width

    def __getitem__(self, idx) -> Rows:
        idx = np.asarray(idx)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64)
        return Rows(self.store, self.taps, self.splits, self.part[idx], self.row[idx], self.budget_bytes)

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        splits = list(dict.fromkeys(s for p in parts for s in p.splits))
        part = np.concatenate([np.array([splits.index(s) for s in p.splits], dtype=np.int32)[p.part] for p in parts])
        return Rows(parts[0].store, parts[0].taps, splits, part, np.concatenate([p.row for p in parts]),
                    parts[0].budget_bytes, whole=all(p.whole for p in parts) and len(splits) == len(parts))

    def plan(self) -> list[np.ndarray]:
        """The chunks of one pass, as positions in these rows: rows in the file's order, each chunk
        cut from a window of at most `rows_per_chunk` consecutive file rows, so a pass reads every
        row of the file at most once and no chunk, nor the window it comes from, exceeds the budget."""
        step = rows_per_chunk(self.width, self.budget_bytes)
        order = np.lexsort((self.row, self.part))
        chunks = []
        for p in np.unique(self.part):
            mine = order[self.part[order] == p]
            rows = self.row[mine]
            start = 0
            while start < len(mine):
                end = int(np.searchsorted(rows, rows[start] + step, side="left"))
                chunks.append(mine[start:end])
                start = end
        return chunks

    def scan(self) -> Iterator[np.ndarray]:
        """The chunks of one pass. When these rows are whole splits, the windows read are the file's rows in
        order, and each tap is checked against the checksum written with it once the pass ends, as a stage
        reading it whole checks it: an edited or bit-rotted value is refused, not trained on."""
        hashes = {(s, t): hashlib.sha256() for s in self.splits for t in self.taps} if self.whole else None
        for positions in self.plan():
            yield self.read(positions, hashes)
        for (split, tap), h in (hashes or {}).items():
            if h.hexdigest() != self.store.file[split][f"features/{tap}"].attrs.get("sha256"):
                raise BottleneckError(f"{self.store.path} is damaged or was edited: {split}/features/{tap} does not "
                                      "match its checksum; delete it and run 'bottleneck extract' again")

    def read(self, positions: np.ndarray, hashes: dict | None = None) -> np.ndarray:
        """The features of rows at `positions` (one chunk of `plan`: one split, rows within one window);
        `hashes` ({(split, tap): sha256}) take in each window read, for `scan`."""
        split = self.splits[int(self.part[positions[0]])]
        rows = self.row[positions]
        lo, hi = int(rows.min()), int(rows.max()) + 1
        x = np.empty((len(positions), self.width), dtype=np.float32)
        col = 0
        for tap, dim in zip(self.taps, self.dims):
            window = self.store.file[split][f"features/{tap}"][lo:hi]
            if hashes is not None:
                hashes[split, tap].update(np.ascontiguousarray(window))
            x[:, col:col + dim] = window if hi - lo == len(rows) and (np.diff(rows) == 1).all() else window[rows - lo]
            col += dim
            del window
        if not np.isfinite(x).all():  # one NaN makes the scaler, and so every prediction, NaN
            raise BottleneckError(f"{self.store.path} is damaged or was edited: {split} features hold NaN or inf; "
                                  "delete it and run 'bottleneck extract' again")
        return x


def is_lazy(x) -> bool:
    """Rows still in the cache (read in chunks), not an array in memory."""
    return isinstance(x, (Rows, ArrayRows))


# --------------------------------------------------------------------------- the estimator

class LinearProbe(ClassifierMixin, BaseEstimator):
    """Multinomial softmax regression with an L2 penalty, several strengths trained at once and the
    best on a held-out stratified `validation_fraction` of the rows kept (ties: the stronger penalty).
    `solver`: "auto" is L-BFGS for rows in memory and minibatch Adam for rows read in chunks."""

    def __init__(self, strengths: tuple = STRENGTHS, validation_fraction: float = 0.1, max_iter: int = 300,
                 epochs: int = 10, batch_size: int = 4096, lr: float = 1e-2, min_steps: int = 600,
                 solver: str = "auto", memory_budget: int = MEMORY_BUDGET_MB, device: str = "auto", seed: int = 0,
                 class_weight: str | None = None):
        self.strengths, self.validation_fraction, self.max_iter = strengths, validation_fraction, max_iter
        self.epochs, self.batch_size, self.lr, self.min_steps = epochs, batch_size, lr, min_steps
        self.solver, self.memory_budget, self.device, self.seed = solver, memory_budget, device, seed
        self.class_weight = class_weight

    # ----------------------------------------------------------------- fitting
    def fit(self, x, y, transform: Callable[[np.ndarray], np.ndarray] | None = None):
        """Fit on an array, or on rows read in chunks (`Rows`), each chunk passed through `transform`."""
        y = np.asarray(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        held = holdout_mask(codes, self.validation_fraction if len(self.strengths) > 1 else 0.0, self.seed)
        weights = row_weights(codes[~held], len(self.classes_), self.class_weight)
        torch.manual_seed(self.seed)
        dev = pick_device(self.device)
        if is_lazy(x) or self.solver == "minibatch":
            rows = x if is_lazy(x) else ArrayRows(np.asarray(x), self.memory_budget * MB)
            w, b = self._minibatch(rows, codes, held, weights, transform or (lambda a: a), dev)
            self.solver_ = "minibatch"
        else:
            x = np.asarray(x, dtype=np.float32)
            w, b = self._lbfgs(x[~held], codes[~held], weights, dev)
            self.solver_ = "lbfgs"
        self.n_features_in_ = int(w.shape[1])
        scores = self._held_out_scores(x, codes, held, w, b, transform)
        # Of equal held-out accuracies, the stronger penalty: on separable rows the weakest would win on loss
        # with weights growing without bound, where each solver stops somewhere else.
        best = max(range(len(self.strengths)), key=lambda s: (scores[s][0], self.strengths[s]))
        self.strengths_ = np.asarray(self.strengths, dtype=np.float64)
        self.validation_accuracy_ = np.asarray([s[0] for s in scores], dtype=np.float64)
        self.validation_log_loss_ = np.asarray([s[1] for s in scores], dtype=np.float64)
        self.strength_ = float(self.strengths[best])
        self.coef_ = w[best].T.astype(np.float64)  # K × D, as scikit-learn's multinomial LogisticRegression
        self.intercept_ = b[best].astype(np.float64)
        return self

    def _lbfgs(self, x: np.ndarray, codes: np.ndarray, weights: np.ndarray, dev: torch.device):
        """Full batch: every strength's weights in one parameter, one L-BFGS on the sum of their losses
        (independent problems: the sum's minimum is each one's minimum)."""
        xt, yt = torch.from_numpy(x).to(dev), torch.from_numpy(codes).to(dev)
        wt = torch.from_numpy(weights.astype(np.float32)).to(dev)
        w, b, lam = self._parameters(x.shape[1], dev)
        # Stops when no gradient entry exceeds 1e-4, scikit-learn's tolerance: 43 iterations instead of 300 on
        # 18,000 × 1,280 rows in 100 classes, the same test accuracy.
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=self.max_iter, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-4, tolerance_change=1e-9)
        block = max(1, LOGIT_BLOCK_BYTES // (4 * len(lam) * len(self.classes_)))

        def closure():
            opt.zero_grad()
            total = 0.0
            for a in range(0, len(xt), block):
                loss = _loss(xt[a:a + block], yt[a:a + block], wt[a:a + block], w, b) / len(xt)
                loss.backward()
                total += float(loss.detach())
            reg = 0.5 * (lam * (w * w).sum((1, 2))).sum()
            reg.backward()
            return torch.tensor(total + float(reg.detach()))

        opt.step(closure)
        self.n_iter_ = int(opt.state[w].get("n_iter", 0))
        return w.detach().cpu().numpy(), b.detach().cpu().numpy()

    def _minibatch(self, rows, codes: np.ndarray, held: np.ndarray, weights: np.ndarray, transform, dev):
        """Adam over minibatches of the chunks, chunks in a new order each epoch, the learning rate
        decaying to zero (cosine) so that it settles at the penalised minimum."""
        plan = rows.plan()
        train = [p[~held[p]] for p in plan]
        batches = sum(math.ceil(len(p) / self.batch_size) for p in train)
        epochs = max(self.epochs, math.ceil(self.min_steps / max(1, batches)))
        total_steps, step = epochs * batches, 0
        full_w = np.zeros(len(codes), dtype=np.float32)
        full_w[~held] = weights
        w, b, lam = self._parameters(rows.width, dev)
        opt = torch.optim.Adam([w, b], lr=self.lr)
        rng = np.random.default_rng(self.seed)
        for _ in range(epochs):
            for c in rng.permutation(len(plan)):
                keep = ~held[plan[c]]
                if not keep.any():
                    continue
                x = torch.from_numpy(np.ascontiguousarray(transform(rows.read(plan[c])[keep]), np.float32)).to(dev)
                y = torch.from_numpy(codes[train[c]]).to(dev)
                rw = torch.from_numpy(full_w[train[c]]).to(dev)
                for batch in np.array_split(rng.permutation(len(x)), math.ceil(len(x) / self.batch_size)):
                    for group in opt.param_groups:
                        group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
                    idx = torch.from_numpy(batch).to(dev)
                    opt.zero_grad()
                    loss = _loss(x[idx], y[idx], rw[idx], w, b) / len(batch) + 0.5 * (lam * (w * w).sum((1, 2))).sum()
                    loss.backward()
                    opt.step()
                    step += 1
        self.n_iter_ = step
        return w.detach().cpu().numpy(), b.detach().cpu().numpy()

    def _parameters(self, width: int, dev: torch.device):
        s, k = len(self.strengths), len(self.classes_)
        w = torch.zeros((s, width, k), device=dev, requires_grad=True)  # convex: zeros are as good a start as any
        b = torch.zeros((s, k), device=dev, requires_grad=True)
        return w, b, torch.tensor(self.strengths, dtype=torch.float32, device=dev)

    def _held_out_scores(self, x, codes, held, w, b, transform) -> list[tuple[float, float]]:
        """(accuracy, mean log loss) of each strength on the held-out rows; all equal when none is held out.
        The logits of every strength are computed for a block of rows at a time (LOGIT_BLOCK_BYTES)."""
        if not held.any():
            return [(0.0, 0.0)] * len(self.strengths)
        idx = np.flatnonzero(held)
        if is_lazy(x):
            sub = x[idx] if isinstance(x, Rows) else ArrayRows(x.x[idx], x.budget_bytes)
            chunks = ((transform(sub.read(p)) if transform else sub.read(p), codes[idx[p]]) for p in sub.plan())
        else:
            xs = np.asarray(x)[idx]
            chunks = iter([(transform(xs) if transform else xs, codes[idx])])
        dev = pick_device(self.device)
        wt, bt = torch.from_numpy(w).to(dev), torch.from_numpy(b).to(dev)
        block = max(1, LOGIT_BLOCK_BYTES // (4 * len(self.strengths) * len(self.classes_)))
        right, loss = torch.zeros(len(self.strengths), dtype=torch.float64), torch.zeros(len(self.strengths),
                                                                                          dtype=torch.float64)
        for xc, yc in chunks:
            xc = torch.from_numpy(np.ascontiguousarray(xc, dtype=np.float32)).to(dev)
            yc = torch.from_numpy(yc).to(dev)
            for a in range(0, len(xc), block):
                logits = torch.einsum("nd,sdk->snk", xc[a:a + block], wt) + bt[:, None, :]
                y = yc[a:a + block]
                right += (logits.argmax(2) == y[None]).sum(1).double().cpu()
                logp = torch.log_softmax(logits.double(), 2)
                loss -= logp[:, torch.arange(len(y), device=dev), y].sum(1).cpu()
        return [(float(r) / len(idx), float(lo) / len(idx)) for r, lo in zip(right, loss)]

    # ----------------------------------------------------------------- predicting
    def decision_function(self, x) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.coef_.T + self.intercept_

    def predict_proba(self, x) -> np.ndarray:
        z = self.decision_function(x)
        return np.exp(z - _logsumexp(z))

    def predict(self, x) -> np.ndarray:
        return self.classes_[self.decision_function(x).argmax(1)]


def _loss(x, y, weights, w, b):
    """The weighted cross-entropy summed over rows, for every strength's weights at once."""
    logits = torch.einsum("nd,sdk->snk", x, w) + b[:, None, :]
    s, n, k = logits.shape
    ce = torch.nn.functional.cross_entropy(logits.reshape(s * n, k), y.repeat(s), reduction="none")
    return (ce.reshape(s, n) * weights[None]).sum()


def _logsumexp(z: np.ndarray) -> np.ndarray:
    top = z.max(-1, keepdims=True)
    return top + np.log(np.exp(z - top).sum(-1, keepdims=True))


def holdout_mask(codes: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified held-out `fraction` of the rows (True = held out): of every class with at least two
    rows, round(fraction × its rows), at least one, drawn with `seed`."""
    held = np.zeros(len(codes), dtype=bool)
    if fraction <= 0:
        return held
    rng = np.random.default_rng(seed)
    for c in np.unique(codes):
        rows = np.flatnonzero(codes == c)
        if len(rows) >= 2:
            held[rng.permutation(rows)[:max(1, min(len(rows) - 1, round(fraction * len(rows))))]] = True
    return held


def row_weights(codes: np.ndarray, n_classes: int, class_weight: str | None) -> np.ndarray:
    """1 per row, or with "balanced" n / (classes × the row's class count), as scikit-learn weighs."""
    if class_weight != "balanced":
        return np.ones(len(codes), dtype=np.float32)
    counts = np.bincount(codes, minlength=n_classes).astype(np.float64)
    return (len(codes) / (n_classes * np.maximum(counts, 1)))[codes].astype(np.float32)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# --------------------------------------------------------------------------- a pipeline on rows in chunks

def fit_streamed(pipe, rows: Rows, y: np.ndarray):
    """Fit a linear pipeline (scaling, maybe tap weighting, then LinearProbe) on rows read in chunks:
    the scaler's mean and variance in one streaming pass, then the probe by minibatch."""
    *prep, (_, probe) = pipe.steps
    if not isinstance(probe, LinearProbe) or any(name not in ("scale", "taps") for name, _ in prep):
        raise BottleneckError("features larger than --memory-budget train only by the linear classifier on taps "
                              "(--layer select ranks every feature in memory); raise --memory-budget above the "
                              "features' size, or fit --layer concat")
    scaler = dict(prep)["scale"]
    for x in rows.scan() if isinstance(rows, Rows) else (rows.read(p) for p in rows.plan()):
        scaler.partial_fit(x)

    def transform(x: np.ndarray) -> np.ndarray:
        for _, step in prep:
            x = step.transform(x)
        return x

    probe.fit(rows, y, transform=transform)
    return pipe


def fit_pipeline(pipe, x, y):
    """pipe.fit(x, y), or fit_streamed for rows still in the cache."""
    return fit_streamed(pipe, x, y) if is_lazy(x) else pipe.fit(x, y)
