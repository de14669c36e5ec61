"""ONNX export: the graph in onnxruntime against the PyTorch predict path, for kNN, FDSL and PCSNet."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import api
from baseline import predict as knn_predict
from common.anomaly_map import gaussian_smooth
from common.memory_bank import nearest_neighbors
from data.dataset import read_image
from export import main as export_main
from export.cli import export_predictor
from tests.fixtures import make_mvtec_tree, make_predict_parts, one_thread  # noqa: F401  (autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
# tiny settings: 3 references of 64 px, efficientnet_lite0; FDSL uses the head shipped in fdsl/weights (the one
# fdsl.predict loads without --checkpoint), PCSNet trains 1 epoch of a CAS of width 8
OPTIONS = {
    "knn": {"image_size": 64},
    "fdsl": {"image_size": 64},  # the CNN defaults: joint FD, support-standardised maps, the map's maximum
    "fdsl-map": {"image_size": 64, "image_score": "map", "fd_weight": 0.5},  # the demo's FDSL setting
    # the paper's FD and fusion with FDSL's own per-image score
    "fdsl-own": {"image_size": 64, "image_score": "max", "map_norm": "none", "fd_match": "level", "fd_weight": 0.0},
    "pcsnet": {"image_size": 64, "epochs": 1, "cas_width": 8, "aug_pool": 1},
}


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """3 references; queries: 2 good + 2 defects, one of each resized to 96 x 80 (the graph input is squashed)."""
    base = tmp_path_factory.mktemp("export")
    refs, queries = make_predict_parts(base)
    return refs, sorted(queries.iterdir()), base


def consumer_input(path: Path, spec: dict) -> np.ndarray:
    """What a deployment does with preprocess.json alone (no project code): (1, 3, S, S) float32."""
    size = spec["image_size"]
    assert spec["resize"] == "bicubic" and spec["color"] == "rgb"
    rgb = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    x = np.asarray(rgb, dtype=np.float32) / 255.0
    x = (x - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("setting", list(OPTIONS))
def test_onnx_graph_equals_the_predict_path(parts, setting, tmp_path):
    refs, queries, _ = parts
    method = setting.split("-")[0]
    predictor = api.build_detector(method, refs, **OPTIONS[setting])
    export_predictor(predictor, tmp_path, method, OPTIONS[setting])
    spec = json.loads((tmp_path / "preprocess.json").read_text())
    assert spec["image_size"] == 64 and spec["mean"] == pytest.approx(list(predictor.detector.mean))
    assert spec["threshold"] == predictor.threshold and len(spec["loo_scores"]) == 3  # the predict path's LOO
    assert spec["score_is_map_max"] == (setting != "fdsl-own")  # FDSL's own score only when asked for
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["image"]  # bank / prototypes / head are constants inside
    assert [o.name for o in model.graph.output] == ["anomaly_map", "pred_score"]
    torch_scores, torch_maps = predictor.predict_batch([read_image(p) for p in queries])
    assert np.ptp(torch_scores) > 0 and torch_maps.std() > 0  # a comparison of non-trivial outputs
    run = session(tmp_path / "model.onnx")
    for i, path in enumerate(queries):
        x = consumer_input(path, spec)
        np.testing.assert_allclose(x, predictor.preprocess([read_image(path)]).numpy(), atol=1e-6)
        onnx_map, onnx_score = run.run(None, {"image": x})
        # maps at the detector's eval size, as predict and eval give them (engine: FDSL at its 240 px, the others S)
        side = 240 if method == "fdsl" else 64
        assert spec["eval_size"] == predictor.post.size == side
        assert onnx_map.shape == (1, side, side) and onnx_score.shape == (1,) and onnx_map.dtype == np.float32
        np.testing.assert_allclose(onnx_map[0], torch_maps[i], rtol=0, atol=1e-4)
        assert float(onnx_score[0]) == pytest.approx(float(torch_scores[i]), rel=1e-5, abs=1e-6)


def test_cli_scores_equal_predictions_csv(parts, tmp_path):
    """`python -m export` then onnxruntime gives the scores `python -m baseline.predict` writes, and its threshold."""
    refs, queries, base = parts
    images = base / "queries"
    assert export_main(["--method", "knn", "--reference", str(refs), "--out", str(tmp_path / "onnx"),
                        "--image-size", "64"]) == 0  # fmt: skip
    assert knn_predict.main(["--reference", str(refs), "--images", str(images), "--out", str(tmp_path / "pred"),
                             "--image-size", "64", "--no-panels", "--quiet"]) == 0  # fmt: skip
    spec = json.loads((tmp_path / "onnx" / "preprocess.json").read_text())
    info = json.loads((tmp_path / "pred" / "threshold.json").read_text())
    assert spec["threshold"] == pytest.approx(info["value"], rel=1e-6) and spec["threshold_rule"] == "max"
    rows = {
        Path(r["image"]).name: float(r["score"]) for r in csv.DictReader((tmp_path / "pred" / "predictions.csv").open())
    }
    run = session(tmp_path / "onnx" / "model.onnx")
    for path in queries:
        onnx_score = float(run.run(None, {"image": consumer_input(path, spec)})[1][0])
        assert onnx_score == pytest.approx(rows[path.name], rel=1e-5)  # the CSV keeps 6 significant digits
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["model.onnx", "preprocess.json"]  # no temp


def test_unsupported_lfe_windows_exit_2_one_line(parts, tmp_path):
    refs, _, _ = parts
    out = tmp_path / "o"
    proc = subprocess.run(
        [sys.executable, "-m", "export", "--method", "fdsl", "--reference", str(refs), "--out", str(out),
         "--win-mode", "mul"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and proc.stderr.strip().count("\n") == 0
    assert "LFE windows" in proc.stderr and "--win-mode nan" in proc.stderr
    assert not out.exists()


def test_flag_of_another_method_is_a_user_error(parts, tmp_path):
    refs, _, _ = parts
    assert export_main(["--method", "knn", "--reference", str(refs), "--out", str(tmp_path), "--epochs", "3"]) == 2


def test_capture_takes_the_torch_paths_of_faiss_and_opencv():
    """Traced with one input and run on another, the graph must recompute (not bake in) the faiss / OpenCV results:
    the torch twins recorded while capturing equal the CPU fast paths of eager mode."""
    gen = torch.Generator().manual_seed(0)
    bank, query, other = (torch.randn(n, 16, generator=gen) for n in (300, 40, 40))
    maps, other_maps = torch.rand(2, 1, 50, 60, generator=gen)

    def search(q):
        return nearest_neighbors(q, bank, 1, "l2", chunk_size=16, backend="faiss")[0]

    traced = torch.jit.trace(search, (query,), check_trace=False)
    exact = torch.cdist(other, bank).min(dim=1).values  # independent reference
    torch.testing.assert_close(traced(other)[:, 0], exact, rtol=0, atol=1e-5)
    torch.testing.assert_close(search(other)[:, 0], exact, rtol=0, atol=1e-5)  # eager: the faiss path
    smooth = torch.jit.trace(lambda m: gaussian_smooth(m, 4.0), (maps,), check_trace=False)
    torch.testing.assert_close(smooth(other_maps), gaussian_smooth(other_maps, 4.0), rtol=0, atol=1e-6)  # vs OpenCV
