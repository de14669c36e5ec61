"""LFE windows: tiling, the one-gather crop and the F.fold stitch against loop references."""

import pytest
import torch

from common.backbones import TINY_VIT, build_backbone
from common.utils import UserError
from fdsl.windows import WindowGeometry, crop_windows, encode_windows, stitch_windows, window_starts


def test_paper_geometry_is_13_by_13_windows_tiling_37():
    starts = window_starts(37, 13, 2)
    assert starts == list(range(0, 25, 2)) and len(starts) == 13  # 169 windows of 182 px at 518 px


@pytest.mark.parametrize("grid,win,stride", [(10, 4, 3), (32, 16, 8), (7, 7, 1), (9, 4, 4)])
def test_windows_cover_every_cell(grid, win, stride):
    starts = window_starts(grid, win, stride)
    covered = torch.zeros(grid)
    for s in starts:
        covered[s : s + win] += 1
    assert covered.min() >= 1 and starts[-1] == grid - win


def test_bad_window_geometry_is_a_user_error():
    with pytest.raises(UserError):
        window_starts(8, 9, 2)
    with pytest.raises(UserError):
        window_starts(8, 4, 0)
    with pytest.raises(UserError):
        window_starts(9, 2, 4)  # gaps between windows


def test_crop_equals_slicing_loop():
    geom = WindowGeometry(grid=5, win=3, stride=1, patch=2)
    images = torch.randn(2, 3, 10, 10)
    crops = crop_windows(images, geom)
    expected = [
        images[b, :, y * 2 : y * 2 + 6, x * 2 : x * 2 + 6] for b in range(2) for y in geom.starts for x in geom.starts
    ]
    assert torch.equal(crops, torch.stack(expected))


def test_zoomed_crops_have_the_encoder_size():
    geom = WindowGeometry(grid=8, win=4, stride=4, patch=8, zoom=2.0)
    assert crop_windows(torch.randn(1, 3, 64, 64), geom).shape == (4, 3, 64, 64) and geom.tokens == 8


@pytest.mark.parametrize("grid,win,stride", [(37, 13, 2), (10, 4, 3), (9, 4, 2), (6, 6, 3), (11, 3, 3)])
def test_fold_stitch_equals_loop_mean(grid, win, stride):
    geom = WindowGeometry(grid=grid, win=win, stride=stride, patch=1)
    n = len(geom.starts)
    maps = torch.rand(2 * n * n, win, win)
    total, count = torch.zeros(2, grid, grid), torch.zeros(grid, grid)
    i = 0
    for b in range(2):
        for y in geom.starts:
            for x in geom.starts:
                total[b, y : y + win, x : x + win] += maps[i]
                if b == 0:
                    count[y : y + win, x : x + win] += 1
                i += 1
    assert torch.allclose(stitch_windows(maps, geom), total / count, atol=1e-6)


def test_window_features_of_the_tiny_vit():
    backbone = build_backbone(TINY_VIT)
    geom = WindowGeometry(grid=8, win=4, stride=2, patch=8)
    features, keys = encode_windows(backbone, torch.randn(2, 3, 64, 64), geom, batch=5)
    assert [f.shape for f in features] == [(18, 64, 4, 4)] * 4 and keys.shape == (18, 32)
    assert torch.allclose(features[0].norm(dim=1), torch.ones(18, 4, 4), atol=1e-5)
