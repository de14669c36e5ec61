"""ROC / PR curve points and the example selection: pure numpy, so tests compare them with scikit-learn."""

from __future__ import annotations

import numpy as np

PIXEL_SAMPLE = 200_000  # pixels drawn (fixed seed) for the pixel-level curves: the curve, not the metric


def _counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True / false positives at each distinct score used as threshold (score >= t), thresholds descending."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]  # last index of each run of equal scores
    tps = np.cumsum(labels)[last]
    fps = (last + 1) - tps
    return tps, fps, scores[last]


def roc_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), starting at (0, 0) with threshold +inf: sklearn's roc_curve(drop_intermediate=False).

    Returns empty arrays when one class is missing (the curve is undefined).
    """
    tps, fps, thresholds = _counts(scores, labels)
    if tps.size == 0 or tps[-1] == 0 or fps[-1] == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    return fpr, tpr, np.r_[np.inf, thresholds]


def pr_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) at each distinct threshold, thresholds descending (no (1, 0) end point).

    Empty arrays when there is no positive.
    """
    tps, fps, thresholds = _counts(scores, labels)
    if tps.size == 0 or tps[-1] == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    return tps / (tps + fps), tps / tps[-1], thresholds


def f1_max_threshold(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """The threshold of the F1-max (an oracle: it looks at the labels); None without positives."""
    precision, recall, thresholds = pr_points(scores, labels)
    if thresholds.size == 0:
        return None
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1))])


def sample_pixels(maps: np.ndarray, masks: np.ndarray, n: int = PIXEL_SAMPLE, seed: int = 0):
    """At most `n` (score, label) pixel pairs drawn uniformly with a fixed seed (all pixels when fewer)."""
    flat_maps, flat_masks = np.asarray(maps).reshape(-1), np.asarray(masks).reshape(-1)
    if flat_maps.size <= n:
        return flat_maps.astype(np.float32), flat_masks > 0
    idx = np.random.default_rng(seed).integers(0, flat_maps.size, n)
    return flat_maps[idx].astype(np.float32), flat_masks[idx] > 0


def select_examples(labels: np.ndarray, scores: np.ndarray, n: int) -> dict[str, list[int]]:
    """Indices of the qualitative examples of one class, each group ordered from worst to best.

    - `worst_normals`: the n highest-scoring normal images (false alarms first);
    - `worst_anomalies`: the n lowest-scoring anomalous images (misses first);
    - `correct_anomalies` / `correct_normals`: the max(1, n // 3) highest-scoring anomalies and lowest-scoring
      normals not already shown. Ties keep the input order. n = 0 selects nothing.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    normals, anomalies = np.flatnonzero(~labels), np.flatnonzero(labels)
    by_score_desc = lambda idx: idx[np.argsort(-scores[idx], kind="mergesort")]  # noqa: E731
    by_score_asc = lambda idx: idx[np.argsort(scores[idx], kind="mergesort")]  # noqa: E731
    if n <= 0:
        return {"worst_normals": [], "worst_anomalies": [], "correct_anomalies": [], "correct_normals": []}
    worst_normals = by_score_desc(normals)[:n]
    worst_anomalies = by_score_asc(anomalies)[:n]
    few = max(1, n // 3)
    correct_anomalies = [i for i in by_score_desc(anomalies) if i not in set(worst_anomalies)][:few]
    correct_normals = [i for i in by_score_asc(normals) if i not in set(worst_normals)][:few]
    return {"worst_normals": worst_normals.tolist(), "worst_anomalies": worst_anomalies.tolist(),
            "correct_anomalies": [int(i) for i in correct_anomalies],
            "correct_normals": [int(i) for i in correct_normals]}  # fmt: skip
