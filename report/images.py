"""Thumbnails for the report: images read with PIL, maps coloured with a perceptually uniform colour map (inferno),
everything encoded inline as base64 so report.html opens from disk with no folder beside it."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image

THUMB = 128  # pixels per side of an example panel (the report stays small; click nothing, it is all inline)
HEAT_CMAP = "inferno"
OVERLAY_ALPHA = 0.5
JPEG_QUALITY = 75


def read_rgb(path: str | Path, max_side: int | None = None) -> np.ndarray | None:
    """RGB uint8 (H, W, 3), downscaled to `max_side` (JPEG decoded at reduced size); None when unreadable."""
    try:
        with Image.open(path) as image:
            if max_side:
                image.draft("RGB", (max_side, max_side))  # JPEG: decode at 1/2, 1/4, 1/8 size (6000 px photos)
            if image.mode in ("I;16", "I;16B", "I", "F"):  # 16-bit / float: stretch, as a viewer would
                values = np.asarray(image, dtype=np.float32)
                values = 255 * (values - values.min()) / max(float(np.ptp(values)), 1e-12)
                image = Image.fromarray(values.astype(np.uint8))
            image = image.convert("RGB")
            if max_side and max(image.size) > max_side:
                image.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
            return np.asarray(image)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def resize_rgb(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) -> (h, w, 3), size = (h, w)."""
    if image.shape[:2] == tuple(size):
        return image
    return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BILINEAR))


def resize_map(values: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """float (H, W) -> float32 (h, w), bilinear (maps) or nearest (masks)."""
    values = np.asarray(values, dtype=np.float32)
    if values.shape == tuple(size):
        return values
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(values, mode="F").resize((size[1], size[0]), method), dtype=np.float32)


def colorize(values: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """float (H, W) -> uint8 (H, W, 3) through inferno, vmin dark, vmax bright (clipped)."""
    norm = np.clip((np.nan_to_num(values, nan=vmin) - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    return (colormaps[HEAT_CMAP](norm)[..., :3] * 255).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a binary mask (H, W) -> bool (H, W): a pixel of the mask with a 4-neighbour outside."""
    mask = np.asarray(mask) > 0
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def overlay(image: np.ndarray, heat: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Blend the coloured map over the image; the ground-truth outline (if any) in cyan on top."""
    out = ((1 - OVERLAY_ALPHA) * image.astype(np.float32) + OVERLAY_ALPHA * heat.astype(np.float32)).astype(np.uint8)
    if mask is not None:
        out[outline(mask)] = (0, 255, 255)
    return out


def encode(array: np.ndarray, fmt: str = "JPEG") -> str:
    """A data: URI of an RGB / grayscale uint8 array (JPEG for photos, PNG for masks and plots)."""
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, format="PNG", optimize=True)
    mime = "jpeg" if fmt == "JPEG" else "png"
    return f"data:image/{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def placeholder(size: tuple[int, int]) -> np.ndarray:
    """A grey tile for an image that cannot be read any more (moved or deleted since the run)."""
    return np.full((*size, 3), 128, dtype=np.uint8)


def img_tag(uri: str, alt: str, css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    return f'<img{cls} src="{uri}" alt="{html.escape(alt)}" title="{html.escape(alt)}">'
