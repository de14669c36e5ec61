"""Determinism on CPU: the same command and seed gives the same results.json metrics (to 1e-6) and the same trained
weights. Each command runs once in a fresh interpreter (its own hash seed) and once in this process."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main as pcsnet_main
from common.backbones import TINY_VIT
from common.results import METRIC_KEYS
from fdsl import test as fdsl_test
from fdsl import train as fdsl_train
from fdsl.checkpoint import load_checkpoint
from tests.fixtures import make_mvtec_dataset, one_thread  # noqa: F401 - autouse: one torch thread in this module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("det")
    roots = []
    for name, classes, seed in (("train_ds", ("a",), 1), ("test_ds", ("a", "b"), 2)):
        roots.append(
            make_mvtec_dataset(base / name, classes=classes, n_train=4, n_test_good=2, defects={"crack": 3}, seed=seed)
        )
    return roots


def fresh_interpreter(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("PYTHONHASHSEED", None)
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def assert_same_metrics(first: Path, second: Path) -> None:
    a, b = json.loads((first / "results.json").read_text()), json.loads((second / "results.json").read_text())
    assert a["support"] == b["support"] and list(a["per_class"]) == list(b["per_class"])
    for group_a, group_b in [(a["mean"], b["mean"])] + [(a["per_class"][c], b["per_class"][c]) for c in a["per_class"]]:
        for key in METRIC_KEYS:
            x, y = group_a[key], group_b[key]
            assert (x is None) == (y is None), key
            assert x is None or math.isclose(x, y, rel_tol=0, abs_tol=1e-6), (key, x, y)
    assert any(v is not None for v in a["mean"].values())


def train_args(root: Path, out: Path) -> list[str]:
    return ["--dataset-root", str(root), "--save-dir", str(out), "--backbone", TINY_VIT, "--epochs", "2",
            "--image-size", "64", "--device", "cpu", "--progress", "0", "--train-k-shot", "2", "--batch-size", "2",
            "--aug-rate", "0.5", "--use-crop", "1"]  # fmt: skip


def test_fdsl_train_and_test_twice(trees, tmp_path):
    train_root, test_root = trees
    assert fdsl_train.main(train_args(train_root, tmp_path / "t1")) == 0
    assert fdsl_train.main(train_args(train_root, tmp_path / "t2")) == 0
    a, b = load_checkpoint(tmp_path / "t1" / "last.pth")["head"], load_checkpoint(tmp_path / "t2" / "last.pth")["head"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    args = ["--dataset-root", str(test_root), "--checkpoint", str(tmp_path / "t1" / "last.pth"), "--k-shot", "2",
            "--seed", "5", "--win-mode", "mul", "--win-size", "4", "--win-stride", "3", "--device", "cpu",
            "--progress", "0"]  # fmt: skip
    fresh_interpreter("-m", "fdsl.test", *args, "--save-dir", str(tmp_path / "r1"))
    assert fdsl_test.main([*args, "--save-dir", str(tmp_path / "r2")]) == 0
    assert_same_metrics(tmp_path / "r1", tmp_path / "r2")


def test_main_twice(trees, tmp_path, capsys):
    _, test_root = trees
    args = ["--data-root", str(test_root), "--k-shot", "2", "--seed", "4", "--image-size", "64", "--epochs", "1",
            "--cas-width", "8", "--aug-pool", "1", "--device", "cpu", "--quiet"]  # fmt: skip
    fresh_interpreter(str(REPO / "main.py"), *args, "--save-dir", str(tmp_path / "r1"))
    assert pcsnet_main.main([*args, "--save-dir", str(tmp_path / "r2")]) == 0
    assert_same_metrics(tmp_path / "r1", tmp_path / "r2")
