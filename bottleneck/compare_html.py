"""compare's report.html: the verdict, the table, the plots and the disputed test images in one file.

Self-contained: every plot and thumbnail is embedded as a data URI, there is no script and no
link to fetch, so the file opens offline, mails as an attachment and archives as it is.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from bottleneck import data, scores
from bottleneck.compare import HEADERS, cells, label, predictions
from bottleneck.errors import BottleneckError
from bottleneck.report import Report, read_report

GALLERY_SIZE = 24  # disputed images shown; the count of all of them is given
THUMBNAIL_PX = 112

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
#verdict { font-size: 1.2em; background: #f3f7fb; border-left: 5px solid #2a6ebb; padding: .8em 1em; }
table { border-collapse: collapse; font-size: .9em; } th, td { border: 1px solid #ccc; padding: .3em .6em; }
th { background: #f0f0f0; } tr.reference td { background: #fff8dc; }
td.num { text-align: right; white-space: nowrap; } .wide { overflow-x: auto; }
.note { color: #555; font-size: .9em; }
.warning { color: #8a4b00; background: #fff4e0; padding: .4em .6em; border-left: 4px solid #e0a000; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; } .figures figure { margin: 0; }
figcaption { font-size: .8em; color: #444; max-width: 420px; overflow-wrap: anywhere; }
/* Long class and file names wrap inside their card (min-width: 0 lets a grid cell be narrower than a word). */
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: .8em; }
.card { border: 1px solid #ddd; padding: .4em; font-size: .78em; min-width: 0; overflow-wrap: anywhere; }
.card img { display: block; margin: 0 auto .3em; }
.right { color: #1a7f37; } .wrong { color: #c62828; }
"""


def html_report(result: dict, comparison_png: bytes) -> str:
    """The whole page as a string."""
    rows = result["rows"]
    c = result["contenders"]
    parts = [f"<h1>Fixed features or fine-tuning? {len(rows)} contenders on {rows[0]['n_test']} test images</h1>",
             f'<p id="verdict">{_e(result["verdict"])}</p>', _power(result["decision"]),
             *([f'<p id="leak" class="warning">{_e(result["leak"])}.</p>'] if result.get("leak") else []),
             f'<p class="note">Reference: <code>{_e(result["reference"])}</code>; fine-tune named: '
             f'<code>{_e(result["challenger"])}</code>; each chosen on its validation score among '
             f'{c["fixed features"]} fixed-feature and {c["fine-tune"]} fine-tune contender(s), never on the test '
             f'images. Margin ±{100 * result["margin"]:g} points. Intervals: {_e(result["intervals"])}. '
             f'Test set sha256 {_e((result["test_set"] or "unknown")[:16])}….</p>',
             "<h2>Accuracy and cost</h2>", _table(rows, "comparison"),
             '<div class="figures">' + _figure_bytes(comparison_png, "Test accuracy (95 % interval) against total cost")
             + "</div>"]
    if result.get("repeats"):
        parts += ["<h2>Seeds</h2>", '<p class="note">Each contender run with several seeds is one row above, '
                  "their mean; its interval covers the seeds' spread as well as the test images.</p>",
                  '<table id="repeats"><thead><tr><th>contender</th><th>runs</th><th>mean ± sd</th>'
                  "<th>each run</th></tr></thead><tbody>"
                  + "".join(f"<tr><td>{_e(r['config'])}</td><td>{r['n']}</td><td>{r['mean']:.3f} ± {r['sd']:.3f}"
                            "</td><td>" + ", ".join(f"{_e(run['id'])} {run['accuracy']:.3f}" for run in r["runs"])
                            + "</td></tr>" for r in result["repeats"])
                  + "</tbody></table>"]
    if result.get("left_out"):
        parts += ["<h2>Left out</h2>", '<ul id="left-out">' + "".join(
            f"<li><code>{_e(r['id'])}</code>: {_e(r['left_out'])}</li>" for r in result["left_out"]) + "</ul>"]
    if result["apart"]:
        parts += ["<h2>Scored on other test images</h2>",
                  '<p class="note">These results were scored on other images than the table above, so they '
                  "are not compared with it.</p>", _table(result["apart"], "apart")]
    parts += _gallery(result)
    parts += _audit_section(result.get("audit"))
    parts += _probability_section(rows)
    parts += ["<h2>Each result</h2>", *_details(rows + result["apart"])]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>bottleneck comparison</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _e(text) -> str:
    return html.escape(str(text))


def _table(rows: list[dict], ident: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in HEADERS)
    body = []
    for r in rows:
        tds = "".join(f'<td class="num">{_e(c)}</td>' if i >= 4 else f"<td>{_e(c)}</td>"
                      for i, c in enumerate(cells(r)))
        body.append(f'<tr class="{"reference" if r.get("reference") else ""}" title="{_e(r["id"])}">{tds}</tr>')
    return (f'<div class="wide"><table id="{ident}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
            "</table></div>")


def _power(decision: dict) -> str:
    """The verdict's reasoning in one line: which test, the margin, and what these images could detect."""
    if decision.get("outcome") in (None, "no pair"):
        return ""
    method = ("Tango's score interval and McNemar's score test" if decision["method"] == "score" else
              "a t interval over the test images and the seeds")
    low90, high90 = (100 * v for v in decision["difference_ci90"])
    need = decision.get("images_needed")
    return (f'<p class="note" id="power">Outcome: <b>{_e(decision["outcome"])}</b>, by {method}. A difference is '
            f"claimed when the 95 % interval excludes zero; equivalence when the 90 % interval "
            f"({low90:+.1f} to {high90:+.1f} points) lies inside ±{100 * decision['margin']:g}. With these "
            f"{decision['n_test']} test images a difference of {100 * decision['detectable']:.1f} points would be "
            f"detected 8 times in 10" + (f"; about {need:,} test images would detect the margin." if need else ".")
            + "</p>")


def _figure_bytes(png: bytes, caption: str) -> str:
    return (f'<figure><img src="{_data_uri(png)}" alt="{_e(caption)}" style="max-width:640px">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(path: Path, caption: str) -> str:
    if not path.is_file():
        return ""
    return (f'<figure><img src="{_data_uri(path.read_bytes())}" alt="{_e(caption)}" style="max-width:640px">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _details(rows: list[dict]) -> list[str]:
    """Per result: its confusion matrix and training curve; per fit folder: its layer probe and learning curves."""
    parts, shown = [], set()
    for r in (run | {"method": g["method"]} for g in rows for run in g.get("runs") or [g]):  # each seed's run
        folder = Path(r["report"]).parent
        figures = [_figure(p, f"{r['id']}: {p.stem.replace('_', ' ')}") for p in sorted(folder.glob("*.png"))]
        if r["method"] == "fixed features":
            for p in sorted(folder.parent.glob("*.png")):  # layer probes and learning curves beside the fits
                if p not in shown:
                    shown.add(p)
                    figures.append(_figure(p, f"{folder.parent.name}: {p.stem.replace('_', ' ')}"))
        acc = f"{r['accuracy']:.3f}"
        parts.append(f"<h3>{_e(r['id'])} — test accuracy {acc}</h3>"
                     f'<div class="figures">{"".join(figures)}</div>')
    return parts


def _gallery(result: dict) -> list[str]:
    """Test images on which the reference fixed-feature result and the named fine-tune disagree."""
    rows = result["rows"]
    ref = next((r for r in rows if r.get("reference")), None)
    ft = next((r for r in rows if r.get("challenger")), None)
    if ref is None or ft is None or ref["method"] != "fixed features" or ft is ref:
        return []
    a, b = (predictions(r) for r in (ref, ft))  # a contender run with seeds shows one of its runs, named
    if a is None or b is None:
        return []
    disputed = _interleaved(sorted(p for p in a if p in b and a[p]["predicted"] != b[p]["predicted"]), a, b)
    only_ft = sum(b[p]["predicted"] == b[p]["true"] for p in disputed)
    only_ref = sum(a[p]["predicted"] == a[p]["true"] for p in disputed)
    name_a, name_b = (label(r) if r.get("n_seeds", 1) == 1 else f"{r['classifier']}, run {r['runs'][0]['id']}"
                      for r in (ref, ft))
    head = [f"<h2>Where they disagree: {len(disputed)} test images</h2>",
            f'<p class="note">{_e(name_a)} against {_e(name_b)}: fine-tuning alone is right on '
            f"{only_ft}, the fixed features alone on {only_ref}"
            + (f"; {GALLERY_SIZE} are shown, taken in turn from each true class and each side"
               if len(disputed) > GALLERY_SIZE else "") + ".</p>"]
    cards = [_card(p, a[p], b[p], ref.get("data_root") or ft.get("data_root"), name_a, name_b)
             for p in disputed[:GALLERY_SIZE]]
    return head + [f'<div class="gallery" id="gallery">{"".join(cards)}</div>']


def _audit_section(audit: dict | None) -> list[str]:
    """The audit beside the comparison: twin pairs and suspect labels as thumbnails, and its map."""
    if not audit:
        return []
    root = audit["data_root"]
    share = ", ".join(f"{s} {v:.1%}" for s, v in audit["twin_share"].items())
    pairs = [f'<div class="card">{_thumbnail(root, t["path"])}{_thumbnail(root, t["train_path"])}'
             f'<div title="{_e(t["path"])}">test {_e(Path(t["path"]).name)} ~ train '
             f'{_e(Path(t["train_path"]).name)}</div>features {t["similarity"]:.3f}'
             + ("" if t.get("pixels") is None else f', thumbnails {t["pixels"]:.3f}')
             + (" (same bytes)" if t["exact"] else "") + ("" if t["same_label"] else " <b>other label</b>")
             + "</div>" for t in audit["twins"]]
    suspects = [f'<div class="card">{_thumbnail(root, s["path"])}<div title="{_e(s["path"])}">{_e(s["split"])} '
                f'{_e(Path(s["path"]).name)}</div>given <b>{_e(s["given"])}</b> ({s["p_given"]:.2f}), likelier '
                f'{_e(s["suggested"])} ({s["p_suggested"]:.2f})</div>' for s in audit["suspects"]]
    probe = audit["probe"]
    parts = ["<h2>Audit of the data</h2>",
             f'<p class="note">From <code>{_e(audit["file"])}</code>: the table above is scored without the test '
             f"images it found to be near-twins of training images (features ≥ {audit['threshold']} or thumbnails "
             f"≥ {audit['pixel_threshold']}; share of "
             f"each split: {_e(share)}). A pair is one to look at, not proof of a leak; suspect labels are the "
             f"ones an out-of-fold probe (accuracy {probe.get('accuracy', 0):.3f}) does not believe "
             f"({probe.get('flagged', 0)} of {probe.get('images', 0)}); nothing was relabelled "
             "(docs/audit.md).</p>"]
    if pairs:
        parts.append(f'<h3>Near-twins, most similar first</h3><div class="gallery" id="twins">{"".join(pairs)}</div>')
    if suspects:
        parts.append(f'<h3>Least believed labels</h3><div class="gallery" id="suspects">{"".join(suspects)}</div>')
    if Path(audit["map"]).is_file():
        parts.append('<div class="figures">' + _figure(Path(audit["map"]), "The data's first two principal "
                     "components: twins ringed red, suspect labels black") + "</div>")
    return parts


def _interleaved(paths: list[str], a: dict, b: dict) -> list[str]:
    """Round-robin over (true class, which side is right), so a short gallery shows every kind of dispute."""
    groups: dict[tuple, list[str]] = {}
    for p in paths:
        groups.setdefault((a[p]["true"], a[p]["predicted"] == a[p]["true"]), []).append(p)
    queues = [groups[k] for k in sorted(groups)]
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def _card(rel: str, a: dict, b: dict, root: str | None, name_a: str, name_b: str) -> str:
    lines = [f"<b>true: {_e(a['true'])}</b>"]
    for name, pred in ((name_a, a), (name_b, b)):
        verdict = "right" if pred["predicted"] == pred["true"] else "wrong"
        prob = pred["probabilities"].get(pred["predicted"], 0.0)
        lines.append(f'<span class="{verdict}">{_e(name)}: {_e(pred["predicted"])} ({prob:.2f})</span>')
    return (f'<div class="card">{_thumbnail(root, rel)}<div title="{_e(rel)}">{_e(Path(rel).name)}</div>'
            + "<br>".join(lines) + "</div>")


def _thumbnail(root: str | None, rel: str) -> str:
    if not root:
        return '<div class="note">(image folder unknown)</div>'
    try:
        img = data.load_image(Path(root) / rel)
    except Exception as e:  # any unreadable file (decompression bombs included) is a note, never a crash
        return f'<div class="note">(image unreadable: {_e(data.describe_error(e))})</div>'
    img.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return f'<img src="{_data_uri(buf.getvalue())}" alt="{_e(rel)}" width="{img.width}" height="{img.height}">'


# --------------------------------------------------------------------------- beyond accuracy

SVG_PX, SVG_PAD = 210, 34  # one small square plot; the padding holds the axis labels
MARK = "; red: the validation threshold"  # its point on the test images


def _probability_section(rows: list[dict]) -> list[str]:
    """Per row, from its predictions.csv: ROC and precision-recall curves for two classes, a
    reliability diagram for any number, and a table of the scores they summarise."""
    drawn, lines, missing = [], [], []
    for r in rows:
        preds = predictions(r)
        if not preds:
            missing.append(r["id"])
            continue
        classes = list(next(iter(preds.values()))["probabilities"])
        y = np.array([classes.index(v["true"]) for v in preds.values()])
        probs = np.array([[v["probabilities"][c] for c in classes] for v in preds.values()])
        stored = _stored_report(r)
        point = stored and stored.operating_point
        c = _positive(classes, y, stored and stored.positive_class)
        cal = scores.calibration(y, probs)
        figures = [_reliability_svg(cal)]
        ranking = {}
        if c is not None and 0 < (y == c).sum() < len(y):
            positive, p = y == c, probs[:, c]
            # the report's own intervals when it has them: 2,000 resamples of 100,000 images take a while
            ranking = ({k: getattr(stored, k) for k in ("roc_auc", "roc_auc_ci", "average_precision",
                                                          "average_precision_ci")}
                       if stored and stored.positive_class == classes[c] and stored.roc_auc_ci
                       else scores.ranking_scores(positive, p))
            figures = [_roc_svg(positive, p, classes[c], point), _pr_svg(positive, p, classes[c], point)] + figures
        lines.append(_score_cells(r, classes[c] if ranking else None, ranking, scores.log_loss(y, probs),
                                  scores.brier(y, probs), cal["ece"], point))
        drawn.append(f'<h3>{_e(r["id"])}</h3><div class="figures">{"".join(figures)}</div>')
    if not drawn:
        return []
    head = "".join(f"<th>{h}</th>" for h in ("result", "positive class", "ROC-AUC (95 % CI)",
                                             "average precision (95 % CI)", "log-loss", "Brier", "calibration error",
                                             "operating point (chosen on validation) on test"))
    note = ('<p class="note">From each result\'s predicted probabilities on the test images. ROC-AUC: the chance '
            "that a random image of the positive class gets a higher probability than a random other one. Average "
            "precision: the precision averaged over every recall reached. Log-loss and Brier: lower is better. "
            "Calibration error: the mean gap between how sure the model is and how often it is right, in "
            f"{scores.CALIBRATION_BINS} bins (the diagram's points; on the diagonal is calibrated). A red point: "
            "where the threshold chosen on validation for the run's --target puts the test images. Intervals: "
            "2,000 stratified bootstrap resamples of the test images."
            + (f" Without predictions.csv: {_e(', '.join(missing))}." if missing else "") + "</p>")
    return ["<h2>Beyond accuracy: probabilities, curves and calibration</h2>", note,
            f'<table id="probabilities"><thead><tr>{head}</tr></thead><tbody>{"".join(lines)}</tbody></table>',
            *drawn]


def _stored_report(r: dict) -> Report | None:
    """A row's report (None if unreadable): its operating point and intervals, when it has them.
    A cross-validated row pools its folds' predictions: no one fold's report speaks for it."""
    if r.get("folds"):
        return None
    try:
        return read_report(r["report"])
    except BottleneckError:
        return None


def _positive(classes: list[str], y: np.ndarray, stored: str | None) -> int | None:
    """Two classes: the report's positive class `stored` (the target's, or the rarer one), else the rarer
    on these images, as report.probability_scores chooses it; None for more classes."""
    if len(classes) != 2:
        return None
    if stored in classes:
        return classes.index(stored)
    counts = np.bincount(y, minlength=2)
    return int(counts[1] <= counts[0])


def _score_cells(r: dict, positive: str | None, ranking: dict, log_loss: float, brier: float, ece: float,
                 point: dict | None) -> str:
    def with_ci(key):
        return f"{ranking[key]:.3f} ({ranking[key + '_ci'][0]:.3f}-{ranking[key + '_ci'][1]:.3f})" if ranking else ""

    at = ""
    if point:
        test = point["test"]["per_class"]
        at = (f"{point['target']}: threshold {point['threshold']:.3f}"
              + ("" if point["met_on_validation"] else " (target not met on validation)") + "; test "
              + ", ".join(f"{k} recall {v['recall']:.3f} precision {v['precision']:.3f}" for k, v in test.items()))
    cells = [r["id"], positive or "", with_ci("roc_auc"), with_ci("average_precision"), f"{log_loss:.3f}",
             f"{brier:.3f}", f"{ece:.3f}", at]
    return "<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if 2 <= i <= 6 else f"<td>{_e(c)}</td>"
                            for i, c in enumerate(cells)) + "</tr>"


def _roc_svg(positive: np.ndarray, p: np.ndarray, cls: str, point: dict | None) -> str:
    curve = scores.roc_curve(positive, p)
    marks = []
    if point:  # where the validation threshold puts the test images
        fpr, tpr = (p[~positive] >= point["threshold"]).mean(), (p[positive] >= point["threshold"]).mean()
        marks = [(fpr, tpr)]
    return _svg(f"ROC ({cls})" + (MARK if marks else ""), "false positive rate", "true positive rate",
                curve["fpr"], curve["tpr"], diagonal=True, marks=marks)


def _pr_svg(positive: np.ndarray, p: np.ndarray, cls: str, point: dict | None) -> str:
    curve = scores.pr_curve(positive, p)
    marks = []
    if point and (p >= point["threshold"]).any():
        picked = p >= point["threshold"]
        marks = [((picked & positive).sum() / positive.sum(), (picked & positive).sum() / picked.sum())]
    return _svg(f"precision-recall ({cls})" + (MARK if marks else ""), "recall", "precision", [0.0, *curve["recall"]],
                [curve["precision"][0], *curve["precision"]], marks=marks, baseline=positive.mean())


def _reliability_svg(cal: dict) -> str:
    pts = cal["points"]
    return _svg(f"reliability (error {cal['ece']:.3f})", "top probability", "fraction right",
                [q["confidence"] for q in pts], [q["accuracy"] for q in pts], diagonal=True, line=False,
                sizes=[q["n"] for q in pts])


def _svg(title: str, xlabel: str, ylabel: str, xs: list, ys: list, diagonal: bool = False, line: bool = True,
         marks: list = (), sizes: list | None = None, baseline: float | None = None) -> str:
    """A square plot on [0, 1]² as inline SVG: a curve (or points sized by `sizes`), optional guides."""
    size, pad = SVG_PX, SVG_PAD

    def at(x, y):
        return f"{pad + x * size:.1f},{pad / 2 + (1 - y) * size:.1f}"

    parts = [f'<rect x="{pad}" y="{pad / 2}" width="{size}" height="{size}" fill="#fff" stroke="#999"/>']
    for t in (0.25, 0.5, 0.75):
        parts.append(f'<polyline points="{at(t, 0)} {at(t, 1)}" stroke="#eee"/>'
                     f'<polyline points="{at(0, t)} {at(1, t)}" stroke="#eee"/>')
    if diagonal:
        parts.append(f'<polyline points="{at(0, 0)} {at(1, 1)}" stroke="#bbb" stroke-dasharray="4 3" fill="none"/>')
    if baseline is not None:  # the precision of guessing the positive class for every image
        parts.append(f'<polyline points="{at(0, baseline)} {at(1, baseline)}" stroke="#bbb" '
                     'stroke-dasharray="4 3" fill="none"/>')
    if line:
        parts.append(f'<polyline points="{" ".join(at(x, y) for x, y in zip(xs, ys))}" stroke="#2a6ebb" '
                     'stroke-width="2" fill="none"/>')
    else:
        most = max(sizes or [1])
        parts += [f'<circle cx="{at(x, y).split(",")[0]}" cy="{at(x, y).split(",")[1]}" '
                  f'r="{2.5 + 5 * (n / most) ** 0.5:.1f}" fill="#2a6ebb" fill-opacity=".7"><title>{n} images'
                  f'</title></circle>' for x, y, n in zip(xs, ys, sizes or [1] * len(xs))]
    parts += [f'<circle cx="{at(x, y).split(",")[0]}" cy="{at(x, y).split(",")[1]}" r="5" fill="#c62828">'
              "<title>the threshold chosen on validation, on the test images</title></circle>" for x, y in marks]
    for t in (0, 0.5, 1):
        parts.append(f'<text x="{pad + t * size:.0f}" y="{pad / 2 + size + 12}" font-size="9" '
                     f'text-anchor="middle">{t:g}</text><text x="{pad - 4}" y="{pad / 2 + (1 - t) * size + 3:.0f}" '
                     f'font-size="9" text-anchor="end">{t:g}</text>')
    parts.append(f'<text x="{pad + size / 2}" y="{pad / 2 + size + 26}" font-size="11" text-anchor="middle">'
                 f"{_e(xlabel)}</text>")
    parts.append(f'<text x="10" y="{pad / 2 + size / 2}" font-size="11" text-anchor="middle" '
                 f'transform="rotate(-90 10 {pad / 2 + size / 2})">{_e(ylabel)}</text>')
    width, height = size + pad + 8, size + pad + 14
    return (f'<figure><svg width="{width}" height="{height}" role="img" '
            f'aria-label="{_e(title)}">{"".join(parts)}</svg><figcaption style="max-width:{width}px">{_e(title)}'
            "</figcaption></figure>")
