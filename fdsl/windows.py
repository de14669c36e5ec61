"""LFE (Local-enhanced Feature Extraction): pixel windows cropped from the image, encoded on their own, stitched back.

Original (fdsl.md section 4): windows of win-size=13 patches (182 px) at win-stride=2 patches on the 518 px
tensor, 13 x 13 = 169 windows tiling the 37 x 37 grid; each crop is encoded at its own size, and the window
maps are stitched back by the arithmetic mean over covering windows (sum / count; `F.fold` here).

Geometry is in grid cells of the finest backbone level. When the stride does not divide (grid - win), one more
window flush with the border is added, so the windows always tile the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.backbones import Backbone
from common.utils import UserError
from fdsl.model import extract_levels


def window_starts(grid: int, win: int, stride: int) -> list[int]:
    """Start cells along one axis: 0, s, 2s, ... and, if needed, a last window flush with the border."""
    if not 1 <= win <= grid:
        raise UserError(f"win-size {win} must be between 1 and the feature grid size {grid}")
    if not 1 <= stride <= win:  # a stride above the window size would leave cells no window covers
        raise UserError(f"win-stride must be between 1 and win-size {win} (got {stride})")
    starts = list(range(0, grid - win + 1, stride))
    if starts[-1] != grid - win:
        starts.append(grid - win)
    return starts


@dataclass(frozen=True)
class WindowGeometry:
    """Windows of `win` x `win` cells on a `grid` x `grid` feature grid of `patch` px cells."""

    grid: int
    win: int
    stride: int
    patch: int
    zoom: float = 1.0

    @property
    def starts(self) -> list[int]:
        return window_starts(self.grid, self.win, self.stride)

    @property
    def n_windows(self) -> int:
        return len(self.starts) ** 2

    @property
    def crop_px(self) -> int:
        return self.win * self.patch

    @property
    def encode_px(self) -> int:
        """Side of the crop fed to the encoder: zoomed, rounded to a multiple of the patch (ViT needs it)."""
        return max(1, round(self.crop_px * self.zoom / self.patch)) * self.patch

    @property
    def tokens(self) -> int:
        """Side of a window's feature grid after encoding (win * zoom cells)."""
        return self.encode_px // self.patch


def crop_windows(images: torch.Tensor, geom: WindowGeometry) -> torch.Tensor:
    """Crop every window from normalised images with one gather (no loop over windows).

    Args:
        images: (B, 3, H, W) with H = W = grid * patch.
        geom: window geometry.

    Returns:
        (B * n_windows, 3, encode_px, encode_px), window order row-major (wy, wx) within each image.
    """
    b, c = images.shape[:2]
    starts = torch.tensor(geom.starts, device=images.device) * geom.patch
    offsets = torch.arange(geom.crop_px, device=images.device)
    idx = starts[:, None] + offsets[None, :]  # (n, crop_px) pixel rows (= columns) of each window
    n = idx.shape[0]
    crops = images[:, :, idx[:, None, :, None], idx[None, :, None, :]]  # (B, 3, n, n, crop, crop)
    crops = crops.permute(0, 2, 3, 1, 4, 5).reshape(b * n * n, c, geom.crop_px, geom.crop_px)
    if geom.encode_px != geom.crop_px:  # --win-zoom (original winZipSize): resize the crop before encoding
        crops = F.interpolate(crops, size=(geom.encode_px,) * 2, mode="bilinear", align_corners=False)
    return crops


@torch.inference_mode()
def encode_windows(
    backbone: Backbone, images: torch.Tensor, geom: WindowGeometry, batch: int = 64, pool: int = 1
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Encode every window crop with the (frozen) backbone, in batches of crops.

    Returns:
        per-level L2-normalised features (B * n_windows, C_l, t, t) with t = geom.tokens (after the same
        `pool` local averaging as the main branch, see `fdsl.model.extract_levels`), and the
        L2-normalised pooled embeddings (B * n_windows, D) used as keys of the image-feature index bank.
    """
    crops = crop_windows(images, geom)
    levels: list[list[torch.Tensor]] = []
    pooled = []
    for start in range(0, crops.shape[0], batch):
        out = backbone(crops[start : start + batch])
        levels.append(extract_levels(out.features, pool, (geom.tokens, geom.tokens)))
        pooled.append(F.normalize(out.pooled.float(), dim=1))
    features = [torch.cat([chunk[i] for chunk in levels]) for i in range(len(levels[0]))]
    return features, torch.cat(pooled)


def _fold_block(values: torch.Tensor, rows: int, cols: int, geom: WindowGeometry, top: int, left: int) -> torch.Tensor:
    """Sum a regular block of rows x cols windows (stride geom.stride) onto the grid with one F.fold.

    values: (B, rows * cols, win, win) -> (B, grid, grid), zero outside the block.
    """
    b, w, s = values.shape[0], geom.win, geom.stride
    height, width = (rows - 1) * s + w, (cols - 1) * s + w
    cols_in = values.reshape(b, rows * cols, w * w).transpose(1, 2)  # fold wants (B, C*k*k, L)
    block = F.fold(cols_in, output_size=(height, width), kernel_size=w, stride=s)[:, 0]
    return F.pad(block, (left, geom.grid - left - width, top, geom.grid - top - height))


def stitch_windows(window_maps: torch.Tensor, geom: WindowGeometry) -> torch.Tensor:
    """Mean over the covering windows of each cell (original: sum / count), via F.fold.

    The regular lattice (starts 0, s, 2s, ...) is one fold; the flush border windows, when present, form at
    most three more regular blocks (last column, last row, corner).

    Args:
        window_maps: (B * n_windows, win, win) per-window maps, row-major window order as `crop_windows`.
        geom: window geometry.

    Returns:
        (B, grid, grid) stitched map.
    """
    starts = geom.starts
    n, w, s = len(starts), geom.win, geom.stride
    lattice = (geom.grid - w) // s + 1  # windows on the regular lattice per axis
    values = window_maps.reshape(-1, n, n, w, w)
    ones = torch.ones_like(values[:1])
    total, count = 0.0, 0.0
    groups = [(0, lattice, 0)] + ([(lattice, n, starts[-1])] if lattice < n else [])
    for r0, r1, top in groups:
        for c0, c1, left in groups:
            block = values[:, r0:r1, c0:c1].reshape(values.shape[0], -1, w, w)
            total = total + _fold_block(block, r1 - r0, c1 - c0, geom, top, left)
            count = count + _fold_block(ones[:, r0:r1, c0:c1].reshape(1, -1, w, w), r1 - r0, c1 - c0, geom, top, left)
    return total / count
