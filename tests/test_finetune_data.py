import numpy as np
import pytest
import torch
from conftest import make_tree

from bottleneck import finetune_data, views
from bottleneck.errors import BottleneckError


def _batch(n=16, size=6):
    return torch.arange(n * 3 * size * size, dtype=torch.int64).remainder(251).to(torch.uint8).view(n, 3, size, size)


def test_augmentation_is_seeded_and_light_only_flips():
    x = _batch()
    a = finetune_data.augment_batch(x, "light", torch.Generator().manual_seed(1))
    b = finetune_data.augment_batch(x, "light", torch.Generator().manual_seed(1))
    c = finetune_data.augment_batch(x, "light", torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for orig, out in zip(x, a):  # every image is itself, flipped or not
        assert any(torch.equal(out, orig.flip(d) if d else orig) for d in ((), (1,), (2,), (1, 2)))
    assert torch.equal(finetune_data.augment_batch(x, "none", torch.Generator()), x)


def test_strong_augmentation_turns_square_images_and_jitters_their_brightness():
    x = _batch(64)
    out = finetune_data.augment_batch(x, "strong", torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    symmetric = [any(torch.equal(o, v) for v in (i, i.flip(1), i.flip(2), i.flip(1, 2), i.transpose(1, 2),
                                               i.transpose(1, 2).flip(1), i.transpose(1, 2).flip(2),
                                               i.transpose(1, 2).flip(1, 2))) for i, o in zip(x, out)]
    assert not all(symmetric)  # brightness and contrast changed at least one image


def test_test_time_views_follow_the_training_augmentation():
    assert views.tta_views(False, "strong") == "none"
    assert [views.tta_views(True, a) for a in ("none", "light", "strong")] == ["hflip", "flips", "dihedral"]


def test_images_decode_once_and_unreadable_files_are_dropped(tmp_path):
    tree = make_tree(tmp_path / "d", {"train": 3})
    (tree / "train" / "cats" / "broken.png").write_bytes(b"not an image")
    samples = sorted((f"train/{c}/{p.name}", i) for i, c in enumerate(("cats", "dogs"))
                     for p in (tree / "train" / c).iterdir())
    prep = {"size": 16, "resize": 16, "crop": False, "interpolation": "bilinear"}
    x, y, paths = finetune_data.load_images(str(tree), samples, prep, 0, False)
    assert x.shape == (6, 3, 16, 16) and x.dtype == torch.uint8
    assert "train/cats/broken.png" not in paths and len(paths) == len(y) == 6
    assert np.bincount(y.numpy()).tolist() == [3, 3]
    with pytest.raises(BottleneckError, match="keeps decoded images in memory"):
        finetune_data.load_images(str(tree), samples * 10**6, {**prep, "size": 224}, 0, False)
