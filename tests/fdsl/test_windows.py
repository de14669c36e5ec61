"""LFE windows: tiling, the one-gather crop and the F.fold stitch against loop references."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.backbones import TINY_VIT, Backbone, BackboneOutput, FeatureInfo, build_backbone
from common.utils import UserError
from fdsl.detector import DetectorOptions, FDSLDetector
from fdsl.model import FDSLHead, extract_levels, feature_discrepancy, flatten_tokens
from fdsl.windows import (
    WindowGeometry,
    check_encode_mode,
    crop_windows,
    cut_windows,
    encode_windows,
    stitch_windows,
    window_starts,
)


class TinyCNN(Backbone):
    """Two levels (stride 4 and 8) of random convolutions: translation-equivariant, fast."""

    def __init__(self):
        super().__init__("tiny-cnn", [FeatureInfo(6, 4, "a"), FeatureInfo(10, 8, "b")], (0.5,) * 3, (0.5,) * 3, 32, 10)
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 6, 4, stride=4), nn.Conv2d(6, 10, 2, stride=2)
        self.freeze()

    def forward(self, x):
        a = self.a(x)
        b = self.b(a)
        return BackboneOutput([a, b], b.mean(dim=(2, 3)))


class PatchMean(Backbone):
    """One level: the mean colour of each 4 px patch (exactly translation-equivariant on the patch grid)."""

    def __init__(self):
        super().__init__("patch-mean", [FeatureInfo(3, 4, "mean")], (0.5,) * 3, (0.5,) * 3, 32, 3)

    def forward(self, x):
        f = F.avg_pool2d(x, 4)
        return BackboneOutput([f], f.mean(dim=(2, 3)))


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


@pytest.mark.parametrize("pool", [1, 3])
def test_shared_windows_are_slices_of_the_zoomed_image_features(pool):
    backbone, images = TinyCNN(), torch.randn(2, 3, 40, 40)  # 10 x 10 grid of 4 px cells
    geom = WindowGeometry(grid=10, win=4, stride=3, patch=4, zoom=2.0, encode="shared")
    features, keys = encode_windows(backbone, images, geom, batch=3, pool=pool)
    zoomed = F.interpolate(images, size=(80, 80), mode="bilinear", align_corners=False)
    per_image = [extract_levels(backbone(z[None]).features, pool) for z in zoomed]  # batch=3 -> 1 image per call
    full = [torch.cat(levels) for levels in zip(*per_image)]  # (2, C, 20, 20) per level
    t, starts = geom.tokens, [0, 6, 12]  # 2 x the cell starts 0, 3, 6
    assert geom.shared_grid == 20 and t == 8 and geom.shared_starts == starts
    for level, feat in zip(full, features):
        expected = [level[b, :, y : y + t, x : x + t] for b in range(2) for y in starts for x in starts]
        assert torch.equal(feat, torch.stack(expected))
    assert [f.shape for f in features] == [(18, 6, 8, 8), (18, 10, 8, 8)] and keys.shape == (18, 16)
    mean = torch.cat(features, dim=1).mean(dim=(2, 3))  # index-bank key: mean of the concatenated levels
    assert torch.allclose(keys, F.normalize(mean, dim=1)) and torch.allclose(keys.norm(dim=1), torch.ones(18))


def test_shared_window_order_matches_crop_mode():
    images = torch.randn(2, 3, 40, 40)
    for zoom in (1.0, 2.0):
        crop = WindowGeometry(grid=10, win=4, stride=3, patch=4, zoom=zoom)
        shared = WindowGeometry(grid=10, win=4, stride=3, patch=4, zoom=zoom, encode="shared")
        by_crop = encode_windows(PatchMean(), images, crop)[0][0]
        by_cut = encode_windows(PatchMean(), images, shared)[0][0]
        assert by_crop.shape == by_cut.shape == (18, 3, 4 * zoom, 4 * zoom)
        if zoom == 1:  # no resizing: identical
            assert torch.allclose(by_crop, by_cut, atol=1e-6)
        else:  # bilinear zoom of a crop vs of the image: only the crop's border pixels differ
            assert torch.allclose(by_crop[..., 1:-1, 1:-1], by_cut[..., 1:-1, 1:-1], atol=1e-5)


def test_cut_windows_on_a_rounded_zoom_stays_inside_the_grid():
    geom = WindowGeometry(grid=10, win=4, stride=3, patch=4, zoom=1.5, encode="shared")
    assert geom.shared_grid == 15 and geom.tokens == 6 and geom.shared_starts == [0, 4, 9]
    maps = torch.arange(15 * 15.0).reshape(1, 1, 15, 15)
    windows = cut_windows(maps, geom)
    assert windows.shape == (9, 1, 6, 6) and torch.equal(windows[5, 0], maps[0, 0, 4:10, 9:15])


def test_shared_encoding_refuses_a_vit():
    with pytest.raises(UserError):
        check_encode_mode("shared", "vit")
    with pytest.raises(UserError):
        check_encode_mode("tiles", "cnn")
    geom = WindowGeometry(grid=8, win=4, stride=2, patch=8, encode="shared")
    with pytest.raises(UserError, match="CNN"):
        encode_windows(build_backbone(TINY_VIT), torch.randn(1, 3, 64, 64), geom)


def _detector(encode, use_img_idx=False, window_batch_bytes=256 * 2**20):
    torch.manual_seed(1)
    head = FDSLHead([6, 10]).eval()
    geom = WindowGeometry(grid=10, win=4, stride=3, patch=4, zoom=2.0, encode=encode)
    opts = DetectorOptions(win_mode="mul", use_img_idx=use_img_idx, window_batch_bytes=window_batch_bytes)
    detector = FDSLDetector(TinyCNN(), head, opts, geom)
    detector.setup("c", torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(2)))
    return detector


@pytest.mark.parametrize("encode,use_img_idx", [("shared", False), ("shared", True), ("crop", False)])
def test_detector_mul_with_window_encodings(encode, use_img_idx):
    images = torch.randn(3, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    score, anomaly_map = _detector(encode, use_img_idx).predict(images)
    assert score.shape == (3,) and anomaly_map.shape == (3, 10, 10) and torch.isfinite(anomaly_map).all()
    one_by_one = _detector(encode, use_img_idx, window_batch_bytes=1)  # one image per LFE step
    assert torch.allclose(one_by_one.predict(images)[1], anomaly_map, atol=1e-5)


def test_shared_detector_equals_matching_every_window_against_the_pooled_window_bank():
    """The deduplicated shared path (FD per zoomed token, then cut) = the literal per-window computation."""
    detector = _detector("shared")
    geom, support = detector.geometry, torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    images = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    bank = [flatten_tokens(f) for f in encode_windows(detector.backbone, support, geom)[0]]  # every window
    asl_maps = []
    for level, feat in enumerate(encode_windows(detector.backbone, images, geom)[0]):
        dev, _ = feature_discrepancy(feat, bank[level])
        prob = detector.head.asl[level](dev)[:, 1]
        asl_maps.append(detector.head.refine(stitch_windows(detector._to_win(prob), geom)))
    with torch.inference_mode():
        anomaly_map, _ = detector._window_branch(images)
    assert torch.allclose(anomaly_map, torch.stack(asl_maps).mean(0), atol=1e-5)
    assert detector.win_bank[0].shape == (2 * 20 * 20, 6)  # each zoomed reference token once


def test_zoomed_window_resolution_keeps_the_zoomed_grid():
    """--win-resolution zoomed: the window map is the per-token map on the zoomed grid (20 x 20 here), by hand."""
    torch.manual_seed(1)
    head = FDSLHead([6, 10]).eval()
    geom = WindowGeometry(grid=10, win=4, stride=3, patch=4, zoom=2.0, encode="shared")
    support = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(2))
    images = torch.randn(2, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    for fd_weight in (0.0, 1.0):
        opts = DetectorOptions(win_mode="onlywin", win_resolution="zoomed", fd_weight=fd_weight)
        detector = FDSLDetector(TinyCNN(), head, opts, geom)
        detector.setup("c", support)
        zoom = lambda x: F.interpolate(x, size=(80, 80), mode="bilinear", align_corners=False)  # noqa: E731
        refs = extract_levels(detector.backbone(zoom(support)).features, 1, (20, 20))
        queries = extract_levels(detector.backbone(zoom(images)).features, 1, (20, 20))
        maps = []
        for level, (q, r) in enumerate(zip(queries, refs)):
            dev, max_cos = feature_discrepancy(q, flatten_tokens(r))
            asl = detector.head.refine(detector.head.asl[level](dev)[:, 1])
            maps.append((1 - fd_weight) * asl + fd_weight * (1 - max_cos))
        score, anomaly_map = detector.predict(images)
        assert anomaly_map.shape == (2, 20, 20)  # not resized back to the 10 x 10 main grid
        assert torch.allclose(anomaly_map, torch.stack(maps).mean(0), atol=1e-5)
        mul = FDSLDetector(TinyCNN(), head, DetectorOptions(win_mode="mul", win_resolution="zoomed"), geom)
        mul.setup("c", support)
        assert mul.predict(images)[1].shape == (2, 20, 20)  # the main map joins the windows at the zoomed grid


@torch.no_grad()
def test_zoomed_windows_read_the_zoomed_pixels_and_the_main_branch_resizes_down():
    """With zoomed shared windows the detector asks for zoom x S inputs (its image_size): the windows encode those
    pixels as they are (no upsampling of an S x S copy), the main branch sees them downsampled to S."""
    torch.manual_seed(1)
    head = FDSLHead([6, 10]).eval()
    geom = WindowGeometry(grid=10, win=4, stride=3, patch=4, zoom=2.0, encode="shared")
    g = torch.Generator().manual_seed(4)
    support, images = torch.randn(2, 3, 80, 80, generator=g), torch.randn(2, 3, 80, 80, generator=g)
    only = FDSLDetector(TinyCNN(), head, DetectorOptions(win_mode="onlywin", win_resolution="zoomed", fd_weight=1.0),
                        geom, image_size=40)  # fmt: skip
    assert (only.image_size, only.main_size) == (80, 40)
    assert FDSLDetector(TinyCNN(), head, DetectorOptions(win_mode="onlywin"), geom, image_size=40).image_size == 40
    only.setup("c", support)
    refs = extract_levels(only.backbone(support).features, 1, (20, 20))  # the 80 px pixels themselves
    queries = extract_levels(only.backbone(images).features, 1, (20, 20))
    fd = [1 - feature_discrepancy(q, flatten_tokens(r))[1] for q, r in zip(queries, refs)]
    assert torch.allclose(only.predict(images)[1], torch.stack(fd).mean(0), atol=1e-5)
    down = F.interpolate(images, size=(40, 40), mode="bilinear", align_corners=False, antialias=True)
    plain = FDSLDetector(TinyCNN(), head, DetectorOptions(fd_weight=1.0), image_size=40)
    plain.setup("c", F.interpolate(support, size=(40, 40), mode="bilinear", align_corners=False, antialias=True))
    mul = FDSLDetector(TinyCNN(), head, DetectorOptions(win_mode="mul", win_resolution="zoomed", fd_weight=1.0),
                       geom, image_size=40)  # fmt: skip
    mul.setup("c", support)
    main = F.interpolate(plain.predict(down)[1][:, None], size=(20, 20), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(mul.predict(images)[1], 0.5 * main + 0.5 * only.predict(images)[1], atol=1e-5)
