"""The method contract (common/contract.py), checked for every method of the registry on tiny synthetic data.

Parametrised over `engine.registry.METHODS`: a method added with one registry line is checked here with no test
edit (the kNN baseline is picked up this way, like FDSL and PCSNet). Each method is built by its registry builder
with its `tiny` options (64 px, efficientnet_lite0; FDSL with the shipped demo head; PCSNet 1 epoch).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.contract import Detector, DetectorOutput, NotSetUpError, PostSpec, post_process
from data.dataset import read_image
from engine import registry
from engine.loop import EvalConfig, evaluate
from engine.predictor import Predictor
from engine.records import ClassRecords
from tests.fixtures import make_mvtec_dataset, one_thread  # noqa: F401  (autouse fixture)

CLASS = "part"
K_SHOT = 2
METRIC_KEYS = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")
CONTRACT_KEYS = ("method", "dataset_root", "k_shot", "seed", "backbone", "image_size", "win_mode", "per_class",
                 "mean", "support", "timing")  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("contract")
    return make_mvtec_dataset(base / "data", classes=(CLASS,), n_train=3, n_test_good=2, defects={"crack": 2},
                              size=64)  # fmt: skip


def _build(name: str, root: Path):
    refs = [read_image(p) for p in sorted((root / CLASS / "train" / "good").iterdir())[:K_SHOT]]
    method = registry.METHODS[name]
    return registry.load_builder(name)(refs, torch.device("cpu"), **method.tiny)


@pytest.mark.parametrize("name", list(registry.METHODS))
def test_method_follows_the_contract(name: str, root: Path) -> None:
    check_contract(_build(name, root), root)


def check_contract(detector, root: Path) -> None:
    """Every check of the contract on one built (not yet set-up) detector."""
    # the specs are the detector's own attributes
    assert isinstance(detector, Detector)
    assert len(detector.mean) == 3 and len(detector.std) == 3 and isinstance(detector.image_size, int)
    assert detector.image_size == 64 and detector.smooth_sigma >= 0
    assert detector.eval_size is None or isinstance(detector.eval_size, int)
    batch = torch.zeros(2, 3, 64, 64)
    with pytest.raises(NotSetUpError, match=f"{type(detector).__name__}.predict called before setup"):
        detector.predict(batch)

    # eval path: the class loop, with an observer receiving the class's records
    seen: list[ClassRecords] = []
    per_class, _ = evaluate(detector, EvalConfig(str(root), K_SHOT, 0, class_names=[CLASS], observers=[seen.append]),
                            progress=False)  # fmt: skip
    (record,) = seen
    n = per_class[CLASS].n_images
    size = detector.eval_size or detector.image_size
    assert record.class_name == CLASS and len(record.image_paths) == n == 4
    assert record.gt_labels.shape == (n,) and record.pred_scores.shape == (n,)
    assert record.anomaly_maps.shape == (n, size, size) and record.anomaly_maps.dtype == np.float32
    assert record.gt_masks.shape == (n, size, size) and record.gt_masks.dtype == np.uint8
    assert record.metrics == per_class[CLASS].metrics and set(METRIC_KEYS) <= set(record.metrics)
    json.dumps(detector.report())  # report() is JSON-serialisable
    assert isinstance(detector.report(), dict)

    # predict's output types and shapes
    output = detector.predict(batch)
    assert isinstance(output, DetectorOutput)
    assert output.pred_score is None or output.pred_score.shape == (2,)
    assert output.anomaly_map.shape[0] == 2 and output.anomaly_map.ndim in (3, 4)

    # predict path, same support and images: the same maps as the eval path (eval keeps them in fp16)
    support = [read_image(root / p) for p in per_class[CLASS].support]
    predictor = Predictor(detector, support, class_name=CLASS, threshold=1.0)
    scores, maps = predictor.predict_batch([read_image(root / p) for p in record.image_paths])
    assert maps.shape == record.anomaly_maps.shape
    span = float(np.ptp(record.anomaly_maps)) or 1.0
    np.testing.assert_allclose(maps, record.anomaly_maps, atol=2e-3 * span + 1e-3 * np.abs(maps).max(), rtol=0)
    if detector.score_fusion is None:
        np.testing.assert_allclose(scores, record.pred_scores, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("name", list(registry.METHODS))
def test_eval_cli_writes_every_contract_key(name: str, root: Path, tmp_path: Path) -> None:
    check_results_json(registry.METHODS[name], root, tmp_path)


def check_results_json(method: registry.Method, root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["--dataset-root", str(root), "--k-shot", str(K_SHOT), "--seed", "0", "--save-dir", str(out),
            *method.tiny_eval]  # fmt: skip
    assert registry.load(method.eval)(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(CONTRACT_KEYS) <= set(results)
    assert results["k_shot"] == K_SHOT and results["seed"] == 0 and results["image_size"] == 64
    assert set(results["per_class"]) == {CLASS} and set(results["per_class"][CLASS]) >= set(METRIC_KEYS)
    assert set(results["mean"]) >= set(METRIC_KEYS) and len(results["support"][CLASS]) == K_SHOT
    assert {"n_images", "seconds_total", "seconds_per_image"} <= set(results["timing"])
    assert results["timing"]["n_images"] == 4
    assert all(0.0 <= v <= 1.0 for v in results["per_class"][CLASS].values() if v is not None)


def test_post_process_is_upsample_smooth_then_max() -> None:
    """Hand-worked: a 2x2 map with one hot cell, upsampled to 4x4 (bilinear, half-pixel centres), no smoothing."""
    raw = torch.tensor([[[0.0, 0.0], [0.0, 4.0]]])
    scores, maps = post_process(DetectorOutput(None, raw), PostSpec(size=4, smooth_sigma=0.0))
    # bilinear with align_corners=False: the corner pixel keeps 4, its neighbours inside the hot cell are 3 and 2.25
    assert maps.shape == (1, 4, 4) and maps[0, 3, 3] == 4.0 and maps[0, 2, 3] == 3.0 and maps[0, 2, 2] == 2.25
    assert float(scores[0]) == 4.0  # None -> the maximum of the post-processed map
    given = torch.tensor([0.5])
    scores, smoothed = post_process(DetectorOutput(given, raw), PostSpec(size=4, smooth_sigma=1.0))
    assert float(scores[0]) == 0.5 and float(smoothed.max()) < 4.0  # a given score is kept; smoothing lowers the peak


# ------------------------------------------------------------------ a new method: one file (here: below) + one line


class MeanImageDetector:
    """A toy method: the anomaly map is the channel-mean |x - mean support image| on an 8 x 8 grid."""

    mean, std, image_size = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 64
    smooth_sigma, eval_size, score_fusion = 1.0, None, None

    def __init__(self) -> None:
        self.reference: torch.Tensor | None = None

    def setup(self, class_name: str, support_images: torch.Tensor) -> None:
        self.reference = support_images.mean(0)

    def predict(self, images: torch.Tensor) -> DetectorOutput:
        from common.contract import require_setup

        require_setup(self.reference is not None, type(self).__name__)
        diff = (images - self.reference).abs().mean(1, keepdim=True)
        return DetectorOutput(None, torch.nn.functional.avg_pool2d(diff, 8)[:, 0])

    def report(self) -> dict:
        return {"toy": True}


def build_toy(references, device, **options) -> MeanImageDetector:
    return MeanImageDetector()


def toy_eval_main(argv: list[str]) -> int:
    from common.utils import cli_entry
    from engine.runner import EvalRequest, print_summary, run_eval

    @cli_entry
    def main(argv: list[str]) -> int:
        args = dict(zip(argv[::2], argv[1::2]))
        request = EvalRequest("toy", args["--dataset-root"], int(args["--k-shot"]), int(args["--seed"]),
                              args["--save-dir"], progress=False)  # fmt: skip
        print_summary(run_eval(request, lambda device, meta: MeanImageDetector(), backbone="none"), args["--save-dir"])
        return 0

    return main(argv)


TOY = registry.Method("toy", "tests.test_contract:build_toy", "tests.test_contract:toy_eval_main",
                      "baseline.predict:main")  # the one registry line a new method adds  # fmt: skip


def test_a_method_added_with_one_registry_line_is_served_everywhere(root: Path, tmp_path: Path, monkeypatch) -> None:
    import api
    from engine import cli

    monkeypatch.setitem(registry.METHODS, "toy", TOY)
    check_contract(registry.load_builder("toy")([], torch.device("cpu")), root)
    check_results_json(TOY, root, tmp_path)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["method"] == "toy" and results["toy"] is True  # report() lands in results.json
    # `fsad eval --method toy` and the Python API find it through the registry
    out = tmp_path / "fsad"
    argv = ["eval", "--method", "toy", "--dataset-root", str(root), "--k-shot", "2", "--seed", "0",
            "--save-dir", str(out)]  # fmt: skip
    assert cli.main(argv) == 0 and json.loads((out / "results.json").read_text())["per_class"] == results["per_class"]
    predictor = api.build_detector("toy", str(root / CLASS / "train" / "good"))
    score, anomaly_map = predictor.predict(str(root / CLASS / "test" / "crack" / "000.png"))
    assert anomaly_map.shape == (64, 64) and predictor.decide(score) == (score > predictor.threshold)
