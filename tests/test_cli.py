import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli


def assert_clean_failure(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), result.stderr
    for word in words:
        assert word in result.stderr


@pytest.mark.parametrize("command", [[], ["extract"], ["models"], ["weights", "fetch"], ["data", "elpv"],
                                     ["cache", "ls"], ["cache", "info"], ["cache", "verify"], ["cache", "merge"]])
def test_every_command_has_help(command):
    result = cli(*command, "--help")
    assert result.returncode == 0 and "Usage" in result.stdout


def test_help_shows_the_bracketed_defaults_of_settings():
    # rich read "[default: ...]" in a help text as markup and dropped it, leaving "or all ."
    text = " ".join(cli("extract", "--help").stdout.replace("│", " ").split())
    assert "[default: the model's own]" in text and " ." not in text


def test_extract_prints_the_cache_path_last_and_cache_commands_read_it(tree, tmp_path):
    result = cli("extract", "--model", "efficientnet_lite0", "--data", str(tree), "--out",
                     str(tmp_path / "c"), "--batch-size", "8")
    assert result.returncode == 0, result.stderr
    path = result.stdout.strip().splitlines()[-1]
    assert path.endswith(".h5") and (tmp_path / "c").samefile(path.rsplit("/", 1)[0])
    info = json.loads(cli("cache", "info", path, "--json").stdout)
    assert info["splits"]["train"]["images"] == 12  # the default taps: the last stages and the penultimate vector
    assert info["dims"] == {"blocks.3": 80, "blocks.4": 112, "blocks.5": 192, "blocks.6": 320, "pool": 1280}
    assert info["cost"]["images_per_second"] > 0
    assert cli("cache", "verify", path).stdout.strip().endswith(": ok")
    assert "complete" in cli("cache", "ls", str(tmp_path / "c")).stdout


@pytest.mark.parametrize("args, words", [
    (["--model", "vgg17", "--data", "{tree}"], ["unknown model 'vgg17'", "did you mean"]),
    (["--model", "vgg16", "--layer", "fc9", "--data", "{tree}"], ["no tap 'fc9'"]),
    (["--model", "resnet18", "--data", "{tmp}/missing"], ["does not exist"]),
    (["--model", "resnet18", "--data", "{tree}", "--batch-size", "0"], ["--batch-size"]),
    (["--model", "resnet18", "--data", "{tree}", "--device", "cuda"], ["no CUDA GPU"]),
    (["--model", "resnet18", "--data", "{tree}", "--pool", "median"], ["unknown pooling"]),
    (["--model", "resnet18", "--data", "{tree}", "--shard", "3/2"], ["--shard"]),
    # click kept the last of two values without a word
    (["--model", "resnet18", "--data", "{tree}", "--maps", "layer3", "--maps=layer4"],
     ["--maps was given 2 times ('layer3', 'layer4'); it takes one value: give it once"]),
])
def test_bad_extract_input_is_one_clear_error(tree, tmp_path, args, words):
    args = [a.format(tree=tree, tmp=tmp_path) for a in args]
    assert_clean_failure(cli("extract", *args, "--out", str(tmp_path / "c")), *words)


def test_printed_paths_are_literal_even_with_brackets(tree, tmp_path):
    out = tmp_path / "c[red]1"
    result = cli("extract", "--model", "squeezenet1_1", "--weights", "none", "--data", str(tree),
                     "--out", str(out), "--no-progress")
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1].startswith(str(out) + "/")


def test_bad_weights_files_and_workers_are_clear_errors(tree, tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x04junk")
    for args, word in [(["--weights", str(tmp_path / "garbage.pth")], "not a loadable state_dict"),
                       (["--workers", "-1"], "--workers")]:
        result = cli("extract", "--model", "squeezenet1_1", "--data", str(tree), "--out",
                         str(tmp_path / "c"), *args)
        assert_clean_failure(result, word)


def test_offline_weights_are_one_clear_error(tree, tmp_path):
    env = {"TORCH_HOME": str(tmp_path / "torch")}
    result = cli("extract", "--model", "resnet18", "--data", str(tree), "--out", str(tmp_path / "c"), env=env)
    assert_clean_failure(result, "bottleneck weights fetch resnet18", str(tmp_path / "torch"))
    fetch = cli("weights", "fetch", "vgg16", env=env)  # the advice is the next step, not this command again
    assert_clean_failure(fetch, "machine with internet, then copy", str(tmp_path / "torch"))
    assert "run 'bottleneck weights fetch vgg16'" not in fetch.stderr


def test_offline_timm_weights_are_one_clear_error_in_seconds(tree, tmp_path):
    started = time.monotonic()
    result = cli("extract", "--model", "timm:convnext_atto", "--data", str(tree), "--out", str(tmp_path / "c"),
                     env={"TORCH_HOME": str(tmp_path / "torch")})
    assert time.monotonic() - started < 30
    assert_clean_failure(result, "bottleneck weights fetch timm:convnext_atto", "huggingface.co",
                         str(tmp_path / "torch"))
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr


def test_cache_commands_refuse_what_is_not_a_cache(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    assert_clean_failure(cli("cache", "info", str(tmp_path / "junk.h5")), "not a readable HDF5 file")
    assert_clean_failure(cli("cache", "info", str(tmp_path / "none.h5")), "does not exist")
    result = cli("cache", "verify", str(tmp_path / "junk.h5"))
    assert result.returncode == 1 and "truncated or damaged" in result.stdout


def test_unwritable_output_folder_is_a_clear_error(tree, tmp_path):
    # Tests run as root in CI, where permission bits do not stop writes: a folder that is
    # really a file is the unwritable output every user can hit.
    (tmp_path / "taken").write_text("a file, not a folder")
    result = cli("extract", "--model", "squeezenet1_1", "--weights", "none", "--data", str(tree),
                     "--out", str(tmp_path / "taken" / "cache"))
    assert_clean_failure(result, str(tmp_path / "taken"))
    assert (tmp_path / "taken").read_text() == "a file, not a folder"


def test_models_table_lists_all_with_weights_state():
    result = cli("models", "--json")
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert len(rows) == 18 and all(rows[f"efficientnet_lite{n}"]["weights_available"] for n in (0, 1, 2))
    assert rows["inception_v3"]["input_size"] == 299
    assert "timm:ARCH" in cli("models").stdout
    timm_rows = json.loads(cli("models", "timm:convnext_atto", "--json").stdout)
    assert [r["name"] for r in timm_rows] == ["timm:convnext_atto"] and timm_rows[0]["taps"]["pool"] == 320


def test_the_installed_command_runs_in_a_fresh_process(tmp_path):
    # The other tests call cli.main in this process; this one runs what a user types, entry point and all.
    command = Path(sys.executable).with_name("bottleneck")
    assert command.exists(), "'pip install -e .' writes the entry point beside python"
    result = subprocess.run([str(command), "cache", "info", str(tmp_path / "none.h5")], capture_output=True,
                            text=True, timeout=300)
    assert_clean_failure(result, "does not exist")
