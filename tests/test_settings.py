"""Each stage's settings are defined once: the command line, the Python signature, the experiment
file and the Slurm scripts all come from the same fields, and agree on names and defaults."""

import dataclasses
import inspect
import typing

import pytest
import typer

import bottleneck
from bottleneck import cli, pipeline, settings, slurm
from bottleneck.errors import BottleneckError

STAGES = {"extract": settings.ExtractSettings, "fit": settings.FitSettings, "finetune": settings.FinetuneSettings}


def _command(name):
    return typer.main.get_command(cli.app).commands[name]


@pytest.mark.parametrize("name", STAGES)
def test_cli_options_and_python_keywords_are_the_settings_fields(name):
    cls = STAGES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    options = {p.name: p for p in _command(name).params}
    params = inspect.signature(getattr(bottleneck, name)).parameters
    assert set(options) == set(fields) == set(params)
    for key, f in fields.items():
        default = None if f.default is dataclasses.MISSING else f.default
        assert options[key].default == default, key
        assert options[key].required == (f.default is dataclasses.MISSING), key
        assert settings.flag(f) in options[key].opts, key
        keyword_only = params[key].kind is inspect.Parameter.KEYWORD_ONLY
        assert keyword_only == (f.default is not dataclasses.MISSING), key  # only the required come positionally


def test_experiment_file_keys_come_from_the_settings():
    assert set(pipeline.BACKBONE_KEYS) - {"name", "fit"} == set(settings.toml_keys(settings.ExtractSettings))
    assert set(pipeline.FIT_KEYS) - {"seeds"} == set(settings.toml_keys(settings.FitSettings))
    assert set(pipeline.FINETUNE_KEYS) - {"name", "seeds"} == set(settings.toml_keys(settings.FinetuneSettings))
    # [data] holds the split settings, which extract and finetune share, and the folds of fit and finetune
    split = set(settings.toml_keys(settings.ExtractSettings, "data"))
    assert split | {"folds"} == set(settings.toml_keys(settings.FinetuneSettings, "data"))
    assert split == {"val_fraction", "test_fraction", "split_seed", "group_pattern"}
    assert set(settings.toml_keys(settings.FitSettings, "data")) == {"folds", "split_seed", "val_fraction"}
    assert set(pipeline.DATA_KEYS) == split | {"folds", "path", "builtin", "labels"}


@pytest.mark.parametrize("name", STAGES)
def test_a_slurm_command_line_parses_back_to_its_arguments(name):
    cls = STAGES[name]
    changed = {"extract": {"model": "resnet18", "data_dir": "d a$ta", "layer": ["layer3", "layer4"], "force": True,
                           "progress": False, "split_seed": 3},
               "fit": {"features": "c.h5", "clf": "svm", "search": True, "class_weight": "balanced"},
               "finetune": {"model": "resnet18", "data_dir": "d", "restore_best": False, "tta": False, "lr": 0.01,
                            "max_images": 7}}[name]
    words = slurm.command(name, changed).split()[2:]
    import shlex

    ctx = _command(name).make_context(name, shlex.split(" ".join(words)))
    expected = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING} | changed
    assert {k: ctx.params[k] for k in expected} == expected


def test_values_of_the_wrong_type_or_range_are_one_error_naming_the_option():
    with pytest.raises(settings.SettingError, match=r"--epochs must be an integer, not '10'"):
        settings.FinetuneSettings(model="resnet18", data_dir="d", epochs="10").validate()
    with pytest.raises(settings.SettingError, match=r"--batch-size must be between 1 and 65536, not 0"):
        settings.ExtractSettings(model="resnet18", data_dir="d", batch_size=0).validate()
    with pytest.raises(settings.SettingError, match=r"unknown classifier 'forest'; choose one of auto, logreg"):
        settings.FitSettings(features="c.h5", clf="forest").validate()
    with pytest.raises(TypeError, match="finetune"):
        bottleneck.finetune("resnet18", "d", 10)  # every setting but model and data is keyword-only


@pytest.mark.parametrize("table, words", [
    ('model = "resnet18"\nepochs = "10"', ["line 6", "[[finetune]] #1 epochs", "must be an integer, not '10'"]),
    ('model = "resnet18"\nlr = "fast"', ["line 6", "[[finetune]] #1 lr", "must be a number"]),
    ('model = "resnet18"\nmax_images = [1, 2]', ["line 6", "max_images", "must be an integer"]),
    ('model = "resnet18"\noptimizer = "lion"', ["line 6", "optimizer", "choose one of adamw, sgd"]),
    ('model = "resnet18"\npatience = 0', ["line 6", "patience", "must be at least 1"]),
    ('model = ["resnet18"]', ["line 5", "model", "must be a string"]),
])
def test_wrong_finetune_values_in_an_experiment_name_key_and_line(tmp_path, table, words):
    path = tmp_path / "e.toml"
    path.write_text(f'[data]\npath = "{tmp_path}"\n\n[[finetune]]\n{table}\n')
    with pytest.raises(BottleneckError) as e:
        pipeline.load(path)
    for w in words:
        assert w in str(e.value)


def test_a_huge_value_is_not_echoed_back():
    with pytest.raises(settings.SettingError) as e:
        settings.ExtractSettings(model="resnet18", data_dir="d", pool="x" * 10_000_000).validate()
    assert len(str(e.value)) < 300


def test_paths_may_be_pathlib_objects_and_are_kept_as_strings(tmp_path):
    @settings.takes(settings.FitSettings)
    def echo(s):
        return s

    assert echo(tmp_path / "c.h5", out=tmp_path / "o").features == str(tmp_path / "c.h5")  # extract returns a Path


FLOAT_FIELDS = [(name, key) for name, cls in STAGES.items() for key, hint in typing.get_type_hints(cls).items()
                if settings.base_type(hint)[0] is float]


@pytest.mark.parametrize("stage, name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_setting_refuses_nan_and_infinity(stage, name, value):
    required = {"extract": {"model": "resnet18", "data_dir": "d"}, "fit": {"features": "c.h5"},
                "finetune": {"model": "resnet18", "data_dir": "d"}}[stage]
    with pytest.raises(settings.SettingError, match="must be a finite number") as e:
        STAGES[stage](**required, **{name: value}).validate()  # what the Python API, the CLI and run all call
    assert e.value.key == name


def test_nan_settings_are_refused_on_the_command_line_and_in_an_experiment(tmp_path):
    from conftest import cli

    for option in (["--lr", "nan"], ["--backbone-lr-mult", "inf"]):
        result = cli("finetune", "--model", "resnet18", "--data", str(tmp_path), *option)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert result.stderr.startswith("error: ") and "must be a finite number" in result.stderr, result.stderr
    path = tmp_path / "e.toml"
    path.write_text(f'[data]\npath = "{tmp_path}"\nval_fraction = nan\n\n[[finetune]]\nmodel = "resnet18"\n'
                    "lr = inf\n")
    with pytest.raises(BottleneckError, match="must be a finite number"):
        pipeline.load(path)
