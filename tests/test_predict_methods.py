"""Predict with FDSL (a 1-epoch checkpoint) and PCSNet (1 epoch) on tiny trees: CLI, API and errors."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import api
from common.utils import UserError
from data.meta import scan_mvtec_layout, write_meta
from fdsl import predict as fdsl_predict
from fdsl import train as fdsl_train
from pcsnet import predict as pcsnet_predict
from tests.fixtures import make_mvtec_tree, make_predict_parts, one_thread  # noqa: F401  (autouse fixture)

SIZES = {(64, 64), (96, 80)}  # (width, height) of the queries
PCSNET_TINY = {"epochs": 1, "image_size": 64, "cas_width": 8, "aug_pool": 1}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """3 references (64 px); queries: 2 good + 2 defects, half resized to 96x80, and one unreadable file."""
    base = tmp_path_factory.mktemp("predict_methods")
    refs, queries = make_predict_parts(base)
    (queries / "empty.png").write_bytes(b"")
    return refs, queries, base


@pytest.fixture(scope="module")
def checkpoint(parts):
    """A 1-epoch FDSL head (efficientnet_lite0, 64 px) trained by `python -m fdsl.train` on a tiny auxiliary tree."""
    _, _, base = parts
    aux = make_mvtec_tree(base / "aux", classes=("a",), n_train=4, n_test_good=2, defects={"crack": 2}, seed=1)
    write_meta(aux, scan_mvtec_layout(aux, verbose=False))
    args = ["--dataset-root", str(aux), "--save-dir", str(base / "fdsl"), "--backbone", "efficientnet_lite0",
            "--epochs", "1", "--image-size", "64", "--device", "cpu", "--progress", "0",
            "--train-k-shot", "2"]  # fmt: skip
    assert fdsl_train.main(args) == 0
    return base / "fdsl" / "last.pth"


def _check_outputs(out: Path, queries: Path, method: str) -> dict:
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert [Path(r["image"]).name for r in rows] == sorted(p.name for p in queries.iterdir())  # one row per image
    for row in rows:
        if Path(row["image"]).name == "empty.png":
            assert row["decision"] == "unreadable" and row["error"]
            continue
        assert (int(row["width"]), int(row["height"])) in SIZES and np.isfinite(float(row["score"]))
        assert row["decision"] in ("normal", "anomalous") and (out / row["panel"]).is_file()
    info = json.loads((out / "threshold.json").read_text())
    assert info["method"] == method and info["k_shot"] == 3 and np.isfinite(info["value"])
    return info


def _api_maps(detector, queries: Path) -> None:
    for path in sorted(queries.glob("[gc]*.png")):
        score, anomaly_map = detector.predict(path)
        width, height = Image.open(path).size
        assert anomaly_map.shape == (height, width) and anomaly_map.dtype == np.float32
        assert np.isfinite(score) and np.isfinite(anomaly_map).all()
        assert detector.decide(score) == (score > detector.threshold)


# ------------------------------------------------------------------ FDSL


def test_fdsl_cli_one_row_per_image(parts, checkpoint, capsys):
    refs, queries, base = parts
    out = base / "fdsl_out"
    argv = ["--reference", str(refs), "--images", str(queries), "--out", str(out), "--checkpoint", str(checkpoint),
            "--quiet"]  # fmt: skip
    assert fdsl_predict.main(argv) == 0, capsys.readouterr().err
    info = _check_outputs(out, queries, "fdsl")
    # the CNN default scores the maximum of the smoothed, support-standardised map (fdsl/config.py CNN_IMAGE_SCORE)
    assert len(info["loo_scores"]) == 3 and info["score_is_map_max"] is True
    assert info["image_size"] == 64 and info["options"]["checkpoint"] == str(checkpoint)


def test_fdsl_api_with_windows_maps_at_image_size(parts, checkpoint):
    refs, queries, _ = parts
    detector = api.build_detector(
        "fdsl", refs, checkpoint=str(checkpoint), win_mode="mul", win_size=4, win_stride=3, fd_weight=0.5
    )
    assert detector.image_size == 64 and detector.detector.opts.win_mode == "mul"
    _api_maps(detector, queries)


def test_fdsl_errors_are_user_errors(parts, checkpoint, tmp_path):
    refs, _, _ = parts
    with pytest.raises(UserError, match="needs a checkpoint"):  # the shipped head only fits efficientnet_lite0
        api.build_detector("fdsl", refs, backbone="vit-tiny-test")
    with pytest.raises(UserError, match="unknown FDSL option"):
        api.build_detector("fdsl", refs, checkpoint=str(checkpoint), epochs=3)
    with pytest.raises(UserError, match="trained on efficientnet_lite0"):  # incompatible backbone
        api.build_detector("fdsl", refs, checkpoint=str(checkpoint), backbone="vit-tiny-test", image_size=64)
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(UserError, match="not an FDSL checkpoint"):
        api.build_detector("fdsl", refs, checkpoint=str(other))


def test_fdsl_missing_checkpoint_exit_2_one_line(parts, tmp_path):
    refs, queries, _ = parts
    proc = subprocess.run(
        [sys.executable, "-m", "fdsl.predict", "--reference", str(refs), "--images", str(queries),
         "--out", str(tmp_path / "o"), "--checkpoint", str(tmp_path / "nope.pth")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and proc.stderr.strip().count("\n") == 0 and "nope.pth" in proc.stderr
    assert not (tmp_path / "o" / "predictions.csv").exists()


# ------------------------------------------------------------------ PCSNet


def test_pcsnet_api_trains_and_maps_at_image_size(parts):
    refs, queries, _ = parts
    detector = api.build_detector("pcsnet", refs, **PCSNET_TINY)
    assert detector.k_shot == 3 and len(detector.loo.scores) == 3  # 3 LOO trainings + the final one
    assert detector.detector.cfg.epochs == 1 and detector.detector.cfg.save_checkpoints is False
    _api_maps(detector, queries)
    with pytest.raises(UserError, match="unknown PCSNet option"):
        api.build_detector("pcsnet", refs, checkpoint="x.pth")


def test_pcsnet_cli_loo_note_and_threshold_skip(parts, capsys):
    refs, queries, base = parts
    tiny = ["--epochs", "1", "--image-size", "64", "--cas-width", "8", "--aug-pool", "1", "--quiet"]
    out = base / "pcsnet_out"
    argv = ["--reference", str(refs), "--images", str(queries), "--out", str(out), *tiny]
    assert pcsnet_predict.main(argv) == 0
    printed = capsys.readouterr().out
    assert "trains 3 extra PCSNet model(s)" in printed and "--threshold" in printed
    info = _check_outputs(out, queries, "pcsnet")
    assert info["rule"] == "max" and len(info["loo_scores"]) == 3
    out2 = base / "pcsnet_fixed"
    assert pcsnet_predict.main([*argv[:5], str(out2), *tiny, "--threshold", "0.5"]) == 0
    assert "extra PCSNet" not in capsys.readouterr().out  # a given threshold skips the LOO trainings
    info = _check_outputs(out2, queries, "pcsnet")
    assert info["rule"] == "user" and info["value"] == 0.5 and info["loo_scores"] == []


def test_pcsnet_bad_config_exit_2(parts, tmp_path, capsys):
    refs, queries, _ = parts
    bad = tmp_path / "bad.yaml"
    bad.write_text("no_such_knob: 1\n")
    argv = ["--reference", str(refs), "--images", str(queries), "--out", str(tmp_path / "o"), "--config", str(bad)]
    assert pcsnet_predict.main(argv) == 2
    err = capsys.readouterr().err
    assert "no_such_knob" in err and err.count("\n") == 1


def test_fdsl_without_checkpoint_uses_the_shipped_demo_head(parts):
    refs, queries, _ = parts
    assert fdsl_predict.DEMO_CHECKPOINT.is_file() and fdsl_predict.DEMO_CHECKPOINT.stat().st_size < 2_000_000
    # fd_weight 0, knn_weight 0: the head's own map (the training-free FD and kNN maps have sharper peaks, which the
    # resize to the image's own 80 x 96 moves by more than the tolerance below)
    predictor = api.build_detector("fdsl", refs, image_size=64, image_score="map", fd_weight=0.0, knn_weight=0.0)
    assert predictor.detector.opts.fd_weight == 0.0
    score, anomaly_map = predictor.predict(str(queries / "crack_1.png"))
    assert anomaly_map.shape == (80, 96) and np.isfinite(score)
    assert score == pytest.approx(float(anomaly_map.max()), rel=1e-3)  # map score = max of the (smoothed) map
