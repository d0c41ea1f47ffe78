"""An experiment as Slurm batch jobs: readable sbatch scripts in the run folder, submitted with dependencies.

    extract (job array, one shard per task) ──afterok──▶ merge ──afterok──▶ fit ──┐
    finetune (GPU, requeued from its checkpoint when time runs out) ──────────────┴─afterany─▶ compare

The scripts hold the same `bottleneck` commands a user would type; how a stage skips work
it already did is the command's own business. Jobs tell each other which cache they made
through small files in RUN/caches/, because a cache's name depends on the compute node
(its precision is resolved there). `docs/slurm.md` explains running this on a real cluster.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path

from bottleneck import pipeline, settings
from bottleneck.errors import BottleneckError
from bottleneck.settings import SlurmOptions
from bottleneck.stages import BY_COMMAND

# bottleneck finetune exits with this after saving a checkpoint on SIGUSR1/SIGTERM (EX_TEMPFAIL).
REQUEUE_EXIT = 75
SIGNAL_LEAD_SECONDS = 300
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}


class Shell(str):
    """Shell text of our own ($SLURM_ARRAY_TASK_ID, $CACHE) that goes into a script unquoted; never a user's value."""


@dataclass
class Job:
    stage: str
    script: str
    log: str
    after: list[str] = field(default_factory=list)
    dependency: str = "afterok"


# --------------------------------------------------------------------------- writing the scripts

def plan(exp: pipeline.Experiment, opts: SlurmOptions) -> list[Job]:
    """Every job of an experiment in submission order: one per step of pipeline.steps, two for a
    stage that shards (an array, then its merge)."""
    jobs, last = [], {}  # last: the job that finishes each step (an array's merge job)
    for step in pipeline.steps(exp):
        made = step_jobs(exp, step, opts)
        for job in made[:1]:
            job.after = [last[name] for name in step.after]
        jobs += made
        last[step.name] = made[-1].stage
    return jobs


def step_jobs(exp: pipeline.Experiment, step: pipeline.Step, opts: SlurmOptions) -> list[Job]:
    """A step's job: `bottleneck COMMAND` for each of its calls, the paths earlier jobs wrote read from
    their records; an array and a merge for a stage that shards, a requeue wrapper for one that requeues."""
    stage = step.stage
    known = {name: Shell(f'"$(cat {_q(record)})"') for name, record in step.reads}  # written by earlier jobs
    runs = [command(stage.command, pipeline.arguments(call, progress=False) | known) for call in step.calls]
    if stage.shards and opts.array_size > 1:
        return sharded_jobs(exp, step, opts, runs)
    lines = requeue_wrapper(runs[0], stage.command, opts, step.outputs[0].parent) if stage.requeues else runs
    if step.record:
        lines = [f"mkdir -p {_q(step.record.parent)}", *lines[:-1], f"{lines[-1]} | tee {_q(step.record)}"]
    job = Job(step.name, script(exp, step.name, opts, f"{step.purpose}.", lines, gpu=stage.asks_gpu(step.calls),
                                requeue=stage.requeues), log=log_pattern(exp, step.name))
    if stage.after_failures:
        job.dependency = "afterany"
    return [job]


def sharded_jobs(exp: pipeline.Experiment, step: pipeline.Step, opts: SlurmOptions, runs: list[str]) -> list[Job]:
    """A job array whose task I computes shard I of N, then a job merging the shards into the step's output."""
    n, name = opts.array_size, step.table["name"]
    shard = step.record.with_name(f"{name}.shard-")  # + the task's number + .path
    lines = [f"mkdir -p {_q(step.record.parent)}"]
    lines += [f'{run} --shard "$SLURM_ARRAY_TASK_ID/{n}" | tee {_q(shard)}"$SLURM_ARRAY_TASK_ID".path' for run in runs]
    array = Job(step.name, script(exp, step.name, opts, f"{step.purpose}: task I of this array computes shard I of "
                                  f"{n}.", lines, gpu=step.stage.asks_gpu(step.calls), array=n),
                log=log_pattern(exp, step.name, array=True))
    lines = [f"mapfile -t shards < <(cat {_q(shard)}{{0..{n - 1}}}.path)",
             f"bottleneck cache merge \"${{shards[@]}}\" | tee {_q(step.record)}"]
    merge = Job(f"merge-{name}", script(exp, f"merge-{name}", opts, f"Join the {n} shards of the "
                                        f"{step.table['model']} cache into one file.", lines),
                log=log_pattern(exp, f"merge-{name}"), after=[array.stage])
    return [array, merge]


def requeue_wrapper(run: str, name: str, opts: SlurmOptions, folder: Path) -> list[str]:
    """Lines running a command that exits 75 after saving a checkpoint, requeueing the job when it does."""
    return [
        f"# Slurm sends USR1 to this script {_lead(opts.time)} s before the time limit, `scontrol requeue`",
        f"# and preemption send TERM: either way bottleneck {name} saves a checkpoint and exits with",
        _comment(f"# {REQUEUE_EXIT}, the job is requeued, and the same command resumes from "
                 f"{folder}/checkpoint.pt."),
        f"{run} &",
        "pid=$!",
        "trap 'kill -USR1 $pid 2>/dev/null' USR1",
        "trap 'kill -TERM $pid 2>/dev/null' TERM",
        "status=0; wait $pid || status=$?",
        "while kill -0 $pid 2>/dev/null; do status=0; wait $pid || status=$?; done  # a trapped signal ends wait early",
        f"if [ \"$status\" -eq {REQUEUE_EXIT} ]; then",
        "    echo \"checkpoint saved; requeueing job $SLURM_JOB_ID to resume\"",
        "    scontrol requeue \"$SLURM_JOB_ID\" || true  # already being requeued when Slurm sent the TERM",
        "fi",
        "exit $status",
    ]


def script(exp: pipeline.Experiment, stage: str, opts: SlurmOptions, purpose: str, lines: list[str], gpu: bool = False,
           array: int | None = None, requeue: bool = False) -> str:
    sbatch = {"job-name": _token(f"{exp.name}-{stage}"),
              "output": log_pattern(exp, stage, array=array is not None),
              "chdir": os.getcwd(),
              "array": f"0-{array - 1}" if array else None,
              "partition": opts.partition, "account": opts.account,
              "gres": opts.gres if gpu else None, "time": opts.time, "mem": opts.mem,
              "kill-on-invalid-dep": "yes"}
    if requeue:
        # append: a requeued job writes to the same log, so both runs stay readable
        sbatch |= {"requeue": True, "signal": f"B:USR1@{_lead(opts.time)}", "open-mode": "append"}
    head = ["#!/bin/bash", _comment(f"# {exp.name} ({exp.file}): {purpose}")]
    head += [f"#SBATCH --{k}" if v is True else f"#SBATCH --{k}={_directive(k, v)}" for k, v in sbatch.items()
             if v is not None]
    # --setup is shell code the user wrote for their jobs; it comes after the directives, so it cannot hide them
    head += ["set -euo pipefail", *([opts.setup] if opts.setup else [])]
    return "\n".join(head + lines) + "\n"


def command(name: str, args: dict) -> str:
    """The `bottleneck NAME --flag value ...` line for a stage's arguments, those equal to their
    defaults left out; the flags come from the stage's settings, as the command line's own options do."""
    words = ["bottleneck", name]
    if BY_COMMAND[name].settings is None:  # compare: its options are the experiment's [compare] table
        options = [f"--{k} {_q(v)}" for k, v in args.items() if k != "run_dirs"]
        return " ".join(words + options + ["--"] + [_q(d) for d in args["run_dirs"]])
    for flag, value in settings.command_words(BY_COMMAND[name].settings, args):
        words += [flag] if value is None else [flag, _q(value)]
    return " ".join(words)


def log_pattern(exp: pipeline.Experiment, stage: str, array: bool = False) -> str:
    """sbatch's --output: the log's path with a literal % written %%, then Slurm's %j (or %A_%a for arrays)."""
    return str(exp.out / "slurm" / "logs" / stage).replace("%", "%%") + f"-{'%A_%a' if array else '%j'}.out"


def _log_file(pattern: str, job_id: str) -> str:
    """The log a job writes, from its --output pattern; %j and %A stay when the job id is not known yet."""
    return re.sub(r"%([%jAa])", lambda m: {"%": "%", "a": "*"}.get(m.group(1), job_id or m.group(0)), pattern)


def _q(value) -> str:
    """A value as one shell word that the shell takes literally; Shell text of our own stays as it is."""
    return value if isinstance(value, Shell) else shlex.quote(str(value))


def _directive(key: str, value) -> str:
    """A value for an #SBATCH line as sbatch reads it back (no shell runs on these lines): plain, or in double
    quotes with \\ and \" escaped; only quotes keep spaces, and a '#' outside them starts a comment.
    A directive cannot continue on a second line, so a line break is refused."""
    text = str(value)
    if _unprintable(text):
        raise BottleneckError(f"#SBATCH --{key} would be {text!r}, which holds a control character; sbatch reads "
                              "each directive from one line, so use a value without it")
    if re.fullmatch(r"[\w@%+=:,./-]+", text, flags=re.ASCII):
        return text
    return '"' + re.sub(r'(["\\])', r"\\\1", text) + '"'


def _comment(line: str) -> str:
    """A comment line for a script: line breaks and other control characters shown escaped, never raw."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in line)


def _token(text: str) -> str:
    """A job name squeue, scontrol and the shell show as one plain word."""
    return re.sub(r"[^\w.-]+", "_", text, flags=re.ASCII)


def _unprintable(text: str) -> bool:
    return not text.isprintable()  # line breaks, tabs, escapes and the like; a plain space is printable


def _lead(time: str | None) -> int:
    """Seconds of warning before the time limit: 5 minutes, or a tenth of a shorter limit."""
    limit = _seconds(time) if time else None
    return max(30, min(SIGNAL_LEAD_SECONDS, limit // 10)) if limit else SIGNAL_LEAD_SECONDS


def _seconds(time: str) -> int | None:
    """Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    days, _, rest = time.rpartition("-")
    parts = [int(p) for p in rest.split(":")] if re.fullmatch(r"\d+(:\d+){0,2}", rest) else None
    if parts is None or (days and not days.isdigit()):
        return None
    if days:
        h, m, s = (parts + [0, 0])[:3]
        return int(days) * 86400 + h * 3600 + m * 60 + s
    m_s = {1: (0, parts[0], 0), 2: (0, parts[0], parts[1]), 3: tuple(parts)}[len(parts)]
    return m_s[0] * 3600 + m_s[1] * 60 + m_s[2]


# --------------------------------------------------------------------------- submitting

def submit(experiment: str | Path, *, dry_run: bool = False, trust: bool = False, **options) -> list[dict]:
    """Write the experiment's sbatch scripts into RUN/slurm/ and submit them; returns stage, job id, script, log.

    `options`: the fields of `SlurmOptions` (partition, account, gres, time, mem, array_size, setup)."""
    opts = SlurmOptions(**options).validate()
    for f in fields(opts):
        value = getattr(opts, f.name)
        if f.name != "setup" and isinstance(value, str) and _unprintable(value):
            raise BottleneckError(f"{settings.flag(f)} {value!r} holds a control character; sbatch reads each "
                                  "directive from one line, so give the value on its own without it")
    if opts.time and _seconds(opts.time) is None:
        raise BottleneckError(f"--time {opts.time} is not a Slurm time; use e.g. 02:00:00 or 1-00:00:00")
    if opts.setup is None and sys.prefix != sys.base_prefix:  # run from a venv: use it on the compute nodes too
        opts = replace(opts, setup=f"source {shlex.quote(sys.prefix)}/bin/activate")
    exp = replace(pipeline.load(experiment), trust=trust)  # --trust goes on to the fine-tune jobs
    if _unprintable(str(exp.out)):
        raise BottleneckError(f"{exp.file}: out {str(exp.out)!r} holds a control character; the run folder goes "
                              "into sbatch's one-line --output directive, so choose a folder name without it")
    jobs = plan(exp, opts)
    if not dry_run:
        if not shutil.which("sbatch"):
            raise BottleneckError("sbatch is not on PATH; run this on a Slurm login node, or add --dry-run to "
                                  "only write the scripts")
        busy = [r["job_id"] for r in status(exp.out) if r["state"].split()[0] in ACTIVE] \
            if _jobs_file(exp.out).is_file() else []
        if busy:
            raise BottleneckError(f"{exp.out} still has jobs queued or running ({', '.join(busy)}); wait for "
                                  "them or cancel them with scancel before submitting again")
        pipeline.prepare_data(exp)
    pipeline.check_finished(exp)
    pipeline.save_copy(exp)
    folder = exp.out / "slurm"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}
    rows = []
    for i, job in enumerate(jobs, 1):
        path = folder / f"{i:02d}-{job.stage}.sbatch"
        path.write_text(job.script)
        deps = f"{job.dependency}:" + ":".join(f"${_var(s)}" if dry_run else ids[s] for s in job.after) \
            if job.after else None
        argv = ["sbatch", "--parsable", *([f"--dependency={deps}"] if deps else []), str(path)]
        ids[job.stage] = "" if dry_run else _sbatch(argv)
        rows.append({"stage": job.stage, "job_id": ids[job.stage], "script": str(path),
                     "sbatch": f"{_var(job.stage)}=$({' '.join(argv[:-1] + [shlex.quote(argv[-1])])})",
                     "log": _log_file(job.log, ids[job.stage])})
    if not dry_run:
        _jobs_file(exp.out).write_text(json.dumps(
            {"submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"), "jobs": rows}, indent=1))
    return rows


def _sbatch(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise BottleneckError(f"sbatch refused {argv[-1]}: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout.strip().split(";")[0]


def _var(stage: str) -> str:
    return re.sub(r"\W", "_", stage, flags=re.ASCII).upper()


def _jobs_file(run_dir: Path) -> Path:
    return Path(run_dir) / "slurm" / "jobs.json"


# --------------------------------------------------------------------------- watching

def status(run_dir: str | Path) -> list[dict]:
    """Each stage of a run: its job id, Slurm state, whether its output exists, and its log."""
    run_dir = Path(run_dir)
    exp_file = run_dir / "experiment.toml"
    if not run_dir.exists():
        raise BottleneckError(f"run folder {run_dir} does not exist")
    if not exp_file.is_file():
        raise BottleneckError(f"{run_dir} is not a run folder (no experiment.toml); give the folder "
                              "'bottleneck run' wrote")
    exp = pipeline.load(exp_file)
    exp.out = run_dir  # the copy may have been moved with its folder
    jobs = {}
    if _jobs_file(run_dir).is_file():
        jobs = {j["stage"]: j for j in json.loads(_jobs_file(run_dir).read_text())["jobs"]}
    rows = []
    for stage, output in outputs(exp).items():
        job = jobs.get(stage)
        state = job_state(job["job_id"]) if job else None
        if state is None:
            state = "not submitted" if not jobs else "unknown (no longer known to Slurm)"
            if not jobs:
                state = "done" if output.startswith("done") else "not run"
        rows.append({"stage": stage, "job_id": job["job_id"] if job else "", "state": state, "output": output,
                     "log": job["log"] if job else ""})
    return rows


def outputs(exp: pipeline.Experiment) -> dict[str, str]:
    """What each stage has left on disk so far (an extraction run as an array: its shards, then its merge)."""
    found = {}
    for step in pipeline.steps(exp):
        found[step.name] = step.stage.output(step.outputs)
        if step.stage.shards and _jobs_file(exp.out).is_file() and \
                f"merge-{step.table['name']}" in _planned_stages(exp):
            record = pipeline.cache_record(exp, step.table)
            shards = len(list(record.parent.glob(f"{glob.escape(step.table['name'])}.shard-*.path")))
            cache = found[step.name]
            found[step.name] = f"{shards} shards" if cache == "missing" else f"done: {shards} shards"
            found[f"merge-{step.table['name']}"] = cache
    return found


def _planned_stages(exp: pipeline.Experiment) -> set[str]:
    return {j["stage"] for j in json.loads(_jobs_file(exp.out).read_text())["jobs"]}


def job_state(job_id: str) -> str | None:
    """A job's state from the controller, else from accounting; None when Slurm no longer knows it."""
    try:
        result = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    states = []
    if result.returncode == 0:
        for line in result.stdout.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if "JobState" in fields:
                reason = fields.get("Reason", "None")
                states.append(fields["JobState"] + (f" ({reason})" if reason not in ("None", "") else ""))
    if not states:
        try:
            result = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State"], capture_output=True,
                                    text=True, timeout=30)
            states = [s.strip() for s in result.stdout.splitlines() if s.strip()] if result.returncode == 0 else []
        except (OSError, subprocess.TimeoutExpired):
            pass
    if not states:
        return None
    if len(set(states)) == 1:
        return states[0]
    counts = {s: states.count(s) for s in dict.fromkeys(states)}
    return ", ".join(f"{s} ×{n}" for s, n in counts.items())
