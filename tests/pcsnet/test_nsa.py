"""Pseudo anomalies: per-class parameters, exact normalisation round trip, mask/image alignment, seeding."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from data.dataset import preprocess_image
from pcsnet.nsa import LARGE, SMALL_WIDE, make_pseudo_anomalies, nsa_params, to_tensor, to_uint8

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def texture(seed: int, h: int = 90, w: int = 70) -> np.ndarray:
    """A smooth random colour field (non-square, so preprocessing really resizes)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))


def test_class_table_and_defaults():
    hazelnut = nsa_params("hazelnut")
    assert hazelnut.width_bounds == SMALL_WIDE and hazelnut.num_patches == 3 and hazelnut.skip_background == (20, 20)
    assert nsa_params("toothbrush").min_object_pct == 0.25
    assert nsa_params("bottle").num_patches == 1 and nsa_params("bracket_white").skip_background == (130, 60)
    unknown = nsa_params("my_widget")
    assert unknown.width_bounds == LARGE and unknown.num_patches == 2 and unknown.skip_background is None
    small = nsa_params("my_widget", default_bounds=(0.01, 0.1), default_patches=3)
    assert small.width_bounds == ((0.01, 0.1), (0.01, 0.1)) and small.num_patches == 3
    assert nsa_params("hazelnut", default_bounds=(0.01, 0.1)).width_bounds == SMALL_WIDE  # the table wins


def test_uint8_round_trip_is_exact():
    images = torch.stack([preprocess_image(texture(i), 48, MEAN, STD) for i in range(2)])
    pixels = to_uint8(images, MEAN, STD)
    assert pixels.shape == (2, 48, 48, 3) and pixels.dtype == np.uint8
    assert torch.equal(to_tensor(pixels, MEAN, STD), images)


def test_mask_is_aligned_with_the_changed_pixels():
    """The mask is drawn on the preprocessed (resized) image itself, so it marks exactly what changed."""
    images = torch.stack([preprocess_image(texture(i), 64, MEAN, STD) for i in range(4)])
    aug, masks = make_pseudo_anomalies(images, "carpet", np.random.default_rng(0), MEAN, STD)
    assert aug.shape == images.shape and masks.shape == (4, 1, 64, 64)
    changed = (aug - images).abs().amax(dim=1, keepdim=True) > 1e-6
    inside = masks > 0.5
    assert inside.any()
    iou = lambda a, b: float((a & b).sum() / (a | b).sum())  # noqa: E731
    assert iou(changed, inside) > 0.9  # the mask marks what changed ...
    for shift in (2, 4):  # ... and a mask displaced by a few pixels (the original's squash) fits clearly worse
        assert iou(changed, inside.roll(shift, dims=-1)) < iou(changed, inside) - 0.05
    assert torch.equal(aug[~changed.expand_as(aug)], images[~changed.expand_as(images)])


def test_same_seed_same_anomalies():
    images = torch.stack([preprocess_image(texture(i), 32, MEAN, STD) for i in range(2)])
    a = make_pseudo_anomalies(images, "wood", np.random.default_rng(3), MEAN, STD)
    b = make_pseudo_anomalies(images, "wood", np.random.default_rng(3), MEAN, STD)
    c = make_pseudo_anomalies(images, "wood", np.random.default_rng(4), MEAN, STD)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_mixed_pseudo_anomalies_are_half_nsa_half_other_kinds_with_exact_masks():
    """`pseudo_anomalies: mixed`: about half the images get NSA, the rest a common.pseudo_anomaly kind; the masks
    still mark what changed (NSA's seamless blend also touches a thin rim around its patch, as in the test above)."""
    from unittest import mock

    import pcsnet.nsa as nsa

    images = torch.stack([preprocess_image(texture(i), 48, MEAN, STD) for i in range(40)])
    with mock.patch.object(nsa, "nsa_cutpaste", wraps=nsa.nsa_cutpaste) as spy:
        aug, masks = make_pseudo_anomalies(images, "my_widget", np.random.default_rng(5), MEAN, STD, mixed=True)
    nsa_images = len({id(c.args[0]) for c in spy.call_args_list})  # NSA retries on one image share its array
    assert 10 <= nsa_images <= 30  # binomial(40, 1/2): 10..30 holds with probability > 0.999
    changed = (aug - images).abs().amax(dim=1, keepdim=True) > 1e-6
    assert bool((masks > 0.5).flatten(1).any(1).all())  # every image got a visible defect
    inside = masks > 0.5
    assert float((changed & inside).sum() / (changed | inside).sum()) > 0.9
    again = make_pseudo_anomalies(images, "my_widget", np.random.default_rng(5), MEAN, STD, mixed=True)
    assert torch.equal(again[0], aug) and torch.equal(again[1], masks)
    plain = make_pseudo_anomalies(images, "my_widget", np.random.default_rng(5), MEAN, STD)
    assert not torch.equal(plain[0], aug)  # the switch changes what is drawn
