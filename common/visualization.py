"""Qualitative figures: anomaly heat-map overlays and one-PNG result panels."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from common.utils import atomic_write_bytes

OUTLINE_RGB = (255, 0, 0)  # red outline of the predicted region
TITLE_HEIGHT = 24  # pixels of the caption strip above the panels


def _check_image(image: np.ndarray) -> None:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")


def _fit(array: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    """Resize a 2-D array to (H, W) when it differs (bilinear for maps, nearest for masks)."""
    array = np.asarray(array)
    if array.ndim != 2:
        array = np.squeeze(array)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D map or mask, got shape {array.shape}")
    if array.shape == size:
        return array
    interpolation = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    return cv2.resize(array.astype(np.float32), (size[1], size[0]), interpolation=interpolation)


def heatmap_overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    vmin: float | None = None,
    vmax: float | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend a jet-coloured anomaly map over an image.

    Args:
        image: uint8 (H, W, 3) RGB.
        anomaly_map: float (H, W) (resized bilinearly when its size differs).
        vmin: value shown as blue; default the map's minimum (finite values).
        vmax: value shown as red; default the map's maximum.
        alpha: weight of the heat map (0 = image only, 1 = heat map only).

    Returns:
        uint8 (H, W, 3) RGB.
    """
    _check_image(image)
    scores = _fit(anomaly_map, image.shape[:2], nearest=False).astype(np.float32)
    finite = scores[np.isfinite(scores)]
    lo = float(vmin) if vmin is not None else float(finite.min()) if finite.size else 0.0
    hi = float(vmax) if vmax is not None else float(finite.max()) if finite.size else 1.0
    norm = np.clip((np.nan_to_num(scores, nan=lo) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    heat = cv2.applyColorMap(np.rint(norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB).astype(np.float32)
    out = (1.0 - alpha) * image.astype(np.float32) + alpha * heat
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _outline(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The image with the border of a bool region drawn in OUTLINE_RGB."""
    out = np.ascontiguousarray(image.copy())
    contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    thickness = max(1, round(min(image.shape[:2]) / 200))
    cv2.drawContours(out, contours, -1, OUTLINE_RGB, thickness)
    return out


def _title_strip(title: str, width: int) -> np.ndarray:
    strip = np.full((TITLE_HEIGHT, width, 3), 255, np.uint8)
    cv2.putText(strip, title, (4, TITLE_HEIGHT - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return strip


def save_panel(
    path: str | os.PathLike,
    image: np.ndarray,
    anomaly_map: np.ndarray,
    gt_mask: np.ndarray | None = None,
    threshold: float | None = None,
    title: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> Path:
    """Write one PNG: image | ground truth (if given) | heat-map overlay | (if threshold) outline of map > threshold.

    Panels are side by side with no gap, so the width is (number of panels) * W. A title adds a white caption
    strip of TITLE_HEIGHT pixels on top. The file is written atomically.

    Args:
        path: output .png path (parent folders are created).
        image: uint8 (H, W, 3) RGB.
        anomaly_map: float (H, W) (resized bilinearly when its size differs).
        gt_mask: (H, W) bool or 0/1 or 0/255, shown white on black.
        threshold: draw the border of anomaly_map > threshold in red on the image.
        title: optional caption.
        vmin: map value shown as blue in the overlay (default: this map's minimum). Pass a class-wide
            vmin/vmax so that panels of one class share a colour scale.
        vmax: map value shown as red (default: this map's maximum).

    Returns:
        The path written.
    """
    _check_image(image)
    size = image.shape[:2]
    panels = [image]
    if gt_mask is not None:
        mask = _fit(gt_mask, size, nearest=True) > 0
        panels.append(np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2))
    panels.append(heatmap_overlay(image, anomaly_map, vmin=vmin, vmax=vmax))
    if threshold is not None:
        panels.append(_outline(image, _fit(anomaly_map, size, nearest=False) > threshold))
    canvas = np.concatenate(panels, axis=1)
    if title:
        canvas = np.concatenate([_title_strip(title, canvas.shape[1]), canvas], axis=0)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"could not encode a PNG for {path}")
    return atomic_write_bytes(path, encoded.tobytes())
