"""What a run hands its observers (the report among them): one record per evaluated class, one per predict run.

The one definition of both records: `engine.records` re-exports them (this module imports only numpy, so the
report stays free of engine, data and method code). The class loop (`engine.loop.evaluate`) builds a
`ClassRecords` once per class after its metrics; the predict run (`engine.predict_run.run_cli`) one
`PredictRecords` per run after scoring.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class ClassRecords(NamedTuple):
    class_name: str
    image_paths: list[str]  # relative to the dataset root, in loader order (the class loop), or absolute paths
    gt_labels: np.ndarray  # (N,) 0 normal / 1 anomalous
    pred_scores: np.ndarray  # (N,) final image scores (after any per-class fusion), higher = more anomalous
    anomaly_maps: np.ndarray  # (N, H, W) float32 at the evaluation size (upsampled, smoothed)
    gt_masks: np.ndarray | None  # (N, H, W) uint8 0/1 at the evaluation size, None when the class has no masks; all
    # 0 = unknown for an anomalous image (left out of the pixel curves, as from the pixel metrics)
    metrics: dict  # the class's results.json metrics


class PredictRecords(NamedTuple):
    image_paths: list[str]  # every input image, in input order
    pred_scores: np.ndarray  # (N,) NaN for an unreadable image
    anomaly_maps: list  # (h, w) float32 per image (may be downscaled), None for an unreadable image
    decisions: list[str]  # "anomalous" | "normal" | "unreadable"
    threshold: float | None
    threshold_info: dict  # threshold.json's content (rule, margin / z, LOO scores, references, ...)
