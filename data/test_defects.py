"""Test-only defect families for the development benchmark (`data/devbench.py`).

These generators are written separately from the training-time ones (`common.pseudo_anomaly`: the demo's six
kinds and PCSNet's NSA cut-paste), and nothing that trains a method may call them: the dev benchmark measures how
a learned part transfers to defects drawn by code it has never seen, as real defects are.

Families (each returns the new grey image and the exact mask of the pixels it changed by >= MIN_CHANGE levels):
- crack: a thin, jagged, branching dark line (1-2 px) with a faint bright lip, as a fracture in a surface;
- scratch: one long, nearly straight, anti-aliased bright or dark line of low contrast;
- dark_spot: a soft-edged irregular region darkened multiplicatively, texture kept (oxidation, burn);
- stain: a translucent blot whose edge is darker than its centre (a dried liquid ring), texture slightly blurred;
- missing: a chunk of material gone: an irregular polygon filled with a flat recess level and a shadowed rim.
Images are grey uint8 (H, W); every function is deterministic given its `np.random.Generator`.
"""

from __future__ import annotations

import cv2
import numpy as np

TEST_FAMILIES = ("crack", "scratch", "dark_spot", "stain", "missing")
MIN_CHANGE = 3.0  # grey levels: a pixel is in the mask when it changed by at least this much
AREA_RANGE = (0.002, 0.03)  # defect area as a fraction of the image (blob-like families), drawn log-uniformly


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _blob(shape: tuple[int, int], area: float, rng: np.random.Generator, roughness: float = 0.35) -> np.ndarray:
    """A float (H, W) in [0, 1]: an irregular star-shaped region of about `area` pixels, soft at the edge."""
    h, w = shape
    radius = np.sqrt(area / np.pi)
    cy = rng.uniform(radius + 4, h - radius - 4)
    cx = rng.uniform(radius + 4, w - radius - 4)
    # radius as a function of angle: a few random harmonics (a smooth irregular outline)
    angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    r = np.ones_like(angles)
    for harmonic in range(2, 6):
        r += roughness / harmonic * rng.normal() * np.cos(harmonic * angles + rng.uniform(0, 2 * np.pi))
    r = np.clip(r, 0.3, 2.0) * radius
    pts = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1).round().astype(np.int32)
    region = np.zeros(shape, np.float32)
    cv2.fillPoly(region, [pts], 1.0)
    return region


def _polyline(shape: tuple[int, int], length: float, rng: np.random.Generator, wiggle: float,
              start: np.ndarray | None = None, heading: float | None = None) -> np.ndarray:
    """Points (N, 2) of a random walk with angle momentum, `length` px long, inside the image."""
    h, w = shape
    p = np.array([rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)]) if start is None else start
    theta = rng.uniform(0, 2 * np.pi) if heading is None else heading
    pts = [p.copy()]
    step = 2.0
    for _ in range(int(length / step)):
        theta += rng.normal(0, wiggle)
        p = p + step * np.array([np.cos(theta), np.sin(theta)])
        if not (1 <= p[0] < w - 1 and 1 <= p[1] < h - 1):
            break
        pts.append(p.copy())
    return np.array(pts)


def _draw_line(shape: tuple[int, int], pts: np.ndarray, width: int) -> np.ndarray:
    """Anti-aliased stroke of `pts` as a float (H, W) coverage in [0, 1]."""
    canvas = np.zeros(shape, np.uint8)
    if len(pts) > 1:
        cv2.polylines(canvas, [(pts * 16).round().astype(np.int32)], False, 255, width, cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def crack(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape
    trunk = _polyline((h, w), rng.uniform(0.25, 0.6) * min(h, w), rng, wiggle=0.35)
    cover = _draw_line((h, w), trunk, int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(1, 4))):  # branches leave the trunk at random points
        i = int(rng.integers(0, len(trunk)))
        branch = _polyline((h, w), rng.uniform(0.05, 0.2) * min(h, w), rng, 0.5, trunk[i], rng.uniform(0, 2 * np.pi))
        cover = np.maximum(cover, _draw_line((h, w), branch, 1))
    lip = cv2.GaussianBlur(cover, (0, 0), 1.5) - cover  # light just beside the dark fracture
    depth = rng.uniform(0.45, 0.8)
    out = image.astype(np.float32) * (1 - depth * cover) + 40.0 * np.clip(lip, 0, 1)
    return out


def scratch(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape
    pts = _polyline((h, w), rng.uniform(0.3, 0.8) * min(h, w), rng, wiggle=0.03)
    cover = cv2.GaussianBlur(_draw_line((h, w), pts, int(rng.integers(1, 3))), (0, 0), 0.7)
    sign = 1.0 if rng.uniform() < 0.6 else -1.0  # scratches on metal are mostly brighter
    return image.astype(np.float32) + sign * rng.uniform(35, 80) * cover


def dark_spot(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape
    region = _blob((h, w), _log_uniform(rng, *AREA_RANGE) * h * w, rng)
    soft = cv2.GaussianBlur(region, (0, 0), rng.uniform(1.5, 4.0))
    return image.astype(np.float32) * (1 - rng.uniform(0.3, 0.6) * soft)


def stain(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape
    region = _blob((h, w), _log_uniform(rng, *AREA_RANGE) * h * w, rng, roughness=0.2)
    soft = cv2.GaussianBlur(region, (0, 0), 2.0)
    core = cv2.GaussianBlur(cv2.erode(region, np.ones((7, 7), np.uint8)), (0, 0), 2.0)
    ring = np.clip(soft - core, 0, 1)  # the edge band, where a dried liquid leaves most of its pigment
    blurred = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 1.2)
    tone = rng.uniform(-45, 45)  # the liquid's own shade (darker or lighter)
    inner = blurred + tone * 0.5
    out = image.astype(np.float32) * (1 - soft) + inner * soft
    return out - 35.0 * ring * np.sign(tone if tone != 0 else 1.0)


def missing(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = image.shape
    region = _blob((h, w), _log_uniform(rng, *AREA_RANGE) * h * w, rng, roughness=0.6)
    recess = float(np.clip(image.mean() + rng.choice([-1, 1]) * rng.uniform(50, 90), 10, 245))
    noise = cv2.GaussianBlur(rng.normal(0, 6, (h, w)).astype(np.float32), (0, 0), 1.0)
    # shadow: the rim on one side (the light comes from a random direction) is darker
    dy, dx = np.sin(a := rng.uniform(0, 2 * np.pi)), np.cos(a)
    shifted = cv2.warpAffine(region, np.float32([[1, 0, 3 * dx], [0, 1, 3 * dy]]), (w, h))
    shadow = np.clip(region - shifted, 0, 1)
    out = image.astype(np.float32) * (1 - region) + (recess + noise) * region
    return out - 40.0 * cv2.GaussianBlur(shadow, (0, 0), 1.0)


_FAMILIES = {"crack": crack, "scratch": scratch, "dark_spot": dark_spot, "stain": stain, "missing": missing}


def draw_test_defect(image: np.ndarray, family: str, rng: np.random.Generator,
                     tries: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """One defect of `family` on a copy of the grey uint8 (H, W) `image`.

    Returns:
        (new image uint8 (H, W), mask bool (H, W)): the mask is exactly the pixels that changed by >= MIN_CHANGE,
        and the image keeps every other pixel as it was; never empty.
    """
    if family not in _FAMILIES:
        raise ValueError(f"unknown test defect family {family!r}; expected one of {', '.join(TEST_FAMILIES)}")
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"image must be grey uint8 (H, W), got {image.dtype} {image.shape}")
    for _ in range(tries):
        new = np.clip(_FAMILIES[family](image, rng), 0, 255).round().astype(np.uint8)
        mask = np.abs(new.astype(np.int16) - image.astype(np.int16)) >= MIN_CHANGE
        if mask.sum() >= 4:
            return np.where(mask, new, image), mask
    raise RuntimeError(f"no visible {family} defect in {tries} tries")
