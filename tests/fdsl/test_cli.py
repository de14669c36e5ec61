"""FDSL end to end on tiny synthetic trees: train -> test through the CLIs and the shell drivers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.backbones import TINY_VIT
from fdsl import test as fdsl_test
from fdsl import train as fdsl_train
from tests.fixtures import make_mvtec_dataset, tree_digest

REPO = Path(__file__).resolve().parents[2]
CONTRACT_KEYS = {
    "method",
    "dataset_root",
    "k_shot",
    "seed",
    "backbone",
    "image_size",
    "win_mode",
    "per_class",
    "mean",
    "support",
    "timing",
}
METRICS = {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"}


def _tree(root: Path, classes=("a", "b"), seed=0) -> Path:
    return make_mvtec_dataset(root, classes=classes, n_train=4, n_test_good=2, defects={"crack": 2}, size=64, seed=seed)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("fdsl")
    return _tree(base / "train_ds", ("a",), seed=1), _tree(base / "test_ds", ("a", "b"), seed=2), base


def _train(root, out, backbone, *extra):
    code = fdsl_train.main(
        [
            "--dataset-root",
            str(root),
            "--save-dir",
            str(out),
            "--backbone",
            backbone,
            "--epochs",
            "1",
            "--image-size",
            "64",
            "--device",
            "cpu",
            "--progress",
            "0",
            "--train-k-shot",
            "2",
            *extra,
        ]
    )
    assert code == 0
    return out / "last.pth"


def _test_args(root, ckpt, out, k_shot, seed, *extra) -> list[str]:
    """fdsl.test arguments on the CPU, without progress bars."""
    args = ["--dataset-root", str(root), "--checkpoint", str(ckpt), "--k-shot", str(k_shot), "--seed", str(seed),
            "--save-dir", str(out), *extra, "--device", "cpu", "--progress", "0"]  # fmt: skip
    return args


def test_clip_path_end_to_end_with_lfe(trees):
    train_root, test_root, base = trees
    before = tree_digest(test_root)
    ckpt = _train(train_root, base / "vit", TINY_VIT, "--aug-rate", "0.5", "--use-crop", "1")
    assert {p.name for p in (base / "vit").iterdir()} >= {"epoch_1.pth", "last.pth", "config.json"}
    assert json.loads((base / "vit" / "config.json").read_text())["backbone"] == TINY_VIT
    out = base / "vit_test"
    code = fdsl_test.main(
        _test_args(test_root, ckpt, out, 2, 0, "--win-mode", "mul", "--win-size", "4", "--win-stride", "3",
                   "--use-img-idx", "1")
    )  # fmt: skip
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert CONTRACT_KEYS <= set(results) and results["win_mode"] == "mul" and results["k_shot"] == 2
    assert set(results["per_class"]) == {"a", "b"} and set(results["mean"]) == METRICS
    assert all(0 <= v <= 1 for v in results["mean"].values() if v is not None)
    assert all(len(paths) == 2 for paths in results["support"].values())
    assert results["image_score"].startswith("paper") and results["bank_bytes"]["window_searched_bytes"] > 0
    assert (out / "log.txt").read_text().count("|") > 10
    report = (out / "report.html").read_text()  # issue 15: on by default, one section per class
    assert 'id="c-a"' in report and 'id="c-b"' in report and report.count('alt="overlay ') > 0
    assert tree_digest(test_root) == before  # the dataset folder is never written


def test_cnn_path_and_options(trees):
    train_root, test_root, base = trees
    ckpt = _train(train_root, base / "cnn", "efficientnet_lite0", "--use-nam", "0")
    out = base / "cnn_test"
    code = fdsl_test.main(
        _test_args(test_root, ckpt, out, 1, 3, "--win-mode", "onlywin", "--win-size", "4", "--win-stride", "4",
                   "--image-score", "max", "--fd-weight", "0.5", "--legacy-second-draw", "1", "--class-name", "b",
                   "--no-report")
    )  # fmt: skip
    assert code == 0 and not (out / "report.html").exists()  # a bare --no-report means 1
    results = json.loads((out / "results.json").read_text())
    assert list(results["per_class"]) == ["b"] and results["use_nam"] is False and results["win_zoom"] == 2.0
    assert results["image_score"].startswith("max") and results["fd_weight"] == 0.5
    # the pooling the head was trained with is recorded for the test side (default: none)
    assert json.loads((ckpt.parent / "config.json").read_text())["feature_pool"] == 1
    # a NAM request against a head trained without NAM, and a backbone that does not match, are user errors
    args = _test_args(test_root, ckpt, base / "x", 1, 0)
    assert fdsl_test.main(args + ["--use-nam", "1"]) == 2
    assert fdsl_test.main(args + ["--backbone", TINY_VIT]) == 2


def test_bad_inputs_exit_2(trees, tmp_path, capsys):
    train_root, test_root, base = trees
    assert (
        fdsl_train.main(
            ["--dataset-root", str(tmp_path / "nope"), "--save-dir", str(tmp_path / "o"), "--backbone", TINY_VIT]
        )
        == 2
    )
    assert (
        fdsl_test.main(
            [
                "--dataset-root",
                str(test_root),
                "--checkpoint",
                str(tmp_path / "missing.pth"),
                "--k-shot",
                "1",
                "--seed",
                "0",
                "--save-dir",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert (
        fdsl_test.main(
            [
                "--dataset-root",
                str(test_root),
                "--checkpoint",
                "x.pth",
                "--seed",
                "0",
                "--save-dir",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "does not exist" in err and "--k-shot" in err and "Traceback" not in err


@pytest.mark.parametrize("script", ["trainAndTest.sh", "test_few_shot.sh"])
@pytest.mark.parametrize(
    "args",
    [
        [],
        ["fdsl", "0", "1", "mul", "13", "2", "0.5", "14"],
        ["fdsl", "cpu", "2", "mul", "13", "2", "0.5", "14", "1"],
        ["fdsl", "cpu", "1", "max", "13", "2", "0.5", "14", "1"],
    ],
)
def test_driver_argument_errors(script, args):
    proc = subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage: bash" in proc.stderr


def test_drivers_end_to_end(trees, tmp_path):
    train_root, test_root, _ = trees
    env = {
        **os.environ,
        "MVTEC_ROOT": str(train_root),
        "VISA_ROOT": str(test_root),
        "BACKBONE": TINY_VIT,
        "EPOCHS_MVTEC": "1",
        "EPOCHS_VISA": "2",
        "PYTHON": sys.executable,
        "EXTRA_TEST_ARGS": "--progress 0",
    }
    args = ["tiny", "cpu", "1", "mul", "4", "2", "0.5", "7", "1"]
    proc = subprocess.run(
        ["bash", str(REPO / "trainAndTest.sh"), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / f"exps/mvtec/{TINY_VIT}/fewshot/tiny/epoch_2.pth").is_file()
    for ds in ("visa", "mvtec"):
        results = json.loads((tmp_path / f"results/{ds}/few_shot/tiny/s1shot/seed7/results.json").read_text())
        assert results["seed"] == 7 and results["win_mode"] == "mul"
        assert (tmp_path / f"results/{ds}/few_shot/tiny/s1shot/seed7/report.html").is_file()  # the drivers too
    proc = subprocess.run(
        ["bash", str(REPO / "test_few_shot.sh"), *args[:3], "nan", *args[4:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "results/mvtec/few_shot/tiny_winmodenan/s1shot/seed7/results.json").is_file()


def test_shipped_head_is_the_default_and_the_cnn_defaults_are_recorded(trees, tmp_path):
    """Without --checkpoint fdsl.test uses the shipped broad-corpus head (efficientnet_lite0) and the CNN defaults
    chosen on the dev benchmark; a stripped training checkpoint keeps the head and drops the resume state."""
    import torch

    from fdsl.checkpoint import SHIPPED_HEAD, load_checkpoint, strip_checkpoint
    from fdsl.config import CNN_FD_MATCH, CNN_FD_WEIGHT, CNN_KNN_WEIGHT, CNN_MAP_NORM, CNN_SMOOTH_SIGMA

    _, test_root, base = trees
    out = tmp_path / "shipped"
    args = ["--dataset-root", str(test_root), "--k-shot", "2", "--seed", "0", "--save-dir", str(out),
            "--image-size", "64", "--device", "cpu", "--progress", "0", "--no-report"]  # fmt: skip
    assert fdsl_test.main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoint"] == str(SHIPPED_HEAD) and results["backbone"] == "efficientnet_lite0"
    assert (results["fd_match"], results["map_norm"], results["fd_weight"]) == (CNN_FD_MATCH, CNN_MAP_NORM,
                                                                               CNN_FD_WEIGHT)  # fmt: skip
    assert results["image_score"].startswith("map") and results["smooth_sigma"] == CNN_SMOOTH_SIGMA
    assert results["knn_weight"] == CNN_KNN_WEIGHT and results["bank_bytes"]["knn_bank_bytes"] > 0
    shipped = load_checkpoint(SHIPPED_HEAD)
    assert "resume" not in shipped and shipped["config"]["fd_match"] == "joint"  # trained as it is tested
    ckpt = _train(test_root, base / "strip_src", "efficientnet_lite0")
    assert "resume" in load_checkpoint(ckpt)
    stripped = load_checkpoint(strip_checkpoint(ckpt, tmp_path / "head.pth"))
    assert "resume" not in stripped
    for key, value in load_checkpoint(ckpt)["head"].items():
        assert torch.equal(stripped["head"][key], value), key
    assert fdsl_test.main(args + ["--backbone", TINY_VIT]) == 2  # the shipped head fits efficientnet_lite0 only
