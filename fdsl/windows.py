"""LFE (Local-enhanced Feature Extraction): pixel windows cropped from the image, encoded on their own, stitched back.

Original (docs/design/fdsl.md section 4): windows of win-size=13 patches (182 px) at win-stride=2 patches on the 518 px
tensor, 13 x 13 = 169 windows tiling the 37 x 37 grid; each crop is encoded at its own size, and the window
maps are stitched back by the arithmetic mean over covering windows (sum / count; `F.fold` here).

Geometry is in grid cells of the finest backbone level. When the stride does not divide (grid - win), one more
window flush with the border is added, so the windows always tile the grid.

Two ways to get a window's features (`--win-encode`):
- `crop` (the paper): every window is cut from the image, zoomed and encoded on its own.
- `shared` (CNN backbones only): the image is zoomed once and encoded once; each window's features are cut from
  that map. A CNN is translation-equivariant, so this approximates `crop` (the cells near a crop's border see
  padding in `crop`, real neighbours here) at about zoom^2 backbone passes per image instead of one per window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.backbones import Backbone
from common.utils import UserError
from fdsl.model import extract_levels

ENCODE_MODES = ("crop", "shared")


def check_encode_mode(mode: str, backbone_kind: str) -> None:
    """`shared` cuts windows out of one feature map: only valid for a (translation-equivariant) CNN."""
    if mode not in ENCODE_MODES:
        raise UserError(f"--win-encode must be one of {', '.join(ENCODE_MODES)} (got {mode!r})")
    if mode == "shared" and backbone_kind != "cnn":
        raise UserError("--win-encode shared needs a CNN backbone; a ViT encodes each window crop (--win-encode crop)")


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
    encode: str = "crop"  # crop = encode every window crop; shared = cut windows from the zoomed image's features

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

    @property
    def shared_px(self) -> int:
        """Side of the zoomed whole image encoded once in `shared` mode: zoom * S rounded to a multiple of the patch."""
        return max(1, round(self.grid * self.zoom)) * self.patch

    @property
    def shared_grid(self) -> int:
        return self.shared_px // self.patch

    @property
    def shared_starts(self) -> list[int]:
        """Window starts on the zoomed grid (start * zoom; exact for an integer zoom, else rounded)."""
        scale = self.shared_grid / self.grid
        return [min(round(s * scale), self.shared_grid - self.tokens) for s in self.starts]


def _window_index(starts: list[int], size: int, device: torch.device) -> torch.Tensor:
    """(n, size) rows (= columns) covered by each window along one axis."""
    return torch.tensor(starts, device=device)[:, None] + torch.arange(size, device=device)[None, :]


def _gather_windows(maps: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B * n * n, C, size, size) with one gather, window order row-major (wy, wx) per image."""
    b, c = maps.shape[:2]
    n, size = idx.shape
    windows = maps[:, :, idx[:, None, :, None], idx[None, :, None, :]]  # (B, C, n, n, size, size)
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(b * n * n, c, size, size)


def cut_windows(maps: torch.Tensor, geom: WindowGeometry) -> torch.Tensor:
    """Cut every window out of maps on the zoomed grid of `shared` mode, in the order of `crop_windows`.

    Args:
        maps: (B, C, shared_grid, shared_grid) features or scores of the zoomed whole images.
        geom: window geometry.

    Returns:
        (B * n_windows, C, t, t) with t = geom.tokens.
    """
    return _gather_windows(maps, _window_index(geom.shared_starts, geom.tokens, maps.device))


def shared_coverage(geom: WindowGeometry, device: torch.device | str = "cpu") -> torch.Tensor:
    """Sorted rows (= columns) of the zoomed grid that some window covers (all of them for an integer zoom)."""
    return _window_index(geom.shared_starts, geom.tokens, torch.device(device)).flatten().unique()


def crop_windows(images: torch.Tensor, geom: WindowGeometry) -> torch.Tensor:
    """Crop every window from normalised images with one gather (no loop over windows).

    Args:
        images: (B, 3, H, W) with H = W = grid * patch.
        geom: window geometry.

    Returns:
        (B * n_windows, 3, encode_px, encode_px), window order row-major (wy, wx) within each image.
    """
    pixel_starts = [s * geom.patch for s in geom.starts]
    crops = _gather_windows(images, _window_index(pixel_starts, geom.crop_px, images.device))
    if geom.encode_px != geom.crop_px:  # --win-zoom (original winZipSize): resize the crop before encoding
        crops = F.interpolate(crops, size=(geom.encode_px,) * 2, mode="bilinear", align_corners=False)
    return crops


@torch.inference_mode()
def encode_shared(
    backbone: Backbone, images: torch.Tensor, geom: WindowGeometry, batch: int = 64, pool: int = 1
) -> list[torch.Tensor]:
    """`shared` mode: encode each whole image once, zoomed to geom.shared_px.

    Args:
        backbone: a CNN backbone (see `check_encode_mode`).
        images: (B, 3, S, S) normalised images.
        geom: window geometry.
        batch: window crops per backbone call in `crop` mode; the same pixel budget sets the images per call here.
        pool: the main branch's local average pooling (`fdsl.model.extract_levels`).

    Returns:
        per-level L2-normalised features (B, C_l, G', G') on the zoomed grid G' = geom.shared_grid.
    """
    check_encode_mode("shared", backbone.kind)
    per_call = max(1, batch * geom.encode_px**2 // geom.shared_px**2)
    levels = []
    for start in range(0, images.shape[0], per_call):
        chunk = images[start : start + per_call]
        if geom.shared_px != chunk.shape[-1]:
            chunk = F.interpolate(chunk, size=(geom.shared_px,) * 2, mode="bilinear", align_corners=False)
        out = backbone(chunk)
        levels.append(extract_levels(out.features, pool, (geom.shared_grid, geom.shared_grid)))
    return [torch.cat([chunk[i] for chunk in levels]) for i in range(len(levels[0]))]


def shared_window_keys(features: list[torch.Tensor]) -> torch.Tensor:
    """Image-index keys of `shared` windows: the L2-normalised mean over the window's tokens of the concatenated
    levels, (N, sum C_l). `crop` mode uses the backbone's pooled output of the crop instead."""
    return F.normalize(torch.cat(features, dim=1).mean(dim=(2, 3)), dim=1)


@torch.inference_mode()
def encode_windows(
    backbone: Backbone, images: torch.Tensor, geom: WindowGeometry, batch: int = 64, pool: int = 1
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Features of every window: each crop encoded on its own (`crop`), or cut from one zoomed map (`shared`).

    Returns:
        per-level L2-normalised features (B * n_windows, C_l, t, t) with t = geom.tokens (after the same
        `pool` local averaging as the main branch, see `fdsl.model.extract_levels`), and the L2-normalised
        keys (B * n_windows, D) of the image-feature index bank: the backbone's pooled embedding of each crop
        (`crop`), or the mean of the window's concatenated level features (`shared`, `shared_window_keys`).
    """
    if geom.encode == "shared":
        features = [cut_windows(level, geom) for level in encode_shared(backbone, images, geom, batch, pool)]
        return features, shared_window_keys(features)
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
