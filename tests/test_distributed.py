"""torchrun with 2 CPU processes (gloo): the merged results.json equals the single-process one, for fdsl.test and
main.py, on a 3-class tree (uneven shards: classes a, c on rank 0, b on rank 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import main as pcsnet_main
from common.backbones import TINY_VIT
from fdsl import test as fdsl_test
from fdsl import train as fdsl_train
from tests.fixtures import make_mvtec_dataset, one_thread  # noqa: F401 - autouse: one torch thread in this module

REPO = Path(__file__).resolve().parents[1]


def tiny_tree(root: Path, classes: tuple[str, ...], seed: int) -> Path:
    return make_mvtec_dataset(root, classes=classes, n_train=4, n_test_good=2, defects={"crack": 3}, size=64, seed=seed)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    train_root = tiny_tree(base / "train_ds", ("a",), seed=1)
    test_root = tiny_tree(base / "test_ds", ("a", "b", "c"), seed=2)
    args = ["--dataset-root", str(train_root), "--save-dir", str(base / "ckpt"), "--backbone", TINY_VIT, "--epochs",
            "1", "--image-size", "64", "--device", "cpu", "--progress", "0", "--train-k-shot", "2"]  # fmt: skip
    assert fdsl_train.main(args) == 0
    return test_root, base / "ckpt" / "last.pth"


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS` (torch.distributed.run through this interpreter)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def assert_same_results(single: Path, merged: Path) -> None:
    """Everything but the timing is identical; log.txt has the same table; no temporary file is left."""
    a, b = json.loads((single / "results.json").read_text()), json.loads((merged / "results.json").read_text())
    assert list(a["per_class"]) == list(b["per_class"]) == ["a", "b", "c"]
    assert a["per_class"] == b["per_class"] and a["mean"] == b["mean"] and a["support"] == b["support"]
    assert a["timing"]["n_images"] == b["timing"]["n_images"] == 15
    assert {k: v for k, v in a.items() if k not in ("timing", "pcsnet")} == {
        k: v for k, v in b.items() if k not in ("timing", "pcsnet")
    }
    table = [line for line in (single / "log.txt").read_text().splitlines() if line.startswith("|")]
    assert table and table == [line for line in (merged / "log.txt").read_text().splitlines() if line.startswith("|")]
    assert not list(merged.rglob("*.tmp"))


def test_fdsl_test_two_processes_equal_one(data, tmp_path):
    test_root, ckpt = data
    args = ["--dataset-root", str(test_root), "--checkpoint", str(ckpt), "--k-shot", "2", "--seed", "3", "--win-mode",
            "mul", "--win-size", "4", "--win-stride", "3", "--device", "cpu", "--progress", "0"]  # fmt: skip
    assert fdsl_test.main([*args, "--save-dir", str(tmp_path / "single")]) == 0
    proc = torchrun("-m", "fdsl.test", *args, "--save-dir", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| mean ") == 1  # only rank 0 prints the table
    assert_same_results(tmp_path / "single", tmp_path / "merged")
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    single = json.loads((tmp_path / "single" / "results.json").read_text())
    assert merged["bank_bytes"] == single["bank_bytes"]  # taken from the rank that ran the last class


def test_main_two_processes_equal_one(data, tmp_path, capsys):
    test_root, _ = data
    args = ["--data-root", str(test_root), "--k-shot", "1", "--seed", "0", "--image-size", "64", "--epochs", "1",
            "--cas-width", "8", "--aug-pool", "1", "--device", "cpu", "--quiet"]  # fmt: skip
    assert pcsnet_main.main([*args, "--save-dir", str(tmp_path / "single")]) == 0
    capsys.readouterr()
    proc = torchrun(str(REPO / "main.py"), *args, "--save-dir", str(tmp_path / "merged"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_results(tmp_path / "single", tmp_path / "merged")
    a = json.loads((tmp_path / "single" / "results.json").read_text())["pcsnet"]
    b = json.loads((tmp_path / "merged" / "results.json").read_text())["pcsnet"]
    assert a["final_losses"] == b["final_losses"] and a["config"] == b["config"]
    assert sorted(p.name for p in (tmp_path / "merged" / "checkpoints").iterdir()) == ["a.pt", "b.pt", "c.pt"]


def test_driver_rejects_bad_nproc(tmp_path):
    env = {**os.environ, "NPROC": "two", "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "trainAndTest.sh"), "x", "cpu", "1", "nan", "4", "2", "0.5", "0", "1"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "NPROC must be a positive integer" in proc.stderr
