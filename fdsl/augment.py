"""Training augmentations of FDSL, done on normalised tensors (no PIL round trip).

- Mosaic (VAND/FDSL `aug_rate`, 0.3 on MVTec): a 2x2 grid of four test images of the same class, masks alike.
- Zoom crop (FDSL `use_crop`, on VisA): a small crop resized back to full size. The original sends the
  *normalised* tensor through ToPILImage, so values wrap and are never renormalised (docs/design/fdsl.md s. 5, bug);
  here the crop is taken and resized in tensor space (image bilinear, mask bilinear then > 0.5).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# FDSL dataset.py (docs/design/fdsl.md section 5), sizes given at 518 px and scaled to the image size here.
CROP_PROB = 0.6  # an image is considered for cropping with this probability
CROP_NORMAL_PROB = 0.5  # ... then a normal image is cropped with this probability (else kept whole)
CROP_SMALL_PROB = 0.6  # ... an anomalous image gets the small crop with this probability (else the large one)
CROP_LARGE = 100 / 518
CROP_SMALL = 50 / 518


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(C, h, w) -> (C, size, size), bilinear (antialiased when shrinking)."""
    shrink = x.shape[-1] > size
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)[0]


def mosaic(images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2x2 mosaic of four images at half size.

    Args:
        images: (4, 3, S, S) normalised images.
        masks: (4, 1, S, S) {0, 1} masks.

    Returns:
        image (3, S, S) and mask (1, S, S): [0 1; 2 3] layout.
    """
    size = images.shape[-1]
    half = size // 2
    tiles = [_resize(img, half) for img in images]
    tile_masks = [(_resize(m, half) > 0.5).float() for m in masks]
    image = torch.cat([torch.cat(tiles[:2], 2), torch.cat(tiles[2:], 2)], 1)
    mask = torch.cat([torch.cat(tile_masks[:2], 2), torch.cat(tile_masks[2:], 2)], 1)
    if image.shape[-1] != size:  # odd sizes
        image, mask = _resize(image, size), (_resize(mask, size) > 0.5).float()
    return image, mask


def crop_size(anomalous: bool, size: int, rng: np.random.Generator) -> int | None:
    """Side in px of the zoom crop for one image, or None to keep it whole (the original's probabilities)."""
    if rng.random() >= CROP_PROB:
        return None
    if not anomalous:
        return round(CROP_LARGE * size) if rng.random() < CROP_NORMAL_PROB else None
    return round((CROP_SMALL if rng.random() < CROP_SMALL_PROB else CROP_LARGE) * size)


def zoom_crop(
    image: torch.Tensor, mask: torch.Tensor, side: int, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop a side x side square and resize it back to the full size.

    For an anomalous mask the crop always contains defect pixels: it is placed around a random defect pixel
    (the original re-draws uniform crops until one contains the defect; this needs a single draw).

    Args:
        image: (3, S, S) normalised image.
        mask: (1, S, S) {0, 1} mask.
        side: crop side in px.
        rng: numpy generator.

    Returns:
        image (3, S, S), mask (1, S, S).
    """
    size = image.shape[-1]
    side = int(min(max(side, 2), size))
    ys, xs = torch.nonzero(mask[0] > 0.5, as_tuple=True)
    if len(ys):
        pick = int(rng.integers(len(ys)))
        y, x = int(ys[pick]), int(xs[pick])
        top = int(rng.integers(max(0, y - side + 1), min(y, size - side) + 1))
        left = int(rng.integers(max(0, x - side + 1), min(x, size - side) + 1))
    else:
        top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    image = image[:, top : top + side, left : left + side]
    mask = mask[:, top : top + side, left : left + side]
    up = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    up_mask = F.interpolate(mask[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return up, (up_mask > 0.5).float()
