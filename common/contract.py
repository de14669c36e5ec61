"""The method contract: what a detector provides, and the one post-processing that turns its output into maps.

A detector (kNN baseline, FDSL, PCSNet, or a new method) is any object with

    setup(class_name: str, support_images: Tensor (k, 3, S, S)) -> None     # banks / training on the k good images
    predict(images: Tensor (B, 3, S, S)) -> DetectorOutput(pred_score (B,) | None, anomaly_map (B, h, w))
    report() -> dict                                                       # JSON-safe results.json extras

and these attributes, which it sets itself (nobody patches them on from outside):

    mean, std: 3-tuples      the normalisation its inputs need (input spec)
    image_size: int          S, the side of its square inputs (input spec)
    smooth_sigma: float      gaussian sigma (px, at the eval size) on the upsampled map; 0 = none
    eval_size: int | None    side the map is upsampled to before smoothing and metrics; None = image_size
    score_fusion: callable | None   per-class fusion `(scores (N,), maps (N, H, W)) -> scores (N,)` applied by the
                             evaluation loop over a whole test class (e.g. FDSL's transductive min-max); None = none

`pred_score` None means "the maximum of the post-processed map". `post_process` is the only place where maps are
upsampled and smoothed: the evaluation loop (engine.loop) and the predictor (engine.predictor) both call it, so the
same detector gives the same map in `eval` and `predict`. This module imports neither `data/` nor any method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch

from common.anomaly_map import gaussian_smooth, image_score_max, upsample_map

ScoreFusion = Callable[[np.ndarray, np.ndarray], np.ndarray]


class DetectorOutput(NamedTuple):
    """What `predict` returns; a NamedTuple, so `score, anomaly_map = detector.predict(x)` keeps working."""

    pred_score: torch.Tensor | None  # (B,), or None = the maximum of the post-processed map
    anomaly_map: torch.Tensor  # (B, h, w) or (B, 1, h, w), any resolution


@runtime_checkable
class Detector(Protocol):
    mean: tuple
    std: tuple
    image_size: int
    smooth_sigma: float
    eval_size: int | None
    score_fusion: ScoreFusion | None

    def setup(self, class_name: str, support_images: torch.Tensor) -> None: ...

    def predict(self, images: torch.Tensor) -> DetectorOutput: ...

    def report(self) -> dict: ...


class NotSetUpError(RuntimeError):
    """`predict` was called before `setup` gave the detector its class state."""


def require_setup(ready: bool, name: str) -> None:
    """Raise NotSetUpError naming the detector class when it has no class state yet."""
    if not ready:
        raise NotSetUpError(f"{name}.predict called before setup(class_name, support_images)")


@dataclass(frozen=True)
class PostSpec:
    """How a detector's raw maps become the maps that are scored and shown."""

    size: int  # side the map is upsampled to
    smooth_sigma: float  # gaussian sigma in px at `size`; 0 = none
    score_fusion: ScoreFusion | None = None


def post_spec(detector: object) -> PostSpec:
    """The detector's post-processing spec (its `eval_size` or `image_size`, `smooth_sigma`, `score_fusion`).

    Raises:
        TypeError: the detector lacks `image_size` or `smooth_sigma` (a contract breach, not a user error).
    """
    missing = [name for name in ("mean", "std", "image_size", "smooth_sigma") if not hasattr(detector, name)]
    if missing:
        raise TypeError(f"{type(detector).__name__} does not declare {', '.join(missing)} (see common/contract.py)")
    size = getattr(detector, "eval_size", None) or detector.image_size
    return PostSpec(int(size), float(detector.smooth_sigma), getattr(detector, "score_fusion", None))


def post_process(output: tuple, spec: PostSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw detector output -> (scores (B,), maps (B, size, size)): upsample, smooth, score = map max if None.

    Args:
        output: `DetectorOutput` (or any `(pred_score | None, anomaly_map)` pair).
        spec: from `post_spec(detector)`.
    """
    pred_score, anomaly_map = output
    anomaly_map = upsample_map(anomaly_map, spec.size)
    if spec.smooth_sigma > 0:
        anomaly_map = gaussian_smooth(anomaly_map, spec.smooth_sigma)
    if pred_score is None:
        pred_score = image_score_max(anomaly_map)
    return pred_score.reshape(-1), anomaly_map


def minmax_fusion(image_scores: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """VAND/FDSL few-shot image score: 0.5 * (score + per-class min-max of the map maxima).

    Transductive: it normalises with the statistics of the whole test set of the class.
    """
    peak = maps.reshape(len(maps), -1).max(axis=1)
    span = peak.max() - peak.min()
    peak = (peak - peak.min()) / span if span > 0 else np.zeros_like(peak)
    return 0.5 * (image_scores + peak)
