"""common/metrics.py: hand-computed cases, agreement with scikit-learn and with a brute-force AUPRO."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from common.metrics import (
    compute_aupro,
    compute_f1_max,
    compute_image_metrics,
    compute_metrics,
    compute_pixel_metrics,
)

IMAGE_KEYS = {"image_auroc", "image_ap", "image_f1_max"}
PIXEL_KEYS = {"pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"}


def blob_masks(rng: np.random.Generator, n: int, size: int, n_normal: int = 1) -> np.ndarray:
    """(n, size, size) bool masks: the first `n_normal` empty, the others 1-3 random discs/rectangles each."""
    yy, xx = np.mgrid[:size, :size]
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n_normal, n):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, size, 2)
            r = rng.integers(1, max(2, size // 5))
            if rng.random() < 0.5:
                masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
            else:
                masks[i, max(cy - r, 0) : cy + r, max(cx - r, 0) : cx + 2 * r] = True
    return masks


def noisy_maps(rng: np.random.Generator, masks: np.ndarray, levels: int | None = None) -> np.ndarray:
    """Maps that are informative but imperfect; `levels` quantises them so that many scores tie."""
    maps = rng.random(masks.shape) + 0.6 * masks
    if levels is not None:
        maps = np.round(maps * levels) / levels
    return maps.astype(np.float32)


def aupro_brute_force(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3, structure=None) -> float:
    """Slow reference: one PRO/FPR point per distinct threshold (pred = score >= t), loops everywhere."""
    structure = np.ones((3, 3), dtype=int) if structure is None else structure
    regions = []
    for mask in masks:
        labelled, n = ndimage.label(mask, structure=structure)
        regions += [(len(regions), labelled == k) for k in range(1, n + 1)]
    image_of = [i for i, mask in enumerate(masks) for _ in range(ndimage.label(mask, structure=structure)[1])]
    normal = ~masks
    fprs, pros = [0.0], [0.0]  # threshold above every score
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fprs.append(pred[normal].sum() / normal.sum())
        pros.append(np.mean([pred[image_of[k]][region].mean() for k, region in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    above = np.flatnonzero(fprs > fpr_limit)[0]  # fprs ends at 1 > fpr_limit
    x0, y0, x1, y1 = fprs[above - 1], pros[above - 1], fprs[above], pros[above]
    x = np.append(fprs[:above], fpr_limit)
    y = np.append(pros[:above], y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    return float(np.trapezoid(y, x) / fpr_limit)


# ---------------------------------------------------------------- image metrics and F1-max


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_agree_with_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = rng.random(60) + 0.4 * labels
    got = compute_image_metrics(scores, labels)
    assert set(got) == IMAGE_KEYS
    assert all(type(v) is float and 0.0 <= v <= 1.0 for v in got.values())
    assert got["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-7)
    assert got["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-7)
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    assert got["image_f1_max"] == pytest.approx(np.nanmax(f1), abs=1e-7)


def test_image_metrics_accept_torch_and_lists():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 20)
    scores = rng.random(20)
    ref = compute_image_metrics(scores, labels)
    assert compute_image_metrics(torch.tensor(scores), torch.tensor(labels)) == pytest.approx(ref)
    assert compute_image_metrics(list(scores), list(labels)) == pytest.approx(ref)


def test_f1_max_hand_computed():
    # Descending thresholds over scores .9 .8 .7 .6 .5 with labels 1 0 1 1 0 (3 positives):
    #   t=.9: TP1 FP0 -> P=1,   R=1/3 -> F1 = 2(1/3)/(4/3)     = 0.5
    #   t=.8: TP1 FP1 -> P=1/2, R=1/3 -> F1 = 2(1/6)/(5/6)     = 0.4
    #   t=.7: TP2 FP1 -> P=2/3, R=2/3 -> F1 = 2/3
    #   t=.6: TP3 FP1 -> P=3/4, R=1   -> F1 = 1.5/1.75        = 6/7  <- max
    #   t=.5: TP3 FP2 -> P=3/5, R=1   -> F1 = 1.2/1.6         = 0.75
    assert compute_f1_max([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 1, 0]) == pytest.approx(6 / 7)


def test_f1_max_ignores_zero_precision_and_recall():
    # t=.9 catches only the negative: P=R=0, F1 = 0/0 (ignored, no warning); t=.1: P=1/2, R=1 -> F1 = 2/3.
    with np.errstate(all="raise"):
        assert compute_f1_max([0.9, 0.1], [0, 1]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        compute_f1_max([0.9, 0.1], [0, 0])


def test_image_metrics_single_class_give_none():
    assert compute_image_metrics([0.1, 0.5, 0.3], [0, 0, 0]) == dict.fromkeys(IMAGE_KEYS)
    all_anomalous = compute_image_metrics([0.1, 0.5, 0.3], [1, 1, 1])
    assert all_anomalous == {"image_auroc": None, "image_ap": None, "image_f1_max": 1.0}


# ---------------------------------------------------------------- pixel metrics


@pytest.mark.parametrize("offset", [0.0, -0.7])  # -0.7: negative and positive scores, and 0.0 == -0.0
def test_pixel_metrics_agree_with_sklearn(offset):
    rng = np.random.default_rng(4)
    masks = blob_masks(rng, 5, 32)
    maps = noisy_maps(rng, masks, levels=None if offset == 0.0 else 10) + np.float32(offset)
    maps[0, 0, :2] = [0.0, -0.0]
    got = compute_pixel_metrics(maps, masks)
    assert set(got) == PIXEL_KEYS
    assert all(type(v) is float and 0.0 <= v <= 1.0 for v in got.values())
    flat_maps, flat_masks = maps.ravel(), masks.ravel()
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-7)
    assert got["pixel_ap"] == pytest.approx(average_precision_score(flat_masks, flat_maps), abs=1e-7)
    assert got["pixel_f1_max"] == pytest.approx(compute_f1_max(flat_maps, flat_masks), abs=1e-7)
    assert got["pixel_aupro"] == pytest.approx(aupro_brute_force(maps, masks), abs=1e-6)
    # torch tensors, float {0,1} masks with a channel axis (the dataset's gt_mask): same numbers
    torch_got = compute_pixel_metrics(torch.from_numpy(maps), torch.from_numpy(masks).float()[:, None])
    assert torch_got == pytest.approx(got)


def test_pixel_metrics_shape_mismatch_raises():
    with pytest.raises(ValueError):
        compute_pixel_metrics(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))


# ---------------------------------------------------------------- AUPRO


def test_aupro_perfect_map_is_one():
    rng = np.random.default_rng(5)
    masks = blob_masks(rng, 4, 32)
    maps = masks + 0.5 * rng.random(masks.shape)  # every anomalous pixel above every normal one
    assert compute_aupro(maps, masks) == pytest.approx(1.0, abs=1e-12)


def test_aupro_hand_computed():
    # One row of 10 pixels:     A   A   N   B   B   B   B   N   N   N
    scores = np.array([[[0.9, 0.9, 0.4, 0.8, 0.8, 0.4, 0.3, 0.3, 0.1, 0.1]]])
    masks = np.array([[[1, 1, 0, 1, 1, 1, 1, 0, 0, 0]]])
    # Regions A (2 px) and B (4 px); 4 normal pixels, so FPR moves in steps of 1/4. PRO = mean over REGIONS.
    #   t=.9: A 2/2, B 0/4, FPR 0           -> (0,    (1 + 0)/2   = .5)
    #   t=.8: A 2/2, B 2/4, FPR 0           -> (0,    (1 + .5)/2  = .75)
    #   t=.4: B 3/4 and 1 normal            -> (.25,  (1 + .75)/2 = .875)   linear from (0, .75)
    #   t=.3: B 4/4 and 2 normals           -> (.5,   1)                    linear from (.25, .875)
    #   t=.1: all                           -> (1,    1)
    # PRO at FPR .3 on the last segment: .875 + .125 * (.05 / .25) = .9.
    # Area: .25 * (.75 + .875)/2 + .05 * (.875 + .9)/2 = .203125 + .044375 = .2475; / .3 = .825.
    # (A pixel-wise mean instead of a region mean would give PRO 4/6 at t=.8 and a different area.)
    assert compute_aupro(scores, masks) == pytest.approx(0.825, abs=1e-12)
    assert aupro_brute_force(scores.astype(np.float32), masks.astype(bool)) == pytest.approx(0.825, abs=1e-12)
    # Integrating to FPR 1 instead: .203125 + .25 * (.875 + 1)/2 + .5 * 1 = .93750
    assert compute_aupro(scores, masks, fpr_limit=1.0) == pytest.approx(0.9375, abs=1e-12)


@pytest.mark.parametrize("levels", [None, 20])
@pytest.mark.parametrize("seed", [6, 7, 8])
def test_aupro_matches_brute_force(seed, levels):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, 4, 24)
    maps = noisy_maps(rng, masks, levels)  # levels=20: many ties between normal and anomalous pixels
    assert compute_aupro(maps, masks) == pytest.approx(aupro_brute_force(maps, masks), abs=1e-6)
    assert compute_aupro(maps, masks, fpr_limit=0.05) == pytest.approx(
        aupro_brute_force(maps, masks, fpr_limit=0.05), abs=1e-6
    )


def test_aupro_uses_8_connectivity():
    # Anomalous pixels (0,0), (0,1) and (1,2); (0,1) and (1,2) touch only diagonally.
    masks = np.zeros((1, 3, 3), dtype=bool)
    masks[0, 0, 0] = masks[0, 0, 1] = masks[0, 1, 2] = True
    maps = np.zeros((1, 3, 3))
    maps[0, 1, 2] = 0.9
    maps[0, 0, 0] = maps[0, 0, 1] = 0.5
    maps[0, 2, 2] = 0.7  # one of the 6 normal pixels
    # 8-connectivity: ONE region of 3 px. t=.9: PRO 1/3 at FPR 0; t=.7: FPR 1/6; t=.5: PRO 1.
    #   area = 1/6 * 1/3 + (.3 - 1/6) * 1 = 17/90, / .3 = 17/27.
    # 4-connectivity would give regions of 2 px and 1 px: PRO (0 + 1)/2 = .5 at t=.9, hence
    #   area = 1/6 * .5 + (.3 - 1/6) = 13/60, / .3 = 13/18.
    assert compute_aupro(maps, masks) == pytest.approx(17 / 27, abs=1e-12)
    cross = ndimage.generate_binary_structure(2, 1)
    assert aupro_brute_force(maps, masks, structure=cross) == pytest.approx(13 / 18, abs=1e-12)


def test_aupro_regions_do_not_span_images():
    # Image 0: region of 1 px at (0,0); image 1: region of 3 px at (0,0..2). They overlap in the stack but
    # are two regions. 12 normal pixels, one of them scored .7.
    masks = np.zeros((2, 2, 4), dtype=bool)
    masks[0, 0, 0] = True
    masks[1, 0, :3] = True
    maps = np.where(masks, 0.5, 0.0)
    maps[0, 0, 0] = 0.9
    maps[1, 1, 3] = 0.7
    # t=.9: PRO (1 + 0)/2 = .5 at FPR 0; t=.7: FPR 1/12; t=.5: PRO 1.
    #   area = 1/12 * .5 + (.3 - 1/12) = 31/120, / .3 = 31/36  (one merged 4-px region would give 57/72).
    assert compute_aupro(maps, masks) == pytest.approx(31 / 36, abs=1e-12)
    assert aupro_brute_force(maps, masks) == pytest.approx(31 / 36, abs=1e-12)


def test_aupro_none_without_anomalous_or_normal_pixels():
    maps = np.random.default_rng(9).random((2, 8, 8))
    assert compute_aupro(maps, np.zeros((2, 8, 8))) is None
    assert compute_aupro(maps, np.ones((2, 8, 8))) is None
    assert compute_pixel_metrics(maps, np.zeros((2, 8, 8))) == dict.fromkeys(PIXEL_KEYS)


# ---------------------------------------------------------------- compute_metrics


def _class_data(seed: int = 10):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, 8, 24, n_normal=4)
    labels = masks.any(axis=(1, 2)).astype(int)
    maps = noisy_maps(rng, masks)
    scores = maps.max(axis=(1, 2))
    return scores, labels, maps, masks


def test_compute_metrics_all_masks_known():
    scores, labels, maps, masks = _class_data()
    got = compute_metrics(scores, labels, maps, masks)
    assert set(got) == IMAGE_KEYS | PIXEL_KEYS
    assert got == pytest.approx({**compute_image_metrics(scores, labels), **compute_pixel_metrics(maps, masks)})
    assert compute_metrics(scores, labels, torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(got)


def test_compute_metrics_excludes_unknown_masks():
    scores, labels, maps, masks = _class_data()
    masks[5] = False  # an anomalous image whose mask file is missing: the loader gives an all-zero mask
    has_mask = np.ones(8, dtype=bool)
    has_mask[5] = False
    has_mask[0] = False  # a normal image: its mask is known (all zero) whatever has_mask says
    got = compute_metrics(scores, labels, maps, masks, has_mask)
    keep = np.arange(8) != 5
    assert got == pytest.approx(
        {**compute_image_metrics(scores, labels), **compute_pixel_metrics(maps[keep], masks[keep])}
    )
    # A stray mask pixel on a normal image is ignored: a normal image's mask is all zero.
    stray = masks.copy()
    stray[1, 3, 3] = True
    assert compute_metrics(scores, labels, maps, stray, has_mask) == pytest.approx(got)
    # Counting image 5's defect pixels as normal would change every pixel metric.
    wrong = compute_pixel_metrics(maps, masks)
    assert all(abs(got[k] - wrong[k]) > 1e-4 for k in PIXEL_KEYS)


def test_compute_metrics_pixel_keys_none_without_anomalous_mask():
    scores, labels, maps, masks = _class_data()
    image_only = compute_image_metrics(scores, labels)
    no_anomalous_mask = labels == 0
    got = compute_metrics(scores, labels, maps, masks, has_mask=no_anomalous_mask)
    assert got == {**image_only, **dict.fromkeys(PIXEL_KEYS)}
    assert compute_metrics(scores, labels) == {**image_only, **dict.fromkeys(PIXEL_KEYS)}
    assert compute_metrics(scores, labels, maps=None, masks=masks) == {**image_only, **dict.fromkeys(PIXEL_KEYS)}
