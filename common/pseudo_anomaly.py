"""Synthetic defects: realistic industrial-looking kinds for demo data, and PCSNet's NSA "CutPaste" preset.

`synthesize_defect` draws one defect of a named kind (scratch, hole, blob, color, cutpaste, foreign) and returns
the new image with a mask of exactly the pixels it changed. `nsa_cutpaste` reproduces NSA's `patch_ex` with the
settings PCSNet uses (docs/design/pcsnet.md section 3). Both are deterministic given a `np.random.Generator`.
Images are uint8 `(H, W, 3)`; a grey image (three equal channels) stays grey.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

DEFECT_KINDS = ("scratch", "hole", "blob", "color", "cutpaste", "foreign")
MIN_AREA_FRACTION = 0.0005  # scale 0: a few pixels (about 33 px at 256x256)
MAX_AREA_FRACTION = 0.15  # scale 1: a large defect
MIN_CHANGE = 2.0  # a pixel belongs to the mask when its channel-mean |change| is at least this (grey levels)
MAX_TRIES = 20  # synthesize_defect retries before giving up

# NSA patch_ex "CutPaste" preset as used by PCSNet (docs/design/pcsnet.md section 3).
NSA_GAMMA_SHAPE, NSA_GAMMA_SCALE, NSA_GAMMA_OFFSET = 2.0, 0.05, 0.03  # half-width = offset + Gamma(shape, scale)
NSA_MAX_TRIES = 200  # tries for a source box and then for a destination centre
NSA_OBJECT_BLUR = 7  # median blur of the thresholded object mask
NSA_LABEL_TOL = 1  # label = channel-mean |orig - patched| > tol inside the patch mask ...
NSA_LABEL_BLUR = 5  # ... then median blur 5

Renderer = Callable[[np.ndarray, float, np.random.Generator, "np.ndarray | None"], np.ndarray]


# ----------------------------------------------------------------------------------------------- helpers


def _check_image(image: np.ndarray, name: str = "image") -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name} must be a uint8 array of shape (H, W, 3), got {got}")


def _is_grey(image: np.ndarray) -> bool:
    return bool(np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 0], image[..., 2]))


def _area_px(scale: float, shape: tuple[int, ...]) -> float:
    """Target defect area in pixels: log-uniform from MIN_AREA_FRACTION (scale 0) to MAX_AREA_FRACTION (scale 1)."""
    fraction = MIN_AREA_FRACTION * (MAX_AREA_FRACTION / MIN_AREA_FRACTION) ** scale
    return fraction * shape[0] * shape[1]


def _centre(shape: tuple[int, ...], extent: float, rng: np.random.Generator) -> tuple[float, float]:
    """A centre that keeps a defect of radius `extent` mostly inside the image."""
    h, w = shape[:2]
    my, mx = min(extent, h / 2 - 1), min(extent, w / 2 - 1)
    return float(rng.uniform(my, h - my)), float(rng.uniform(mx, w - mx))


def _smooth_noise(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-smoothed white noise, normalised to zero mean and unit std, float32 (H, W)."""
    noise = rng.standard_normal(shape[:2]).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), max(sigma, 0.5), borderType=cv2.BORDER_REFLECT)
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _ellipse_coords(
    shape: tuple[int, ...], area: float, rng: np.random.Generator, max_aspect: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Elliptic coordinates (u, v) of a random ellipse of the given area (|(u, v)| = 1 on its border)."""
    r = math.sqrt(area / math.pi)
    aspect = rng.uniform(1.0, max_aspect)
    a, b, theta = r * math.sqrt(aspect), r / math.sqrt(aspect), rng.uniform(0, math.pi)
    cy, cx = _centre(shape, a, rng)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = (dx * math.cos(theta) + dy * math.sin(theta)) / a
    v = (-dx * math.sin(theta) + dy * math.cos(theta)) / b
    return u, v, r


def _irregular_region(
    shape: tuple[int, ...], area: float, rng: np.random.Generator, roughness: float, max_aspect: float = 2.0
) -> tuple[np.ndarray, float]:
    """Bool (H, W) irregular region of about `area` pixels: an ellipse perturbed by smooth noise, top-k thresholded."""
    u, v, r = _ellipse_coords(shape, area, rng, max_aspect)
    field = -(u * u + v * v) + roughness * _smooth_noise(shape, 0.35 * r, rng)
    k = int(np.clip(round(area), 1, field.size))
    threshold = np.partition(field.ravel(), -k)[-k]
    return field >= threshold, r


def _feather(region: np.ndarray, sigma: float) -> np.ndarray:
    """Soft alpha float32 (H, W) in [0, 1] from a bool region."""
    return cv2.GaussianBlur(region.astype(np.float32), (0, 0), max(sigma, 0.3))


def _blend(image: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """image * (1 - alpha) + target * alpha, float32 (H, W, 3)."""
    a = alpha[..., None]
    return image.astype(np.float32) * (1.0 - a) + target.astype(np.float32) * a


def _dark_probability(image: np.ndarray, region: np.ndarray) -> float:
    """Bright surroundings favour dark defects and vice versa (so the defect stays visible)."""
    mean = float(image[region].mean()) if region.any() else float(image.mean())
    return float(np.clip(mean / 255.0, 0.15, 0.85))


# ----------------------------------------------------------------------------------------------- defect kinds


def _random_walk(
    start: np.ndarray, angle: float, length: float, rng: np.random.Generator, jagged: bool
) -> np.ndarray:
    """Vertices (N, 2) as (x, y) of a directed random walk: smooth for scratches, zig-zag for cracks."""
    step = 2.0 if jagged else 4.0
    n = max(2, int(math.ceil(length / step)))
    drift = np.cumsum(rng.normal(0.0, 0.12 if jagged else 0.04, n))
    wiggle = rng.normal(0.0, 0.6, n) if jagged else np.zeros(n)
    angles = angle + drift + wiggle
    steps = step * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return np.vstack([start[None], start[None] + np.cumsum(steps, axis=0)])


def _render_scratch(
    image: np.ndarray, scale: float, rng: np.random.Generator, foreign: np.ndarray | None
) -> np.ndarray:
    """A thin bright or dark polyline (scratch) or a branching zig-zag crack, 1-4 px wide."""
    h, w = image.shape[:2]
    side = min(h, w)
    length = side * (0.035 + 0.9 * scale**1.3)
    jagged = bool(rng.random() < 0.4)
    width = 1 + int(rng.integers(0, 1 + round(3 * scale)))
    layer = np.zeros((h, w), np.uint8)
    angle = rng.uniform(0, 2 * math.pi)
    middle = np.array(_centre(image.shape, length / 3, rng)[::-1])
    start = middle - 0.5 * length * np.array([math.cos(angle), math.sin(angle)])
    walks = [(_random_walk(start, angle, length, rng, jagged), width)]
    for _ in range(int(rng.integers(1, 4)) if jagged and scale > 0.3 else 0):  # crack branches
        root = walks[0][0][rng.integers(len(walks[0][0]))]
        branch_angle = angle + rng.choice([-1.0, 1.0]) * rng.uniform(0.4, 1.2)
        walks.append((_random_walk(root, branch_angle, length * rng.uniform(0.15, 0.4), rng, True), max(1, width - 1)))
    for points, thickness in walks:  # a handful of polylines, drawn by OpenCV (sub-pixel, anti-aliased)
        pts = np.round(points * 16).astype(np.int32)[None]
        cv2.polylines(layer, pts, False, 255, thickness=thickness, lineType=cv2.LINE_AA, shift=4)
    alpha = layer.astype(np.float32) / 255.0 * rng.uniform(0.75, 1.0)
    img = image.astype(np.float32)
    if rng.random() < (0.9 if jagged else _dark_probability(image, layer > 0)):
        target = img * rng.uniform(0.1, 0.4)
    else:
        target = 255.0 - (255.0 - img) * rng.uniform(0.05, 0.3)
    return _blend(image, target, alpha)


def _render_hole(image: np.ndarray, scale: float, rng: np.random.Generator, foreign: np.ndarray | None) -> np.ndarray:
    """A dark (or, less often, back-lit bright) ellipse with an anti-aliased rim and a soft offset shadow/halo."""
    u, v, r = _ellipse_coords(image.shape, 0.75 * _area_px(scale, image.shape), rng, 1.8)  # 0.75: room for the rim
    dist = np.sqrt(u * u + v * v)
    core = np.clip((1.0 - dist) * r + 0.5, 0.0, 1.0)  # about 1 px anti-aliased edge
    light = rng.uniform(0, 2 * math.pi)
    side = np.clip(u * math.cos(light) + v * math.sin(light), -1.0, 1.0)  # -1..1 across the hole
    img = image.astype(np.float32)
    rim = float(np.clip(3.5 / r, 0.06, 0.3))  # shadow / glow width: about 3.5 px, relative to the radius
    if rng.random() < 0.75:  # dark hole: lit inner wall on one side, shadow cast outside on the other
        interior = rng.uniform(8, 40) + rng.uniform(10, 45) * np.clip(side, 0, 1) ** 2
        interior = np.minimum(interior + rng.normal(0, 3, dist.shape), img.mean(axis=2) - 3.0)  # always darker
        su, sv = u + 0.5 * rim * math.cos(light), v + 0.5 * rim * math.sin(light)
        ring = np.exp(-(((np.sqrt(su * su + sv * sv) - 1.0) / rim) ** 2)) * (dist > 1.0)
        outside = img * (1.0 - rng.uniform(0.25, 0.55) * ring)[..., None]
    else:  # bright pin-hole / burn-through with a glow
        interior = rng.uniform(215, 250) + rng.normal(0, 3, dist.shape)
        glow = np.exp(-(((dist - 1.0) / rim) ** 2)) * (dist > 1.0)
        outside = _blend(image, np.full_like(img, 255.0), glow * rng.uniform(0.2, 0.45))
    target = np.repeat(np.clip(interior, 0, 255)[..., None].astype(np.float32), 3, axis=2)
    return _blend(outside, target, core)


def _render_blob(image: np.ndarray, scale: float, rng: np.random.Generator, foreign: np.ndarray | None) -> np.ndarray:
    """An irregular stain: smoothed-noise region, uneven density, colour-tinted, optional darker rim."""
    region, r = _irregular_region(image.shape, 0.75 * _area_px(scale, image.shape), rng, 0.9, 2.5)  # 0.75: soft rim
    soft = _feather(region, max(0.6, 0.06 * r))
    density = 0.7 + 0.3 * np.clip(0.5 + 0.3 * _smooth_noise(image.shape, max(1.0, 0.25 * r), rng), 0, 1)
    alpha = soft * density * rng.uniform(0.6, 0.95)
    if rng.random() < 0.5:  # coffee-ring: pigment piles up at the border
        alpha = np.clip(alpha + 1.2 * soft * (1.0 - soft), 0, 1)
    img = image.astype(np.float32)
    if rng.random() < _dark_probability(image, region):
        target = img * rng.uniform(0.3, 0.7, 3).astype(np.float32)  # oil / rust: darker and tinted
    else:
        target = 255.0 - (255.0 - img) * rng.uniform(0.3, 0.6, 3).astype(np.float32)  # bleach / dust: lighter
    return _blend(image, target, alpha)


def _render_color(image: np.ndarray, scale: float, rng: np.random.Generator, foreign: np.ndarray | None) -> np.ndarray:
    """A discoloured irregular area: per-channel gain and offset with a soft border, texture kept."""
    region, r = _irregular_region(image.shape, 0.75 * _area_px(scale, image.shape), rng, 0.5)  # 0.75: soft rim
    alpha = _feather(region, max(0.7, 0.1 * r))
    sign = -1.0 if rng.random() < _dark_probability(image, region) else 1.0
    gain = 1.0 + sign * rng.uniform(0.15, 0.35) + rng.uniform(-0.06, 0.06, 3)
    offset = sign * rng.uniform(10, 30) + rng.uniform(-8, 8, 3)
    target = image.astype(np.float32) * gain.astype(np.float32) + offset.astype(np.float32)
    return _blend(image, target, alpha)


def _patch_shape(area: float, shape: tuple[int, ...], rng: np.random.Generator) -> tuple[int, int]:
    aspect = math.exp(rng.uniform(-0.7, 0.7))
    ph = int(np.clip(round(math.sqrt(area * aspect)), 2, 0.6 * shape[0]))
    pw = int(np.clip(round(area / max(ph, 1)), 2, 0.6 * shape[1]))
    return ph, pw


def _render_cutpaste(
    image: np.ndarray, scale: float, rng: np.random.Generator, foreign: np.ndarray | None
) -> np.ndarray:
    """NSA-style: a rectangle of the same image hard-pasted at another place."""
    h, w = image.shape[:2]
    ph, pw = _patch_shape(_area_px(scale, image.shape), image.shape, rng)
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    ys, xs = rng.integers(0, h - ph + 1, 16), rng.integers(0, w - pw + 1, 16)  # 16 candidate destinations
    far = np.hypot(ys - sy, xs - sx) >= 0.5 * max(ph, pw)
    dy, dx = int(ys[far.argmax()]), int(xs[far.argmax()])
    out = image.astype(np.float32)
    out[dy : dy + ph, dx : dx + pw] = image[sy : sy + ph, sx : sx + pw]
    return out


def _render_foreign(
    image: np.ndarray, scale: float, rng: np.random.Generator, foreign: np.ndarray | None
) -> np.ndarray:
    """An irregular patch of another texture (`foreign`, or this image rotated/flipped), shifted at random."""
    h, w = image.shape[:2]
    if foreign is None:
        k = int(rng.integers(1, 4))
        source = np.rot90(image, k) if h == w else image[::-1, ::-1] if k == 2 else image[::-1]
    else:
        source = foreign if foreign.ndim == 3 else np.repeat(foreign[..., None], 3, axis=2)
        if source.shape[:2] != (h, w):
            source = cv2.resize(np.ascontiguousarray(source), (w, h), interpolation=cv2.INTER_LINEAR)
    source = np.roll(source, (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1))
    region, r = _irregular_region(image.shape, _area_px(scale, image.shape), rng, roughness=0.5, max_aspect=2.5)
    return _blend(image, source, _feather(region, 0.6))


_RENDERERS: dict[str, Renderer] = {
    "scratch": _render_scratch,
    "hole": _render_hole,
    "blob": _render_blob,
    "color": _render_color,
    "cutpaste": _render_cutpaste,
    "foreign": _render_foreign,
}


def _finalize(image: np.ndarray, candidate: np.ndarray, grey: bool) -> tuple[np.ndarray, np.ndarray]:
    """Round the candidate, keep only pixels that changed by at least MIN_CHANGE; the rest stay the original."""
    if grey:
        candidate = np.repeat(candidate.mean(axis=2, keepdims=True), 3, axis=2)
    new = np.clip(np.rint(candidate), 0, 255).astype(np.uint8)
    change = np.abs(new.astype(np.int16) - image.astype(np.int16)).mean(axis=2)
    mask = change >= MIN_CHANGE
    return np.where(mask[..., None], new, image), mask


def synthesize_defect(
    image: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    scale: float | None = None,
    foreign: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic defect of `kind` on a copy of `image`.

    Args:
        image: uint8 (H, W, 3). A grey image (equal channels) gets a grey defect.
        kind: one of DEFECT_KINDS: scratch, hole, blob, color, cutpaste, foreign.
        rng: the only source of randomness (same generator state -> same output).
        scale: 0..1 from tiny (about MIN_AREA_FRACTION of the image) to large (about MAX_AREA_FRACTION; for a
            scratch, a long crack across the image). None draws it uniformly.
        foreign: uint8 (h, w, 3) or (h, w) texture for kind "foreign" (resized to the image size when it differs);
            None uses this image rotated by 90/180/270 degrees (flipped when it is not square).

    Returns:
        (new image uint8 (H, W, 3), mask bool (H, W)). The mask is exactly the set of pixels that differ, and every
        one of them changed by at least MIN_CHANGE grey levels (channel mean); it is never empty.

    Raises:
        ValueError: unknown kind or bad array.
        RuntimeError: no visible defect after MAX_TRIES draws (e.g. a constant saturated image).
    """
    _check_image(image)
    if kind not in _RENDERERS:
        raise ValueError(f"unknown defect kind '{kind}'; expected one of {', '.join(DEFECT_KINDS)}")
    if foreign is not None and (foreign.dtype != np.uint8 or foreign.shape[2:] not in ((), (3,))):
        raise ValueError(f"foreign must be a uint8 (h, w[, 3]) array, got {foreign.dtype} {foreign.shape}")
    grey = _is_grey(image)
    for _ in range(MAX_TRIES):
        s = float(rng.uniform()) if scale is None else float(np.clip(scale, 0.0, 1.0))
        out, mask = _finalize(image, _RENDERERS[kind](image, s, rng, foreign), grey)
        if mask.any():
            return out, mask
    raise RuntimeError(f"could not draw a visible '{kind}' defect in {MAX_TRIES} tries")


# ----------------------------------------------------------------------------------------------- NSA CutPaste


def _nsa_half_width(size: int, bounds: tuple[float, float], rng: np.random.Generator) -> tuple[int, int]:
    """(min half-width, sampled half-width) in pixels: clip((0.03 + Gamma(2, 0.05)) * size, lo, hi)."""
    lo, hi = round(bounds[0] * size), round(bounds[1] * size)
    width = int(np.clip((NSA_GAMMA_OFFSET + rng.gamma(NSA_GAMMA_SHAPE, NSA_GAMMA_SCALE)) * size, lo, hi))
    return int(lo), max(width, 1)


def _nsa_patch(
    dest: np.ndarray,
    source: np.ndarray,
    objects: np.ndarray | None,
    rng: np.random.Generator,
    width_bounds: tuple[tuple[float, float], tuple[float, float]],
    min_object_pct: float,
    min_overlap_pct: float,
) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """One NSA swap patch (NSA `_patch_ex`, mode swap, same image, shift, no resize), written into `dest` in place.

    Returns the destination box and the patch mask, or None when no source box / destination centre was found.
    """
    h, w = dest.shape[:2]
    min1, half1 = _nsa_half_width(h, width_bounds[0], rng)
    min2, half2 = _nsa_half_width(w, width_bounds[1], rng)
    for _ in range(NSA_MAX_TRIES):  # source box: centre uniform in [lo, size - lo), clipped to the image
        c1, c2 = int(rng.integers(min1, h - min1)), int(rng.integers(min2, w - min2))
        box = (slice(max(c1 - half1, 0), min(c1 + half1, h)), slice(max(c2 - half2, 0), min(c2 + half2, w)))
        if objects is None or objects[box].mean() > min_object_pct:
            break
    else:
        return None
    patch = source[box]
    ph, pw = patch.shape[:2]
    src_obj = objects[box] if objects is not None else None
    for _ in range(NSA_MAX_TRIES):  # destination centre with the patch fully inside
        d1, d2 = int(rng.integers(ph // 2 + 1, h - ph // 2 - 1)), int(rng.integers(pw // 2 + 1, w - pw // 2 - 1))
        dbox = (slice(d1 - ph // 2, d1 + (ph + 1) // 2), slice(d2 - pw // 2, d2 + (pw + 1) // 2))
        if src_obj is None:
            break
        overlap = np.count_nonzero(objects[dbox] & src_obj) / max(np.count_nonzero(src_obj), 1)
        if src_obj.mean() > min_object_pct and overlap > min_overlap_pct:
            break
    else:
        return None
    patch_mask = np.ones((ph, pw), bool) if objects is None else src_obj | objects[dbox]
    dest[dbox] = np.where(patch_mask[..., None], patch, dest[dbox])  # hard swap, no blending
    return dbox, patch_mask


def nsa_cutpaste(
    image: np.ndarray,
    rng: np.random.Generator,
    width_bounds: tuple[tuple[float, float], tuple[float, float]] = ((0.03, 0.4), (0.03, 0.4)),
    num_patches: int = 1,
    min_object_pct: float = 0.7,
    min_overlap_pct: float = 0.25,
    skip_background: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """PCSNet's pseudo anomaly: NSA `patch_ex` with the "CutPaste" preset (docs/design/pcsnet.md section 3).

    Same-image patches, hard swap, shift, no resize, binary labels. Half-widths per axis are
    clip((0.03 + Gamma(2, 0.05)) * size, lo * size, hi * size). With `skip_background=(bg, thr)` the object is
    |mean RGB - bg| > thr (median blur 7); source boxes need an object fraction > min_object_pct and destinations
    an object overlap > min_overlap_pct, and the patch mask is ANDed with (source OR destination object).
    The first patch is always tried, each further one with probability 0.5; 200 tries each for source and
    destination. Patch masks are OR-ed (NSA overwrote the box, which could erase an earlier patch's label).

    Args:
        image: uint8 (H, W, 3), typically 256x256.
        rng: the only source of randomness.
        width_bounds: ((lo, hi) rows, (lo, hi) cols) half-width fractions of the image size, hi < 0.5.
        num_patches: maximum number of patches.
        min_object_pct: minimum object fraction of a patch (only with skip_background).
        min_overlap_pct: minimum overlap of the source object with the destination object.
        skip_background: (background grey level, threshold) or None for textures.

    Returns:
        (patched image uint8 (H, W, 3), mask bool (H, W)): mask = (channel-mean |orig - patched| > 1) inside the
        patch masks, median-blurred with size 5. Like NSA, the mask may be empty when every try failed (or the
        pasted content matches what it covered), and a few changed pixels may fall outside it after the blur.
    """
    _check_image(image)
    h, w = image.shape[:2]
    for lo, hi in width_bounds:
        if not 0 <= lo <= hi < 0.5:
            raise ValueError(f"width_bounds must be 0 <= lo <= hi < 0.5 per axis, got {width_bounds}")
    objects = None
    if skip_background is not None:
        background, threshold = skip_background
        objects = (np.abs(image.mean(axis=2) - background) > threshold).astype(np.uint8)
        objects = cv2.medianBlur(objects, NSA_OBJECT_BLUR).astype(bool)
    out = image.copy()
    patch_area = np.zeros((h, w), bool)
    for i in range(num_patches):
        if i == 0 or rng.integers(2) > 0:
            found = _nsa_patch(out, image, objects, rng, width_bounds, min_object_pct, min_overlap_pct)
            if found is not None:
                patch_area[found[0]] |= found[1]
    change = np.abs(out.astype(np.int16) - image.astype(np.int16)).mean(axis=2)
    label = ((change > NSA_LABEL_TOL) & patch_area).astype(np.uint8)
    return out, cv2.medianBlur(label, NSA_LABEL_BLUR).astype(bool)
