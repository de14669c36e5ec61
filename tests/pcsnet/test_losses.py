"""Each PCSNet loss on a case with a known value or sign."""

from __future__ import annotations

import math

import torch

from pcsnet.losses import afs_loss, image_disparity, nfc_loss, pdc_loss, seg_loss, total_loss

NU, ALPHA = 1e-3, 0.2


def test_nfc_zero_inside_radius_and_known_value_outside():
    r = torch.tensor(1.0)
    assert nfc_loss(torch.full((2, 4, 3), 0.5), r, NU) == 0  # all d < r^2
    knn = torch.full((1, 2, 3), 1.5)
    assert math.isclose(float(nfc_loss(knn, r, NU)), 0.5 / NU, rel_tol=1e-5)


def test_nfc_gradient_grows_r():
    r = torch.tensor(0.5, requires_grad=True)
    nfc_loss(torch.full((1, 4, 3), 2.0), r, NU).backward()
    assert r.grad < 0  # gradient descent increases r when normal distances exceed r^2


def test_afs_only_masked_pixels_closer_than_margin():
    r = torch.tensor(0.0)
    knn = torch.tensor([[[0.01] * 3, [1.0] * 3]])  # pixel 0 close (inside (r+alpha)^2 = 0.04), pixel 1 far
    in_close = afs_loss(knn, torch.tensor([[True, False]]), r, ALPHA, NU)
    assert math.isclose(float(in_close), (0.04 - 0.01) / NU, rel_tol=1e-4)
    assert afs_loss(knn, torch.tensor([[False, True]]), r, ALPHA, NU) == 0  # far enough
    empty = afs_loss(knn, torch.tensor([[False, False]]), r, ALPHA, NU)
    assert empty == 0


def test_afs_pushes_masked_features_away():
    d = torch.full((1, 1, 3), 0.01, requires_grad=True)
    afs_loss(d, torch.tensor([[True]]), torch.tensor(0.0), ALPHA, NU).backward()
    assert (d.grad < 0).all()  # descending the loss increases the distance


def test_image_disparity_top_mean():
    knn = torch.arange(12.0).view(1, 4, 3)
    assert float(image_disparity(knn, 2)) == 10.5


def test_pdc_softmax_lower_when_anomaly_is_farther():
    target = torch.tensor([0.0, 1.0])
    near = torch.stack([torch.full((4, 3), 1.0), torch.full((4, 3), 0.5)])  # anomaly closer than normal
    far = torch.stack([torch.full((4, 3), 1.0), torch.full((4, 3), 3.0)])
    assert pdc_loss(far, target, 2) < pdc_loss(near, target, 2)
    # one normal + one anomaly: the original's CE on the score vector = softplus(s_n - s_a)
    assert math.isclose(float(pdc_loss(far, target, 2)), math.log1p(math.exp(1.0 - 3.0)), rel_tol=1e-5)
    assert pdc_loss(far, torch.tensor([1.0, 1.0]), 2) == 0  # no normal image: no ranking


def test_pdc_bce_lower_when_anomaly_is_farther():
    target, margin = torch.tensor([0.0, 1.0]), torch.tensor(1.5)
    near = torch.stack([torch.full((4, 3), 1.0), torch.full((4, 3), 1.0)])
    far = torch.stack([torch.full((4, 3), 1.0), torch.full((4, 3), 4.0)])
    assert pdc_loss(far, target, 2, "bce", margin) < pdc_loss(near, target, 2, "bce", margin)


def test_seg_and_total():
    logits, mask = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert math.isclose(float(seg_loss(logits, mask)), 0.25)
    terms = {"nfc": torch.tensor(1.0), "afs": torch.tensor(2.0), "pdc": torch.tensor(3.0), "seg": torch.tensor(4.0)}
    assert float(total_loss(terms, (1, 1, 50, 40))) == 1 + 2 + 150 + 160


def test_log_radius_gradient_signs_through_the_losses():
    """r = exp(log r): L_NFC (normal pixels outside r^2) grows r, L_AFS (anomalies inside (r+alpha)^2) shrinks it."""
    log_r = torch.tensor(0.0, requires_grad=True)  # r = 1
    nfc_loss(torch.full((1, 4, 3), 2.0), log_r.exp(), NU).backward()
    assert log_r.grad < 0
    # d(L)/d(log r) = r * dL/dr = -2 r^2 / nu per active value: a step of log r is scale-free
    assert math.isclose(float(log_r.grad), -2.0 / NU, rel_tol=1e-5)
    log_r.grad = None
    afs_loss(torch.full((1, 1, 3), 1.0), torch.tensor([[True]]), log_r.exp(), ALPHA, NU).backward()
    assert math.isclose(float(log_r.grad), 2 * (1 + ALPHA) / NU, rel_tol=1e-5)  # > 0: descent shrinks r
