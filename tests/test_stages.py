"""The stages are declared once (bottleneck/stages.py); the commands, the package's functions and
status's words on outputs come from those rows."""

from __future__ import annotations

import typer

import bottleneck
from bottleneck import cli, settings, slurm, stages


def test_every_row_names_its_function_its_settings_and_its_command():
    commands = typer.main.get_command(cli.app).commands
    for stage in stages.STAGES:
        func = stage.entry()
        assert getattr(bottleneck, stage.command) is func  # the package export
        assert stage.command in commands
        if stage.settings:  # the function takes the row's settings, and the command has one option per field
            assert func.settings is stage.settings
            assert {p.name for p in commands[stage.command].params} == set(stage.settings.__dataclass_fields__)
    assert list(stages.BY_COMMAND) == ["extract", "fit", "finetune", "compare"]


def test_the_properties_slurm_reads_are_the_stages_own():
    by = stages.BY_COMMAND
    assert [s.command for s in stages.STAGES if s.needs_gpu is True] == ["extract", "finetune"]
    fits = {clf: settings.FitSettings(features="x.h5", clf=clf) for clf in ("logreg", "svm", "linear")}
    # a fit job asks for a GPU when one of its classifiers trains on one
    assert by["fit"].asks_gpu((fits["logreg"], fits["linear"]))
    assert not by["fit"].asks_gpu((fits["logreg"], fits["svm"]))
    assert by["extract"].asks_gpu(()) and not by["compare"].asks_gpu(({"run_dirs": []},))
    assert [s.command for s in stages.STAGES if s.shards] == ["extract"]
    assert [s.command for s in stages.STAGES if s.requeues] == ["finetune"]
    assert by["compare"].after_failures and by["compare"].settings is None


def test_status_words_on_what_a_step_left(tmp_path):
    record, report = tmp_path / "x.path", tmp_path / "ft" / "report.json"
    assert stages.cache_made((record,)) == "missing"
    record.write_text("cache/x.h5\n")
    assert stages.cache_made((record,)) == "done: cache/x.h5"
    assert stages.run_made((report,)) == "missing"
    report.parent.mkdir()
    (report.parent / "checkpoint.pt").write_bytes(b"")
    assert stages.run_made((report,)) == "checkpoint"
    report.write_text("{}")
    assert stages.run_made((report,)) == "done: report.json"
    reports = (tmp_path / "a.json", report)
    assert stages.reports_made(reports) == "1/2 reports"
    reports[0].write_text("{}")
    assert stages.reports_made(reports) == "done: 2/2 reports"


def test_a_job_command_gives_only_what_differs_from_the_defaults():
    fit = settings.FitSettings(features="c.h5", clf="logreg", search=True, seed=3)
    assert slurm.command("fit", fit.asdict()) == "bottleneck fit --features c.h5 --seed 3"
    options = settings.SlurmOptions(array_size=2).validate()
    assert (options.array_size, options.partition) == (2, None)
