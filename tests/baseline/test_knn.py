"""The training-free baseline end to end: it must find the synthetic defects, through the CLI."""

import json
import subprocess
import sys

import pytest

from baseline.knn import main
from common.results import METRIC_KEYS
from tests.fixtures import make_mvtec_tree


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = make_mvtec_tree(tmp_path_factory.mktemp("knn") / "ds", classes=("a", "b"), n_train=4, n_test_good=4,
                           defects={"crack": 4}, size=64)
    subprocess.run([sys.executable, "data/mvtec.py", "--root", str(root)], check=True, capture_output=True)
    return root


def test_knn_finds_synthetic_defects(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("FSAD_TIMING", "1")  # backbone timing is opt-in (common.timing), as the benchmark runs it
    assert main(["--dataset-root", str(tree), "--k-shot", "2", "--seed", "0", "--save-dir", str(tmp_path),
                 "--image-size", "64", "--quiet"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["method"] == "knn" and results["k_shot"] == 2
    assert set(results["per_class"]) == {"a", "b"}
    for cls, metrics in results["per_class"].items():
        assert set(metrics) == set(METRIC_KEYS)
        assert len(results["support"][cls]) == 2 and all("/train/good/" in p for p in results["support"][cls])
    # bright rectangles on a texture are easy: a working detector localises them well
    assert results["mean"]["pixel_auroc"] > 0.9
    assert results["mean"]["image_auroc"] > 0.8
    timing = results["timing"]
    assert timing["n_images"] == 16
    # where the time went: set-up + test = total, the backbone is part of the test loop, never all of it
    assert timing["setup_seconds"] + timing["test_seconds"] == pytest.approx(timing["seconds_total"], rel=1e-6)
    assert 0 < timing["backbone_seconds"] < timing["test_seconds"] and 0 < timing["backbone_share"] < 1
    assert 0 <= timing["data_seconds"] < timing["test_seconds"]


def test_knn_coreset_keeps_a_fraction_of_the_bank_and_still_finds_defects(tree, tmp_path):
    runs = {}
    for ratio in ("1.0", "0.25"):
        out = tmp_path / ratio
        main(["--dataset-root", str(tree), "--k-shot", "2", "--seed", "0", "--save-dir", str(out),
              "--image-size", "64", "--quiet", "--coreset", ratio, "--class-name", "a"])  # fmt: skip
        runs[ratio] = json.loads((out / "results.json").read_text())
    assert runs["0.25"]["coreset"] == 0.25
    assert runs["0.25"]["bank_bytes"] == pytest.approx(runs["1.0"]["bank_bytes"] / 4, rel=0.01)
    assert runs["0.25"]["mean"]["pixel_auroc"] > 0.9


def test_knn_same_seed_same_numbers_and_faiss_agrees(tree, tmp_path):
    runs = []
    for sub, backend in (("a", "torch"), ("b", "torch"), ("c", "faiss")):
        out = tmp_path / sub
        main(["--dataset-root", str(tree), "--k-shot", "1", "--seed", "3", "--save-dir", str(out),
              "--image-size", "64", "--quiet", "--nn-backend", backend])
        runs.append(json.loads((out / "results.json").read_text()))
    assert runs[0]["mean"] == runs[1]["mean"]
    assert runs[0]["support"] == runs[2]["support"]
    for key in ("image_auroc", "pixel_auroc"):
        assert abs(runs[0]["mean"][key] - runs[2]["mean"][key]) < 1e-3


def test_knn_bad_input_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "baseline.knn", "--dataset-root", str(tmp_path / "nope"),
                           "--k-shot", "1", "--save-dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:")
