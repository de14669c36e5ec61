"""Image- and pixel-level anomaly-detection metrics as pure functions returning dicts of named numbers.

Keys are exactly those of results.json (docs/design/CONTRACT.md). Values are plain Python floats in [0, 1], or None
where the metric is undefined (a single class among the labels, no mask known). Inputs may be numpy arrays or
torch tensors (any device); scores are used as float32, labels and masks are binarised with `> 0.5`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

# MVTec AD (Bergmann et al., IJCV 2021, Sec. 5.2): PRO is integrated up to a false-positive rate of 30%.
AUPRO_FPR_LIMIT = 0.3
# 8-connectivity within one image, none across images: the official MVTec code labels with a 3x3 structure of
# ones; the zero outer planes keep the images of an (N, H, W) stack apart so all can be labelled in one call.
_STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8[1] = True

IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _scores(x: Any) -> np.ndarray:
    return _to_numpy(x).astype(np.float32, copy=False)


def _binary(x: Any) -> np.ndarray:
    x = _to_numpy(x)
    return x if x.dtype == bool else x > 0.5


def _stack(x: np.ndarray, name: str) -> np.ndarray:
    # Accept (N, 1, H, W) as produced by the dataset's gt_mask; everything else must be (N, H, W).
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"{name} must have shape (N, H, W), got {x.shape}")
    return x


def _maps_and_masks(maps: Any, masks: Any) -> tuple[np.ndarray, np.ndarray]:
    maps_np, masks_np = _stack(_scores(maps), "maps"), _stack(_binary(masks), "masks")
    if maps_np.shape != masks_np.shape:
        raise ValueError(f"maps {maps_np.shape} and masks {masks_np.shape} must have the same shape")
    return maps_np, masks_np


def compute_f1_max(scores: Any, labels: Any) -> float:
    """Maximum F1 over all thresholds of the precision-recall curve (an oracle threshold, not a deployable F1).

    Args:
        scores: (M,) anomaly scores, higher = more anomalous.
        labels: (M,) binary ground truth, 1 = anomalous.

    Returns:
        max over thresholds of 2PR / (P + R), ignoring thresholds where P + R = 0.

    Raises:
        ValueError: if `labels` has no positive (recall, hence F1, is undefined).
    """
    labels_np = _binary(labels).ravel()
    if not labels_np.any():
        raise ValueError("F1-max is undefined without a positive label")
    precision, recall, _ = precision_recall_curve(labels_np, _scores(scores).ravel())
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.max(f1[np.isfinite(f1)]))  # P + R = 0 where no positive is caught; the last point is finite


def compute_image_metrics(scores: Any, labels: Any) -> dict[str, float | None]:
    """Image-level AUROC, AP and F1-max (scikit-learn).

    Args:
        scores: (N,) image anomaly scores.
        labels: (N,) image labels, 1 = anomalous.

    Returns:
        {"image_auroc", "image_ap", "image_f1_max"}. With a single class among the labels AUROC and AP are
        None (undefined); F1-max is None when there is no anomalous image (1.0 if all are anomalous).
    """
    scores_np, labels_np = _scores(scores).ravel(), _binary(labels).ravel()
    if scores_np.shape != labels_np.shape:
        raise ValueError(f"scores {scores_np.shape} and labels {labels_np.shape} must have the same length")
    results: dict[str, float | None] = dict.fromkeys(IMAGE_KEYS)
    n_pos = int(np.count_nonzero(labels_np))
    if n_pos > 0:
        results["image_f1_max"] = compute_f1_max(scores_np, labels_np)
    if 0 < n_pos < labels_np.size:
        results["image_auroc"] = float(roc_auc_score(labels_np, scores_np))
        results["image_ap"] = float(average_precision_score(labels_np, scores_np))
    return results


class _PixelCurve(NamedTuple):
    """Counts at every distinct threshold t, highest first; a pixel is predicted anomalous when score >= t."""

    tp: np.ndarray  # (T,) int64, anomalous pixels predicted anomalous
    fp: np.ndarray  # (T,) int64, normal pixels predicted anomalous
    pro: np.ndarray  # (T,) float64, mean over GT regions of the fraction of the region predicted anomalous
    n_pos: int
    n_neg: int


def _pixel_curve(maps: np.ndarray, masks: np.ndarray) -> _PixelCurve:
    """One sort of all pixels gives the ROC, PR and PRO curves at every distinct threshold, with no loop.

    Each anomalous pixel carries the weight 1 / (|region| * n_regions), so the cumulative sum of the weights
    down the descending order is PRO; the last index of each run of tied scores is the point reached once
    every pixel >= t is counted, whatever the order inside the run.
    """
    scores = maps.ravel()
    if np.isnan(scores).any():
        raise ValueError("maps contain NaN")
    regions, n_regions = ndimage.label(masks, structure=_STRUCTURE_8)
    regions = regions.ravel().astype(np.uint32)
    region_sizes = np.bincount(regions, minlength=1)  # index 0 counts the normal pixels
    weight = np.zeros(n_regions + 1, dtype=np.float64)
    weight[1:] = 1.0 / (region_sizes[1:] * float(max(n_regions, 1)))

    # Sort (score, region id) packed into one uint64 instead of an argsort: ~5x faster on 10M pixels.
    # The float32 -> uint32 map preserves order (flip all bits of negatives, the sign bit of the others);
    # adding +0.0 first turns -0.0 into 0.0 so that the two tie.
    bits = (scores + np.float32(0.0)).view(np.uint32)
    ordered = np.where(bits >> 31 != 0, ~bits, bits | np.uint32(0x80000000))
    keys = (ordered.astype(np.uint64) << np.uint64(32)) | regions
    del bits, ordered, regions
    keys.sort()
    keys = keys[::-1]  # descending score
    sorted_scores = keys >> np.uint64(32)
    last_of_run = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    del sorted_scores
    sorted_regions = (keys & np.uint64(0xFFFFFFFF)).astype(np.intp)
    del keys
    tp = np.cumsum(sorted_regions != 0)[last_of_run]
    pro = np.cumsum(weight[sorted_regions])[last_of_run]
    fp = last_of_run + 1 - tp
    n_neg = int(region_sizes[0])
    return _PixelCurve(tp, fp, np.clip(pro, 0.0, 1.0), scores.size - n_neg, n_neg)  # clip: weight round-off


def _aupro_from_curve(curve: _PixelCurve, fpr_limit: float) -> float:
    fpr = np.concatenate(([0.0], curve.fp / curve.n_neg))  # threshold above every score: nothing predicted
    pro = np.concatenate(([0.0], curve.pro))
    # fpr is non-decreasing and ends at 1, so the points up to fpr_limit are a prefix.
    end = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:end], pro[:end]
    if end < fpr.size and x[-1] < fpr_limit:  # interpolate the curve exactly at fpr_limit
        y_limit = y[-1] + (pro[end] - y[-1]) * (fpr_limit - x[-1]) / (fpr[end] - x[-1])
        x, y = np.append(x, fpr_limit), np.append(y, y_limit)
    area = float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))
    return min(max(area / fpr_limit, 0.0), 1.0)


def compute_aupro(maps: Any, masks: Any, fpr_limit: float = AUPRO_FPR_LIMIT) -> float | None:
    """Normalised area under the per-region-overlap (PRO) curve, the official MVTec AD definition.

    Regions are the 8-connected components of each image's mask. At threshold t (a pixel is predicted
    anomalous when its score >= t), PRO(t) is the mean over all regions of all images of the fraction of the
    region's pixels predicted anomalous, and FPR(t) the fraction of all normal pixels (of all images)
    predicted anomalous. Every distinct score is a threshold. PRO is integrated over FPR in [0, fpr_limit]
    with the trapezoid rule, the curve being interpolated linearly at fpr_limit, then divided by fpr_limit so
    that a perfect map scores 1.

    Args:
        maps: (N, H, W) anomaly maps (used as float32).
        masks: (N, H, W) (or (N, 1, H, W)) binary ground-truth masks.
        fpr_limit: upper integration limit on the FPR axis, in (0, 1].

    Returns:
        AUPRO in [0, 1], or None when there is no anomalous or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    curve = _pixel_curve(*_maps_and_masks(maps, masks))
    if curve.n_pos == 0 or curve.n_neg == 0:
        return None
    return _aupro_from_curve(curve, fpr_limit)


def compute_pixel_metrics(maps: Any, masks: Any) -> dict[str, float | None]:
    """Pixel-level AUROC, AP and F1-max over all pixels of all images flattened, plus AUPRO.

    All four come from one sort of the pixels (see `_pixel_curve`) and equal scikit-learn's roc_auc_score,
    average_precision_score and the F1-max of precision_recall_curve (checked in the tests); ~10M pixels
    take about a second and a few hundred MB.

    Args:
        maps: (N, H, W) anomaly maps (used as float32).
        masks: (N, H, W) (or (N, 1, H, W)) binary ground-truth masks.

    Returns:
        {"pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"}; None where undefined, as in
        `compute_image_metrics`: all four without an anomalous pixel, all but F1-max without a normal one.
    """
    curve = _pixel_curve(*_maps_and_masks(maps, masks))
    results: dict[str, float | None] = dict.fromkeys(PIXEL_KEYS)
    if curve.n_pos == 0:
        return results
    # F1 = 2PR / (P + R) = 2 TP / (TP + FP + n_pos): the denominator is never 0 here.
    results["pixel_f1_max"] = float(np.max(2 * curve.tp / (curve.tp + curve.fp + curve.n_pos)))
    if curve.n_neg == 0:
        return results
    tpr = np.concatenate(([0.0], curve.tp / curve.n_pos))
    fpr = np.concatenate(([0.0], curve.fp / curve.n_neg))
    results["pixel_auroc"] = float(np.sum(0.5 * (tpr[1:] + tpr[:-1]) * np.diff(fpr)))
    # sklearn's AP: sum over thresholds of (R_n - R_{n-1}) * P_n, with R_0 = 0.
    results["pixel_ap"] = float(np.sum(np.diff(tpr) * (curve.tp / (curve.tp + curve.fp))))
    results["pixel_aupro"] = _aupro_from_curve(curve, AUPRO_FPR_LIMIT)
    return results


def compute_metrics(
    image_scores: Any, labels: Any, maps: Any = None, masks: Any = None, has_mask: Any = None
) -> dict[str, float | None]:
    """All seven metrics of one class.

    Pixel metrics use only the images whose mask is known: anomalous images with `has_mask` True, and every
    normal image (its mask is all zero by definition, whatever `has_mask` says).

    Args:
        image_scores: (N,) image anomaly scores.
        labels: (N,) image labels, 1 = anomalous.
        maps: (N, H, W) anomaly maps, or None for image metrics only.
        masks: (N, H, W) (or (N, 1, H, W)) ground-truth masks; entries of unknown masks are ignored.
        has_mask: (N,) bool, whether each image's mask is known; None means all are.

    Returns:
        {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
        "pixel_aupro"}; the four pixel keys are None when `maps` or `masks` is None or no anomalous image
        with a known mask is left.
    """
    results: dict[str, float | None] = compute_image_metrics(image_scores, labels)
    results.update(dict.fromkeys(PIXEL_KEYS))
    if maps is None or masks is None:
        return results
    labels_np = _binary(labels).ravel()
    known = np.ones_like(labels_np) if has_mask is None else _binary(has_mask).ravel()
    if known.shape != labels_np.shape:
        raise ValueError(f"has_mask {known.shape} and labels {labels_np.shape} must have the same length")
    known = known | ~labels_np
    if not (known & labels_np).any():
        return results
    maps_np, masks_np = _maps_and_masks(maps, masks)
    if maps_np.shape[0] != labels_np.size:
        raise ValueError(f"{maps_np.shape[0]} maps for {labels_np.size} labels")
    if masks_np[~labels_np].any():  # a normal image's mask is all zero by definition
        masks_np = masks_np.copy()
        masks_np[~labels_np] = False
    if not known.all():  # boolean indexing copies: only pay for it when something is left out
        maps_np, masks_np = maps_np[known], masks_np[known]
    results.update(compute_pixel_metrics(maps_np, masks_np))
    return results
