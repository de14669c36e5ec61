"""Inspect your own parts: the pure pieces of prediction (image collection, the leave-one-out threshold rule).

The predictor (`Predictor`: set-up detector + threshold, batched inference) and the image readers live in
`engine.predictor`, above `data/`; `common.predict.Predictor` etc. still resolve there on first use. The
method builders (`build_<method>_detector(references, device, **options)`) are listed in `engine.registry`; a
builder returns a detector that follows `common.contract` (its own mean/std/image_size and post-processing spec).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.anomaly_map import upsample_map
from common.contract import Detector  # noqa: F401  (re-exported)
from common.utils import UserError

_MOVED = {"Predictor", "LOOResult", "try_read", "to_rgb_uint8", "read_references"}  # now in engine.predictor


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module("engine.predictor"), name)
    raise AttributeError(f"module 'common.predict' has no attribute {name!r}")


IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff")
THRESHOLD_RULES = ("max", "meanstd")
# Default rule: max of the LOO reference scores times (1 + margin), measured on the textile and fabric demos with
# the kNN baseline, 16 draws of 4 references (docs/PREDICT.md): normal FPR <= 6% in every draw (mean <= 1.5%), where
# margin 0 gave up to 64% and mean + 3 std (a std of 4 numbers) up to 42%.
DEFAULT_RULE = "max"
DEFAULT_MARGIN = 0.1
DEFAULT_Z = 3.0  # "meanstd" rule: mean + Z * std of the LOO scores
DEFAULT_CLASS_NAME = "object"


def collect_images(sources: str | os.PathLike | Sequence[str | os.PathLike], what: str = "--images") -> list[Path]:
    """Expand folders (non-recursive, sorted, image suffixes only) and keep files as given, in order.

    Raises:
        UserError: a source that does not exist, or no image file at all.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    paths: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            paths.extend(sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.exists():
            paths.append(path)
        else:
            raise UserError(f"{what} {path} does not exist")
    if not paths:
        raise UserError(
            f"{what} {', '.join(str(s) for s in sources) or '(nothing)'} holds no image files "
            f"({', '.join(IMAGE_SUFFIXES)})"
        )
    return paths


def threshold_from_scores(
    scores: Sequence[float], rule: str = DEFAULT_RULE, margin: float = DEFAULT_MARGIN, z: float = DEFAULT_Z
) -> float:
    """The decision threshold from the LOO scores of normal references.

    Rules: `max` = max(s) + margin * |max(s)| (= max * (1 + margin) for positive scores); `meanstd` = mean(s) +
    z * std(s) (population std), never below max(s) when fewer than 3 scores (a std from 1-2 values means nothing).
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError(f"need finite LOO scores, got {values.tolist()}")
    if rule == "max":
        top = float(values.max())
        return top + margin * abs(top)
    if rule == "meanstd":
        value = float(values.mean() + z * values.std())
        return max(value, float(values.max())) if values.size < 3 else value
    raise UserError(f"unknown threshold rule '{rule}': use one of {', '.join(THRESHOLD_RULES)}")


def resize_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an `(h, w)` map to `size` = (H, W) (no copy when already that size)."""
    if anomaly_map.shape == tuple(size):
        return anomaly_map.astype(np.float32, copy=False)
    return upsample_map(torch.from_numpy(np.ascontiguousarray(anomaly_map))[None], tuple(size))[0].numpy()
