"""Per-class NSA "CutPaste" parameters (docs/design/pcsnet.md section 3) and pseudo anomalies made on model inputs.

The pseudo anomaly is drawn on the very image the model sees (already resized to the input size, recovered from
the normalised tensor as uint8), so its mask is aligned pixel for pixel with the image. The original made it at
256 px, center-cropped the image to 224 and squashed the uncropped mask instead (docs/design/pcsnet.md section 9.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.pseudo_anomaly import DEFECT_KINDS, nsa_cutpaste, synthesize_defect

SMALL = ((0.01, 0.05), (0.01, 0.05))
SMALL_WIDE = ((0.01, 0.05), (0.01, 0.1))
LARGE = ((0.03, 0.4), (0.03, 0.4))
LARGER = ((0.05, 0.4), (0.05, 0.4))
_WIDTHS = {
    **dict.fromkeys(
        ("cable", "capsule", "screw", "toothbrush", "leather", "wood", "bracket_black", "bracket_brown"), SMALL
    ),
    **dict.fromkeys(("hazelnut", "pill", "grid", "tile"), SMALL_WIDE),
    **dict.fromkeys(
        ("bottle", "transistor", "zipper", "carpet", "bracket_white", "connector", "metal_plate", "tubes"), LARGE
    ),
    "metal_nut": LARGER,
}
_PATCHES = {
    **dict.fromkeys(
        ("cable", "hazelnut", "toothbrush", "transistor", "zipper", "grid", "leather", "wood", "bracket_brown"), 3
    ),
    "pill": 2,
    "carpet": 2,
}
_MIN_OBJECT = {"metal_nut": 0.5, "screw": 0.5, "toothbrush": 0.25}
_BACKGROUND = {
    **dict.fromkeys(("bottle", "screw", "capsule", "zipper"), (200, 60)),
    **dict.fromkeys(("hazelnut", "pill", "toothbrush", "metal_nut"), (20, 20)),
    "bracket_white": (130, 60),
}
DEFAULT_PATCHES = 2  # classes outside the MVTec/MPDD tables: large bounds, up to 2 patches, no object mask
MAX_DRAWS = 5  # redraw a pseudo anomaly whose mask came out empty (NSA keeps it; an empty "anomaly" is noise)


@dataclass(frozen=True)
class NSAParams:
    """Arguments of `common.pseudo_anomaly.nsa_cutpaste` for one class."""

    width_bounds: tuple[tuple[float, float], tuple[float, float]]
    num_patches: int
    min_object_pct: float
    min_overlap_pct: float
    skip_background: tuple[int, int] | None


def nsa_params(
    class_name: str, default_bounds: tuple[float, float] | None = None, default_patches: int | None = None
) -> NSAParams:
    """The class's NSA parameters.

    Classes outside the MVTec/MPDD tables get `default_bounds` (half-width fractions (lo, hi) on both axes;
    None = the (0.03, 0.4) bounds), `default_patches` patches (None = DEFAULT_PATCHES) and no object mask.
    """
    known = class_name in _WIDTHS
    bounds = LARGE if default_bounds is None else (tuple(default_bounds), tuple(default_bounds))
    patches = DEFAULT_PATCHES if default_patches is None else int(default_patches)
    return NSAParams(
        width_bounds=_WIDTHS[class_name] if known else bounds,
        num_patches=_PATCHES.get(class_name, 1 if known else patches),
        min_object_pct=_MIN_OBJECT.get(class_name, 0.7),
        min_overlap_pct=0.25,
        skip_background=_BACKGROUND.get(class_name),
    )


def to_uint8(images: torch.Tensor, mean: tuple, std: tuple) -> np.ndarray:
    """Undo the normalisation: (B, 3, S, S) float -> uint8 (B, S, S, 3) (exact for images made by preprocess_image)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = (images.detach().float().cpu() * s + m) * 255.0
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def to_tensor(images: np.ndarray, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 (B, S, S, 3) -> normalised float (B, 3, S, S), the same arithmetic as data.dataset.preprocess_image."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return ((x - m) / s).contiguous()


def make_pseudo_anomalies(
    images: torch.Tensor,
    class_name: str,
    rng: np.random.Generator,
    mean: tuple,
    std: tuple,
    params: NSAParams | None = None,
    mixed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One NSA pseudo anomaly per image, made at the input resolution.

    With `mixed` (`pseudo_anomalies: mixed`, ours) each image instead gets, with probability 1/2, NSA, else one of
    the training defect kinds of `common.pseudo_anomaly` (scratch, hole, blob, color, cutpaste, foreign) drawn
    uniformly: more kinds of "not normal" for the CAS to learn from than NSA's seams alone. (The dev benchmark's test
    defects come from data/test_defects.py, which no training path imports.)

    Args:
        images: (B, 3, S, S) normalised support images.
        class_name: selects the NSA parameters.
        rng: the only source of randomness (seeded per run and class).
        mean, std: the normalisation of `images`.
        params: NSA parameters (default: `nsa_params(class_name)`).

    Returns:
        (augmented (B, 3, S, S) normalised, masks (B, 1, S, S) float {0, 1}); a mask may stay empty after
        MAX_DRAWS tries (such an image is then labelled normal by the trainer).
    """
    params = params or nsa_params(class_name)
    pixels = to_uint8(images, mean, std)
    out, masks = np.empty_like(pixels), np.zeros(pixels.shape[:3], np.float32)
    for i, image in enumerate(pixels):
        if mixed and rng.random() < 0.5:
            kind = DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
            out[i], mask = synthesize_defect(image, kind, rng)
            masks[i] = mask
            continue
        for _ in range(MAX_DRAWS):
            patched, mask = nsa_cutpaste(
                image, rng, params.width_bounds, params.num_patches, params.min_object_pct,
                params.min_overlap_pct, params.skip_background,
            )  # fmt: skip
            if mask.any():
                break
        out[i], masks[i] = patched, mask
    return to_tensor(out, mean, std), torch.from_numpy(masks)[:, None]
