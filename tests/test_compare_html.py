"""The HTML report's page as a browser shows it (tests/browser.py)."""

import pytest
from conftest import make_image

from bottleneck import compare_html

LONG = "a_class_named_after_a_folder_of_somebodys_dataset_without_any_spaces_at_all_" * 2


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
