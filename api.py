"""Python API: inspect parts from a few good references inside your own script.

    from api import build_detector
    detector = build_detector("knn", "photos/good/")             # folder, files, or uint8 arrays
    score, anomaly_map = detector.predict("photos/new/0042.jpg")  # map: float32 (H, W) at the image's size
    if detector.decide(score): ...                                # score > detector.threshold

Methods: those of `engine/registry.py` ("knn", the training-free baseline, "fdsl", "pcsnet"); each builder is
imported on first use, so importing this module loads no model code. Detector contract: common/contract.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from common.predict import DEFAULT_CLASS_NAME, DEFAULT_MARGIN, DEFAULT_RULE, DEFAULT_Z
from common.utils import parse_device
from engine import registry
from engine.predictor import Predictor, read_references

METHODS = tuple(registry.METHODS)  # "knn", "fdsl", "pcsnet": the registry's names (engine/registry.py)
# method -> (module, builder function), derived from the registry (kept for callers of the older API)
BUILDERS: dict[str, tuple[str, str]] = {m.name: tuple(m.build.split(":")) for m in registry.METHODS.values()}


def load_builder(method: str) -> Callable[..., Any]:
    """The builder function of `method` (UserError: unknown method, or its module/function does not exist)."""
    entry = registry.get_method(method)
    target = ":".join(BUILDERS[method]) if method in BUILDERS else entry.build
    return registry.load(target, f"method '{method}' has no predict support yet")


def build_detector(
    method: str,
    references: str | os.PathLike | Sequence[str | os.PathLike] | Sequence[np.ndarray],
    *,
    device: str | None = "cpu",
    threshold: float | None = None,
    pixel_threshold: float | None = None,
    threshold_rule: str = DEFAULT_RULE,
    margin: float = DEFAULT_MARGIN,
    z: float = DEFAULT_Z,
    class_name: str = DEFAULT_CLASS_NAME,
    batch_size: int = 8,
    **options: Any,
) -> Predictor:
    """A ready detector: set up on the references, with a threshold estimated from them (leave-one-out).

    Args:
        method: a name of `engine.registry.METHODS` ("knn", "fdsl", "pcsnet").
        references: a folder (non-recursive), image files, or uint8 arrays `(H, W)` / `(H, W, 3)`; any sizes.
            Unreadable files are skipped (`UserError` when none is readable).
        device: "cpu", a CUDA index ("0") or "cuda:N"; None = CUDA when available.
        threshold: image-score threshold; None = the LOO rule (see docs/PREDICT.md).
        pixel_threshold: threshold of the map region; None = derived (equal to `threshold` for knn).
        threshold_rule: "max" (max LOO score * (1 + margin)) or "meanstd" (mean + z * std).
        margin: margin of the "max" rule.
        z: z of the "meanstd" rule.
        class_name: name passed to the detector's setup.
        batch_size: images per forward pass in `predict_batch`.
        **options: the method's builder options, e.g. knn: backbone, image_size, metric, layers, pretrained.

    Returns:
        A `common.predict.Predictor`: `predict(image) -> (score, anomaly_map (H, W))`, `predict_batch(images)`,
        `decide(score) -> bool`, `threshold`, `pixel_threshold`, `threshold_info()`.
    """
    builder = load_builder(method)
    images, _, _ = read_references(references)
    torch_device = parse_device(device)
    detector = builder(images, torch_device, **options)
    return Predictor(
        detector, images, class_name, threshold, pixel_threshold, threshold_rule, margin, z, torch_device, batch_size
    )
