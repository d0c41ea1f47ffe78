"""One name per seed: --split-seed (and [data] split_seed) is the split's, --seed the training's."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from bottleneck import pipeline, settings
from bottleneck.cli import app
from bottleneck.errors import BottleneckError


@pytest.mark.parametrize("cls", [settings.ExtractSettings, settings.FitSettings, settings.FinetuneSettings])
def test_the_split_seed_has_one_name_and_seed_is_never_it(cls):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert settings.flag(fields["split_seed"]) == "--split-seed"
    assert fields["split_seed"].metadata["flags"] in ((), ("--split-seed",))
    assert fields["split_seed"].metadata["toml"] == "[data] split_seed"
    if "seed" in fields:  # the training seed, where a stage trains
        assert settings.flag(fields["seed"]) == "--seed" and fields["seed"].metadata["toml"] is True


@pytest.mark.parametrize("argv", [["extract", "--model", "resnet18", "--data", "x", "--seed", "1"],
                                  ["data", "elpv", "--seed", "1"], ["data", "cifar10", "--seed", "1"]])
def test_seed_is_not_a_split_seed_on_the_command_line(argv):
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2 and "No such option" in result.output and "--seed" in result.output


def test_the_old_data_seed_key_names_its_new_name(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text('[data]\npath = "data/x"\nseed = 3\n\n[[backbone]]\nmodel = "efficientnet_lite0"\n')
    with pytest.raises(BottleneckError, match=r"line 3: \[data\] seed: is now split_seed"):
        pipeline.load(path)
    path.write_text('[data]\npath = "data/x"\nsplit_seed = 3\n\n[[backbone]]\nmodel = "efficientnet_lite0"\n')
    assert pipeline.load(path).data["split_seed"] == 3
