"""What a run hands the report: one record per evaluated class, one per predict run.

The evaluation loop (today `common.evaluation.evaluate`, later the engine's observers) builds a `ClassRecords`
once per class; `common.predict_run` builds one `PredictRecords`. Field names and types are shared with the engine
branch: keep them exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class ClassRecords(NamedTuple):
    class_name: str
    image_paths: list[str]  # readable paths (absolute, or relative to the working directory)
    gt_labels: np.ndarray  # (N,) 0 normal / 1 anomalous
    pred_scores: np.ndarray  # (N,) image scores, higher = more anomalous
    anomaly_maps: np.ndarray  # (N, H, W) float32 at the evaluation size
    gt_masks: np.ndarray | None  # (N, H, W) uint8 0/1, None when the class has no masks; all 0 = unknown for an
    # anomalous image (left out of the pixel curves, as from the pixel metrics)
    metrics: dict  # the class's results.json metrics


class PredictRecords(NamedTuple):
    image_paths: list[str]
    pred_scores: np.ndarray  # (N,) NaN for an unreadable image
    anomaly_maps: list  # (h, w) float32 per image (may be downscaled), None for an unreadable image
    decisions: list[str]  # "anomalous" | "normal" | "unreadable"
    threshold: float | None
    threshold_info: dict  # threshold.json's content (rule, margin / z, LOO scores, references, ...)
