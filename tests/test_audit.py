"""The audit on real images with planted problems: copies across splits, flipped labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bottleneck import audit, leaks
from bottleneck.extract import extract


def rescaled(im: Image.Image) -> Image.Image:
    return im.resize((im.width * 2, im.height * 2), Image.BICUBIC)


COPIES = {  # the ways a training image comes back as a test image (docs/audit.md measures each)
    "rescaled": rescaled,
    "jpeg": lambda im: im,  # saved again as JPEG at quality 90
    "corner": lambda im: im.crop((0, 0, round(im.width * 0.95), round(im.height * 0.95))),
}


@pytest.fixture(scope="module")
def cifar_tree(cifar_tgz, tmp_path_factory):
    """1,000 real CIFAR-10 photos (100 of each class) and 10 test ones."""
    from bottleneck.data import write_cifar10

    root = tmp_path_factory.mktemp("cifar") / "cifar"
    write_cifar10(root, cifar_tgz, per_class="100,0,1", seed=0)
    return root


@pytest.fixture(scope="module")
def planted(cifar_tree, tmp_path_factory):
    """train: 40 photos; test: 3 copies of each of the first 8, an exact copy of another, and 16 other
    photos; val: 6 other photos. Classes: airplane and frog."""
    root = tmp_path_factory.mktemp("audit") / "data"
    photos = [p for c in ("airplane", "frog") for p in sorted((cifar_tree / "train" / c).iterdir())[:31]]
    photos = [photos[i] for i in np.random.default_rng(1).permutation(len(photos))]
    copies = set()
    for i, path in enumerate(photos):
        label = path.parent.name
        im = Image.open(path).convert("RGB")
        split = "train" if i < 40 else "test" if i < 56 else "val"
        target = root / split / label / f"photo{i}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        im.save(target)
        if i < 8:
            for kind, make in COPIES.items():
                name = f"test/{label}/copy-{kind}-{i}.{'jpg' if kind == 'jpeg' else 'png'}"
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                make(im).save(root / name, quality=90) if kind == "jpeg" else make(im).save(root / name)
                copies.add(name)
        if i == 8:  # an exact copy under another name
            (root / f"test/{label}/same-bytes-{i}.png").write_bytes(target.read_bytes())
            copies.add(f"test/{label}/same-bytes-{i}.png")
    cache = extract("efficientnet_lite0", str(root), layer=["blocks.6", "pool"], out=str(root.parent / "cache"),
                    batch_size=32, workers=0, progress=False)
    return cache, copies


def test_every_planted_copy_is_found_with_its_original(planted, tmp_path):
    cache, copies = planted
    result = json.loads(audit.audit(cache, out=tmp_path / "a").read_text())
    found = {t["path"]: t for t in result["twins"]}
    assert set(found) == copies  # all copies, and no distinct photo: none of the 16 other test photos nor val
    for path, t in found.items():
        number = path.rsplit("-", 1)[1].split(".")[0]
        assert Path(t["train_path"]).name == f"photo{number}.png" and t["same_label"]
    assert found[next(p for p in copies if "same-bytes" in p)]["exact"]
    assert not any(t["exact"] for p, t in found.items() if "same-bytes" not in p)
    assert result["twin_share"]["test"] == pytest.approx(len(copies) / (16 + len(copies)))
    assert result["twin_share"]["val"] == 0
    assert (tmp_path / "a" / "audit.png").stat().st_size > 10_000
    assert len(result["map"]["points"]) == sum(result["images"].values())


def test_nearest_in_blocks_matches_the_full_matrix(monkeypatch):
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(37, 8)), rng.normal(size=(53, 8))
    monkeypatch.setattr(leaks, "BLOCK_CELLS", 100)  # one or two query rows per block
    index, sims = leaks.nearest(q, r)
    full = leaks.unit_rows(q) @ leaks.unit_rows(r).T
    assert (index == full.argmax(axis=1)).all()
    assert np.allclose(sims, full.max(axis=1), atol=1e-6)
    own = np.arange(0, 53, 2)  # reference rows as queries, each barred from picking itself
    index, sims = leaks.nearest(r[own], r, skip=own)
    others = leaks.unit_rows(r[own]) @ leaks.unit_rows(r).T
    others[np.arange(len(own)), own] = -np.inf
    assert (index != own).all() and (index == others.argmax(axis=1)).all()
    pairs = leaks.unit_rows(r) @ leaks.unit_rows(r).T
    np.fill_diagonal(pairs, -np.inf)
    bar, q = leaks.neighbour_bar(r, floor=0.99)  # random directions in 8-d: neighbours far below the floor
    assert bar == 0.99 and q == pytest.approx(np.quantile(pairs.max(axis=1), leaks.NEIGHBOUR_QUANTILE), abs=1e-6)


def test_confident_learning_flags_only_believed_other_classes():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.3, 0.7], [0.95, 0.05], [0.55, 0.45]])
    y = np.array([0, 0, 1, 1, 1, 0])
    # thresholds: class 0: mean(0.9, 0.8, 0.55) = 0.75; class 1: mean(0.8, 0.7, 0.05) = 0.517
    assert audit.confident_errors(probs, y).tolist() == [4]


@pytest.fixture(scope="module")
def flipped(cifar_tree, tmp_path_factory):
    """300 real CIFAR-10 photos of 3 classes in a manifest whose labels are wrong for 15 (5 %)."""
    root = tmp_path_factory.mktemp("flip")
    keep = ("airplane", "frog", "truck")
    rows = sorted((str(p), p.parent.name) for c in keep for p in (cifar_tree / "train" / c).iterdir())
    flips = set(np.random.default_rng(0).choice(len(rows), 15, replace=False).tolist())
    lines = []
    for i, (path, label) in enumerate(rows):
        if i in flips:
            label = keep[(keep.index(label) + 1) % 3]
        lines.append(f"{path},{label}")
    (root / "labels.csv").write_text("path,label\n" + "\n".join(lines) + "\n")
    cache = extract("efficientnet_lite0", str(root / "labels.csv"), layer=["pool"], out=str(root / "cache"),
                    batch_size=50, workers=0, progress=False)
    return cache, {rows[i][0] for i in flips}


def test_flipped_labels_rank_near_the_top(flipped, tmp_path):
    cache, flipped_paths = flipped
    result = json.loads(audit.audit(cache, out=tmp_path / "a").read_text())
    ranked = [s["path"] for s in result["suspects"]]
    top = ranked[:30]  # the top 10 % of 300 images
    recall = len(set(top) & flipped_paths) / len(flipped_paths)
    print(f"flipped labels in the top 10 %: {recall:.0%}; probe {result['probe']}")
    assert recall >= 0.8, (recall, result["probe"])
    assert all(s["given"] != s["suggested"] for s in result["suspects"])


def test_compare_rescores_every_row_without_the_twins(tmp_path):
    from test_compare import TEST_PATHS, write_report

    from bottleneck.compare import compare, comparison

    write_report(tmp_path / "fit" / "pool-logreg", 32, 0.80, stage="fit", tap="pool", clf="logreg", cost={})
    write_report(tmp_path / "finetune", 39, 0.90, stage="finetune", clf="finetune", cost={"wall_seconds": 60.0})
    twins = [{"split": "test", "path": p, "train_path": "train/x.png", "similarity": 0.99, "exact": False,
              "same_label": True} for p in TEST_PATHS[:10]]
    twins.append({"split": "val", "path": "val/cats/v.png", "train_path": "train/y.png", "similarity": 0.97,
                  "exact": False, "same_label": True})
    (tmp_path / "audit.json").write_text(json.dumps({"twins": twins}))
    whole = {r["id"]: r["accuracy"] for r in comparison([str(tmp_path)])["rows"]}
    assert whole == {"fit/pool-logreg": 0.8, "finetune": 39 / 40}
    result = comparison([str(tmp_path)], exclude={t["path"] for t in twins if t["split"] == "test"})
    assert result["excluded"] == sorted(TEST_PATHS[:10]) and result["decision"]["n_test"] == 30
    assert {r["id"]: r["accuracy"] for r in result["rows"]} == {"fit/pool-logreg": 22 / 30, "finetune": 29 / 30}
    md = compare([str(tmp_path)], without_twins=str(tmp_path / "audit.json")).read_text()
    assert "without the 10 test images the audit found to be copies" in md


def test_audit_command_lists_pairs_and_suspects_and_refuses_a_bad_threshold(planted, tmp_path):
    from typer.testing import CliRunner

    from bottleneck.cli import app

    cache, copies = planted
    done = CliRunner().invoke(app, ["audit", str(cache), "--out", str(tmp_path / "a"), "--top", "3"])
    assert done.exit_code == 0, done.output
    assert f"{len(copies)} near-twins of training images" in done.output
    assert "same bytes" in done.output and "labels the out-of-fold probe" in done.output
    assert done.output.strip().endswith("audit.json")
    bad = CliRunner().invoke(app, ["audit", str(cache), "--threshold", "1.5", "--out", str(tmp_path / "b")])
    assert bad.exit_code != 0 and "--threshold must be in (0, 1]" in str(bad.exception)
    assert not (tmp_path / "b").exists()


def test_fit_finetune_checks_and_compare_warn_of_planted_copies(planted, tmp_path, monkeypatch):
    from conftest import cli

    from bottleneck.store import FeatureStore

    cache, copies = planted
    with FeatureStore(cache) as st:
        train, test, root = st.paths("train"), st.paths("test"), st.attrs["data_root"]
    by_files = leaks.check_files(train, test, root)  # finetune's check: exact bytes and thumbnails find all but crops
    assert (by_files["twins"], by_files["of"]) == (len([c for c in copies if "corner" not in c]), len(test))
    assert "have a near-twin in train by a copy of the file" in leaks.warning(by_files)

    done = cli("fit", "--features", str(cache), "--clf", "logreg", "--layer", "pool", "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    assert "of the test images have a near-twin in train by similar features" in " ".join(done.stderr.split())
    twins = json.loads(Path(done.stdout.split()[-1]).read_text())["test_set"]["twins"]
    assert twins["by"] == "features" and twins["checked"] == twins["of"] == len(test)
    assert 9 <= twins["twins"] <= len(copies)  # the crops and the exact copy at least; rescaled ones are the files'
    lo, hi = twins["share_ci"]
    assert lo < twins["share"] < hi

    shown = cli("compare", str(tmp_path / "run"))
    assert shown.returncode == 0, shown.stderr
    assert "near-twin in train" in " ".join(shown.stderr.split())
    assert "**Warning:**" in (tmp_path / "run" / "comparison.md").read_text()
    assert 'id="leak"' in (tmp_path / "run" / "report.html").read_text()

    monkeypatch.setattr(leaks, "CHECKED_AT_MOST", 10)  # a test set larger than the check looks at
    sampled = leaks.check_files(train, test, root, seed=3)
    assert sampled["checked"] == 10 and sampled["of"] == len(test)
    assert sampled["share_ci"][1] - sampled["share_ci"][0] > 0.2  # 10 images: a wide interval, said so
    assert sampled == leaks.check_files(train, test, root, seed=3)  # seeded: the same sample again


def test_no_warning_without_copies(planted):
    cache, copies = planted
    from bottleneck.store import FeatureStore

    with FeatureStore(cache) as st:  # the 16 distinct test photos alone
        test = [p for p in st.paths("test") if p not in copies]
        found = leaks.check_cache(st, st.paths("train"), test)
        assert leaks.check_files(st.paths("train"), test, st.attrs["data_root"])["twins"] == 0
    assert found["twins"] == 0 and leaks.warning(found) is None


def test_the_quick_check_streamed_under_a_memory_budget_finds_what_it_finds_in_memory(planted, monkeypatch):
    from bottleneck.linear import Rows
    from bottleneck.store import FeatureStore

    cache, copies = planted
    sizes = []
    read = Rows.read
    monkeypatch.setattr(Rows, "read", lambda self, positions, hashes=None: sizes.append(len(positions) * 1280 * 4)
                        or read(self, positions, hashes))
    with FeatureStore(cache) as st:
        train, test = st.paths("train"), st.paths("test")
        whole = leaks.check_cache(st, train, test)
        assert not sizes
        budget = 12 * 1280 * 4  # twelve rows of pool features: the 40 training images in four chunks
        streamed = leaks.check_cache(st, train, test, budget=budget)
    assert sizes and max(sizes) <= budget
    assert streamed["twins"] == whole["twins"] >= 9 and streamed["checked"] == whole["checked"]
    assert streamed["bar"] == pytest.approx(whole["bar"], abs=1e-4)
