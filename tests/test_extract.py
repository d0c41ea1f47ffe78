import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli, make_tree
from test_data import bad_files

from bottleneck import data, networks, store
from bottleneck.errors import BottleneckError, CacheBusy
from bottleneck.extract import extract
from bottleneck.views import crop_boxes, views_of

LITE = "efficientnet_lite0"


def test_features_equal_a_direct_forward_pass(tree, tmp_path):
    path = extract(LITE, str(tree), out=str(tmp_path / "c"), batch_size=4, workers=0, precision="fp32",
                   progress=False)
    with store.FeatureStore(path) as st:
        assert st.splits == ["train", "val", "test"]
        assert st.taps == ["blocks.3", "blocks.4", "blocks.5", "blocks.6", "pool"]  # the default taps
        assert st.attrs["complete"] and st.attrs["model"] == LITE and st.attrs["classes"] == ["cats", "dogs"]
        assert st.attrs["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
        feats, paths, labels = st.features("test"), st.paths("test"), st.labels("test")
    assert feats.shape == (6, 1280) and list(labels) == [0, 0, 0, 1, 1, 1]
    # 48-px images: the whole image resized to the input (no crop), with the model's bicubic
    from torchvision.transforms import v2

    img = v2.functional.resize(data.load_image(tree / paths[4]), [224, 224],
                               interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    model = networks.FeatureExtractor(networks.build_model(LITE), LITE, ["pool"])
    with torch.no_grad():
        direct = model((x - 0.5) / 0.5)["pool"][0].numpy()
    np.testing.assert_allclose(feats[4], direct, rtol=1e-4, atol=1e-4)
    assert store.verify(path) == []


def test_same_input_reuses_the_cache_and_changed_input_does_not(tree, tmp_path):
    kw = dict(out=str(tmp_path / "c"), batch_size=8, workers=0, progress=False, weights="none")
    first = extract("squeezenet1_1", str(tree), **kw)
    stamp = first.stat().st_mtime_ns
    assert extract("squeezenet1_1", str(tree), **kw) == first and first.stat().st_mtime_ns == stamp
    assert extract("squeezenet1_1", str(tree), pool="max", **kw) != first
    (tree / "test" / "dogs" / "test_000.png").unlink()
    changed = extract("squeezenet1_1", str(tree), **kw)
    assert changed != first
    with store.FeatureStore(changed) as st:
        assert len(st.labels("test")) == 5


def test_broken_files_are_skipped_with_reasons_and_good_ones_kept(tree, tmp_path):
    reasons = bad_files(tree / "train" / "cats")
    path = extract(LITE, str(tree), out=str(tmp_path / "c"), batch_size=5, workers=2, progress=False)
    with store.FeatureStore(path) as st:
        skipped = dict(st.skipped("train"))
        assert set(skipped) == {f"train/cats/{n}" for n in reasons}
        assert all(skipped.values())
        assert len(st.labels("train")) == 12 and len(st.features("train")) == 12
        assert not any(p in skipped for p in st.paths("train"))


def test_several_taps_and_float16_storage(tree, tmp_path):
    path = extract("resnet18", str(tree), layer=["layer4", "layer2"], weights="none", dtype="float16",
                   out=str(tmp_path / "c"), batch_size=8, workers=0, progress=False)
    with store.FeatureStore(path) as st:
        assert st.taps == ["layer2", "layer4"] and st.attrs["dims"] == {"layer2": 128, "layer4": 512}
        assert st.features("train", "layer2").dtype == np.float16


def test_shards_merge_into_the_unsharded_cache(tree, tmp_path):
    kw = dict(out=str(tmp_path / "c"), batch_size=2, workers=0, progress=False, weights="none")
    whole = extract("squeezenet1_1", str(tree), **kw)
    shards = [extract("squeezenet1_1", str(tree), shard=f"{i}/3", **kw) for i in range(3)]
    assert all(".shard-" in s.name for s in shards)
    merged = store.merge([shards[2], shards[0], shards[1]], tmp_path / "merged.h5")
    assert store.contents_equal(whole, merged)
    with pytest.raises(BottleneckError, match="do not form one whole set"):
        store.merge(shards[:2], tmp_path / "partial.h5")
    (tree / "train" / "cats" / "été.png").write_bytes((tree / "train" / "cats" / "train_000.png").read_bytes())
    whole = extract("squeezenet1_1", str(tree), **kw)
    shards = [extract("squeezenet1_1", str(tree), shard=f"{i}/2", **kw) for i in range(2)]
    assert store.contents_equal(whole, store.merge(shards, tmp_path / "accents.h5"))
    odd = extract("squeezenet1_1", str(tree), shard="1/2", **(kw | {"batch_size": 3, "out": str(tmp_path / "o")}))
    with pytest.raises(BottleneckError, match="same batch size"):
        store.merge([shards[0], odd], tmp_path / "odd.h5")
    with pytest.raises(BottleneckError, match="not a shard"):
        store.merge([whole], tmp_path / "one.h5")
    other = extract("squeezenet1_1", str(tree), shard="1/2", pool="max", **kw)
    with pytest.raises(BottleneckError, match="belongs to another extraction"):
        store.merge([shards[0], other], tmp_path / "mixed.h5")


def test_a_second_writer_is_refused_clearly(tree, tmp_path):
    kw = dict(out=str(tmp_path / "c"), batch_size=8, workers=0, progress=False, weights="none")
    path = extract("squeezenet1_1", str(tree), **kw)
    path.unlink()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from bottleneck.store import CacheLock\n"
                               f"with CacheLock('{path}'):\n print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CacheBusy, match=f"being written by another process \\(pid {holder.pid}\\)"):
            extract("squeezenet1_1", str(tree), **kw)
    finally:
        holder.kill()
        holder.wait()
    assert extract("squeezenet1_1", str(tree), **kw) == path  # free again once the holder is gone


def _extract_cmd(data_dir, out):
    return [sys.executable, "-m", "bottleneck", "extract", "--model", LITE, "--data", str(data_dir),
            "--out", str(out), "--batch-size", "2", "--workers", "1", "--no-progress"]


def _extract_here(cmd: list[str]) -> str:
    """Run an _extract_cmd in this process (the kills need processes; the runs before and after do not)."""
    result = cli(*cmd[3:])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_killed_anywhere_it_resumes_to_the_same_cache(tmp_path):
    tree = make_tree(tmp_path / "data", {"train": 10, "test": 4})
    ref_path = _extract_here(_extract_cmd(tree, tmp_path / "ref"))
    out = tmp_path / "killed"
    for kill_after_blocks in (1, 4, 9):
        proc = subprocess.Popen(_extract_cmd(tree, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            parts = list(out.glob("*.parts/*.npz"))
            if len(parts) >= kill_after_blocks:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not list(out.glob("*.h5")), "the run finished before it could be killed"
    assert list(out.glob("*.parts/*.npz"))
    unfinished = str(next(out.glob("*.parts"))).removesuffix(".parts")
    with pytest.raises(BottleneckError, match="is not finished"):  # what fit sees meanwhile
        store.FeatureStore(unfinished)
    path = _extract_here(_extract_cmd(tree, out))
    assert store.contents_equal(ref_path, path)
    assert not list(out.glob("*.parts"))


def test_readers_refuse_incomplete_and_damaged_caches(tree, tmp_path):
    path = extract("squeezenet1_1", str(tree), out=str(tmp_path / "c"), batch_size=8, workers=0,
                   progress=False, weights="none")
    good = path.read_bytes()
    import h5py

    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    with pytest.raises(BottleneckError, match="is incomplete"):
        store.FeatureStore(path)
    path.write_bytes(good[: len(good) // 2])
    assert "truncated or damaged" in store.verify(path)[0]
    path.write_bytes(good)
    with h5py.File(path, "r") as f:
        offset = f["train/features/fire9"].id.get_chunk_info(0).byte_offset
    damaged = bytearray(good)
    damaged[offset + 100] ^= 0xFF
    path.write_bytes(bytes(damaged))
    assert any("checksum" in p for p in store.verify(path))


@pytest.mark.slow
def test_twenty_random_kills_still_end_with_the_same_cache(tmp_path):
    """SIGKILL at 20 seeded random moments across the whole run (start-up, blocks, assembly)."""
    import random

    tree = make_tree(tmp_path / "data", {"train": 12, "test": 4})
    started = time.monotonic()
    reference = subprocess.run(_extract_cmd(tree, tmp_path / "ref"), capture_output=True, text=True, check=True)
    duration = time.monotonic() - started
    out = tmp_path / "killed"
    rng = random.Random(20)
    for _ in range(20):
        proc = subprocess.Popen(_extract_cmd(tree, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.5, duration))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    final = subprocess.run(_extract_cmd(tree, out), capture_output=True, text=True, check=True)
    assert store.contents_equal(reference.stdout.strip().splitlines()[-1], final.stdout.strip().splitlines()[-1])
    assert store.verify(final.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
def test_a_multi_view_cache_resumes_after_a_kill_to_an_identical_file(tmp_path):
    tree = make_tree(tmp_path / "data", {"train": 6, "test": 2})
    cmd = lambda out: _extract_cmd(tree, out) + ["--views", "dihedral", "--layer", "pool",  # noqa: E731
                                                 "--maps", "blocks.5"]
    ref_path = _extract_here(cmd(tmp_path / "ref"))
    with store.FeatureStore(ref_path) as st:
        assert st.n_views == 8 and len(st.labels("train")) == 8 * 12 and st.attrs["views"] == "dihedral"
        assert st.taps == ["blocks.5", "pool"] and st.maps("train").shape == (8 * 12, 192, 7, 7)
        assert st.maps("train").dtype == "float16"
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd(out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(list(out.glob("*.parts/*.npz"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(out.glob("*.h5")) and list(out.glob("*.parts/*.npz")), "not killed mid-way"
    resumed = _extract_here(cmd(out))
    assert store.contents_equal(ref_path, resumed)
    assert store.verify(resumed) == []


def test_crop_views_are_the_image_and_the_same_seeded_crops_of_every_image(tree, tmp_path):
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    views = views_of(x, "crops:3")
    assert len(views) == 3 and torch.equal(views[0], x) and all(v.shape == x.shape for v in views)
    assert crop_boxes(2) == crop_boxes(2)  # fixed boxes: a rerun makes the same rows
    assert torch.equal(views_of(x[1:], "crops:3")[2], views[2][1:])  # a box does not depend on the batch
    kwargs = dict(layer=["pool"], views="crops:3", image_size=32, batch_size=4, workers=0, precision="fp32",
                  progress=False)
    a = extract(LITE, str(tree), out=str(tmp_path / "a"), **kwargs)
    with store.FeatureStore(a) as st:
        assert st.n_views == 3 and st.attrs["views"] == "crops:3" and "-crops-3-" in a.name
        rows = st.features("train", "pool")
        assert len(rows) == 3 * 12 and not np.allclose(rows[0::3], rows[1::3])
    b = extract(LITE, str(tree), out=str(tmp_path / "b"), **kwargs | {"batch_size": 5})
    with store.FeatureStore(b) as st:  # other batches, the same crops
        np.testing.assert_allclose(st.features("train", "pool"), rows, atol=1e-4)
    with pytest.raises(BottleneckError, match="crops:K"):
        extract(LITE, str(tree), views="crops:1", out=str(tmp_path / "c"), progress=False)


def _interrupted(tree, out, blocks: int = 3) -> Path:
    """The .parts folder of an extraction killed (SIGKILL) after `blocks` finished blocks."""
    proc = subprocess.Popen(_extract_cmd(tree, out) + ["--layer", "pool"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and len(list(out.glob("*.parts/*.npz"))) < blocks:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list(out.glob("*.h5")), "the run finished before it could be killed"
    return next(out.glob("*.parts"))


def test_damaged_blocks_and_meta_are_redone_and_cache_ls_says_so(tmp_path, capsys):
    from bottleneck.cli import cache_ls

    tree = make_tree(tmp_path / "data", {"train": 6, "test": 2})
    resume = lambda out: extract(LITE, str(tree), layer=["pool"], out=str(out), batch_size=2,  # noqa: E731
                                 workers=0, progress=False)
    parts = _interrupted(tree, tmp_path / "a")
    shutil.copytree(parts, tmp_path / "b" / parts.name)  # the same run, for the damaged meta.json below
    blocks = sorted(parts.glob("*.npz"))
    blocks[0].write_bytes(blocks[0].read_bytes()[:100])  # truncated: once "Aborted." and nothing else
    blocks[1].write_bytes(b"")  # empty: once a BadZipFile traceback
    data = bytearray(blocks[2].read_bytes())
    data[len(data) // 3] ^= 0xFF  # a flipped byte inside an array: only reading it tells
    blocks[2].write_bytes(bytes(data))
    capsys.readouterr()
    cache_ls(tmp_path / "a")
    # the kill lands after at least 3 blocks, and one more may finish before it does
    assert f"interrupted after {len(blocks)} blocks (2 damaged: the rerun computes them again)" in \
        capsys.readouterr().out
    try:
        cache = resume(tmp_path / "a")
        notes = capsys.readouterr().err
    except BottleneckError as e:  # the flipped byte is met when the blocks are assembled: one error, the block goes
        notes = capsys.readouterr().err
        assert "is damaged (BadZipFile) and was removed; rerun the same 'bottleneck extract'" in str(e)
        cache_ls(tmp_path / "a")
        assert "rerun its extract command to resume" in capsys.readouterr().out
        cache = resume(tmp_path / "a")
    assert notes.count("is damaged (truncated or empty); computing it again") == 2
    assert store.verify(cache) == []
    with store.FeatureStore(cache) as st:
        assert len(st.labels("train")) == 12 and len(st.labels("test")) == 4

    (tmp_path / "b" / parts.name / "meta.json").write_text("{not json")  # once a JSONDecodeError traceback
    cache_ls(tmp_path / "b")
    assert "interrupted with a damaged meta.json: rerun its extract command to start it again" in \
        capsys.readouterr().out
    assert store.contents_equal(resume(tmp_path / "b"), cache)
    assert "meta.json is damaged; the interrupted extraction starts again" in capsys.readouterr().err


def test_views_are_parsed_once_into_one_canonical_name(tree, tmp_path):
    with pytest.raises(BottleneckError, match=r"unknown views 'crops:²'"):  # once a ValueError traceback
        extract(LITE, str(tree), views="crops:²", out=str(tmp_path), progress=False)
    result = cli("extract", "--model", LITE, "--data", str(tree), "--views", "crops:²", "--out", str(tmp_path))
    assert result.returncode != 0 and result.stderr.startswith("error: unknown views")
    assert "Traceback" not in result.stderr
    kwargs = dict(layer=["pool"], image_size=32, batch_size=16, workers=0, precision="fp32", progress=False,
                  out=str(tmp_path / "c"))
    a = extract(LITE, str(tree), views="crops:2", **kwargs)
    assert extract(LITE, str(tree), views="crops:02", **kwargs) == a  # one cache, not two
    with store.FeatureStore(a) as st:
        assert st.attrs["views"] == "crops:2"
    assert [p.name for p in (tmp_path / "c").iterdir()] == [a.name]
