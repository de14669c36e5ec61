"""The kNN distance term (common/patch_knn.py) against brute-force loops, and its use by the kNN baseline."""

import pytest
import torch
import torch.nn.functional as F

from common.backbones import Backbone, BackboneOutput, FeatureInfo, align_features
from common.patch_knn import SupportKNN, knn_embed, self_nearest_distance


def _levels(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(k, 4, 6, 6, generator=g), torch.randn(k, 5, 3, 3, generator=g)]


def _pooled_by_hand(feature, y, x):
    """3 x 3 mean around (y, x) of (C, h, w), cells outside the grid count as zeros (PatchCore's zero padding)."""
    _, h, w = feature.shape
    total = torch.zeros(feature.shape[0])
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if 0 <= y + dy < h and 0 <= x + dx < w:
                total += feature[:, y + dy, x + dx]
    return total / 9


def test_embedding_pools_each_level_then_aligns_and_concatenates():
    levels = _levels(2)
    emb = knn_embed(levels)
    assert emb.shape == (2, 6, 6, 9)
    assert torch.allclose(emb[1, 0, 5, :4], _pooled_by_hand(levels[0][1], 0, 5), atol=1e-6)
    assert torch.allclose(emb[0, 2, 3, :4], _pooled_by_hand(levels[0][0], 2, 3), atol=1e-6)
    coarse = torch.stack([torch.stack([_pooled_by_hand(levels[1][0], y, x) for x in range(3)], -1)
                          for y in range(3)], -2)  # fmt: skip
    assert torch.allclose(emb[0, ..., 4:], align_features([coarse[None]], (6, 6))[0][0].permute(1, 2, 0), atol=1e-5)


def _nearest(token, candidates):
    return min(float((token - c).norm()) for c in candidates)


@torch.no_grad()
def test_distances_and_leave_one_out_by_brute_force():
    support, query = _levels(3, seed=1), _levels(2, seed=2)
    knn = SupportKNN(backend="torch").fit(support)
    emb_s, emb_q = knn_embed(support), knn_embed(query)
    bank = emb_s.reshape(-1, 9)
    dist = knn.distances(query)
    for b in range(2):
        for y, x in [(0, 0), (2, 5), (5, 3)]:
            assert dist[b, y, x] == pytest.approx(_nearest(emb_q[b, y, x], bank), rel=1e-4, abs=1e-5)
    for i in range(3):  # each support image against the other two only
        others = torch.cat([emb_s[j].reshape(-1, 9) for j in range(3) if j != i])
        for y, x in [(1, 1), (4, 0)]:
            assert knn.normal[i, y, x] == pytest.approx(_nearest(emb_s[i, y, x], others), rel=1e-4, abs=1e-5)
    assert knn.mean == pytest.approx(float(knn.normal.mean()))
    assert knn.std == pytest.approx(float(knn.normal.std(unbiased=False)))
    assert knn.max == pytest.approx(float(knn.normal.max()))
    z = knn.zscores(query)
    assert torch.allclose(z, (dist - knn.mean) / knn.std)
    assert (knn.normal > 0).all()  # never a support patch against itself


def test_one_support_image_uses_its_own_far_patches():
    emb = torch.randn(5, 5, 3, generator=torch.Generator().manual_seed(3))
    emb[0, 1] = emb[0, 0]  # an identical neighbour: excluded (within 2 cells)
    emb[4, 4] = emb[0, 0] + 0.01  # the nearest far patch
    d = self_nearest_distance(emb)
    assert d[0, 0] == pytest.approx(float((emb[0, 0] - emb[4, 4]).norm()), rel=1e-4)
    for y, x in [(2, 2), (3, 1)]:
        far = [emb[v, u] for v in range(5) for u in range(5) if max(abs(v - y), abs(u - x)) > 2]
        expected = _nearest(emb[y, x], far) if far else float("inf")
        assert float(d[y, x]) == pytest.approx(expected, rel=1e-4)
    knn = SupportKNN(backend="torch").fit(_levels(1, seed=4))
    assert knn.normal.shape == (1, 6, 6) and torch.isfinite(knn.normal).all()


class _TwoLevels(Backbone):
    """Two fixed levels: 4 px and 8 px mean colours (no weights)."""

    def __init__(self):
        super().__init__("two-levels", [FeatureInfo(3, 4, "a"), FeatureInfo(3, 8, "b")], (0.5,) * 3, (0.5,) * 3, 32, 3)

    def forward(self, x):
        return BackboneOutput([F.avg_pool2d(x, 4), F.avg_pool2d(x, 8) ** 2], x.mean(dim=(2, 3)))


@torch.no_grad()
def test_knn_baseline_map_is_the_support_knn_distance():
    """`python -m baseline.knn` and the term FDSL / PCSNet add are one computation."""
    from baseline.knn import KNNDetector

    g = torch.Generator().manual_seed(5)
    support, query = torch.rand(2, 3, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g)
    backbone = _TwoLevels()
    det = KNNDetector(backbone, nn_backend="torch")
    det.setup("c", support)
    term = SupportKNN(backend="torch").fit(backbone(support).features)
    assert torch.allclose(det.predict(query).anomaly_map, term.distances(backbone(query).features), atol=1e-5)
    coarse = KNNDetector(backbone, nn_backend="torch", grid_stride=8)  # `--grid-stride 8`: the 4 x 4 grid
    coarse.setup("c", support)
    term = SupportKNN(backend="torch", size=(4, 4)).fit(backbone(support).features)
    amap = coarse.predict(query).anomaly_map
    assert amap.shape == (3, 4, 4)
    assert torch.allclose(amap, term.distances(backbone(query).features), atol=1e-5)


def test_embedding_on_a_coarser_grid_area_averages_the_finer_levels():
    """`size`: a level finer than the grid is 3 x 3 pooled at its own resolution, then each grid cell is the mean of
    the cells it covers; a level on the grid is only pooled."""
    g = torch.Generator().manual_seed(3)
    fine, grid = torch.randn(1, 2, 8, 8, generator=g), torch.randn(1, 3, 4, 4, generator=g)
    emb = knn_embed([fine, grid], size=(4, 4))
    assert emb.shape == (1, 4, 4, 5)
    for y, x in [(0, 0), (1, 2), (3, 3)]:
        cells = [_pooled_by_hand(fine[0], 2 * y + dy, 2 * x + dx) for dy in (0, 1) for dx in (0, 1)]
        assert torch.allclose(emb[0, y, x, :2], torch.stack(cells).mean(0), atol=1e-6)
        assert torch.allclose(emb[0, y, x, 2:], _pooled_by_hand(grid[0], y, x), atol=1e-6)
    assert torch.equal(knn_embed([fine, grid], size=(8, 8)), knn_embed([fine, grid]))  # level 0's grid: as before
