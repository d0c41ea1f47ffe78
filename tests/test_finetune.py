import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import hold_lock, make_tree

from bottleneck import networks, trained
from bottleneck.errors import BottleneckError
from bottleneck.finetune import finetune
from bottleneck.trained import load_network

LITE = "efficientnet_lite0"
QUICK = dict(batch_size=4, workers=0, progress=False, precision="fp32", image_size=64)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("ft") / "data", {"train": 8, "val": 2, "test": 3})


def _weights(path):
    t = load_network(path)
    return t.net.state_dict(), t.meta


def test_head_phase_changes_only_the_head_and_reports_before_and_after(small, tmp_path):
    report = finetune(LITE, str(small), head_epochs=1, epochs=1, unfreeze="from:blocks.5", restore_best=False,
                      out=str(tmp_path), **QUICK)
    tuned, meta = _weights(tmp_path / "model.pt")
    start = networks.build_model(LITE).state_dict()
    assert meta["head"] == "classifier" and tuned["classifier.weight"].shape == (2, 1280)
    frozen = [k for k in start if not k.startswith(("blocks.5", "blocks.6", "conv_head", "bn2", "classifier"))]
    assert frozen and all(torch.equal(start[k], tuned[k]) for k in frozen)  # BN running stats included
    assert not torch.equal(start["blocks.6.0.conv_pw.weight"], tuned["blocks.6.0.conv_pw.weight"])
    import json

    rep = json.loads(report.read_text())
    assert rep["stage"] == "finetune" and rep["head_only"] is not None and "accuracy" in rep["head_only"]
    assert rep["cost"]["epochs_run"] == 2 and rep["cost"]["images_per_second"] > 0
    assert [h["phase"] for h in rep["history"]] == ["head", "finetune"]
    assert (tmp_path / "learning_curve.png").is_file() and not (tmp_path / "checkpoint.pt").exists()


def test_unfreeze_zero_blocks_keeps_the_whole_backbone(small, tmp_path):
    finetune(LITE, str(small), head_epochs=0, epochs=1, unfreeze="0", out=str(tmp_path), **QUICK)
    tuned, _ = _weights(tmp_path / "model.pt")
    start = networks.build_model(LITE).state_dict()
    assert all(torch.equal(start[k], tuned[k]) for k in start if not k.startswith("classifier"))


def test_a_timm_model_fine_tunes_its_last_blocks_into_a_safe_folder(small, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name = "timm:convnext_atto"
    report = finetune(name, str(small), weights="none", head_epochs=1, epochs=1, unfreeze="2", restore_best=False,
                      **QUICK)
    assert report == Path("runs/finetune/timm-convnext_atto/report.json") and report.is_file()
    tuned, meta = _weights(report.with_name("model.pt"))
    start = networks.build_model(name, "none").state_dict()
    assert meta["head"] == "head.fc" and tuned["head.fc.weight"].shape == (2, 320)
    frozen = [k for k in start if k.startswith(("stem.", "stages.0.", "stages.1."))]  # --unfreeze 2: stages 2 and 3
    assert frozen and all(torch.equal(start[k], tuned[k]) for k in frozen)
    assert not torch.equal(start["stages.2.blocks.0.conv_dw.weight"], tuned["stages.2.blocks.0.conv_dw.weight"])


def test_a_vit_fine_tunes_at_another_image_size(small, tmp_path):
    name = "timm:vit_tiny_patch16_224"
    finetune(name, str(small), weights="none", head_epochs=0, epochs=1, unfreeze="2", out=str(tmp_path),
             **QUICK | {"image_size": 32})
    tuned, meta = _weights(tmp_path / "model.pt")
    start = networks.build_model(name, "none").state_dict()
    assert meta["head"] == "head" and tuned["head.weight"].shape == (2, 192)
    # the last two parameter-holding blocks: blocks.11 and the final norm
    assert torch.equal(start["blocks.10.mlp.fc1.weight"], tuned["blocks.10.mlp.fc1.weight"])
    assert not torch.equal(start["blocks.11.mlp.fc1.weight"], tuned["blocks.11.mlp.fc1.weight"])


def test_bad_settings_are_clear_errors(small, tmp_path):
    with pytest.raises(BottleneckError, match="--unfreeze"):
        finetune(LITE, str(small), unfreeze="half", out=str(tmp_path), **QUICK)
    with pytest.raises(BottleneckError, match="no tap 'blocks.9'"):
        finetune(LITE, str(small), unfreeze="from:blocks.9", out=str(tmp_path), **QUICK)
    with pytest.raises(BottleneckError, match="unknown --optimizer"):
        finetune(LITE, str(small), optimizer="lion", out=str(tmp_path), **QUICK)


def _cmd(data, out, *extra):
    """The finetune command line; an option in `extra` replaces the default one (giving one twice is an error)."""
    defaults = {"--model": LITE, "--epochs": "2", "--batch-size": "4", "--workers": "0", "--precision": "fp32",
                "--image-size": "64", "--deterministic": None, "--no-progress": None, "--optimizer": "sgd",
                "--lr": "0.02"}
    words = [w for flag, value in defaults.items() if flag not in extra for w in (flag, value) if w is not None]
    return [sys.executable, "-m", "bottleneck", "finetune", "--data", str(data), "--out", str(out), *words, *extra]


@pytest.fixture(scope="module")
def timed_reference(small, tmp_path_factory):
    """An uninterrupted run, and how long the command took (for placing kills inside it)."""
    out = tmp_path_factory.mktemp("ref")
    started = time.monotonic()
    subprocess.run(_cmd(small, out), check=True, capture_output=True)
    return out, time.monotonic() - started


@pytest.fixture(scope="module")
def reference(timed_reference):
    return timed_reference[0]


def _assert_same_run(a, b):
    """The same run up to float rounding. With --deterministic reruns are normally bit-identical,
    but one CI run in many came out different, so the test allows rounding (1e-5 relative) and
    nothing more: a lost or repeated step, a wrong data order or learning rate moves weights and
    losses far beyond it. The kill tests use SGD because Adam turns a rounding difference in a
    near-zero gradient into a whole step of its sign."""
    wa, _ = _weights(a / "model.pt")
    wb, _ = _weights(b / "model.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
    import json

    ra, rb = (json.loads((d / "report.json").read_text()) for d in (a, b))
    assert [(h["epoch"], h["phase"], h["val_accuracy"]) for h in ra["history"]] == \
        [(h["epoch"], h["phase"], h["val_accuracy"]) for h in rb["history"]]
    for ha, hb in zip(ra["history"], rb["history"]):
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-5)
        assert hb["val_loss"] == pytest.approx(ha["val_loss"], rel=1e-5)
    assert ra["accuracy"] == rb["accuracy"]


def _start_and_wait(cmd, until):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not until():
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(small, reference, tmp_path):
    out = tmp_path / "killed"
    proc = _start_and_wait(_cmd(small, out), lambda: (out / "checkpoint.pt").exists())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists() and (out / "checkpoint.pt").exists()
    subprocess.run(_cmd(small, out), check=True, capture_output=True)
    _assert_same_run(reference, out)


@pytest.mark.slow
def test_sigterm_saves_a_mid_epoch_checkpoint_and_exits_75(small, reference, tmp_path):
    out = tmp_path / "term"
    log = tmp_path / "log"
    with open(log, "w") as f:
        proc = subprocess.Popen(_cmd(small, out), stdout=subprocess.PIPE, stderr=f, text=True)
        deadline = time.monotonic() + 120
        while "training:" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 75
    assert "checkpoint saved" in log.read_text() and "Traceback" not in log.read_text()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["state"]["epoch"] * 100 + ckpt["state"]["step"] > 0
    subprocess.run(_cmd(small, out), check=True, capture_output=True)
    _assert_same_run(reference, out)


@pytest.mark.slow
def test_two_processes_with_ddp_agree_with_one(small, tmp_path):
    # resnet18 has no dropout before its head, so both runs see exactly the same batches;
    # with the backbone frozen (BatchNorm in eval mode) the averaged gradients must agree.
    args = ["--unfreeze", "0", "--head-epochs", "0", "--epochs", "1", "--model", "resnet18", "--weights", "none"]
    single = tmp_path / "single"
    subprocess.run(_cmd(small, single, *args), check=True, capture_output=True)
    ddp = tmp_path / "ddp"
    cmd = _cmd(small, ddp, *args)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    result = subprocess.run(launcher + cmd[2:], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    a, _ = _weights(single / "model.pt")
    b, _ = _weights(ddp / "model.pt")
    torch.testing.assert_close(a["fc.weight"], b["fc.weight"], rtol=1e-4, atol=1e-5)
    import json

    assert json.loads((ddp / "report.json").read_text())["cost"]["processes"] == 2


@pytest.mark.slow
def test_five_random_kills_resume_and_finish(small, timed_reference, tmp_path):
    import random

    reference, seconds = timed_reference
    out = tmp_path / "five"
    rng = random.Random(5)
    for _ in range(5):
        proc = subprocess.Popen(_cmd(small, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:  # anywhere from start-up to the last files, on a fast machine or a slow one
            proc.wait(timeout=rng.uniform(0.2, 1.0) * seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    subprocess.run(_cmd(small, out), check=True, capture_output=True)
    _assert_same_run(reference, out)


def test_a_finished_run_is_returned_only_for_the_same_settings(small, tmp_path):
    report = finetune(LITE, str(small), head_epochs=0, epochs=1, out=str(tmp_path), **QUICK)
    stamp = report.stat().st_mtime_ns
    assert finetune(LITE, str(small), head_epochs=0, epochs=1, out=str(tmp_path), **QUICK) == report
    with pytest.raises(BottleneckError, match=r"holds a finished run with other settings \(lr\)"):
        finetune(LITE, str(small), head_epochs=0, epochs=1, lr=0.5, out=str(tmp_path), **QUICK)
    other = make_tree(tmp_path.parent / "other-data", {"train": 4, "val": 2, "test": 2})
    with pytest.raises(BottleneckError, match=r"other settings \(data_dir\)"):
        finetune(LITE, str(other), head_epochs=0, epochs=1, out=str(tmp_path), **QUICK)
    assert report.stat().st_mtime_ns == stamp


def test_a_second_run_into_a_folder_being_trained_is_refused_at_once(small, tmp_path):
    from bottleneck.errors import Busy

    out = tmp_path / "run"
    holder = hold_lock(Path(f"{out}.lock"))
    try:
        with pytest.raises(Busy, match=f"{out} is being written by another process \\(pid {holder.pid}\\)"):
            finetune(LITE, str(small), head_epochs=0, epochs=1, out=str(out), **QUICK)
        assert not out.exists()  # nothing decoded, nothing written
    finally:
        holder.kill()
        holder.wait()


def test_evaluate_refuses_images_that_are_gone(small, tmp_path):
    """Moved data once scored its missing images as black placeholders: accuracy 0.50, exit 0."""
    import shutil

    from bottleneck.extract import extract
    from bottleneck.predict import evaluate

    data = shutil.copytree(small, tmp_path / "data")
    finetune(LITE, str(data), head_epochs=0, epochs=1, out=str(tmp_path / "ft"), **QUICK)
    cache = extract(LITE, str(data), out=str(tmp_path / "c"), batch_size=8, workers=0, progress=False)
    model = str(tmp_path / "ft" / "model.pt")
    rep = evaluate(model, str(cache))
    assert rep["n_test"] == 6 and rep["test_set"]["n"] == 6
    shutil.move(data, tmp_path / "moved")
    with pytest.raises(BottleneckError, match=r"6 of the 6 test images .* cannot be read .* was the data moved"):
        evaluate(model, str(cache))


def test_a_run_stopped_early_and_interrupted_while_saving_resumes_to_its_end(small, tmp_path):
    # A learning rate too small to move any weight (and a frozen backbone, so no BatchNorm
    # statistics move either) keeps the validation loss flat: patience 1 stops after epoch 2.
    args = dict(head_epochs=0, epochs=5, patience=1, unfreeze="0", lr=1e-30, out=str(tmp_path), **QUICK)
    (tmp_path / "model.pt").mkdir(parents=True)  # the final save fails, as if killed while writing
    with pytest.raises(OSError, match="model.pt"):
        finetune(LITE, str(small), **args)
    assert (tmp_path / "checkpoint.pt").is_file()
    (tmp_path / "model.pt").rmdir()
    import json

    rep = json.loads(finetune(LITE, str(small), **args).read_text())
    assert [h["epoch"] for h in rep["history"]] == [1, 2]


def test_sigterm_while_images_decode_exits_75_without_a_traceback(tmp_path):
    import numpy as np
    from PIL import Image

    big = tmp_path / "big.png"  # noise, 1024 px: tens of milliseconds to decode, so decoding lasts seconds
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)).save(big)
    for split, n in {"train": 100, "val": 2, "test": 2}.items():
        for c in ("a", "b"):
            folder = tmp_path / "data" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                os.link(big, folder / f"{i}.png")
    log = tmp_path / "log"
    with open(log, "w") as f:
        proc = subprocess.Popen(_cmd(tmp_path / "data", tmp_path / "out"), stdout=subprocess.PIPE, stderr=f)
        deadline = time.monotonic() + 120
        while "decoding train" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 75
    text = log.read_text()
    assert "while decoding images" in text and "Traceback" not in text and "training:" not in text


def test_init_head_starts_from_the_probe_with_its_predictions_and_skips_the_head_phase(small, tmp_path):
    import json

    import numpy as np

    from bottleneck import data
    from bottleneck.classify import fit
    from bottleneck.extract import extract
    from bottleneck.finetune_probe import init_head, read_probe
    from bottleneck.store import FeatureStore

    cache = extract(LITE, str(small), layer=["pool"], image_size=64, out=str(tmp_path / "c"), batch_size=8, workers=0,
                    precision="fp32", progress=False)
    probe = fit(str(cache), layer="pool", search=False, out=str(tmp_path / "fit")).parent / "model.skops"
    with FeatureStore(cache) as st:
        expected = trained.load(probe).pipe.predict_proba(st.features("test", "pool"))
        paths, prep = st.paths("test"), st.attrs["preprocessing"]
    net = networks.build_model(LITE)
    head = networks.replace_head(net, LITE, 2, seed=0)
    init_head(net, head, read_probe(str(probe), LITE, "DEFAULT", ["cats", "dogs"], prep))
    images = torch.stack([data.resize_crop(data.load_image(small / p), prep) for p in paths])
    got = networks.predict_proba(net.eval(), images, prep, torch.device("cpu"), "fp32", "none").numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)  # step 0 of LP-FT is the probe

    rep = json.loads(finetune(LITE, str(small), init_head=str(probe), epochs=1, out=str(tmp_path / "ft"), **QUICK)
                     .read_text())
    assert [h["phase"] for h in rep["history"]] == ["finetune"] and rep["params"]["head_epochs"] == 0
    assert rep["head_only"] is not None and rep["params"]["init_head"] == str(probe)

    svm = fit(str(cache), clf="svm", layer="pool", search=False, out=str(tmp_path / "fit")).parent / "model.skops"
    with pytest.raises(BottleneckError, match="not a linear probe"):
        finetune(LITE, str(small), init_head=str(svm), epochs=1, out=str(tmp_path / "ft2"), **QUICK)
    with pytest.raises(BottleneckError, match="preprocessing"):
        finetune(LITE, str(small), init_head=str(probe), epochs=1, out=str(tmp_path / "ft3"),
                 **QUICK | {"image_size": 96})


def test_a_target_threshold_is_chosen_on_val_by_the_final_model_and_scored_on_test(small, tmp_path):
    import json

    import numpy as np

    from bottleneck import report

    path = finetune(LITE, str(small), head_epochs=0, epochs=1, target="recall:dogs=0.5", out=str(tmp_path), **QUICK)
    rep = json.loads(path.read_text())
    point = rep["operating_point"]
    assert point["chosen_on"] == "validation split, scored by the final model" and point["n_validation"] == 4
    assert point["met_on_validation"] and point["validation"]["recall"] >= 0.5
    rows = report.read_predictions(path.parent / "predictions.csv").values()
    dogs = [r["probabilities"]["dogs"] for r in rows if r["true"] == "dogs"]
    assert point["test"]["per_class"]["dogs"]["recall"] == np.mean([p >= point["threshold"] for p in dogs])
    assert rep["positive_class"] == "dogs" and len(rep["roc_auc_ci"]) == 2 and rep["log_loss"] > 0
    assert rep["params"]["target"] == "recall:dogs=0.5"
    with pytest.raises(BottleneckError, match="names class 'birds'"):
        finetune(LITE, str(small), target="recall:birds=0.5", out=str(tmp_path / "bad"), **QUICK)


def test_a_finished_run_on_data_changed_since_is_refused_and_run_redoes_it_only_with_force(tmp_path):
    """A class added to --data once returned the old run ("already holds this finished run"), old classes and all."""
    import json

    from conftest import make_image

    from bottleneck import pipeline

    data = make_tree(tmp_path / "data", {"train": 4, "val": 2, "test": 2})

    def add_class(name: str, tint: int) -> None:
        for split, n in {"train": 4, "val": 2, "test": 2}.items():
            for i in range(n):
                make_image(data / split / name / f"{i}.png", seed=1000 + tint * 10 + i, tint=tint)

    args = dict(head_epochs=0, epochs=1, out=str(tmp_path / "ft"), **QUICK)
    report = finetune(LITE, str(data), **args)
    add_class("birds", 2)
    with pytest.raises(BottleneckError, match=r"holds a finished run with other data \(the classes or images"):
        finetune(LITE, str(data), **args)
    assert json.loads(report.read_text())["classes"] == ["cats", "dogs"]  # refused, not overwritten

    toml = tmp_path / "e.toml"
    toml.write_text(f'out = "{tmp_path / "run"}"\n\n[data]\npath = "{data}"\n\n[[finetune]]\nmodel = "squeezenet1_1"\n'
                    'weights = "none"\nhead_epochs = 0\nepochs = 1\nbatch_size = 4\nimage_size = 64\nworkers = 0\n')
    pipeline.run(toml, progress=False)
    done = tmp_path / "run" / "finetune" / "squeezenet1_1" / "report.json"
    assert json.loads(done.read_text())["classes"] == ["birds", "cats", "dogs"]
    add_class("fish", 1)
    with pytest.raises(BottleneckError, match=r"made with other data .*rerun with --force"):
        pipeline.run(toml, progress=False)
    pipeline.run(toml, force=True, progress=False)
    assert json.loads(done.read_text())["classes"] == ["birds", "cats", "dogs", "fish"]
