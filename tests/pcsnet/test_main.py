"""main.py end to end on a tiny synthetic MVTec tree (efficientnet_lite0 at 64 px, 1-2 epochs); one subprocess run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.results import METRIC_KEYS
from data.meta import scan_mvtec_layout, write_meta
from tests.fixtures import make_mvtec_tree, tree_digest

REPO = Path(__file__).resolve().parents[2]
CONTRACT_KEYS = {"method", "dataset_root", "k_shot", "seed", "backbone", "image_size", "win_mode", "per_class",
                 "mean", "support", "timing"}  # fmt: skip


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = make_mvtec_tree(tmp_path_factory.mktemp("data") / "tree", classes=("a", "screw"), n_train=4, size=64)
    write_meta(root, scan_mvtec_layout(root, verbose=False))
    return root


def run_main(*args: str) -> subprocess.CompletedProcess:
    """main.py in a subprocess, as a user runs it."""
    cmd = [sys.executable, str(REPO / "main.py"), *args, "--device", "cpu", "--quiet"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)


def call_main(capsys, *args: str) -> tuple[int, str]:
    """main.main in this process (no interpreter start-up): (exit code, stderr)."""
    import main

    code = main.main([*args, "--device", "cpu", "--quiet"])
    return code, capsys.readouterr().err


def test_main_k1_writes_contract_results(tree, tmp_path):
    before = tree_digest(tree, exclude=())
    out = tmp_path / "out"
    proc = run_main("--data-root", str(tree), "--k-shot", "1", "--seed", "0", "--save-dir", str(out),
                    "--image-size", "64", "--epochs", "2", "--cas-width", "8", "--aug-pool", "1")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    assert CONTRACT_KEYS <= set(results) and results["method"] == "pcsnet" and results["k_shot"] == 1
    assert set(results["per_class"]) == {"a", "screw"}
    for metrics in results["per_class"].values():
        assert set(metrics) == set(METRIC_KEYS)
        assert all(v is None or 0.0 <= v <= 1.0 for v in metrics.values())
    assert all(len(paths) == 1 for paths in results["support"].values())
    assert results["timing"]["n_images"] == 12 and (out / "log.txt").is_file()
    assert (out / "checkpoints" / "screw.pt").is_file()
    report = (out / "report.html").read_text()  # issue 15: beside results.json, one section per class
    assert 'id="c-a"' in report and 'id="c-screw"' in report and "fsad report: pcsnet" in report
    assert tree_digest(tree, exclude=()) == before  # nothing written into the dataset folder


def test_main_one_class_with_yaml_and_flags(tree, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("cas_width: 4\nepochs: 5\nrefresh_prototypes: 1\n")
    args = [
        "--data-root",
        str(tree),
        "--k-shot",
        "2",
        "--seed",
        "1",
        "--save-dir",
        str(tmp_path / "o"),
        "--class-name",
        "a",
        "--image-size",
        "64",
        "--epochs",
        "1",
        "--config",
        str(config),
        "--no-checkpoints",
        "--set",
        "lr_cas=1e-3",
        "--set",
        "nsa_default_bounds=[0.01, 0.1]",
        "--set",
        "r_mode=linear",
    ]
    code, err = call_main(capsys, *args)
    assert code == 0, err
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    cfg = results["pcsnet"]["config"]
    assert list(results["per_class"]) == ["a"] and cfg["epochs"] == 1 and cfg["cas_width"] == 4
    assert cfg["refresh_prototypes"] == 1 and not (tmp_path / "o" / "checkpoints").exists()
    assert cfg["lr_cas"] == 1e-3 and cfg["nsa_default_bounds"] == [0.01, 0.1] and cfg["r_mode"] == "linear"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--k-shot", "0"], "k-shot"),
        (["--k-shot", "99"], "larger than"),
        (["--k-shot", "1", "--class-name", "nope"], "nope"),
        (["--k-shot", "1", "--cas-width", "0"], "CAS width"),
        (["--k-shot", "1", "--set", "lr_cas"], "KEY=VALUE"),
        (["--k-shot", "1", "--set", "no_such_option=1"], "no_such_option"),
    ],
)
def test_bad_input_is_one_line_exit_2(tree, tmp_path, capsys, args, message):
    code, err = call_main(capsys, "--data-root", str(tree), "--save-dir", str(tmp_path / "o"), "--epochs", "1", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_missing_dataset_and_wrn_weights(tmp_path, capsys):
    code, err = call_main(capsys, "--data-root", str(tmp_path / "none"), "--k-shot", "1", "--save-dir", str(tmp_path))
    assert code == 2 and "not a folder" in err
    root = make_mvtec_tree(tmp_path / "t", classes=("a",), n_train=2, size=32)
    write_meta(root, scan_mvtec_layout(root, verbose=False))
    code, err = call_main(capsys, "--data-root", str(root), "--k-shot", "1", "--save-dir", str(tmp_path / "o"),
                          "--backbone", "wide_resnet50_2", "--pretrained", str(tmp_path / "missing.pth"))  # fmt: skip
    assert code == 2 and "missing.pth" in err


def test_bare_vis_flag_writes_one_panel_per_test_image_like_knn(tree, tmp_path):
    out = tmp_path / "out"
    proc = run_main("--data-root", str(tree), "--k-shot", "1", "--seed", "0", "--save-dir", str(out), "--class-name",
                    "a", "--image-size", "64", "--epochs", "1", "--cas-width", "8", "--aug-pool", "1", "--vis",
                    "--no-report")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    results = json.loads((out / "results.json").read_text())
    panels = sorted((out / "vis").rglob("*.png"))
    assert len(panels) == results["timing"]["n_images"] > 0  # SAVE_DIR/vis, as baseline.knn --vis
