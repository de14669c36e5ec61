"""Synthetic defects: masks are exactly the changed pixels, sizes span tiny..large, seeded; NSA CutPaste; panels."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from common.pseudo_anomaly import DEFECT_KINDS, MIN_CHANGE, nsa_cutpaste, synthesize_defect
from common.visualization import TITLE_HEIGHT, heatmap_overlay, save_panel

SIZE = 256


@pytest.fixture(scope="module")
def colour_image() -> np.ndarray:
    """A 256x256 RGB texture (gravel, tinted so the channels differ)."""
    grey = cv2.resize(skdata.gravel(), (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)
    return np.clip(grey[..., None] * np.array([0.9, 0.75, 0.6]) + 20, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def grey_image() -> np.ndarray:
    grey = cv2.resize(skdata.brick(), (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    return np.repeat(grey[..., None], 3, axis=2)


def _change(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=2)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_mask_is_exactly_the_changed_region(colour_image, kind, scale):
    out, mask = synthesize_defect(colour_image, kind, np.random.default_rng(3), scale=scale)
    assert out.dtype == np.uint8 and out.shape == colour_image.shape
    assert mask.dtype == bool and mask.shape == colour_image.shape[:2]
    assert mask.any()
    np.testing.assert_array_equal(out[~mask], colour_image[~mask])  # nothing changes outside the mask
    assert (_change(out, colour_image)[mask] >= MIN_CHANGE).all()  # every mask pixel visibly changed
    assert mask.mean() < 0.3


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_sizes_span_tiny_to_large(colour_image, kind):
    tiny = [synthesize_defect(colour_image, kind, np.random.default_rng(s), scale=0.0)[1] for s in range(4)]
    large = [synthesize_defect(colour_image, kind, np.random.default_rng(s), scale=1.0)[1] for s in range(4)]
    assert max(m.mean() for m in tiny) < 0.003  # a few tens of pixels out of 65536
    if kind == "scratch":  # thin: large means long, not wide
        extents = [max(np.ptp(np.nonzero(m)[0]), np.ptp(np.nonzero(m)[1])) for m in large]
        assert min(extents) > 0.4 * SIZE
        assert min(m.mean() for m in large) > 5 * max(m.mean() for m in tiny)
    else:
        assert min(m.mean() for m in large) > 0.08  # about 15% of the image


def test_scale_none_draws_varied_sizes(colour_image):
    rng = np.random.default_rng(0)
    areas = [synthesize_defect(colour_image, "blob", rng)[1].mean() for _ in range(12)]
    assert max(areas) > 10 * min(areas)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_same_seed_same_output(colour_image, kind):
    a = synthesize_defect(colour_image, kind, np.random.default_rng(7))
    b = synthesize_defect(colour_image, kind, np.random.default_rng(7))
    c = synthesize_defect(colour_image, kind, np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("kind", ["blob", "color", "hole", "foreign"])
def test_grey_image_gets_grey_defect(grey_image, kind):
    foreign = np.zeros((64, 64, 3), np.uint8) + np.array([255, 0, 0], np.uint8)  # red: must come out grey
    out, mask = synthesize_defect(grey_image, kind, np.random.default_rng(1), scale=0.7, foreign=foreign)
    assert mask.any()
    np.testing.assert_array_equal(out[..., 0], out[..., 1])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_foreign_texture_is_pasted(colour_image):
    foreign = np.full((100, 80, 3), (10, 200, 30), np.uint8)  # other size: resized to the image
    out, mask = synthesize_defect(colour_image, "foreign", np.random.default_rng(2), scale=0.8, foreign=foreign)
    inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)  # away from the feathered rim
    assert inner.sum() > 100
    np.testing.assert_allclose(out[inner], np.broadcast_to([10, 200, 30], out[inner].shape), atol=2)


def test_cutpaste_copies_pixels_of_the_same_image(colour_image):
    out, mask = synthesize_defect(colour_image, "cutpaste", np.random.default_rng(5), scale=0.6)
    ys, xs = np.nonzero(mask)
    top, left, bottom, right = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
    patch = out[top:bottom, left:right]
    match = cv2.matchTemplate(colour_image, patch, cv2.TM_SQDIFF)  # where the pasted patch came from
    sy, sx = np.unravel_index(match.argmin(), match.shape)
    source = colour_image[sy : sy + bottom - top, sx : sx + right - left]
    inside = mask[top:bottom, left:right]  # (unchanged-within-2 pixels keep the original value)
    np.testing.assert_array_equal(patch[inside], source[inside])
    assert (sy, sx) != (top, left)


def test_impossible_defect_raises():
    flat = np.zeros((64, 64, 3), np.uint8)  # pasting black on black never changes anything
    with pytest.raises(RuntimeError):
        synthesize_defect(flat, "cutpaste", np.random.default_rng(0))
    with pytest.raises(ValueError):
        synthesize_defect(flat, "rust", np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------- NSA CutPaste


def _object_image() -> tuple[np.ndarray, np.ndarray]:
    """A textured disc object on a black background and its true object mask."""
    grey = cv2.resize(skdata.gravel(), (SIZE, SIZE), interpolation=cv2.INTER_AREA).astype(np.float32)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = (yy - 128) ** 2 + (xx - 140) ** 2 < 80**2
    texture = np.clip(grey * 0.6 + 90, 0, 255).astype(np.uint8)  # object pixels are all > 60
    image = np.where(disc, texture, 0).astype(np.uint8)
    return np.repeat(image[..., None], 3, axis=2), disc


def _black_fraction(out: np.ndarray, image: np.ndarray) -> float:
    """Fraction of the changed pixels that became background (black)."""
    changed = _change(out, image) > 0
    return float((out[changed].max(axis=1) == 0).mean()) if changed.any() else 0.0


def test_nsa_with_object_mask_pastes_only_object():
    image, disc = _object_image()
    for seed in range(12):
        out, mask = nsa_cutpaste(image, np.random.default_rng(seed), skip_background=(0, 20))
        changed = _change(out, image) > 0
        assert changed.any() and mask.any()
        assert (out[changed & ~disc].min(axis=1) > 20).all()  # off the object, only object pixels land
        assert (changed & disc).any()
        assert _black_fraction(out, image) < 0.35  # source boxes are > 70% object (a little slack for the blur)


def test_nsa_without_object_mask_does_paste_background():
    """The control for the test above: without skip_background, background boxes get pasted on the object."""
    image, _ = _object_image()
    fractions = [_black_fraction(nsa_cutpaste(image, np.random.default_rng(s))[0], image) for s in range(12)]
    assert max(fractions) > 0.5


def test_nsa_patch_size_follows_width_bounds(colour_image):
    bounds = ((0.05, 0.1), (0.05, 0.1))
    for seed in range(10):
        out, mask = nsa_cutpaste(colour_image, np.random.default_rng(seed), width_bounds=bounds)
        changed = np.nonzero(_change(out, colour_image) > 0)
        assert mask.any()
        assert np.ptp(changed[0]) < 2 * 0.1 * SIZE + 1 and np.ptp(changed[1]) < 2 * 0.1 * SIZE + 1
        assert mask.sum() > 0.5 * (2 * 0.05 * SIZE) ** 2


def test_nsa_deterministic_and_multi_patch(colour_image):
    a = nsa_cutpaste(colour_image, np.random.default_rng(4), num_patches=3)
    b = nsa_cutpaste(colour_image, np.random.default_rng(4), num_patches=3)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    counts = [cv2.connectedComponents(nsa_cutpaste(colour_image, np.random.default_rng(s), ((0.03, 0.05),) * 2,
                                                   num_patches=3)[1].astype(np.uint8))[0] - 1 for s in range(10)]
    assert max(counts) >= 2 and min(counts) >= 1


def test_nsa_no_object_gives_empty_mask():
    blank = np.zeros((SIZE, SIZE, 3), np.uint8)
    out, mask = nsa_cutpaste(blank, np.random.default_rng(0), skip_background=(0, 20))
    assert not mask.any()
    np.testing.assert_array_equal(out, blank)


# ----------------------------------------------------------------------------------------------- visualization


@pytest.mark.parametrize(("with_gt", "threshold", "panels"), [(True, 0.5, 4), (True, None, 3), (False, None, 2)])
def test_save_panel_width(tmp_path, colour_image, with_gt, threshold, panels):
    image = colour_image[:96, :128]
    amap = np.zeros((96, 128), np.float32)
    amap[30:60, 40:90] = 1.0
    gt = amap > 0.5 if with_gt else None
    path = save_panel(tmp_path / "sub" / "panel.png", image, amap, gt_mask=gt, threshold=threshold, title="x")
    read = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert read.shape == (96 + TITLE_HEIGHT, panels * 128, 3)
    if threshold is not None:  # the outline panel has pure red (BGR 0,0,255) pixels around the hot region
        outline = read[TITLE_HEIGHT:, 3 * 128 :]
        red = (outline[..., 2] == 255) & (outline[..., 0] == 0) & (outline[..., 1] == 0)
        ys, xs = np.nonzero(red)
        assert red.any() and ys.min() >= 28 and ys.max() <= 61 and xs.min() >= 38 and xs.max() <= 91
    assert not list(tmp_path.glob("sub/.*.tmp"))


def test_save_panel_shared_colour_scale(tmp_path, colour_image):
    """With a class-wide vmin/vmax (as the evaluation harness passes), a flat low map is drawn blue, not red."""
    amap = np.full(colour_image.shape[:2], 0.1, np.float32)
    path = save_panel(tmp_path / "p.png", colour_image, amap, vmin=0.0, vmax=1.0)
    overlay = cv2.imread(str(path))[:, colour_image.shape[1] :]
    assert overlay.shape == colour_image.shape
    assert overlay[..., 0].mean() > overlay[..., 2].mean() + 50  # BGR: blue dominates


def test_heatmap_overlay_colours(colour_image):
    amap = np.zeros(colour_image.shape[:2], np.float32)
    amap[:, 128:] = 1.0
    heat = heatmap_overlay(colour_image, amap, alpha=1.0)
    assert heat.dtype == np.uint8 and heat.shape == colour_image.shape
    assert heat[0, 200, 0] > 100 and heat[0, 200, 2] < 50  # high scores red (RGB)
    assert heat[0, 10, 2] > 100 and heat[0, 10, 0] < 50  # low scores blue
