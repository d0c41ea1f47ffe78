import json
from pathlib import Path

import pytest
from conftest import cli, make_tree

from bottleneck import pipeline
from bottleneck.errors import BottleneckError

ROOT = Path(__file__).resolve().parent.parent


def experiment(tmp_path: Path, data: Path, finetune: str = "") -> Path:
    """A small experiment: Lite0 with two taps, two quick classifiers, optional fine-tuning."""
    path = tmp_path / "tiny.toml"
    path.write_text(f"""
name = "tiny"
out = "{tmp_path / 'run'}"
cache = "{tmp_path / 'cache'}"

[data]
path = "{data}"

[[backbone]]
model = "efficientnet_lite0"
layers = ["blocks.4", "pool"]
batch_size = 8
workers = 0

[fit]
classifiers = ["logreg", "knn"]
layers = ["blocks.4", "pool"]
search = false
{finetune}""")
    return path


@pytest.mark.parametrize("shipped", ["elpv", "elpv-paths", "catsdogs"])
def test_shipped_experiments_are_valid(shipped):
    exp = pipeline.load(ROOT / "pipelines" / f"{shipped}.toml")
    assert exp.backbones and exp.fit and exp.finetunes and exp.out == Path("runs") / shipped


GOOD = """\
name = "x"

[data]
path = "data/x"

[[backbone]]
model = "efficientnet_lite0"
layers = ["blocks.4"]

[fit]
classifiers = ["logreg"]
"""


@pytest.mark.parametrize("old, new, words", [
    ('name = "x"', 'name = "x', ["not valid TOML", "line 1"]),
    ('name = "x"', 'name = "x"\nouts = "runs"', ["line 2", "outs: unknown key"]),
    ('model = "efficientnet_lite0"', 'model = "efficientnet_lit0"',
     ["line 7", "[[backbone]] #1 model", "did you mean 'efficientnet_lite0'"]),
    ('layers = ["blocks.4"]', 'layers = ["blocks.9"]', ["line 8", "layers", "no tap 'blocks.9'"]),
    ('layers = ["blocks.4"]', 'layers = "blocks.4"', ["line 8", "must be a list of strings"]),
    ('layers = ["blocks.4"]', 'layers = ["blocks.4"]\nbatch_size = "64"', ["line 9", "batch_size: must be an integer"]),
    ('classifiers = ["logreg"]', 'classifiers = ["forest"]', ["line 11", "[fit] classifiers", "unknown classifier"]),
    ('classifiers = ["logreg"]', 'classifiers = ["logreg"]\nlayers = ["pool"]', ["line 12", "does not extract pool"]),
    ('path = "data/x"', 'path = "data/x"\nbuiltin = "mnist"', ["line 5", "unknown dataset 'mnist'"]),
    ('path = "data/x"', 'path = "data/x"\nbuiltin = "elpv"\nlabels = "3"', ["[data] labels", "elpv's labelling"]),
    ('path = "data/x"', 'path = "data/x"\nlabels = "4"', ["[data] labels", "with builtin = \"elpv\""]),
    ('[data]\npath = "data/x"', '[data]', ["line 3", "[data]: needs path"]),
    ('[[backbone]]', '[backbone]', ["line 6", "write [[backbone]] (double brackets)"]),
    ('[fit]', '[[finetune]]\nmodel = "resnet18"\nepoch = 3\n[fit]', ["line 12", "[[finetune]] #1 epoch: unknown key"]),
])
def test_a_bad_file_is_one_error_naming_key_and_line(tmp_path, old, new, words):
    path, message = load_error(tmp_path, old, new)
    for word in words:
        assert word in message
    assert message.startswith(str(path))


def load_error(tmp_path: Path, old: str, new: str) -> tuple[Path, str]:
    """GOOD with `old` replaced by `new`, written to a file: the file and the message load() refuses it with."""
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace(old, new, 1))
    with pytest.raises(BottleneckError) as e:
        pipeline.load(path)
    return path, str(e.value)


@pytest.mark.parametrize("old, new, words", [
    ('name = "x"', r'name = "exp\ntouch Z\n#"', ["line 1", ": name: 'exp\\ntouch Z\\n#' holds a control character"]),
    ('name = "x"', r'name = "x\u001b[2J"', ["line 1", ": name: ", "holds a control character"]),
    ('name = "x"', 'name = "../x"', ["line 1", ": name: '../x' holds a path separator"]),
    ('name = "x"', 'name = ".."', ["line 1", ": name: '..' is not a folder name"]),
    ('[[backbone]]', '[[backbone]]\nname = "../../../x"',
     ["line 7", "[[backbone]] #1 name: '../../../x' holds a path separator"]),
    ('[[backbone]]', '[[backbone]]\nname = "/tmp/x"', ["line 7", "[[backbone]] #1 name: '/tmp/x' holds a path"]),
    ('[[backbone]]', '[[backbone]]\nname = "a\\\\b"', ["line 7", "[[backbone]] #1 name: 'a\\\\b' holds a path"]),
    ('[[backbone]]', '[[backbone]]\nname = "."', ["line 7", "[[backbone]] #1 name: '.' is not a folder name"]),
    ('[[backbone]]', '[[backbone]]\nname = ""', ["line 7", "[[backbone]] #1 name: '' is not a folder name"]),
    ('[[backbone]]', '[[backbone]]\nname = "bb\\r\\n#SBATCH --x"', ["line 7", "[[backbone]] #1 name", "control"]),
    ('[fit]', '[[finetune]]\nmodel = "resnet18"\nname = "/tmp/x"\n[fit]',
     ["line 12", "[[finetune]] #1 name: '/tmp/x' holds a path separator"]),
    ('[fit]', '[[finetune]]\nmodel = "resnet18"\nname = "ft\tx"\n[fit]',
     ["line 12", "[[finetune]] #1 name: 'ft\\tx' holds a control character"]),
    ('[fit]', '[[finetune]]\nmodel = "resnet18"\nname = ".."\n[fit]', ["line 12", "[[finetune]] #1 name: '..' is"]),
])
def test_a_name_that_is_no_plain_folder_name_is_refused_naming_key_and_line(tmp_path, old, new, words):
    path, message = load_error(tmp_path, old, new)
    assert message.startswith(f"{path}, ") and "\n" not in message and "set name = " in message
    for word in words:
        assert word in message


def test_a_file_name_that_is_no_plain_folder_name_needs_a_name_key(tmp_path):
    path = tmp_path / "bad\tname.toml"
    path.write_text(GOOD.replace('name = "x"\n', ""))
    with pytest.raises(BottleneckError) as e:
        pipeline.load(path)
    assert str(e.value) == (f"{path}: name: 'bad\\tname' holds a control character; a name becomes a folder and a "
                            "job name, so set name = \"...\" to letters, digits, '-', '_' and '.'")
    path.write_text(GOOD.replace('name = "x"', 'name = "fine name $(not run)"'))
    assert pipeline.load(path).name == "fine name $(not run)"


def test_run_does_every_stage_then_skips_what_is_done(tmp_path):
    data = make_tree(tmp_path / "data", {"train": 6, "val": 2, "test": 3})
    path = experiment(tmp_path, data)
    result = cli("run", str(path), "--no-progress")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("**Verdict:** no verdict: no fine-tune result")  # none in this experiment
    table = lines[lines.index(next(x for x in lines if x.startswith("| method"))):]
    assert table[0].startswith("| method | backbone | tap | classifier | runs | validation accuracy")
    assert len(table) == 2 + 4
    run = tmp_path / "run"
    cache = Path((run / "caches" / "efficientnet_lite0.path").read_text().strip())
    reports = sorted(run.glob("fit/efficientnet_lite0/*/report.json"))
    assert [p.parent.name for p in reports] == ["blocks.4-knn", "blocks.4-logreg", "pool-knn", "pool-logreg"]
    assert all(json.loads(p.read_text())["cache"]["path"] == str(cache) for p in reports)
    assert {f.name for f in run.iterdir()} >= {"experiment.toml", "comparison.md", "comparison.csv",
                                              "comparison.json", "comparison.png"}
    stamps = [p.stat().st_mtime_ns for p in [cache, *reports]]

    again = cli("run", str(path), "--no-progress")
    assert again.returncode == 0 and again.stdout == result.stdout
    assert "reusing complete cache" in again.stderr and again.stderr.count("done before") == 4
    assert [p.stat().st_mtime_ns for p in [cache, *reports]] == stamps

    status = cli("status", str(run), "--json")
    rows = {r["stage"]: r for r in json.loads(status.stdout)}
    assert list(rows) == ["extract-efficientnet_lite0", "fit-efficientnet_lite0", "compare"]
    assert all(r["state"] == "done" for r in rows.values()) and rows["fit-efficientnet_lite0"]["output"] == \
        "done: 4/4 reports"


def test_changed_fit_settings_fit_again(tmp_path):
    data = make_tree(tmp_path / "data", {"train": 6, "test": 3})
    path = experiment(tmp_path, data)
    pipeline.run(path, progress=False)
    report = tmp_path / "run" / "fit" / "efficientnet_lite0" / "pool-logreg" / "report.json"
    assert json.loads(report.read_text())["search"] is None
    path.write_text(path.read_text().replace('classifiers = ["logreg", "knn"]', 'classifiers = ["logreg"]')
                    .replace("search = false", "search = true"))
    pipeline.run(path, progress=False)
    searched = report.parent.with_name("pool-logreg-search") / "report.json"  # its own folder: nothing replaced
    assert json.loads(searched.read_text())["search"]["chosen"]["cv"] == "2 × 5-fold stratified CV on train"
    assert json.loads(report.read_text())["search"] is None


def test_run_fine_tunes_and_compares_it_with_the_classifiers(tmp_path):
    data = make_tree(tmp_path / "data", {"train": 6, "val": 2, "test": 3})
    path = experiment(tmp_path, data, finetune="""
[[finetune]]
model = "squeezenet1_1"
weights = "none"
head_epochs = 0
epochs = 1
batch_size = 4
image_size = 64
workers = 0
""")
    comparison = pipeline.run(path, progress=False)
    result = json.loads(comparison.with_suffix(".json").read_text())
    rows = result["rows"]  # [data] splits the fine-tune as it splits extract: one test set, one table
    tuned = [r for r in rows if r["method"] == "fine-tune"]
    assert len(rows) == 5 and len(tuned) == 1 and tuned[0]["backbone"] == "squeezenet1_1" and not result["apart"]
    assert tuned[0]["cost_seconds"] > 0 and tuned[0]["p_value"] is not None
    assert "test images" in result["verdict"] and (comparison.parent / "report.html").is_file()
    assert pipeline.run(path, progress=False) == comparison  # the finished fine-tune is not repeated

    saved = (tmp_path / "run" / "experiment.toml").read_text()
    path.write_text(path.read_text().replace("epochs = 1", "epochs = 1\nlr = 0.01"))
    with pytest.raises(BottleneckError, match=r"made with other settings \(lr\); rerun with --force"):
        pipeline.run(path, progress=False)
    assert (tmp_path / "run" / "experiment.toml").read_text() == saved  # the folder still says what it holds
    report = tmp_path / "run" / "finetune" / "squeezenet1_1" / "report.json"
    pipeline.run(path, force=True, progress=False)
    assert json.loads(report.read_text())["params"]["lr"] == 0.01
    assert "lr = 0.01" in (tmp_path / "run" / "experiment.toml").read_text()


def test_run_refuses_slurm_options_without_slurm(tmp_path):
    result = cli("run", str(ROOT / "pipelines" / "elpv.toml"), "--partition", "gpu")
    assert result.returncode != 0 and "--partition only apply with --slurm" in result.stderr


def test_seeds_repeat_a_configuration_on_the_same_split(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text(GOOD.replace('classifiers = ["logreg"]', 'classifiers = ["logreg"]\nseeds = [0, 1]')
                    + '\n[[finetune]]\nmodel = "squeezenet1_1"\nseeds = [0, 2]\n')
    exp = pipeline.load(path)
    assert [(ft["name"], ft["seed"]) for ft in exp.finetunes] == [("squeezenet1_1-seed0", 0),
                                                                  ("squeezenet1_1-seed2", 2)]
    ft = pipeline.finetune_settings(exp, exp.finetunes[1])
    assert ft.seed == 2 and ft.split_seed == 0  # the training seed moves, the split stays
    reports = [pipeline.fit_report(a).parent.name for a in pipeline.fit_settings(exp, exp.backbones[0])]
    assert reports == ["auto-logreg-search", "auto-logreg-search-seed1"]  # by default: tap chosen on val, searched
    for bad in ("[0, 0]", '["a"]', "[]", "[-1]"):
        path.write_text(GOOD + f'\n[[finetune]]\nmodel = "squeezenet1_1"\nseeds = {bad}\n')
        with pytest.raises(BottleneckError, match="seeds: must be a list of distinct non-negative integers"):
            pipeline.load(path)


def test_lpft_from_the_experiments_own_probe(tmp_path):
    from bottleneck import slurm

    path = tmp_path / "x.toml"
    path.write_text(GOOD.replace('layers = ["blocks.4"]', 'layers = ["blocks.4", "pool"]')
                    + '\n[[finetune]]\nmodel = "efficientnet_lite0"\nname = "lpft"\ninit_head = "probe"\n')
    exp = pipeline.load(path)
    fits = pipeline.fit_settings(exp, exp.backbones[0])
    probe = {"clf": "logreg", "layer": "pool", "search": True, "class_weight": None, "seed": 0,
             "out": str(exp.out / "fit" / "efficientnet_lite0")}
    assert {k: getattr(fits[-1], k) for k in probe} == probe and len(fits) == 2  # [fit]'s auto fit, then the probe
    ft = pipeline.finetune_settings(exp, exp.finetunes[0])
    assert ft.init_head == str(pipeline.fit_report(fits[-1]).parent / "model.skops")
    jobs = {j.stage: j for j in slurm.plan(exp, slurm.SlurmOptions())}
    assert jobs["finetune-lpft"].after == ["fit-efficientnet_lite0"]  # the job waits for its probe
    no_fit = GOOD.replace('layers = ["blocks.4"]', 'layers = ["pool"]').split("[fit]")[0]
    path.write_text(no_fit + '[[finetune]]\nmodel = "efficientnet_lite0"\ninit_head = "probe"\n')
    exp = pipeline.load(path)  # no [fit]: the probe is the only fit
    assert [a.layer for a in pipeline.fit_settings(exp, exp.backbones[0])] == ["pool"]
    assert [j.stage for j in slurm.plan(exp, slurm.SlurmOptions(array_size=1))] == [
        "extract-efficientnet_lite0", "fit-efficientnet_lite0", "finetune-efficientnet_lite0", "compare"]
    path.write_text(GOOD + '\n[[finetune]]\nmodel = "efficientnet_lite0"\ninit_head = "probe"\n')
    with pytest.raises(BottleneckError, match="init_head.*no .* of model efficientnet_lite0 extracts pool"):
        pipeline.load(path)


def test_a_top_fine_tune_trains_on_the_maps_of_the_experiments_own_cache(tmp_path, monkeypatch):
    from bottleneck import slurm

    monkeypatch.chdir(tmp_path)  # the run folder is relative

    path = tmp_path / "x.toml"
    maps = ('\n[[backbone]]\nmodel = "efficientnet_lite0"\nname = "maps"\nlayers = ["pool"]\nmaps = "blocks.5"\n'
            'fit = false\n')
    top = '\n[[finetune]]\nmodel = "efficientnet_lite0"\nname = "top"\nfrom_cache = "maps"\n'
    path.write_text(GOOD + maps + top)
    exp = pipeline.load(path)
    record = pipeline.cache_record(exp, exp.backbones[1])
    assert pipeline.finetune_settings(exp, exp.finetunes[0]).from_cache == str(record)  # before extraction
    record.parent.mkdir(parents=True)
    record.write_text("cache/made.h5\n")
    assert pipeline.finetune_settings(exp, exp.finetunes[0]).from_cache == "cache/made.h5"
    jobs = {j.stage: j for j in slurm.plan(exp, slurm.SlurmOptions())}
    assert jobs["finetune-top"].after == ["merge-maps"]  # the job waits for the cache it reads
    assert "fit-maps" not in jobs and pipeline.fit_settings(exp, exp.backbones[1]) == []  # fit = false
    assert f"--from-cache \"$(cat {record})\"" in jobs["finetune-top"].script
    path.write_text(GOOD + maps.replace("fit = false", 'fit = ["logreg"]') + top)
    exp = pipeline.load(path)
    assert [a.clf for a in pipeline.fit_settings(exp, exp.backbones[1])] == ["logreg"]
    for table, words in [(GOOD + maps.replace("fit = false", 'fit = "yes"'), "must be true, false or a list"),
                         (GOOD + top, "names no \\[\\[backbone\\]\\]"),
                         (GOOD + top.replace('"maps"', '"efficientnet_lite0"'), "keep a tap's maps")]:
        path.write_text(table)
        with pytest.raises(BottleneckError, match=f"(from_cache|fit).*{words}"):
            pipeline.load(path)


def test_a_target_in_fit_and_finetune_tables_reaches_every_fit_the_probe_and_the_fine_tune(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text(GOOD.replace('layers = ["blocks.4"]', 'layers = ["blocks.4", "pool"]')
                    .replace('classifiers = ["logreg"]', 'classifiers = ["logreg"]\ntarget = "recall:dogs=0.9"')
                    + '\n[[finetune]]\nmodel = "efficientnet_lite0"\ninit_head = "probe"\n'
                    'target = "precision:dogs=0.8"\n')
    exp = pipeline.load(path)
    assert [a.target for a in pipeline.fit_settings(exp, exp.backbones[0])] == ["recall:dogs=0.9"] * 2
    assert pipeline.finetune_settings(exp, exp.finetunes[0]).target == "precision:dogs=0.8"
    message = load_error(tmp_path, 'classifiers = ["logreg"]', 'classifiers = ["logreg"]\ntarget = "f1:dogs=2"')[1]
    assert "line 12" in message and "target" in message and "is not MEASURE:CLASS=VALUE" in message


@pytest.mark.parametrize("head, words", [
    ('""', ["line 15", "[[finetune]] #1 init_head", "--init-head is empty"]),  # was silently no LP-FT
    ('"runs/missing/model.joblib"', ["line 15", "init_head: 'runs/missing/model.joblib' is not a file"]),
])
def test_an_init_head_that_is_empty_or_no_file_is_refused_when_the_file_is_read(tmp_path, head, words):
    new = f'classifiers = ["logreg"]\n\n[[finetune]]\nmodel = "efficientnet_lite0"\ninit_head = {head}\n'
    path, message = load_error(tmp_path, 'classifiers = ["logreg"]\n', new)
    for word in words:
        assert word in message
    from bottleneck import slurm

    with pytest.raises(BottleneckError, match="init_head"):  # run --slurm --dry-run reads it the same way
        slurm.submit(path, dry_run=True)
