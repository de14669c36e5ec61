"""`--resume`: a training process killed with SIGKILL after its first epoch resumes to the uninterrupted run's
weights; resumption refuses other options; main.py --resume skips the classes already recorded."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import main as pcsnet_main
from common.backbones import TINY_VIT
from fdsl import train as fdsl_train
from fdsl.checkpoint import latest_checkpoint, load_checkpoint
from tests.fixtures import make_mvtec_dataset, one_thread  # noqa: F401 - autouse: one torch thread in this module

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 5


@pytest.fixture(scope="module")
def train_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume") / "train_ds"
    return make_mvtec_dataset(root, classes=("a",), n_train=4, n_test_good=3, defects={"crack": 5}, size=64, seed=1)


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    """8 masked items, batch 2, mosaic and crops on: 4 steps per epoch, every RNG in use."""
    return ["--dataset-root", str(root), "--save-dir", str(out), "--backbone", TINY_VIT, "--epochs", str(EPOCHS),
            "--image-size", "64", "--device", "cpu", "--progress", "0", "--train-k-shot", "2", "--batch-size", "2",
            "--aug-rate", "0.5", "--use-crop", "1", *extra]  # fmt: skip


def test_killed_training_resumes_to_the_same_weights(train_root, tmp_path, capsys):
    assert fdsl_train.main(train_args(train_root, tmp_path / "reference")) == 0
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "fdsl.train", *train_args(train_root, run)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run / "epoch_1.pth").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no epoch_1.pth after 120 s"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stderr.close()
    killed_at = latest_checkpoint(run)[1]["epoch"]
    assert 1 <= killed_at < EPOCHS  # really interrupted mid-way
    for path in run.glob("*.pth"):  # every file under its final name is complete
        assert load_checkpoint(path)["epoch"] >= 1
    # a write cut short leaves only a temporary file (never a partial checkpoint); simulate one, resume removes it
    (run / ".last.pth.x1y2z3.tmp").write_bytes(b"partial")
    capsys.readouterr()
    assert fdsl_train.main(train_args(train_root, run, "--resume")) == 0
    out = capsys.readouterr().out
    assert f"(epoch {killed_at})" in out and ".last.pth.x1y2z3.tmp" in out
    assert not list(run.glob(".*.tmp"))
    for epoch in range(killed_at + 1, EPOCHS + 1):
        assert f"epoch {epoch}: loss" in out
    for name in ("last.pth", f"epoch_{EPOCHS}.pth"):
        ref, got = load_checkpoint(tmp_path / "reference" / name), load_checkpoint(run / name)
        assert got["epoch"] == ref["epoch"] == EPOCHS
        assert ref["head"].keys() == got["head"].keys()
        for key, value in ref["head"].items():
            torch.testing.assert_close(got["head"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        exp_avg = [s["exp_avg"] for s in ref["resume"]["optimizer"]["state"].values()]
        for i, s in enumerate(got["resume"]["optimizer"]["state"].values()):
            torch.testing.assert_close(s["exp_avg"], exp_avg[i], rtol=1e-5, atol=1e-7)
    with capsys.disabled():
        print(f" [killed with SIGKILL after epoch {killed_at} of {EPOCHS}; resumed weights match]", end="")


def test_resume_refuses_other_options(train_root, tmp_path, capsys):
    out = tmp_path / "o"
    args = train_args(train_root, out, "--epochs", "1")
    assert fdsl_train.main(args) == 0
    config = (out / "config.json").read_bytes()
    capsys.readouterr()
    assert fdsl_train.main([*args, "--resume", "--lr", "0.01", "--use-nam", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different options" in err and "lr 0.001 vs now 0.01" in err
    assert "use_nam 1 vs now 0" in err and str(out) in err
    assert (out / "config.json").read_bytes() == config  # nothing rewritten
    # options that do not change the training may differ: more epochs continues, progress/device are free
    assert fdsl_train.main([*args[:-2], "--epochs", "2", "--resume", "1", "--progress", "1"]) == 0
    assert load_checkpoint(out / "last.pth")["epoch"] == 2


def test_main_resume_skips_recorded_classes(tmp_path, capsys):
    root = make_mvtec_dataset(tmp_path / "ds", classes=("a", "b"), n_train=3, n_test_good=2, defects={"crack": 2})
    args = ["--data-root", str(root), "--k-shot", "1", "--seed", "0", "--image-size", "64", "--epochs", "1",
            "--cas-width", "8", "--aug-pool", "1", "--device", "cpu", "--quiet", "--resume"]  # fmt: skip
    assert pcsnet_main.main([*args, "--save-dir", str(tmp_path / "full")]) == 0
    full = json.loads((tmp_path / "full" / "results.json").read_text())
    # as if the run had died during class b: only a's record exists
    part = tmp_path / "part"
    (part / "classes").mkdir(parents=True)
    (part / "classes" / "a.json").write_bytes((tmp_path / "full" / "classes" / "a.json").read_bytes())
    capsys.readouterr()
    assert pcsnet_main.main([*args, "--save-dir", str(part)]) == 0
    assert "1 class(es) already recorded" in capsys.readouterr().out
    resumed = json.loads((part / "results.json").read_text())
    assert resumed["per_class"] == full["per_class"] and resumed["mean"] == full["mean"]
    assert resumed["support"] == full["support"] and resumed["timing"]["n_images"] == full["timing"]["n_images"]
    assert not (part / "checkpoints" / "a.pt").exists() and (part / "checkpoints" / "b.pt").is_file()
    assert pcsnet_main.main([*args, "--save-dir", str(part), "--cas-width", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other options" in err and "cas_width" in err
