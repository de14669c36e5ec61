"""FDSL head: FD against a brute-force loop, ASL/NAM shapes, losses, checkpoint round trip."""

import pytest
import torch
import torch.nn.functional as F

from common.backbones import TINY_VIT, build_backbone
from common.utils import UserError
from fdsl.checkpoint import build_head, load_checkpoint, save_checkpoint
from fdsl.detector import DetectorOptions, FDSLDetector, indexed_discrepancy
from fdsl.model import FDSLHead, dice_loss, extract_levels, fdsl_loss, feature_discrepancy, focal_loss


def _unit(*shape, dim=1, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=dim)


@pytest.mark.parametrize("signed", [False, True])
def test_feature_discrepancy_equals_bruteforce_loop(signed):
    query, bank = _unit(2, 5, 3, 4), _unit(17, 5, seed=1)
    deviation, max_cos = feature_discrepancy(query, bank, signed=signed, chunk_size=7)  # several chunks
    for b in range(2):
        for y in range(3):
            for x in range(4):
                f = query[b, :, y, x]
                sims = torch.stack([torch.dot(f, m) for m in bank])  # cosine: both unit vectors
                n = bank[int(sims.argmax())]
                expected = f - n if signed else (f - n).abs()
                assert torch.allclose(deviation[b, :, y, x], expected, atol=1e-6)
                assert max_cos[b, y, x] == pytest.approx(float(sims.max()), abs=1e-5)


def test_feature_discrepancy_is_zero_for_reference_patches():
    bank = _unit(1, 8, 4, 4)
    deviation, max_cos = feature_discrepancy(bank, bank.permute(0, 2, 3, 1).reshape(-1, 8))
    assert deviation.abs().max() < 1e-6 and torch.allclose(max_cos, torch.ones_like(max_cos), atol=1e-5)


def test_extract_levels_pools_locally_then_aligns_and_normalises():
    torch.manual_seed(0)
    fine, coarse = torch.randn(2, 5, 8, 8), torch.randn(2, 7, 4, 4)
    plain = extract_levels([fine, coarse], pool=1)
    pooled = extract_levels([fine, coarse], pool=3)
    assert [f.shape for f in pooled] == [(2, 5, 8, 8), (2, 7, 8, 8)]
    assert torch.allclose(pooled[0].norm(dim=1), torch.ones(2, 8, 8), atol=1e-5)
    assert torch.allclose(plain[0], F.normalize(fine, dim=1))
    # interior cell: the mean of its 3 x 3 neighbourhood; corner: the mean of the 4 cells inside the image
    assert torch.allclose(pooled[0][0, :, 4, 4], F.normalize(fine[0, :, 3:6, 3:6].mean((1, 2)), dim=0), atol=1e-6)
    assert torch.allclose(pooled[0][0, :, 0, 0], F.normalize(fine[0, :, :2, :2].mean((1, 2)), dim=0), atol=1e-6)


def test_indexed_discrepancy_searches_only_the_chosen_window():
    query, bank = _unit(3, 6, 2, 2), _unit(4, 4, 6, dim=2, seed=2)
    choice = torch.tensor([2, 0, 2])
    deviation, max_cos = indexed_discrepancy(query, bank, choice, signed=False, chunk=2)
    for i in range(3):
        expected, cos = feature_discrepancy(query[i : i + 1], bank[choice[i]])
        assert torch.allclose(deviation[i], expected[0], atol=1e-6) and torch.allclose(max_cos[i], cos[0], atol=1e-6)


@pytest.mark.parametrize("use_nam", [True, False])
def test_head_output_shapes(use_nam):
    head = FDSLHead([8, 12], use_nam=use_nam)
    deviations = [torch.rand(2, 8, 5, 5), torch.rand(2, 12, 5, 5)]
    maps = head(deviations)
    assert len(maps) == (4 if use_nam else 2)
    for m in maps:
        assert m.shape == (2, 2, 5, 5) and torch.allclose(m.sum(1), torch.ones(2, 5, 5), atol=1e-5)
    head.eval()
    scores = head.score_maps(deviations, use_nam=True)
    assert [s.shape for s in scores] == [(2, 5, 5)] * 2


def test_nam_changes_the_scores():
    torch.manual_seed(0)
    head = FDSLHead([8], use_nam=True).eval()
    deviations = [torch.rand(1, 8, 6, 6)]
    with_nam, without = head.score_maps(deviations, True)[0], head.score_maps(deviations, False)[0]
    assert not torch.allclose(with_nam, without)
    refined = head.refine(without)  # NAM on a stitched map, as the LFE branch does
    assert refined.shape == (1, 6, 6) and not torch.allclose(refined, without)


def test_losses_reward_the_right_answer():
    target = torch.zeros(1, 1, 4, 4)
    target[..., :2, :2] = 1
    good = torch.cat([1 - target, target], dim=1).clamp(0.01, 0.99)
    bad = 1 - good
    assert focal_loss(good, target) < focal_loss(bad, target)
    assert dice_loss(good[:, 1], target[:, 0]) < dice_loss(bad[:, 1], target[:, 0])
    assert fdsl_loss([good[..., ::2, ::2]], target) > 0


def test_checkpoint_round_trip_and_backbone_mismatch(tmp_path):
    backbone = build_backbone(TINY_VIT)
    head = FDSLHead([i.channels for i in backbone.feature_info], use_nam=True)
    for p in head.parameters():
        torch.nn.init.normal_(p)
    path = save_checkpoint(tmp_path / "ckpt.pth", head, backbone, {"image_size": 64}, epoch=3)
    state = load_checkpoint(path)
    loaded = build_head(state, backbone)
    for key, value in head.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    assert state["epoch"] == 3 and state["config"]["image_size"] == 64
    lite0 = build_backbone("efficientnet_lite0")
    with pytest.raises(UserError, match="widths"):
        build_head(state, lite0)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError):
        load_checkpoint(tmp_path / "junk.pth")
    with pytest.raises(UserError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")


def test_detector_score_from_map_leaves_the_image_score_to_the_evaluator():
    torch.manual_seed(0)
    backbone = build_backbone(TINY_VIT, None, None, torch.device("cpu"))
    head = FDSLHead([info.channels for info in backbone.feature_info], use_nam=True)
    support, queries = torch.randn(2, 3, 64, 64), torch.randn(3, 3, 64, 64)
    own = FDSLDetector(backbone, head, DetectorOptions())
    from_map = FDSLDetector(backbone, head, DetectorOptions(score_from_map=True))
    for det in (own, from_map):
        det.setup("a", support)
    score, amap = own.predict(queries)
    none, amap2 = from_map.predict(queries)
    assert score.shape == (3,) and none is None and torch.equal(amap, amap2)
