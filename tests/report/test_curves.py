"""Curve points against scikit-learn, and the example selection on hand-made scores."""

import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve, roc_curve

from report.curves import f1_max_threshold, pr_points, roc_points, sample_pixels, select_examples


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_and_pr_points_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random(200), 2)  # many ties
    labels = rng.random(200) < 0.3
    fpr, tpr, thr = roc_curve(labels, scores, drop_intermediate=False)
    ours = roc_points(scores, labels)
    np.testing.assert_allclose(ours[0], fpr)
    np.testing.assert_allclose(ours[1], tpr)
    np.testing.assert_array_equal(ours[2], thr)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    p, r, t = pr_points(scores, labels)  # ours: descending thresholds, no (precision 1, recall 0) end point
    np.testing.assert_allclose(p, precision[:-1][::-1])
    np.testing.assert_allclose(r, recall[:-1][::-1])
    np.testing.assert_array_equal(t, thresholds[::-1])


def test_curves_are_empty_without_both_classes():
    assert roc_points([0.1, 0.2], [0, 0])[0].size == 0
    assert pr_points([0.1, 0.2], [0, 0])[0].size == 0
    assert f1_max_threshold([0.1, 0.2], [0, 0]) is None


def test_f1_max_threshold_hand_case():
    # scores 0.9 (pos), 0.8 (neg), 0.7 (pos), 0.1 (neg): F1 at t=0.9 is 2/3, at 0.7 is 0.8, at 0.1 is 2/3
    assert f1_max_threshold([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx(0.7)


def test_select_examples_picks_the_worst_and_a_few_correct():
    #              0    1    2    3    4    5    6    7    8    9
    labels = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    scores = [0.1, 0.9, 0.3, 0.5, 0.2, 0.4, 0.95, 0.15, 0.6, 0.8]
    chosen = select_examples(labels, scores, 2)
    assert chosen["worst_normals"] == [1, 3]  # the false alarms: normals 0.9 and 0.5
    assert chosen["worst_anomalies"] == [7, 5]  # the misses: anomalies 0.15 and 0.4
    assert chosen["correct_anomalies"] == [6]  # max(1, 2 // 3) = 1, the most confident anomaly
    assert chosen["correct_normals"] == [0]
    big = select_examples(labels, scores, 6)  # more than there are: every normal once, never twice
    assert big["worst_normals"] == [1, 3, 2, 4, 0] and big["correct_normals"] == []
    assert big["worst_anomalies"] == [7, 5, 8, 9, 6] and big["correct_anomalies"] == []
    assert all(v == [] for v in select_examples(labels, scores, 0).values())


def test_sample_pixels_caps_and_keeps_pairs_aligned():
    maps = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    masks = (maps % 2 == 1).astype(np.uint8)
    values, labels = sample_pixels(maps, masks, n=100)
    assert values.size == 100 and np.array_equal(labels, values % 2 == 1)
    values, labels = sample_pixels(maps, masks, n=5000)
    assert values.size == 1000


def test_thin_keeps_the_ends_and_at_most_n_points():
    from report.plots import thin

    x, y = np.arange(10_001, dtype=float), np.arange(10_001, dtype=float) ** 2
    tx, ty = thin(x, y, n=100)
    assert tx.size <= 100 and tx[0] == 0 and tx[-1] == 10_000 and np.array_equal(ty, tx**2)
    assert thin(x[:50], n=100)[0].size == 50
