"""Bad input never crashes bottleneck and never damages what it wrote before.

The guarantees and the tests that prove them are listed in docs/reliability.md. Kill-anywhere
tests live beside their stage (test_extract.py, test_finetune.py, test_slurm.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from badfiles import write_broken, write_odd
from conftest import cli, make_tree

ELPV_PER_SPLIT = {"train": 10, "test": 5}  # per class


def elpv_subset(root: Path) -> Path:
    """A few real elpv solar-cell images in train/test class folders (links to the package's files)."""
    import elpv_dataset

    src = Path(elpv_dataset.__file__).parent / "data"
    rows = [line.split() for line in (src / "labels.csv").read_text().splitlines() if line.strip()]
    by_class = {"defective": [r[0] for r in rows if float(r[1]) >= 0.5],
                "functional": [r[0] for r in rows if float(r[1]) < 0.5]}
    for name, files in by_class.items():
        start = 0
        for split, n in ELPV_PER_SPLIT.items():
            for rel in files[start:start + n]:
                (root / split / name).mkdir(parents=True, exist_ok=True)
                os.symlink(src / rel, root / split / name / Path(rel).name)
            start += n
    return root


@pytest.mark.slow
def test_fifty_broken_files_in_a_real_dataset_are_skipped_with_reasons(tmp_path):
    data = elpv_subset(tmp_path / "elpv")
    broken = write_broken(data / "train" / "defective")
    odd = write_odd(data / "test" / "functional")
    assert len(broken) >= 50
    result = cli("extract", "--model", "efficientnet_lite0", "--data", str(data), "--out",
                     str(tmp_path / "cache"), "--batch-size", "16", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "UserWarning" not in result.stderr
    assert f"skipped {len(broken)}" in result.stderr

    import h5py

    with h5py.File(result.stdout.strip().splitlines()[-1]) as f:
        kept = {s: {Path(p.decode()).name for p in f[s]["paths"][:]} for s in ("train", "test")}
        skipped = {Path(r["path"].decode()).name: r["reason"].decode()
                   for s in ("train", "test") for r in f[s]["skipped"][:]}
    assert len(kept["train"]) == 2 * ELPV_PER_SPLIT["train"]  # every real image, no broken one
    assert len(kept["test"]) == 2 * ELPV_PER_SPLIT["test"] + len(odd)  # odd-but-valid files are images
    assert set(odd) <= kept["test"]
    assert set(skipped) == set(broken)
    for name, word in broken.items():
        assert skipped[name] and word in skipped[name], (name, skipped[name])

    fitted = cli("fit", "--features", result.stdout.strip().splitlines()[-1], "--out", str(tmp_path / "fit"))
    assert fitted.returncode == 0, fitted.stderr
    model = next((tmp_path / "fit").rglob("model.skops"))
    predicted = cli("predict", str(model), str(data), "--format", "json")
    assert predicted.returncode == 0, predicted.stderr
    rows = {Path(r["path"]).name: r for r in json.loads(predicted.stdout)}
    for name, word in broken.items():
        assert rows[name]["label"] is None and word in rows[name]["error"], rows[name]
    assert all(rows[name]["label"] in ("defective", "functional") for name in odd)


# --------------------------------------------------------------------------- bad commands

def sha256_of_files(root: Path) -> dict[str, str]:
    found = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    found[path] = hashlib.sha256(f.read()).hexdigest()
    return found


def mount_tmpfs(path: Path, size_kb: int, fill: list[Path] = (), read_only: bool = False) -> bool:
    """A small tmpfs at `path` holding copies of `fill`; False (and a plain folder) where this user
    cannot mount."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)], capture_output=True).returncode == 0
    for f in fill:
        shutil.copy2(f, path / f.name)
    if read_only and mounted:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
    elif read_only:  # without root, permission bits do stop writes
        os.chmod(path, 0o555)
    return mounted


def file_size_limit(limit: int):
    """For a child process: writing past `limit` bytes fails with EFBIG, a simulated full disk."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Real inputs and outputs for every subcommand, good and bad, under one folder."""
    root = tmp_path_factory.mktemp("world")
    tree = make_tree(root / "data", {"train": 4, "val": 2, "test": 2})
    made = {}
    for name, args in [("cache", ["--model", "efficientnet_lite0"]),
                       ("other", ["--model", "squeezenet1_1", "--weights", "none"]),
                       ("shard0", ["--model", "efficientnet_lite0", "--shard", "0/2", "--batch-size", "4"]),
                       ("shard1", ["--model", "efficientnet_lite0", "--shard", "1/2", "--batch-size", "4"])]:
        result = cli("extract", *args, "--data", str(tree), "--out", str(root / "caches"), "--no-progress")
        assert result.returncode == 0, result.stderr
        made[name] = Path(result.stdout.strip().splitlines()[-1])
    assert cli("fit", "--features", str(made["cache"]), "--out", str(root / "fit")).returncode == 0
    broken = root / "broken"
    broken.mkdir()
    whole = made["cache"].read_bytes()
    (broken / "truncated.h5").write_bytes(whole[: len(whole) // 2])
    shutil.copy(made["cache"], broken / "incomplete.h5")
    import h5py

    with h5py.File(broken / "incomplete.h5", "r+") as f:
        f.attrs["complete"] = False
    (broken / "junk.h5").write_bytes(b"not hdf5")
    (broken / "corrupt").mkdir()
    (broken / "corrupt" / "model.joblib").write_bytes(b"\x80\x04garbage")
    (broken / "syntax.toml").write_text('name = "x\n[data]\npath = "data"\n')
    good_toml = f'name = "x"\nout = "{root / "pipe"}"\n[data]\npath = "{tree}"\n' \
                '[[backbone]]\nmodel = "efficientnet_lite0"\n[fit]\nclassifiers = ["logreg"]\n'
    (broken / "model.toml").write_text(good_toml.replace("efficientnet_lite0", "resnet5O"))
    (broken / "clf.toml").write_text(good_toml.replace("logreg", "forest"))
    (broken / "ro.toml").write_text(good_toml.replace(str(root / "pipe"), str(root / "ro" / "pipe")))
    mount_tmpfs(root / "ro", made["cache"].stat().st_size // 1024 + 64, [made["cache"]], read_only=True)
    # The existing cache and 8 kB more: the next write fills the disk.
    disk = mount_tmpfs(root / "full", made["cache"].stat().st_size // 1024 + 256, [made["cache"]])
    if disk:
        free = shutil.disk_usage(root / "full").free
        (root / "full" / "filler").write_bytes(b"\0" * (free - 8192))
    paths = {**made, "tree": tree, "model": next(root.glob("fit/*/model.skops")), "fit": root / "fit",
             "missing": root / "missing", "ro": root / "ro", "full": root / "full",
             "corrupt_joblib": broken / "corrupt" / "model.joblib",
             **{p.stem: p for p in broken.glob("*.h5")}, **{f"{p.stem}_toml": p for p in broken.glob("*.toml")}}
    yield {"root": root, "full_is_a_disk": disk, **{k: str(v) for k, v in paths.items()}}
    for mount in ("ro", "full"):
        subprocess.run(["umount", "-l", str(root / mount)], capture_output=True)


BAD_COMMANDS = {
    # extract
    "extract-missing-path": (["extract", "--model", "efficientnet_lite0", "--data", "{missing}"], ["does not exist"]),
    "extract-unknown-model": (["extract", "--model", "vgg17", "--data", "{tree}"], ["unknown model 'vgg17'"]),
    "extract-unknown-tap": (["extract", "--model", "vgg16", "--layer", "fc9", "--data", "{tree}"], ["no tap 'fc9'"]),
    "extract-batch-size": (["extract", "--model", "efficientnet_lite0", "--data", "{tree}", "--batch-size", "0"],
                           ["--batch-size"]),
    "extract-cuda": (["extract", "--model", "efficientnet_lite0", "--data", "{tree}", "--device", "cuda"],
                     ["no CUDA GPU"]),
    "extract-read-only": (["extract", "--model", "efficientnet_lite0", "--data", "{tree}", "--out", "{ro}",
                           "--force"], ["{ro}"]),
    "extract-full-disk": (["extract", "--model", "efficientnet_lite0", "--data", "{tree}", "--out", "{full}",
                           "--force"], ["No space left on device", "({full}/"]),
    # fit
    "fit-missing-path": (["fit", "--features", "{missing}"], ["does not exist"]),
    "fit-unknown-tap": (["fit", "--features", "{cache}", "--layer", "fc9"], ["no tap 'fc9'"]),
    "fit-unknown-classifier": (["fit", "--features", "{cache}", "--clf", "forest"], ["unknown classifier 'forest'"]),
    "fit-truncated-cache": (["fit", "--features", "{truncated}"], ["truncated.h5"]),
    "fit-incomplete-cache": (["fit", "--features", "{incomplete}"], ["incomplete.h5"]),
    "fit-not-a-cache": (["fit", "--features", "{junk}"], ["junk.h5"]),
    "fit-read-only": (["fit", "--features", "{cache}", "--out", "{ro}/fit"], ["{ro}"]),
    "fit-full-disk": (["fit", "--features", "{cache}", "--out", "{full}/fit"], ["No space left on device",
                                                                                "({full}/fit/"]),
    # evaluate
    "evaluate-missing-model": (["evaluate", "{missing}", "--features", "{cache}"], ["does not exist"]),
    "evaluate-missing-cache": (["evaluate", "{model}", "--features", "{missing}"], ["does not exist"]),
    "evaluate-corrupt-model": (["evaluate", "{corrupt_joblib}", "--features", "{cache}"],
                               ["not a model.skops written by 'bottleneck fit'"]),
    "evaluate-foreign-cache": (["evaluate", "{model}", "--features", "{other}"], ["squeezenet1_1"]),
    "evaluate-truncated-cache": (["evaluate", "{model}", "--features", "{truncated}"], ["truncated.h5"]),
    "evaluate-incomplete-cache": (["evaluate", "{model}", "--features", "{incomplete}"], ["incomplete.h5"]),
    # predict
    "predict-missing-model": (["predict", "{missing}", "{tree}"], ["does not exist"]),
    "predict-missing-images": (["predict", "{model}", "{missing}"], ["does not exist"]),
    "predict-corrupt-model": (["predict", "{corrupt_joblib}", "{tree}"], ["not a model.skops written by"]),
    "predict-unknown-model": (["predict", "--imagenet", "--model", "vgg17", "{tree}"], ["unknown model 'vgg17'"]),
    "predict-cuda": (["predict", "{model}", "{tree}", "--device", "cuda"], ["no CUDA GPU"]),
    # finetune
    "finetune-missing-path": (["finetune", "--model", "efficientnet_lite0", "--data", "{missing}"], ["does not exist"]),
    "finetune-unknown-model": (["finetune", "--model", "vgg17", "--data", "{tree}"], ["unknown model 'vgg17'"]),
    "finetune-unknown-tap": (["finetune", "--model", "efficientnet_lite0", "--data", "{tree}", "--unfreeze",
                              "from:fc9"], ["fc9"]),
    "finetune-batch-size": (["finetune", "--model", "efficientnet_lite0", "--data", "{tree}", "--batch-size", "0"],
                            ["--batch-size"]),
    "finetune-cuda": (["finetune", "--model", "efficientnet_lite0", "--data", "{tree}", "--device", "cuda"],
                      ["no CUDA GPU"]),
    "finetune-read-only": (["finetune", "--model", "efficientnet_lite0", "--data", "{tree}", "--out", "{ro}/ft",
                            "--epochs", "0", "--no-progress"], ["{ro}"]),
    "finetune-full-disk": (["finetune", "--model", "efficientnet_lite0", "--data", "{tree}", "--out", "{full}/ft",
                            "--epochs", "0", "--no-progress"], ["No space left on device"]),
    # run, compare, status
    "run-missing-path": (["run", "{missing}"], ["does not exist"]),
    "run-malformed-toml": (["run", "{syntax_toml}"], ["not valid TOML", "line 1"]),
    "run-unknown-model": (["run", "{model_toml}"], ["unknown model 'resnet5O'"]),
    "run-unknown-classifier": (["run", "{clf_toml}"], ["unknown classifier"]),
    "run-read-only": (["run", "{ro_toml}", "--no-progress"], ["{ro}"]),
    "compare-missing-path": (["compare", "{missing}"], ["does not exist"]),
    "compare-no-reports": (["compare", "{tree}"], ["no fit or finetune report.json"]),
    "compare-read-only": (["compare", "{fit}", "--out", "{ro}/cmp"], ["{ro}"]),
    "compare-full-disk": (["compare", "{fit}", "--out", "{full}/cmp"], ["No space left on device"]),
    "status-missing-path": (["status", "{missing}"], ["does not exist"]),
    # cache, weights, data
    "cache-ls-missing-path": (["cache", "ls", "{missing}"], ["does not exist"]),
    "cache-info-missing-path": (["cache", "info", "{missing}"], ["does not exist"]),
    "cache-info-truncated": (["cache", "info", "{truncated}"], ["truncated.h5"]),
    "cache-info-incomplete": (["cache", "info", "{incomplete}"], ["incomplete.h5"]),
    "cache-merge-missing-path": (["cache", "merge", "{missing}"], ["does not exist"]),
    "cache-merge-foreign": (["cache", "merge", "{cache}", "{other}", "--out", "{root}/merged.h5"], ["not a shard"]),
    "cache-merge-read-only": (["cache", "merge", "{shard0}", "{shard1}", "--out", "{ro}/merged.h5"], ["{ro}"]),
    "cache-merge-full-disk": (["cache", "merge", "{shard0}", "{shard1}", "--out", "{full}/merged.h5"],
                              ["No space left on device"]),
    "weights-unknown-model": (["weights", "fetch", "vgg17"], ["unknown model 'vgg17'"]),
    "data-elpv-read-only": (["data", "elpv", "--out", "{ro}/elpv"], ["{ro}"]),
    "data-cifar10-missing-package": (["data", "cifar10", "--package", "{missing}", "--out", "{root}/c10"],
                                     ["does not exist"]),
}


@pytest.mark.parametrize("case", BAD_COMMANDS)
def test_bad_command_is_one_sentence_and_damages_nothing(world, case):
    args, words = BAD_COMMANDS[case]
    limit = None
    if "{full}" in str(args) and not world["full_is_a_disk"]:  # no tmpfs: a file size limit instead
        words, limit = ["File too large", *[w for w in words if "{full}" in w]], file_size_limit(8192)
    args, words = [a.format(**world) for a in args], [w.format(**world) for w in words]
    before = sha256_of_files(world["root"])
    if limit is None:
        result = cli(*args)
    else:  # the file size limit must bind a child process, not the one running the tests
        result = subprocess.run([sys.executable, "-m", "bottleneck", *args], capture_output=True, text=True,
                                timeout=300, preexec_fn=limit)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), result.stderr
    assert sum(line.startswith("error:") for line in lines) == 1
    for word in words:
        assert word in lines[-1], lines[-1]
    after = sha256_of_files(world["root"])
    assert {p: h for p, h in after.items() if p in before} == before


# --------------------------------------------------------------------------- concurrency

@pytest.mark.slow
def test_fit_during_extraction_is_told_to_wait_and_two_extracts_do_not_mix(tmp_path):
    import signal
    import time

    tree = make_tree(tmp_path / "data", {"train": 24, "test": 8})
    cmd = [sys.executable, "-m", "bottleneck", "extract", "--model", "efficientnet_lite0", "--data", str(tree),
           "--out", str(tmp_path / "c"), "--batch-size", "2", "--workers", "0", "--no-progress"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "c").glob("*.h5.parts/*.npz")) and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # a writer mid-run, held there while the others try
    try:
        cache = Path(str(next((tmp_path / "c").glob("*.h5.parts"))).removesuffix(".parts"))
        second = cli(*cmd[3:])
        assert second.returncode == 4 and f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
        reader = cli("fit", "--features", str(cache), "--out", str(tmp_path / "fit"))
        assert reader.returncode == 1 and "is still being extracted; wait" in reader.stderr
        assert not (tmp_path / "fit").exists()
    finally:
        first.send_signal(signal.SIGCONT)
    while first.poll() is None:  # readers racing the running writer: refused until the cache is complete
        reader = cli("fit", "--features", str(cache), "--out", str(tmp_path / "fit"))
        assert reader.returncode == 0 or "is still being extracted; wait" in reader.stderr, reader.stderr
    assert first.wait() == 0, first.stderr.read()
    assert cli("cache", "verify", str(cache)).stdout.strip().endswith(": ok")
    final = cli("fit", "--features", str(cache), "--out", str(tmp_path / "fit"))
    assert final.returncode == 0, final.stderr


# --------------------------------------------------------------------------- untrusted files

class Payload:
    """Unpickling this runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_with_code_are_refused_and_never_run(tree, tmp_path):
    import torch

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "bottleneck-finetuned/1", "model": Payload(marker)}, evil)
    (tmp_path / "ft").mkdir()
    shutil.copy(evil, tmp_path / "ft" / "checkpoint.pt")
    legacy = tmp_path / "legacy.pt"  # a plain pickle, not a torch archive, under a model's name
    torch.save({"format": "bottleneck-finetuned/1", "model": Payload(marker)}, legacy,
               _use_new_zipfile_serialization=False)
    cases = [(["extract", "--model", "efficientnet_lite0", "--weights", str(evil), "--data", str(tree),
               "--out", str(tmp_path / "c")], "not a loadable state_dict"),
             (["predict", str(evil), str(tree)], "not a readable fine-tuned model"),
             (["predict", str(legacy), str(tree)], "not a readable fine-tuned model"),
             (["evaluate", str(legacy), "--features", str(tmp_path / "none.h5")], "not a readable fine-tuned model"),
             (["finetune", "--model", "efficientnet_lite0", "--data", str(tree), "--out", str(tmp_path / "ft"),
               "--no-progress"], "cannot be read")]
    for args, words in cases:
        result = cli(*args)
        assert result.returncode == 1 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not marker.exists()


def test_a_model_whose_weights_do_not_match_its_metadata_is_refused(tree, tmp_path):
    import torch

    from bottleneck.backbones import preprocessing
    from bottleneck.trained import NETWORK_FORMAT as MODEL_FORMAT

    state = torch.nn.Linear(3, 2).state_dict()
    meta = {"format": MODEL_FORMAT, "arch": "efficientnet_lite0", "classes": ["cats", "dogs"], "precision": "fp32",
            "preprocessing": preprocessing("efficientnet_lite0"), "tta": "none"}
    torch.save(meta | {"model": state}, tmp_path / "model.pt")
    result = cli("predict", str(tmp_path / "model.pt"), str(tree))
    assert result.returncode == 1 and "do not match its metadata" in result.stderr
    assert "Traceback" not in result.stderr
    del meta["preprocessing"]  # once a traceback, or a silently wrong resize
    torch.save(meta | {"model": state}, tmp_path / "model.pt")
    result = cli("predict", str(tmp_path / "model.pt"), str(tree))
    assert result.returncode == 1 and "metadata lacks preprocessing" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_provenance_copied_onto_another_estimator_is_refused(tree, tmp_path):
    """Once a traceback (a 7-feature estimator) or a silent score (a bare LogisticRegression)."""
    import numpy as np
    import skops.io
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline

    from bottleneck import trained
    from bottleneck.classify import fit
    from bottleneck.extract import extract

    cache = extract("squeezenet1_1", str(tree), layer=["fire9"], out=str(tmp_path / "c"), batch_size=8, workers=0,
                    progress=False, weights="none")
    report = fit(str(cache), layer="fire9", search=False, out=str(tmp_path / "fit"))
    prov = trained.load(report.parent / "model.skops").meta
    rng = np.random.default_rng(0)
    others = {"narrow": Pipeline([("clf", LogisticRegression().fit(rng.random((20, 7)), [0, 1] * 10))]),
              "bare": LogisticRegression().fit(rng.random((20, 512)), [0, 1] * 10)}
    for name, est in others.items():
        est.bottleneck_ = prov
        skops.io.dump(est, tmp_path / f"{name}.skops")
        for args in (["evaluate", str(tmp_path / f"{name}.skops"), "--features", str(cache)],
                     ["predict", str(tmp_path / f"{name}.skops"), str(tree / "test")]):
            result = cli(*args)
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
            assert "not the logreg pipeline that 'bottleneck fit' builds" in result.stderr or \
                "was not written by 'bottleneck fit'" in result.stderr, result.stderr


def test_a_checkpoint_of_other_settings_is_refused_not_resumed(tree, tmp_path):
    import torch

    (tmp_path / "ft").mkdir()
    ckpt = tmp_path / "ft" / "checkpoint.pt"
    torch.save({"format": "bottleneck-checkpoint/1", "args": {"model": "efficientnet_lite0", "lr": 0.5}}, ckpt)
    before = ckpt.read_bytes()
    result = cli("finetune", "--model", "efficientnet_lite0", "--data", str(tree), "--out", str(tmp_path / "ft"),
                     "--no-progress")
    assert result.returncode == 1 and "holds a run with other settings" in result.stderr and "lr" in result.stderr
    assert "Traceback" not in result.stderr and ckpt.read_bytes() == before


# Out of memory for real: the address space a process may allocate is capped (RLIMIT_DATA)
# after torch is loaded, so the allocator itself fails on a batch that does not fit.
MEMORY_CAPPED = """
import resource, sys
import torch, torchvision
from bottleneck.cli import main
import bottleneck.backbones, bottleneck.extract
limit = int(sys.argv.pop(1)) << 20
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
sys.argv[0] = "bottleneck"
main()
"""


@pytest.mark.slow
def test_out_of_memory_in_extract_is_one_error_and_a_smaller_batch_takes_over(tmp_path):
    data = make_tree(tmp_path / "data", {"train": 40, "test": 4})  # 80 training images: one block of 80
    args = ["2300", "extract", "--model", "vgg16", "--weights", "none", "--data", str(data), "--out",
            str(tmp_path / "c"), "--workers", "0", "--no-progress", "--batch-size"]
    run = [sys.executable, "-c", MEMORY_CAPPED]
    big = subprocess.run([*run, *args, "80"], capture_output=True, text=True, timeout=300)
    assert big.returncode == 1 and "Traceback" not in big.stderr and "DefaultCPUAllocator" not in big.stderr
    assert "error: out of memory running 80 images at once" in big.stderr and "smaller --batch-size" in big.stderr
    small = subprocess.run([*run, *args, "4"], capture_output=True, text=True, timeout=300)
    assert small.returncode == 0, small.stderr
    assert "batch size of the interrupted run" not in small.stderr  # no block was saved: 4 is taken
    from bottleneck.store import FeatureStore

    with FeatureStore(small.stdout.strip().splitlines()[-1]) as st:
        assert st.attrs["block_rows"] == 4 and len(st.labels("train")) == 80
