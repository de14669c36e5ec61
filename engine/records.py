"""What the engine hands its observers: one record per evaluated class, one per predict run.

An observer is any callable taking the record; the class loop (`engine.loop.evaluate`) calls each observer once per
class after its metrics, the predictor (`engine.predict_run.run_predict`) once per run after scoring. Observers
write reports, panels, exports; they never change what is scored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np


class ClassRecords(NamedTuple):
    class_name: str
    image_paths: list[str]  # relative to the dataset root, in loader order
    gt_labels: np.ndarray  # (N,) 0 = normal, 1 = anomalous
    pred_scores: np.ndarray  # (N,) final image scores (after any per-class fusion)
    anomaly_maps: np.ndarray  # (N, H, W) float32 at the eval size (upsampled, smoothed)
    gt_masks: np.ndarray | None  # (N, H, W) uint8 0/1 at the eval size; None when no image of the class has a mask
    metrics: dict  # the class's results.json metrics


class PredictRecords(NamedTuple):
    image_paths: list[str]  # the readable images, in input order
    pred_scores: np.ndarray  # (N,)
    anomaly_maps: np.ndarray  # (N, H, W) float32 at the detector's eval size
    decisions: list[str]  # "anomalous" | "normal", per image
    threshold: float | None
    threshold_info: dict  # what threshold.json records


ClassObserver = Callable[[ClassRecords], None]
PredictObserver = Callable[[PredictRecords], None]
