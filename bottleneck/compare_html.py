"""compare's report.html: the verdict, the table, the plots and the disputed test images in one file.

Self-contained: every plot and thumbnail is embedded as a data URI, there is no script and no
link to fetch, so the file opens offline, mails as an attachment and archives as it is.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from bottleneck import data
from bottleneck.compare import HEADERS, cells, label, predictions

GALLERY_SIZE = 24  # disputed images shown; the count of all of them is given
THUMBNAIL_PX = 112

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 2em; border-bottom: 1px solid #ddd; }
#verdict { font-size: 1.2em; background: #f3f7fb; border-left: 5px solid #2a6ebb; padding: .8em 1em; }
table { border-collapse: collapse; font-size: .9em; } th, td { border: 1px solid #ccc; padding: .3em .6em; }
th { background: #f0f0f0; } tr.reference td { background: #fff8dc; }
td.num { text-align: right; white-space: nowrap; }
.note { color: #555; font-size: .9em; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; } .figures figure { margin: 0; }
figcaption { font-size: .8em; color: #444; max-width: 420px; overflow-wrap: anywhere; }
/* Long class and file names wrap inside their card (min-width: 0 lets a grid cell be narrower than a word). */
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: .8em; }
.card { border: 1px solid #ddd; padding: .4em; font-size: .78em; min-width: 0; overflow-wrap: anywhere; }
.card img { display: block; margin: 0 auto .3em; }
.right { color: #1a7f37; } .wrong { color: #c62828; }
"""


def html_report(result: dict, comparison_png: Path) -> str:
    """The whole page as a string."""
    rows = result["rows"]
    parts = [f"<h1>Fixed features or fine-tuning? {len(rows)} results on {rows[0]['n_test']} test images</h1>",
             f'<p id="verdict">{_e(result["verdict"])}</p>',
             f'<p class="note">Reference row: <code>{_e(result["reference"])}</code>. Intervals: '
             f'{_e(result["intervals"])}. p: McNemar\'s exact test on the images where the two disagree. '
             f'Test set sha256 {_e((result["test_set"] or "unknown")[:16])}….</p>',
             "<h2>Accuracy and cost</h2>", _table(rows, "comparison"),
             '<div class="figures">' + _figure(comparison_png, "Test accuracy (95 % interval) against total cost")
             + "</div>"]
    if result.get("repeats"):
        parts += ["<h2>Across seeds</h2>", '<p class="note">The same configuration rerun with other seeds: the '
                  "spread is a rerun's noise, which the intervals above do not cover.</p>",
                  '<table id="repeats"><thead><tr><th>configuration</th><th>runs</th><th>mean ± sd</th><th>min</th>'
                  "<th>max</th></tr></thead><tbody>"
                  + "".join(f"<tr><td>{_e(r['config'])}</td><td>{r['n']}</td><td>{r['mean']:.3f} ± {r['sd']:.3f}"
                            f"</td><td>{r['min']:.3f}</td><td>{r['max']:.3f}</td></tr>" for r in result["repeats"])
                  + "</tbody></table>"]
    if result["apart"]:
        parts += ["<h2>Scored on other test images</h2>",
                  '<p class="note">These results were scored on other images than the table above, so they '
                  "are not compared with it.</p>", _table(result["apart"], "apart")]
    parts += _gallery(result)
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
    return f'<table id="{ident}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


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
    for r in rows:
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
    """Test images on which the reference fixed-feature result and the best fine-tune disagree."""
    rows = result["rows"]
    ref = next(r for r in rows if r.get("reference"))
    tunes = [r for r in rows if r["method"] == "fine-tune" and not r.get("reference")]
    if ref["method"] != "fixed features" or not tunes:
        return []
    ft = max(tunes, key=lambda r: r["accuracy"])
    a, b = (predictions(r) for r in (ref, ft))
    if a is None or b is None:
        return []
    disputed = _interleaved(sorted(p for p in a if p in b and a[p]["predicted"] != b[p]["predicted"]), a, b)
    only_ft = sum(b[p]["predicted"] == b[p]["true"] for p in disputed)
    only_ref = sum(a[p]["predicted"] == a[p]["true"] for p in disputed)
    head = [f"<h2>Where they disagree: {len(disputed)} test images</h2>",
            f'<p class="note">{_e(label(ref))} against {_e(label(ft))}: fine-tuning alone is right on '
            f"{only_ft}, the fixed features alone on {only_ref}"
            + (f"; {GALLERY_SIZE} are shown, taken in turn from each true class and each side"
               if len(disputed) > GALLERY_SIZE else "") + ".</p>"]
    cards = [_card(p, a[p], b[p], ref.get("data_root") or ft.get("data_root"), label(ref), label(ft))
             for p in disputed[:GALLERY_SIZE]]
    return head + [f'<div class="gallery" id="gallery">{"".join(cards)}</div>']


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
