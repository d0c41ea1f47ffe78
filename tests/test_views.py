"""A view kind is parsed, counted and made in one place, views.py."""

import pytest
import torch

from bottleneck import views
from bottleneck.errors import BottleneckError


@pytest.mark.parametrize("name, count", [("none", 1), ("hflip", 2), ("flips", 4), ("dihedral", 8), ("crops:3", 3)])
def test_a_view_kind_makes_as_many_views_as_it_counts(name, count):
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert views.n_views(name) == count == len(views.views_of(x, name))
    assert all(v.shape == x.shape and v.dtype == torch.uint8 for v in views.views_of(x, name))


def test_crops_have_one_spelling_and_bounds():
    assert views.parse_views("crops:02") == views.Views("crops:2", 2)
    for bad in ("crops:1", f"crops:{views.MAX_CROPS + 1}", "crops:²", "mirror", "x" * 1000):
        with pytest.raises(BottleneckError, match="unknown views") as e:
            views.parse_views(bad)
        assert len(str(e.value)) < 200  # a long value is cut, not echoed back


def test_dihedral_views_of_a_square_are_its_eight_symmetries_and_of_a_rectangle_its_four_flips():
    square = torch.arange(9, dtype=torch.uint8).view(1, 1, 3, 3)
    made = views.views_of(square, "dihedral")
    assert len({tuple(v.flatten().tolist()) for v in made}) == 8
    assert len(views.views_of(torch.zeros(1, 1, 2, 3, dtype=torch.uint8), "dihedral")) == 4


def test_cached_views_take_the_first_alone_for_none():
    maps = torch.arange(24.0).view(2, 3, 4)
    assert torch.equal(views.cached_views(maps, "none"), maps[:, :1])
    assert torch.equal(views.cached_views(maps, "flips"), maps)
