"""Stage 4: put fixed-feature classifiers and fine-tuned networks side by side, with what each cost.

Reads every `report.json` (docs/reports.md) under the given folders. The cost of a
classifier on cached features is its extraction plus its fit; the cost of a fine-tune is
its whole run. `comparison.png` plots test accuracy against that cost on a log scale: the
picture that answers "is fine-tuning worth it here?".
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from bottleneck.errors import BottleneckError

COLUMNS = ("method", "backbone", "tap", "classifier", "accuracy", "balanced_accuracy", "macro_f1",
           "cost_seconds", "ms_per_image")
HEADERS = ("method", "backbone", "tap", "classifier", "test accuracy", "balanced accuracy", "macro-F1",
           "total cost", "cost per image")


def compare(run_dirs: list[str], out: str | None = None) -> Path:
    """Collect the reports under `run_dirs` into OUT/comparison.{md,csv,json,png}; returns the .md's path.

    `out` defaults to the first folder.
    """
    rows = collect(run_dirs)
    out_dir = Path(out or run_dirs[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "comparison.md").write_text(markdown(rows))
    (out_dir / "comparison.csv").write_text(to_csv(rows))
    (out_dir / "comparison.json").write_text(json.dumps(rows, indent=1))
    plot(rows, out_dir / "comparison.png")
    return out_dir / "comparison.md"


def collect(run_dirs: list[str]) -> list[dict]:
    """One row per fit or finetune report under the folders, cheapest first."""
    rows, seen = [], set()
    for folder in run_dirs:
        if not Path(folder).is_dir():
            raise BottleneckError(f"run folder {folder} does not exist")
        for path in sorted(Path(folder).rglob("report.json")):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            try:
                rep = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise BottleneckError(f"{path} is not a readable report ({e}); delete it or rerun its stage") \
                    from None
            if rep.get("stage") in ("fit", "finetune"):
                rows.append(row(rep, path))
    if not rows:
        raise BottleneckError(f"no fit or finetune report.json under {', '.join(run_dirs)}; run "
                              "'bottleneck fit', 'bottleneck finetune' or 'bottleneck run' first")
    return sorted(rows, key=lambda r: (r["cost_seconds"], r["report"]))


def row(rep: dict, path: Path) -> dict:
    """The comparison's view of one report: its scores and its total cost in seconds."""
    cost = rep.get("cost", {})
    if rep["stage"] == "finetune":
        method, seconds, device = "fine-tune", cost.get("wall_seconds", 0.0), cost.get("device", "")
    else:
        extraction = cost.get("extraction", {})
        method = "fixed features"
        seconds = cost.get("fit_seconds", 0.0) + extraction.get("wall_seconds", 0.0)
        device = extraction.get("device", "")
    n_train = rep.get("n_train") or 0
    return {"method": method, "backbone": rep["model"], "tap": rep.get("tap") or "",
            "classifier": rep["clf"] if rep["stage"] == "fit" else "fine-tuned head",
            "accuracy": rep["accuracy"], "balanced_accuracy": rep["balanced_accuracy"], "macro_f1": rep["macro_f1"],
            "cost_seconds": round(seconds, 3),
            # per training image: what each labelled example cost to learn from
            "ms_per_image": round(1000 * seconds / n_train, 3) if n_train else None,
            "n_train": n_train, "n_test": rep.get("n_test"), "device": device, "report": str(path)}


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for r in rows:
        cells = [r["method"], r["backbone"], r["tap"], r["classifier"], f"{r['accuracy']:.3f}",
                 f"{r['balanced_accuracy']:.3f}", f"{r['macro_f1']:.3f}", _seconds(r["cost_seconds"]),
                 f"{r['ms_per_image']:.1f} ms" if r["ms_per_image"] is not None else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.1f} s"


def plot(rows: list[dict], path: Path) -> None:
    """Test accuracy against total cost (log scale), one labelled point per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several = len({r["backbone"] for r in rows}) > 1
    colours = {"fixed features": "tab:blue", "fine-tune": "tab:red"}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method, colour in colours.items():
        mine = [r for r in rows if r["method"] == method]
        ax.scatter([max(r["cost_seconds"], 1e-3) for r in mine], [r["accuracy"] for r in mine], c=colour,
                   label=method, zorder=3)
    for r in rows:
        label = r["classifier"] if r["method"] == "fine-tune" else f"{r['tap']} {r['classifier']}"
        label = f"{r['backbone']} {label}" if several else label
        ax.annotate(label, (max(r["cost_seconds"], 1e-3), r["accuracy"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("total cost, seconds (extraction + fit, or fine-tuning)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Is fine-tuning worth it? Accuracy against cost", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
