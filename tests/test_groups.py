"""Grouped splits: a group's images never fall on two sides, in splits or folds, whatever the seed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bottleneck import data
from bottleneck.errors import BottleneckError
from tests.conftest import make_image


def random_groups(seed: int) -> tuple[list[tuple[str, int]], dict[str, str]]:
    """60 to 120 groups of 1 to 8 images, each group mostly of one of 3 classes."""
    rng = np.random.default_rng(seed)
    samples, groups = [], {}
    for g in range(int(rng.integers(60, 120))):
        main = int(rng.integers(0, 3))
        for i in range(int(rng.integers(1, 9))):
            label = main if rng.random() < 0.9 else int(rng.integers(0, 3))
            path = f"g{g}_{i}.png"
            samples.append((path, label))
            groups[path] = f"g{g}"
    return samples, groups


def sides(parts: dict) -> dict[str, set]:
    where: dict[str, set] = {}
    for split, members in parts.items():
        for path, _ in members:
            where.setdefault(path.split("_")[0], set()).add(split)
    return where


@pytest.mark.parametrize("seed", range(40))
def test_split_keeps_every_group_on_one_side(seed):
    samples, groups = random_groups(seed)
    parts = data.split_samples(samples, 0.1, 0.25, seed, groups)
    assert sorted(s for v in parts.values() for s in v) == sorted(samples)
    assert all(len(s) == 1 for s in sides(parts).values())
    n = len(samples)
    assert abs(len(parts["test"]) / n - 0.25) < 0.08 and abs(len(parts["val"]) / n - 0.1) < 0.06
    for label in range(3):  # stratified as nearly as the groups allow
        share = sum(lab == label for _, lab in parts["test"]) / sum(lab == label for _, lab in samples)
        assert abs(share - 0.25) < 0.12, (label, share)
    assert parts == data.split_samples(samples, 0.1, 0.25, seed, groups)  # seeded


@pytest.mark.parametrize("seed", range(40))
def test_folds_keep_every_group_in_one_fold(seed):
    samples, groups = random_groups(seed)
    folds = data.fold_assignment(samples, 5, seed, groups=groups)
    assert set(folds) == {p for p, _ in samples}
    for g in set(groups.values()):
        assert len({folds[p] for p, grp in groups.items() if grp == g}) == 1
    sizes = np.bincount(list(folds.values()), minlength=5)
    assert sizes.min() >= 0.6 * len(samples) / 5
    for fold in range(5):
        split, _ = data.fold_splits(samples, 5, fold, seed, 0.1, groups=groups)
        assert all(len(s) == 1 for s in sides(split).values())


def test_a_tree_is_split_by_the_group_pattern(tmp_path):
    for cls, tint in (("ok", 0), ("bad", 1)):
        for module in range(12):
            for cell in range(3):
                make_image(tmp_path / "d" / cls / f"module{cls}{module}_cell{cell}.png", module * 10 + cell, tint)
    m = data.load_manifest(tmp_path / "d", seed=3, group_pattern=r"^(module\w+?)_cell")
    assert m.split_info["groups"] | {"sha256": None} == {"by": "pattern", "pattern": r"^(module\w+?)_cell", "count": 24,
                                                         "sha256": None}
    where = sides({s: [(p.split("/")[-1].split("_")[0] + "_x", lab) for p, lab in v] for s, v in m.splits.items()})
    assert all(len(s) == 1 for s in where.values()) and set(m.splits) == {"train", "val", "test"}
    with pytest.raises(BottleneckError, match="no capture group"):
        data.load_manifest(tmp_path / "d", group_pattern="module")
    with pytest.raises(BottleneckError, match="finds no group in the file name"):
        data.load_manifest(tmp_path / "d", group_pattern=r"^(patient\d+)")


def test_a_manifest_group_column_keeps_groups_whole_and_warns_of_given_splits(tmp_path, capsys):
    rows = []
    for i in range(48):
        make_image(tmp_path / "x" / f"{i}.png", i, i % 2)
        rows.append(f"x/{i}.png,{'cat' if i % 2 else 'dog'},p{i // 4}")
    (tmp_path / "m.csv").write_text("path,label,group\n" + "\n".join(rows) + "\n")
    m = data.load_manifest(tmp_path / "m.csv")
    assert m.split_info["groups"]["by"] == "csv" and m.split_info["groups"]["count"] == 12
    where: dict[str, set] = {}
    for split, members in m.splits.items():
        for path, _ in members:
            where.setdefault(m.groups[path], set()).add(split)
    assert all(len(s) == 1 for s in where.values())
    split_rows = [f"{r.rsplit(',', 1)[0]},{'test' if i in (0, 1, 5, 9) else 'train'},{r.rsplit(',', 1)[1]}"
                  for i, r in enumerate(rows)]
    (tmp_path / "s.csv").write_text("path,label,split,group\n" + "\n".join(split_rows) + "\n")
    data.load_manifest(tmp_path / "s.csv")
    assert "groups have images in more than one of the given splits" in capsys.readouterr().err
    (tmp_path / "e.csv").write_text("path,label,group\nx/0.png,dog,\nx/1.png,cat,a\n")
    with pytest.raises(BottleneckError, match="empty group"):
        data.load_manifest(tmp_path / "e.csv")


def test_a_grouped_cache_keeps_groups_whole_in_fit_folds_and_survives_verify(tmp_path):
    from bottleneck import store
    from bottleneck.classify import fit
    from bottleneck.extract import extract

    for cls, tint in (("ok", 0), ("bad", 1)):
        for module in range(6):
            for cell in range(3):
                make_image(tmp_path / "d" / cls / f"m{cls}{module}_c{cell}.png", module * 10 + cell + tint * 99, tint)
    cache = extract("efficientnet_lite0", str(tmp_path / "d"), layer=["pool"], out=str(tmp_path / "c"),
                    group_pattern=r"^(m\w+?)_c", val_fraction=0.0, test_fraction=0.25, batch_size=36, workers=0,
                    progress=False)
    with store.FeatureStore(cache) as st:
        groups = st.groups()
        assert st.splits == ["train", "test"] and len(groups) == 36 and len(set(groups.values())) == 12
        for split in st.splits:
            for other in set(st.splits) - {split}:
                assert not {groups[p] for p in st.paths(split)} & {groups[p] for p in st.paths(other)}
    assert store.verify(cache) == []
    for fold in range(3):
        rep = json.loads(fit(cache, clf="logreg", folds=3, fold=fold, search=False,
                             out=str(tmp_path / "fit")).read_text())
        test = {groups[p] for p in rep["test_set"]["paths"]} if "paths" in rep["test_set"] else None
        rows = (tmp_path / "fit").rglob("predictions.csv")
        held = {line.split(",")[0] for f in rows if f"fold{fold}" in str(f) for line in f.read_text().splitlines()[1:]}
        assert held and len({groups[p] for p in held}) * 3 == len(held)  # whole groups of 3 cells
        assert test is None or test == {groups[p] for p in held}


def test_finetune_splits_and_folds_by_the_group_pattern(tmp_path):
    from bottleneck.finetune import finetune

    for cls, tint in (("ok", 0), ("bad", 1)):
        for module in range(6):
            for cell in range(3):
                make_image(tmp_path / "d" / cls / f"m{cls}{module}_c{cell}.png", module * 10 + cell + tint * 99, tint)
    pattern = r"^(m\w+?)_c"
    grouped = data.load_manifest(tmp_path / "d", 0.0, 0.25, 0, pattern)
    rep = json.loads(finetune("squeezenet1_1", str(tmp_path / "d"), weights="none", head_epochs=0, epochs=1,
                              val_fraction=0.0, test_fraction=0.25, group_pattern=pattern, batch_size=8, workers=0,
                              progress=False, out=str(tmp_path / "ft")).read_text())
    tested = sorted(line.split(",")[0] for line in (tmp_path / "ft" / "predictions.csv").read_text().splitlines()[1:])
    assert tested == sorted(p for p, _ in grouped.splits["test"])  # the grouped split, not the image-level one
    assert rep["test_set"]["groups"]["count"] == 12
    fold = json.loads(finetune("squeezenet1_1", str(tmp_path / "d"), weights="none", head_epochs=0, epochs=1,
                               folds=3, fold=1, group_pattern=pattern, batch_size=8, workers=0, progress=False,
                               out=str(tmp_path / "ftf")).read_text())
    held = [line.split(",")[0] for f in tmp_path.glob("ftf*/predictions.csv")  # a fold's folder ends -fold1
            for line in f.read_text().splitlines()[1:]]
    assert fold["folds"]["fold"] == 1 and held and len({grouped.groups[p] for p in held}) * 3 == len(held)
