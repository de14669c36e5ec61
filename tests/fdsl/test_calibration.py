"""Support calibration (fdsl/calibration.py) and the detector's `map_norm` / `input_norm`, checked by hand."""

import pytest
import torch
import torch.nn.functional as F

from common.backbones import Backbone, BackboneOutput, FeatureInfo
from fdsl.calibration import leave_one_out, level_stats, logit
from fdsl.detector import DetectorOptions, FDSLDetector
from fdsl.model import FDSLHead, discrepancies, extract_levels, joint_discrepancy
from fdsl.train import compute_deviations


class TwoLevels(Backbone):
    """Two levels: the mean colour of 4 px patches and of 8 px patches (fixed, no weights)."""

    def __init__(self):
        super().__init__("two-levels", [FeatureInfo(3, 4, "a"), FeatureInfo(3, 8, "b")], (0.5,) * 3, (0.5,) * 3, 32, 3)

    def forward(self, x):
        a = F.avg_pool2d(x, 4) + 0.1  # an offset so no patch feature is the zero vector
        b = F.avg_pool2d(x, 8) ** 2 + 0.1
        return BackboneOutput([a, b], a.mean(dim=(2, 3)))


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=1)


def _nearest_by_loop(token, candidates):
    """Index of the candidate (N, C) with the largest cosine to token (C,), one at a time."""
    best, arg = -2.0, -1
    for j in range(candidates.shape[0]):
        cos = float(token @ candidates[j])
        if cos > best:
            best, arg = cos, j
    return arg, best


def test_leave_one_out_matches_every_support_image_against_the_others_only():
    feats = _unit(3, 4, 3, 3)  # k = 3 images, 4 channels, 3 x 3 grid
    (dev, fd), = leave_one_out([feats])
    for i in range(3):
        others = torch.cat([feats[j] for j in range(3) if j != i], dim=1).reshape(4, -1).T  # (18, 4)
        for y in range(3):
            for x in range(3):
                token = feats[i, :, y, x]
                j, cos = _nearest_by_loop(token, others)
                assert torch.allclose(dev[i, :, y, x], (token - others[j]).abs(), atol=1e-6)
                assert fd[i, y, x] == pytest.approx(1 - cos, abs=1e-6)


def test_one_support_image_is_matched_against_its_own_far_patches():
    """k = 1: the nearest normal is the most similar patch more than 2 cells away, never itself or a neighbour."""
    feats = _unit(1, 3, 6, 6, seed=1)
    feats[0, :, 0, 1] = feats[0, :, 0, 0]  # an identical neighbour: must be excluded
    target = feats[0, :, 0, 0] + 0.05 * torch.tensor([1.0, -1.0, 0.5])
    feats[0, :, 4, 4] = F.normalize(target, dim=0)  # the most similar far patch
    (dev, fd), = leave_one_out([feats])
    tokens = feats[0].reshape(3, -1).T
    far = [j for j in range(36) if max(abs(j // 6 - 0), abs(j % 6 - 0)) > 2]
    j, cos = _nearest_by_loop(tokens[0], tokens[far])
    assert far[j] == 4 * 6 + 4
    assert fd[0, 0, 0] == pytest.approx(1 - cos, abs=1e-6)
    assert torch.allclose(dev[0, :, 0, 0], (tokens[0] - tokens[far[j]]).abs(), atol=1e-6)


def test_level_stats_by_hand():
    dev = torch.zeros(2, 2, 1, 2)
    dev[:, 0] = torch.tensor([[[1.0, 3.0]], [[3.0, 1.0]]])  # channel 0: RMS sqrt((1 + 9 + 9 + 1) / 4) = sqrt(5)
    dev[:, 1] = 2.0  # channel 1: RMS 2
    fd = torch.tensor([[[0.1, 0.3]], [[0.2, 0.4]]])
    st = level_stats(dev, fd)
    assert torch.allclose(st.channel_scale, torch.tensor([5**0.5, 2.0]))
    assert st.fd_mean == pytest.approx(0.25) and st.fd_std == pytest.approx(0.0125**0.5)


def _images(n, seed):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _detector(**opts):
    torch.manual_seed(3)
    head = FDSLHead([3, 3]).eval()
    det = FDSLDetector(TwoLevels(), head, DetectorOptions(**opts))
    det.setup("c", _images(3, 1))
    return det


def _by_hand(det, support, queries, fd_weight, input_norm=False):
    """The calibrated main map without the detector: LOO stats, query FD / ASL logits, z-scores, blend, level mean."""
    sup = extract_levels(det.backbone(support).features)
    qry = extract_levels(det.backbone(queries).features)
    maps = []
    for level, (s, q) in enumerate(zip(sup, qry)):
        bank = s.permute(0, 2, 3, 1).reshape(-1, 3)
        dev_q = torch.stack([torch.stack([torch.stack([
            (q[b, :, y, x] - bank[_nearest_by_loop(q[b, :, y, x], bank)[0]]).abs()
            for x in range(q.shape[3])], -1) for y in range(q.shape[2])], -2) for b in range(q.shape[0])])  # fmt: skip
        cos_q = torch.stack([torch.stack([torch.stack([
            torch.tensor(_nearest_by_loop(q[b, :, y, x], bank)[1])
            for x in range(q.shape[3])]) for y in range(q.shape[2])]) for b in range(q.shape[0])])  # fmt: skip
        fd_q = 1 - cos_q
        (dev_s, fd_s), = leave_one_out([s])
        st = level_stats(dev_s, fd_s)
        if input_norm:
            dev_q = dev_q / st.channel_scale[None, :, None, None]
            dev_s = dev_s / st.channel_scale[None, :, None, None]
        fd_z = (fd_q - fd_s.mean()) / fd_s.std(unbiased=False)
        if fd_weight == 1:
            maps.append(fd_z)
            continue
        head = det.head
        asl_s = logit(head.nam(head.asl[level](dev_s))[:, 1])
        asl_q = logit(head.nam(head.asl[level](dev_q))[:, 1])
        asl_z = (asl_q - asl_s.mean()) / asl_s.std(unbiased=False)
        maps.append((1 - fd_weight) * asl_z + fd_weight * fd_z)
    return torch.stack(maps).mean(0)


@torch.no_grad()
@pytest.mark.parametrize("fd_weight,input_norm", [(1.0, "none"), (0.5, "none"), (0.5, "support")])
def test_support_map_norm_is_the_blend_of_z_scores_by_hand(fd_weight, input_norm):
    det = _detector(map_norm="support", fd_weight=fd_weight, input_norm=input_norm)
    queries = _images(2, 5)
    expected = _by_hand(det, _images(3, 1), queries, fd_weight, input_norm == "support")
    score, amap = det.predict(queries)
    assert amap.shape == (2, 8, 8)
    assert torch.allclose(amap, expected, rtol=1e-3, atol=1e-3)  # z-scores amplify float32 cosines
    raw = _detector(map_norm="none", fd_weight=fd_weight, input_norm=input_norm).predict(queries)[1]
    assert (raw - amap).abs().max() > 0.1  # the calibration changes the map: the check can fail


@torch.no_grad()
def test_one_support_image_calibrates_from_its_own_far_patches():
    """k = 1: setup still measures a spread (the self-match), and the map is the z-score of the FD map."""
    torch.manual_seed(3)
    det = FDSLDetector(TwoLevels(), FDSLHead([3, 3]).eval(), DetectorOptions(map_norm="support", fd_weight=1.0))
    support = _images(1, 1)
    det.setup("c", support)
    assert all(st.fd_std > 0 for st in det.stats)
    expected = _by_hand(det, support, _images(2, 5), 1.0)
    assert torch.allclose(det.predict(_images(2, 5))[1], expected, rtol=1e-3, atol=1e-3)


@torch.no_grad()
def test_input_norm_divides_the_training_deviation_by_the_class_scale():
    backbone = TwoLevels()
    images = _images(2, 7)
    bank_feats = extract_levels(backbone(_images(3, 1)).features)
    banks = {"c": [f.permute(0, 2, 3, 1).reshape(-1, 3) for f in bank_feats]}
    scales = {"c": [torch.tensor([2.0, 4.0, 0.5]), torch.tensor([1.0, 10.0, 3.0])]}
    plain = compute_deviations(backbone, images, ["c", "c"], banks, signed=False)
    scaled = compute_deviations(backbone, images, ["c", "c"], banks, signed=False, scales=scales)
    for level in range(2):
        assert torch.allclose(scaled[level], plain[level] / scales["c"][level][None, :, None, None])


def test_joint_match_takes_every_level_from_one_reference_patch():
    """The motivating case: a query made of patch A's level 1 and patch B's level 2 is normal for per-level FD (each
    level finds a perfect match), and anomalous for the joint match (no single normal patch explains both)."""
    a1, a2 = F.normalize(torch.tensor([1.0, 0.0, 0.2]), dim=0), F.normalize(torch.tensor([0.0, 1.0, 0.1]), dim=0)
    b1, b2 = F.normalize(torch.tensor([0.1, 0.2, 1.0]), dim=0), F.normalize(torch.tensor([1.0, 1.0, 0.0]), dim=0)
    banks = [torch.stack([a1, b1]), torch.stack([a2, b2])]  # rows: patch A, patch B
    query = [a1.view(1, 3, 1, 1), b2.view(1, 3, 1, 1)]
    level = discrepancies(query, banks, "level")
    assert all(float(1 - cos) == pytest.approx(0.0, abs=1e-6) for _, cos in level)
    joint = joint_discrepancy(query, banks)
    # joint: A scores cos(a1, a1) + cos(b2, a2), B scores cos(a1, b1) + cos(b2, b2); the larger wins
    score_a = 1 + float(b2 @ a2)
    score_b = float(a1 @ b1) + 1
    ref = 0 if score_a > score_b else 1
    for lv, (dev, cos) in enumerate(joint):
        normal = banks[lv][ref]
        assert torch.allclose(dev[0, :, 0, 0], (query[lv][0, :, 0, 0] - normal).abs(), atol=1e-6)
        assert float(cos) == pytest.approx(float(query[lv][0, :, 0, 0] @ normal), abs=1e-6)
    assert sum(float(1 - cos) for _, cos in joint) > 0.1


def test_joint_match_is_the_best_mean_cosine_by_loop():
    queries = [_unit(2, 4, 3, 3, seed=4), _unit(2, 5, 3, 3, seed=5)]
    banks = [_unit(30, 4, seed=6), _unit(30, 5, seed=7)]
    out = joint_discrepancy(queries, banks)
    for b in range(2):
        for y in range(3):
            for x in range(3):
                sims = [sum(float(queries[lv][b, :, y, x] @ banks[lv][j]) for lv in range(2)) for j in range(30)]
                j = max(range(30), key=sims.__getitem__)
                for lv in range(2):
                    assert float(out[lv][1][b, y, x]) == pytest.approx(float(queries[lv][b, :, y, x] @ banks[lv][j]),
                                                                       abs=1e-5)  # fmt: skip


@torch.no_grad()
def test_joint_calibration_and_coreset_keep_the_levels_aligned():
    """fd_match joint: the leave-one-out FD of the support uses the joint match (by loop), and a coreset keeps the
    same patches on every level (rows stay aligned across the banks)."""
    support = _images(3, 1)
    det = FDSLDetector(TwoLevels(), FDSLHead([3, 3]).eval(),
                       DetectorOptions(map_norm="support", fd_weight=1.0, fd_match="joint"))  # fmt: skip
    det.setup("c", support)
    feats = extract_levels(det.backbone(support).features)
    fd0 = []
    for lv in range(2):
        rest = [feats[j][1:].permute(0, 2, 3, 1).reshape(-1, 3) for j in range(2)]
        fd0.append(1 - joint_discrepancy([f[:1] for f in feats], rest)[lv][1])
    assert det.stats[0].fd_mean != pytest.approx(det.stats[1].fd_mean)
    (_, fd_a), _ = leave_one_out(feats, match="joint")
    assert torch.allclose(fd_a[0], fd0[0][0], atol=1e-6)
    det = FDSLDetector(TwoLevels(), FDSLHead([3, 3]).eval(), DetectorOptions(fd_match="joint", coreset=0.5))
    det.setup("c", support)
    full = [f.permute(0, 2, 3, 1).reshape(-1, 3) for f in feats]
    rows = [torch.cdist(det.bank[lv], full[lv]).argmin(1) for lv in range(2)]
    assert det.bank[0].shape[0] == det.bank[1].shape[0] < full[0].shape[0]
    assert torch.equal(rows[0], rows[1])  # the same patches kept on both levels


@torch.no_grad()
@pytest.mark.parametrize("k", [1, 3])
def test_knn_weight_blends_the_knn_baseline_z_map_by_hand(k):
    """`--knn-weight b`: map = (1 - b) * FDSL's calibrated map + b * (d - mean) / std, where d is the euclidean
    distance of the 3 x 3 pooled patch to its nearest support patch and mean / std come from the support scored
    leave-one-out; the score blends the same way with the kNN map's maximum."""
    from common.patch_knn import knn_embed

    support, queries = _images(k, 1), _images(2, 5)
    plain = FDSLDetector(TwoLevels(), FDSLHead([3, 3]).eval(), DetectorOptions(map_norm="support", fd_weight=0.8))
    blend = FDSLDetector(TwoLevels(), plain.head, DetectorOptions(map_norm="support", fd_weight=0.8, knn_weight=0.25))
    plain.setup("c", support)
    blend.setup("c", support)
    emb_s, emb_q = knn_embed(TwoLevels()(support).features), knn_embed(TwoLevels()(queries).features)
    g = emb_s.shape[1]
    if k == 1:  # its own patches more than 2 cells away
        cells = [(y, x) for y in range(g) for x in range(g)]
        normal = torch.tensor([min(float((emb_s[0, y, x] - emb_s[0, v, u]).norm()) for v, u in cells
                                   if max(abs(v - y), abs(u - x)) > 2) for y, x in cells])  # fmt: skip
    else:
        normal = torch.tensor([
            min(float((emb_s[i, y, x] - emb_s[j, v, u]).norm()) for j in range(k) if j != i
                for v in range(g) for u in range(g))
            for i in range(k) for y in range(g) for x in range(g)])  # fmt: skip
    bank = emb_s.reshape(-1, emb_s.shape[-1])
    d = torch.cdist(emb_q.reshape(-1, bank.shape[1]), bank).min(1).values.reshape(2, g, g)
    z = (d - normal.mean()) / normal.std(unbiased=False)
    score0, map0 = plain.predict(queries)
    score, amap = blend.predict(queries)
    assert torch.allclose(amap, 0.75 * map0 + 0.25 * z, atol=1e-3)
    assert torch.allclose(score, 0.75 * score0 + 0.25 * z.flatten(1).amax(1), atol=1e-3)
    assert (amap - map0).abs().max() > 0.05  # the term changes the map: the check can fail
    with pytest.raises(ValueError, match="map-norm support"):
        FDSLDetector(TwoLevels(), plain.head, DetectorOptions(map_norm="none", knn_weight=0.25))


class TappableTwoLevels(TwoLevels):
    """TwoLevels declared as levels 1 and 2 of a backbone whose level 0 (2 px patch means) can be tapped."""

    layers = (1, 2)

    def __init__(self):
        super().__init__()
        self.tapped = ()

    def tap(self, levels):
        self.tapped = tuple(levels)
        return self

    def forward(self, x):
        out = super().forward(x)
        out.extra = {0: F.avg_pool2d(x, 2) - 0.2} if 0 in self.tapped else {}
        return out


@torch.no_grad()
def test_knn_layers_add_a_tapped_finer_level_averaged_onto_fdsl_grid():
    """`knn_layers` (0, 1, 2): the term's distance is on the embedding of the tapped level 0 and FDSL's levels,
    on FDSL's grid (knn_embed with size, checked by hand in tests/common/test_patch_knn.py); FDSL's own map is the
    same as without it."""
    from common.patch_knn import knn_embed

    support, queries = _images(3, 1), _images(2, 5)
    opts = {"map_norm": "support", "fd_weight": 0.8, "knn_weight": 0.25}
    backbone = TappableTwoLevels()
    plain = FDSLDetector(TappableTwoLevels(), FDSLHead([3, 3]).eval(), DetectorOptions(**opts))
    finer = FDSLDetector(backbone, plain.head, DetectorOptions(**opts, knn_layers=(0, 1, 2)))
    assert backbone.tapped == (0,)
    plain.setup("c", support)
    finer.setup("c", support)

    def embed(x):
        out = backbone(x)
        return knn_embed([out.extra[0], *out.features], size=out.features[0].shape[-2:])

    emb_s, emb_q = embed(support), embed(queries)
    k, g, _, c = emb_s.shape
    normal = torch.cat([torch.cdist(emb_s[i].reshape(-1, c), torch.cat([emb_s[:i], emb_s[i + 1 :]]).reshape(-1, c))
                        .min(1).values for i in range(k)])  # fmt: skip
    d = torch.cdist(emb_q.reshape(-1, c), emb_s.reshape(-1, c)).min(1).values.reshape(2, g, g)
    z_finer = (d - normal.mean()) / normal.std(unbiased=False)
    z_own = plain.knn.zscores(plain._encode(queries)[1])
    assert emb_s.shape[-1] == 9 and g == 8  # 3 + 3 + 3 channels on FDSL's 4 px grid
    _, map_plain = plain.predict(queries)
    _, map_finer = finer.predict(queries)
    fdsl_map = (map_plain - 0.25 * z_own) / 0.75
    assert torch.allclose(map_finer, 0.75 * fdsl_map + 0.25 * z_finer, atol=1e-3)
    assert (z_finer - z_own).abs().max() > 0.05  # the extra level changes the term: the check can fail


def test_knn_layers_resolve_per_backbone():
    from types import SimpleNamespace

    from common.utils import UserError
    from fdsl.test import resolve_knn_layers

    lite = SimpleNamespace(name="efficientnet_lite0", layers=(2, 3))
    wrn = SimpleNamespace(name="wide_resnet50_2", layers=(1, 2, 3))
    assert resolve_knn_layers(None, lite) == (1, 2, 3)  # the CNN default: one level below FDSL's finest
    assert resolve_knn_layers("own", lite) == (2, 3)
    assert resolve_knn_layers("0,2,3", lite) == (0, 2, 3)
    assert resolve_knn_layers(None, wrn) == (1, 2, 3)  # own
    assert resolve_knn_layers("finer", SimpleNamespace(name="efficientnet_lite0", layers=(0, 1))) == (0, 1)
    with pytest.raises(UserError, match="needs an efficientnet_lite"):
        resolve_knn_layers("finer", wrn)
    with pytest.raises(UserError, match="repeats"):
        resolve_knn_layers("2,2", lite)
    with pytest.raises(UserError, match="comma-separated integers"):
        resolve_knn_layers("two", lite)
