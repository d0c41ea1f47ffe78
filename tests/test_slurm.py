import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cli, make_tree
from slurm_cluster import SlurmCluster, Unavailable

from bottleneck import pipeline, slurm, store
from bottleneck.errors import BottleneckError


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A real single-node Slurm cluster on localhost with two fake GPUs, for the whole session."""
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except Unavailable as e:
        pytest.skip(str(e))
    except BaseException:
        c.stop()
        raise
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = c.env["SLURM_CONF"]  # for slurm.status() called in this process
    yield c
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
    c.stop()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("slurm-data") / "data", {"train": 6, "val": 2, "test": 3})


def experiment(folder: Path, data: Path, name: str, extract: bool = True, finetune: str | None = None) -> Path:
    text = f'name = "{name}"\nout = "{folder / name}"\ncache = "{folder / name}-cache"\n\n[data]\npath = "{data}"\n'
    if extract:
        text += ('\n[[backbone]]\nmodel = "efficientnet_lite0"\nlayers = ["blocks.4", "pool"]\nbatch_size = 4\n'
                 'workers = 0\n\n[fit]\nclassifiers = ["logreg", "knn"]\nlayers = ["blocks.4", "pool"]\n')
    if finetune:
        text += f'\n[[finetune]]\nmodel = "squeezenet1_1"\nweights = "none"\nbatch_size = 4\nimage_size = 64\n' \
                f'workers = 0\n{finetune}'
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def submit(cluster, path: Path, *options: str) -> list[dict]:
    result = cli("run", str(path), "--slurm", "--partition", "gpu", "--gres", "gpu:1", "--time", "00:10:00",
                     *options, env=cluster.env)
    assert result.returncode == 0, result.stderr
    assert "watch with: bottleneck status" in result.stdout
    jobs = json.loads((pipeline.load(path).out / "slurm" / "jobs.json").read_text())["jobs"]
    assert all(j["job_id"] in result.stdout for j in jobs)
    return jobs


def wait_until_done(run_dir: Path, seconds: float = 240) -> dict[str, dict]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        rows = {r["stage"]: r for r in slurm.status(run_dir)}
        if not any(r["state"].split()[0] in slurm.ACTIVE for r in rows.values()):
            return rows
        time.sleep(1)
    raise TimeoutError(f"jobs of {run_dir} still running after {seconds} s: {rows}")


def test_dry_run_prints_scripts_and_order_and_submits_nothing(tmp_path, data):
    path = experiment(tmp_path, data, "dry", finetune="epochs = 1\n")
    result = cli("run", str(path), "--slurm", "--dry-run", "--array-size", "3", "--gres", "gpu:1",
                     "--time", "1:00:00", "--setup", "module load cuda")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "#SBATCH --array=0-2" in out and '--shard "$SLURM_ARRAY_TASK_ID/3"' in out and "module load cuda" in out
    assert "#SBATCH --requeue" in out and "#SBATCH --signal=B:USR1@300" in out and out.count("--gres=gpu:1") == 2
    order = out.split("# submission order (nothing was submitted):\n")[1].splitlines()
    assert [line.split("=")[0] for line in order] == ["EXTRACT_EFFICIENTNET_LITE0", "MERGE_EFFICIENTNET_LITE0",
                                                      "FIT_EFFICIENTNET_LITE0", "FINETUNE_SQUEEZENET1_1", "COMPARE"]
    assert "--dependency=afterok:$EXTRACT_EFFICIENTNET_LITE0 " in order[1]
    assert "--dependency=afterany:$FIT_EFFICIENTNET_LITE0:$FINETUNE_SQUEEZENET1_1 " in order[4]
    assert len(list((tmp_path / "dry" / "slurm").glob("*.sbatch"))) == 5
    assert not (tmp_path / "dry" / "slurm" / "jobs.json").exists()


def test_a_fit_job_asks_for_a_gpu_only_when_one_of_its_classifiers_trains_on_one(tmp_path, data):
    scripts = {}
    for name, classifiers in (("cpu", '["logreg", "knn"]'), ("gpu", '["logreg", "linear"]')):
        path = experiment(tmp_path, data, name)
        path.write_text(path.read_text().replace('classifiers = ["logreg", "knn"]', f"classifiers = {classifiers}"))
        result = cli("run", str(path), "--slurm", "--dry-run", "--gres", "gpu:1")
        assert result.returncode == 0, result.stderr
        scripts[name] = {p.name.split("-", 1)[1]: p.read_text() for p in (tmp_path / name / "slurm").glob("*.sbatch")}
    assert "--clf linear" in scripts["gpu"]["fit-efficientnet_lite0.sbatch"]
    assert "#SBATCH --gres=gpu:1" in scripts["gpu"]["fit-efficientnet_lite0.sbatch"]
    assert "--gres" not in scripts["cpu"]["fit-efficientnet_lite0.sbatch"]
    for made in scripts.values():  # extraction asks for one either way, compare never
        assert "#SBATCH --gres=gpu:1" in made["extract-efficientnet_lite0.sbatch"]
        assert "--gres" not in made["compare.sbatch"]


def test_run_trust_reaches_the_fine_tune_jobs_and_nothing_else_trusts(tmp_path, data):
    """`run --slurm --trust` lets a fine-tune job read a pickled init_head; without it no job may."""
    (tmp_path / "old.joblib").write_bytes(b"")  # a dry run reads no model, but the file must be there
    path = experiment(tmp_path, data, "trust", extract=False, finetune=f'init_head = "{tmp_path / "old.joblib"}"\n')
    for trust in (True, False):
        scripts = [Path(r["script"]).read_text() for r in slurm.submit(path, dry_run=True, trust=trust)]
        finetune = next(s for s in scripts if "bottleneck finetune" in s)
        assert ("--trust" in finetune) is trust and sum("--trust" in s for s in scripts) == trust


def hostile(mark: str) -> str:
    """Text that runs `touch MARK` wherever a script lets the shell read it as code."""
    return f" $(touch {mark}) `touch {mark}`;touch {mark};' \"{mark}\" # {mark}"


def fake_command(folder: Path, name: str, prints: str) -> Path:
    """An executable NAME that appends its arguments to NAME.calls as a JSON line and prints PRINTS."""
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f"#!{sys.executable}\nimport json, sys\n"
                               f"with open({str(folder / f'{name}.calls')!r}, 'a') as f:\n"
                               "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
                               f"print({prints})\n")
    (folder / name).chmod(0o755)
    return folder / f"{name}.calls"


def given(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_hostile_names_and_paths_reach_the_commands_as_text_and_never_run(tmp_path):
    data = tmp_path / f"data{hostile('X')}\ntouch X\n#"
    bb, ft, name = f"bb{hostile('Y')} 100%j [*]", f"ft{hostile('W')}", f"exp{hostile('Z')}"
    out, cache = tmp_path / f"run{hostile('W')}", tmp_path / f"cache{hostile('W')}"
    path = tmp_path / f"file{hostile('Z')}\ntouch Z\n#.toml"
    path.write_text(f"name = {json.dumps(name)}\nout = {json.dumps(str(out))}\ncache = {json.dumps(str(cache))}\n"
                    f"[data]\npath = {json.dumps(str(data))}\n"
                    f'[[backbone]]\nname = {json.dumps(bb)}\nmodel = "efficientnet_lite0"\nlayers = ["pool"]\n'
                    '[fit]\nclassifiers = ["logreg"]\n'
                    f'[[finetune]]\nname = {json.dumps(ft)}\nmodel = "squeezenet1_1"\nweights = "none"\n')
    fakes = tmp_path / "bin"
    submitted = fake_command(fakes, "sbatch", "sum(1 for _ in open(f.name))")  # job ids 1, 2, ...
    ran = fake_command(fakes, "bottleneck", "'/made/by/' + sys.argv[1]")
    env = {"PATH": f"{fakes}:{os.environ['PATH']}"}
    result = cli("run", str(path), "--slurm", "--array-size", "2", "--setup", "echo ready", env=env)
    assert result.returncode == 0, result.stderr

    scripts = sorted((out / "slurm").glob("*.sbatch"))
    assert [call[-1] for call in map(json.loads, submitted.read_text().splitlines())] == [str(s) for s in scripts]
    here = tmp_path / "cwd"
    here.mkdir()
    runs = []
    for script in scripts:  # as Slurm would: in submission order, each array task once
        for task in ["0", "1"] if "#SBATCH --array=" in script.read_text() else [None]:
            runs.append(subprocess.run(["bash", str(script)], cwd=here, capture_output=True, text=True, timeout=60,
                                       env={**os.environ, **env, "SLURM_JOB_ID": "1",
                                            **({"SLURM_ARRAY_TASK_ID": task} if task else {})}))
    assert not [p for p in tmp_path.rglob("*") if p.name in ("X", "Y", "Z", "W")]
    assert all(r.returncode == 0 and r.stdout.startswith("ready") for r in runs), runs
    for script in scripts:
        head = script.read_text().split("set -euo pipefail\n")[0].splitlines()
        assert all(line.startswith("#") for line in head), head  # nothing runs before the directives end
        sbatch = dict(shlex.split(line[len("#SBATCH "):])[0].lstrip("-").partition("=")[::2]
                      for line in head if line.startswith("#SBATCH "))
        assert re.fullmatch(r"[\w.-]+", sbatch["job-name"]) and sbatch["job-name"].startswith("exp_")
        assert sbatch["output"].startswith(str(out / "slurm" / "logs" / "")) and sbatch["chdir"] == os.getcwd()

    calls = [json.loads(line) for line in ran.read_text().splitlines()]
    assert [c[0] for c in calls] == ["extract", "extract", "cache", "fit", "finetune", "compare"]
    extract, fit, finetune = calls[0], calls[3], calls[4]
    assert given(extract, "--data") == str(data) and given(extract, "--out") == str(cache)
    assert [given(c, "--shard") for c in calls[:2]] == ["0/2", "1/2"]
    assert [(out / "caches" / f"{bb}.shard-{i}.path").read_text() for i in (0, 1)] == ["/made/by/extract\n"] * 2
    assert calls[2] == ["cache", "merge", "/made/by/extract", "/made/by/extract"]
    assert (out / "caches" / f"{bb}.path").read_text() == "/made/by/cache\n"
    assert given(fit, "--features") == "/made/by/cache" and given(fit, "--out") == str(out / "fit" / bb)
    assert "--reuse" in fit and "--force" not in fit  # a finished fit of this cache is kept, as `run` keeps it
    assert given(finetune, "--data") == str(data) and given(finetune, "--out") == str(out / "finetune" / ft)
    assert calls[5] == ["compare", "--", str(out)]
    status = {r["stage"]: r for r in slurm.status(out)}
    assert status[f"extract-{bb}"]["output"] == "done: 2 shards"
    assert status[f"extract-{bb}"]["log"] == str(out / "slurm" / "logs" / f"extract-{bb}-1_*.out")


@pytest.mark.slow
def test_real_sbatch_reads_the_directives_of_hostile_names_as_written(cluster, tmp_path, data):
    # sbatch reads #SBATCH lines with its own rules (quotes, escapes, '#' comments), not bash's; Slurm then
    # expands %j in --output. Run the directives as written, with a body that only reports where it ran.
    out, bb = tmp_path / f"run{hostile('W')} 5%j", f"bb{hostile('Y')} 100%"
    path = tmp_path / "real.toml"
    path.write_text(f"name = {json.dumps('exp' + hostile('Z'))}\nout = {json.dumps(str(out))}\n"
                    f"[data]\npath = {json.dumps(str(data))}\n"
                    f'[[backbone]]\nname = {json.dumps(bb)}\nmodel = "efficientnet_lite0"\n')
    logs = []
    for row in slurm.submit(path, array_size=1, dry_run=True):
        script = Path(row["script"])
        script.write_text(script.read_text().split("set -euo pipefail\n")[0] + 'echo "$PWD"; echo "$SLURM_JOB_NAME"\n')
        submitted = cluster.run("sbatch", "--parsable", str(script))
        assert submitted.returncode == 0, submitted.stderr
        job = submitted.stdout.strip().split(";")[0]
        logs.append(out / "slurm" / "logs" / f"{row['stage']}-{job}.out")
    deadline = time.monotonic() + 60
    while not all(log.is_file() and log.read_text().count("\n") == 2 for log in logs) and time.monotonic() < deadline:
        time.sleep(0.5)
    for log in logs:
        where, name = log.read_text().splitlines()
        assert where == os.getcwd() and re.fullmatch(r"exp_touch_Z_touch_Z_touch_Z_Z_Z-[\w.-]+", name)
    assert len({log.read_text() for log in logs}) == len(logs) == 2  # extract and compare, each its own job name
    assert not [p for p in tmp_path.rglob("*") if p.name in ("X", "Y", "Z", "W")]


@pytest.mark.parametrize("option, value", [("partition", "gpu\ntouch V"), ("account", "lab\r"),
                                           ("gres", "gpu:1\x1b[2J"), ("time", "1:00:00\n"),
                                           ("mem", "32G\n#SBATCH --partition=x")])
def test_sbatch_options_with_line_breaks_or_control_characters_are_refused(tmp_path, data, option, value):
    path = experiment(tmp_path, data, "opts")
    with pytest.raises(BottleneckError) as e:
        slurm.submit(path, dry_run=True, **{option: value})
    assert str(e.value).startswith(f"--{option} {value!r} holds a control character") and "\n" not in str(e.value)
    assert not (tmp_path / "opts").exists()


def test_a_run_folder_with_a_line_break_is_refused_for_slurm(tmp_path, data):
    path = experiment(tmp_path, data, "outs")
    path.write_text(path.read_text().replace(f'out = "{tmp_path / "outs"}"', f'out = "{tmp_path}/x\\ntouch V"'))
    with pytest.raises(BottleneckError) as e:
        slurm.submit(path, dry_run=True)
    assert str(e.value).startswith(f"{path}: out '{tmp_path}/x\\ntouch V' holds a control character")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outs.toml"]


@pytest.mark.slow
def test_pipeline_on_slurm_equals_a_local_run(cluster, tmp_path, data):
    finetune = "head_epochs = 0\nepochs = 1\n" if _can_finetune() else None
    path = experiment(tmp_path, data, "batch", finetune=finetune)
    jobs = submit(cluster, path, "--array-size", "2")
    assert [j["stage"] for j in jobs][:3] == ["extract-efficientnet_lite0", "merge-efficientnet_lite0",
                                              "fit-efficientnet_lite0"]
    rows = wait_until_done(tmp_path / "batch")
    assert all(r["state"] == "COMPLETED" for r in rows.values()), rows
    assert all(r["output"].startswith("done") for r in rows.values()), rows
    assert rows["extract-efficientnet_lite0"]["output"].startswith("done: 2 shards")

    local = pipeline.load(experiment(tmp_path, data, "here", finetune=finetune))
    pipeline.run(local.file, progress=False)
    merged = Path((tmp_path / "batch" / "caches" / "efficientnet_lite0.path").read_text().strip())
    here = Path((tmp_path / "here" / "caches" / "efficientnet_lite0.path").read_text().strip())
    assert merged.name == here.name and merged.parent != here.parent
    assert store.contents_equal(merged, here) and store.verify(merged) == []
    for report in sorted((tmp_path / "here" / "fit").rglob("report.json")):
        theirs = json.loads((tmp_path / "batch" / report.relative_to(tmp_path / "here")).read_text())
        mine = json.loads(report.read_text())
        assert {k: theirs[k] for k in ("accuracy", "confusion_matrix", "per_class", "params")} == \
            {k: mine[k] for k in ("accuracy", "confusion_matrix", "per_class", "params")}
    table = (tmp_path / "batch" / "comparison.md").read_text()
    assert table.count("| fixed features |") == 4 and table.count("| fine-tune |") == (1 if finetune else 0)

    status = cli("status", str(tmp_path / "batch"), env=cluster.env)
    assert status.returncode == 0 and status.stdout.count("COMPLETED") == len(jobs)
    log = Path(rows["fit-efficientnet_lite0"]["log"])
    assert log.is_file() and "logreg on blocks.4: test accuracy" in log.read_text()


@pytest.mark.slow
def test_a_failed_job_and_its_cancelled_dependents_show_in_status(cluster, tmp_path, data):
    path = experiment(tmp_path, data, "broken")
    submit(cluster, path, "--array-size", "2", "--setup", "echo 'no such module' >&2; exit 3")
    rows = wait_until_done(tmp_path / "broken", seconds=60)
    assert rows["extract-efficientnet_lite0"]["state"].startswith("FAILED")
    assert rows["merge-efficientnet_lite0"]["state"].startswith("CANCELLED")
    assert rows["fit-efficientnet_lite0"]["state"].startswith("CANCELLED")
    log = next(Path(rows["extract-efficientnet_lite0"]["log"]).parent.glob("extract-*_0.out"))
    assert "no such module" in log.read_text()


@pytest.mark.slow
def test_requeued_finetune_job_resumes_from_its_checkpoint(cluster, tmp_path):
    data = make_tree(tmp_path / "data", {"train": 8, "val": 2, "test": 2})
    path = experiment(tmp_path, data, "requeue", extract=False, finetune="head_epochs = 0\nepochs = 12\n"
                                                                          "patience = 100\n")
    jobs = submit(cluster, path)
    job = next(j for j in jobs if j["stage"] == "finetune-squeezenet1_1")
    checkpoint = tmp_path / "requeue" / "finetune" / "squeezenet1_1" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert checkpoint.exists(), "the fine-tune never saved a checkpoint"
    cluster.run("scontrol", "requeue", job["job_id"], check=True)
    # Slurm holds a requeued job back for two minutes (BeginTime); let it start again at once.
    assert wait_for_state(cluster, job["job_id"], "PENDING")
    cluster.run("scontrol", "update", f"JobId={job['job_id']}", "StartTime=now", check=True)
    rows = wait_until_done(tmp_path / "requeue", seconds=300)
    assert rows["finetune-squeezenet1_1"]["state"] == "COMPLETED"
    restarts = re.search(r"Restarts=(\d+)", cluster.run("scontrol", "show", "job", job["job_id"]).stdout)
    assert int(restarts.group(1)) == 1
    log = Path(job["log"]).read_text()
    assert re.search(r"resuming \S+ at epoch \d+", log), log  # from the checkpoint, not from the start
    report = json.loads((checkpoint.parent / "report.json").read_text())
    assert report["stage"] == "finetune" and not checkpoint.exists()


def wait_for_state(cluster, job_id: str, state: str, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if f"JobState={state}" in cluster.run("scontrol", "show", "job", job_id).stdout:
            return True
        time.sleep(0.25)
    return False


def _can_finetune() -> bool:
    try:
        import bottleneck.finetune  # noqa: F401
    except ImportError:
        return False
    return True
