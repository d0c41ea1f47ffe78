"""Start-up: importing the package, or asking a command for help, loads none of the heavy libraries.

Each check runs in a fresh interpreter, since a test process has long imported torch itself.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "sklearn", "h5py")

# Runs the command line in-process with ARGV, then prints which heavy libraries got loaded.
CLI = """
import json, sys
sys.argv = ["bottleneck", *json.loads(sys.argv[1])]
from bottleneck.cli import main
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)))
"""


def loaded_after(code: str, *args: str) -> list[str]:
    """The heavy libraries in sys.modules after running `code` in a new interpreter (its last line of output)."""
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_the_package_loads_no_heavy_library():
    code = ("import json, sys\nimport bottleneck, bottleneck.settings, bottleneck.cli\n"
            f"print(json.dumps(sorted(m for m in {HEAVY} if m in sys.modules)))")
    assert loaded_after(code) == []


@pytest.mark.parametrize("argv", [["--help"], ["status", "--help"], ["run", "--help"], ["extract", "--help"],
                                  ["fit", "--help"], ["finetune", "--help"], ["models", "--help"],
                                  ["cache", "ls", "--help"]])
def test_help_loads_no_heavy_library(argv):
    assert loaded_after(CLI.format(heavy=HEAVY), json.dumps(argv)) == []


def test_cache_ls_loads_no_torch(tmp_path):
    assert loaded_after(CLI.format(heavy=HEAVY), json.dumps(["cache", "ls", str(tmp_path)])) == ["h5py"]


def test_the_stage_functions_load_on_first_use():
    code = ("import json, sys\nimport bottleneck\nbefore = 'bottleneck.compare' in sys.modules\n"
            "from bottleneck import compare\nimport bottleneck.compare as module\n"
            "print(json.dumps([before, callable(compare), module is compare, bottleneck.compare is compare]))")
    assert loaded_after(code) == [False, True, True, True]  # the function answers to the name, as it always did


def test_help_of_the_installed_module_names_the_commands():
    result = subprocess.run([sys.executable, "-m", "bottleneck", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "extract" in result.stdout and "status" in result.stdout


def test_settings_knows_every_classifier_without_loading_scikit_learn():
    from bottleneck import classifiers, settings

    assert settings.CLASSIFIERS == tuple(classifiers.TABLE)
    assert settings.GPU_CLASSIFIERS == tuple(name for name, c in classifiers.TABLE.items() if c.gpu)


def test_status_of_a_run_loads_no_heavy_library(tmp_path):
    from pathlib import Path

    run = tmp_path / "runs" / "elpv"
    run.mkdir(parents=True)
    text = (Path(__file__).parent.parent / "pipelines" / "elpv.toml").read_text()
    (run / "experiment.toml").write_text(text.replace('out = "runs/elpv"', f'out = "{run}"'))
    assert loaded_after(CLI.format(heavy=HEAVY), json.dumps(["status", str(run)])) == []
