"""report.html's figures beyond accuracy: ROC and precision-recall curves, reliability diagrams."""

import json
import re
import subprocess
import tempfile

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from bottleneck import compare_html, scores
from bottleneck import report as reports
from bottleneck.compare import compare

CLASSES = ["defective", "functional"]
N = 80
PATHS = [f"test/{i:03d}.png" for i in range(N)]


def write_row(folder, seed: int, sharpness: float, **fields):
    """A report.json with its predictions.csv: a classifier whose probabilities separate the classes
    by `sharpness`; about a third of the images are defective, as in elpv."""
    y = (np.arange(N) % 3 != 0).astype(int)  # fixed labels: every row is scored on the same images
    logit = sharpness * (2 * y - 1) + np.random.default_rng(seed).normal(0, 1.3, N)
    p1 = 1 / (1 + np.exp(-logit))
    probs = np.c_[1 - p1, p1]
    pred = probs.argmax(1)
    reports.write_predictions(folder, PATHS, y, pred, probs, CLASSES)
    m = reports.metrics(y, pred, CLASSES, probs)
    rep = {"model": "efficientnet_lite0", "n_train": 200, "n_test": N, "classes": CLASSES,
           "test_set": reports.test_set("test", PATHS, y, CLASSES), **m}
    reports.write_report(folder, rep | fields)
    return y, probs


@pytest.fixture
def page(tmp_path):
    y, probs = write_row(tmp_path / "a" / "fit" / "pool-logreg<&>", 1, 1.2, stage="fit", tap="pool", clf="logreg",
                         cost={"fit_seconds": 1.0, "extraction": {"wall_seconds": 5.0}})
    folder = tmp_path / "a" / "fit" / "pool-logreg<&>"
    rep = json.loads((folder / "report.json").read_text())
    point = reports.operating_point("recall:defective=0.9", CLASSES, (y, probs), "validation split", y, probs)
    (folder / "report.json").write_text(json.dumps(rep | {"operating_point": point}))
    write_row(tmp_path / "b" / "finetune", 2, 2.0, stage="finetune", clf="finetune", tap=None,
              cost={"wall_seconds": 600.0})
    compare([str(tmp_path / "a"), str(tmp_path / "b")], out=str(tmp_path / "out"))
    return tmp_path / "out" / "report.html", point


def test_each_row_gets_roc_pr_and_reliability_figures_and_its_scores(page):
    path, point = page
    text = path.read_text()
    table = re.search(r'<table id="probabilities">.*?</table>', text, re.S).group(0)
    assert table.count("<tr>") == 3 and "pool-logreg&lt;&amp;&gt;" in table and "<&>" not in text
    assert text.count("<svg") == 6  # ROC, PR and reliability for each of the two rows
    assert f"threshold {point['threshold']:.3f}" in table and "defective recall" in table
    rows = reports.read_predictions(path.parent.parent / "b" / "finetune" / "predictions.csv").values()
    y = np.array([r["true"] == "defective" for r in rows])
    p = np.array([r["probabilities"]["defective"] for r in rows])
    assert f"{scores.roc_auc(y, p):.3f} (" in table  # the rarer class, defective, is the positive one
    assert "http" not in text  # fetches nothing


@pytest.mark.slow
def test_the_figures_render_in_chromium(page, tmp_path):
    browser = pytest.importorskip("browser")
    try:
        chromium = browser.chromium()
    except browser.Unavailable as e:
        pytest.skip(str(e))
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([chromium, *browser.FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                              page[0].resolve().as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<svg") == 6 and dom.count("<polyline") > 30
    shot = browser.screenshot(page[0], tmp_path / "page.png", height=4000)
    gray = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert gray.std() > 20 and (gray < 128).mean() > 0.01


LONG = "a_class_named_after_a_folder_of_somebodys_dataset_without_any_spaces_at_all_" * 2


@pytest.mark.slow
def test_long_class_names_stay_inside_their_gallery_cards(tmp_path):
    browser = pytest.importorskip("browser")
    try:
        browser.chromium()
    except browser.Unavailable as e:
        pytest.skip(str(e))
    classes = [LONG + "cats", LONG + "dogs"]
    cards = []
    for i in range(6):
        rel = f"test/{LONG}{i}.png"
        make_image(tmp_path / "images" / rel, i, tint=i % 2)
        a = {"true": classes[i % 2], "predicted": classes[i % 2], "probabilities": {classes[i % 2]: 0.9}}
        b = a | {"predicted": classes[1 - i % 2], "probabilities": {classes[1 - i % 2]: 0.6}}
        cards.append(compare_html._card(rel, a, b, str(tmp_path / "images"), "svm", "finetune-" + LONG))
    page = tmp_path / "page.html"
    page.write_text(f"<!DOCTYPE html><html><head><style>{compare_html.STYLE}</style></head><body>"
                    f'<div class="gallery" id="gallery">{"".join(cards)}</div></body></html>')
    seen = browser.inspect(page)
    assert seen["gallery"] == 6 and seen["overflowing"] == 0  # once one card stretched past the page
