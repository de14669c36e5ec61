"""Image- and pixel-level anomaly-detection metrics as pure functions returning dicts of named numbers.

Keys are exactly those of results.json (design/CONTRACT.md). Values are plain Python floats in [0, 1], or None
where the metric is undefined (a single class among the labels, no mask known). Inputs may be numpy arrays or
torch tensors (any device); scores are used as float32, labels and masks are binarised with `> 0.5`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

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


def _ranking_metrics(scores: np.ndarray, labels: np.ndarray) -> tuple[float | None, float | None, float | None]:
    """AUROC, AP and F1-max of flat float32 `scores` (M,) against flat bool `labels` (M,).

    AUROC and AP are None unless both classes are present; F1-max is None when there is no positive.
    One precision-recall curve serves both AP and F1-max (a second full sort would double the cost on
    ~10M pixels).
    """
    n_pos = int(np.count_nonzero(labels))
    if n_pos == 0:
        return None, None, None
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1_max = _f1_max_from_curve(precision, recall)
    if n_pos == labels.size:
        return None, None, f1_max
    auroc = float(roc_auc_score(labels, scores))
    # Exactly sklearn's average_precision_score: sum over thresholds of (R_n - R_{n-1}) * P_n.
    ap = float(-np.sum(np.diff(recall) * precision[:-1]))
    return auroc, ap, f1_max


def _f1_max_from_curve(precision: np.ndarray, recall: np.ndarray) -> float:
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    f1 = f1[np.isfinite(f1)]  # P + R = 0 at thresholds with no true positive
    return float(f1.max()) if f1.size else 0.0


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
    return _f1_max_from_curve(precision, recall)


def compute_image_metrics(scores: Any, labels: Any) -> dict[str, float | None]:
    """Image-level AUROC, AP and F1-max.

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
    return dict(zip(IMAGE_KEYS, _ranking_metrics(scores_np, labels_np), strict=True))


def compute_aupro(maps: Any, masks: Any, fpr_limit: float = AUPRO_FPR_LIMIT) -> float | None:
    """Normalised area under the per-region-overlap (PRO) curve, the official MVTec AD definition.

    Regions are the 8-connected components of each image's mask. At threshold t (a pixel is predicted
    anomalous when its score >= t), PRO(t) is the mean over all regions of all images of the fraction of the
    region's pixels predicted anomalous, and FPR(t) the fraction of all normal pixels (of all images)
    predicted anomalous. PRO is integrated over FPR in [0, fpr_limit] with the trapezoid rule, the curve
    being interpolated linearly at fpr_limit, then divided by fpr_limit so that a perfect map scores 1.

    Every distinct score is a threshold, computed without a loop: each anomalous pixel carries the weight
    1 / (|region| * n_regions), so after one descending sort the cumulative sums of the normal-pixel count
    and of the weights are FPR and PRO; the last index of each run of tied scores gives the curve's points.

    Args:
        maps: (N, H, W) anomaly maps.
        masks: (N, H, W) (or (N, 1, H, W)) binary ground-truth masks.
        fpr_limit: upper integration limit on the FPR axis, in (0, 1].

    Returns:
        AUPRO in [0, 1], or None when there is no anomalous or no normal pixel.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    maps_np, masks_np = _maps_and_masks(maps, masks)
    scores = maps_np.ravel()
    if np.isnan(scores).any():
        raise ValueError("maps contain NaN")
    regions, n_regions = ndimage.label(masks_np, structure=_STRUCTURE_8)
    regions = regions.ravel()
    region_sizes = np.bincount(regions)  # index 0 counts the normal pixels
    n_normal = int(region_sizes[0])
    if n_regions == 0 or n_normal == 0:
        return None
    weight = np.zeros(n_regions + 1, dtype=np.float64)
    weight[1:] = 1.0 / (region_sizes[1:] * float(n_regions))

    order = np.argsort(scores)[::-1]  # descending; the order inside a tie does not matter (see below)
    sorted_scores = scores[order]
    sorted_regions = regions[order]
    del order
    # Keep the last index of each run of equal scores: the point reached once every pixel >= t is counted.
    last_of_run = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    del sorted_scores
    fpr = np.cumsum(sorted_regions == 0)[last_of_run] / n_normal
    pro = np.cumsum(weight[sorted_regions])[last_of_run]
    del sorted_regions
    fpr = np.concatenate(([0.0], fpr))  # threshold above every score: nothing predicted anomalous
    pro = np.concatenate(([0.0], np.clip(pro, 0.0, 1.0)))  # clip float round-off of the weight sum

    # fpr is non-decreasing and ends at 1, so the points up to fpr_limit are a prefix.
    end = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:end], pro[:end]
    if end < fpr.size and x[-1] < fpr_limit:
        y_limit = y[-1] + (pro[end] - y[-1]) * (fpr_limit - x[-1]) / (fpr[end] - x[-1])
        x, y = np.append(x, fpr_limit), np.append(y, y_limit)
    area = float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))
    return min(max(area / fpr_limit, 0.0), 1.0)


def compute_pixel_metrics(maps: Any, masks: Any) -> dict[str, float | None]:
    """Pixel-level AUROC, AP and F1-max over all pixels of all images flattened, plus AUPRO.

    Args:
        maps: (N, H, W) anomaly maps (float32 is enough; ~10M pixels fit in a few hundred MB).
        masks: (N, H, W) (or (N, 1, H, W)) binary ground-truth masks.

    Returns:
        {"pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"}; None where undefined (no anomalous or
        no normal pixel), as in `compute_image_metrics`.
    """
    maps_np, masks_np = _maps_and_masks(maps, masks)
    auroc, ap, f1_max = _ranking_metrics(maps_np.ravel(), masks_np.ravel())
    return {
        "pixel_auroc": auroc,
        "pixel_ap": ap,
        "pixel_f1_max": f1_max,
        "pixel_aupro": compute_aupro(maps_np, masks_np),
    }


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
