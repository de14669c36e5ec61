"""Our CLIP ViT forward loop against open_clip's own, on the real architectures with random weights (CPU).

ViT-L-14-336 (24 blocks, 1024 wide, ~1.2 GB) is built once per module; every forward runs under no_grad.
"""

import pytest
import torch
import torch.nn.functional as F

from common.backbones import RANDOM_WEIGHTS, build_backbone

LAYERS = (6, 12, 18, 24)  # FDSL / VAND: 1-based block indices


@pytest.fixture(scope="module")
def vit_l():
    return build_backbone("ViT-L-14-336", RANDOM_WEIGHTS, LAYERS)


@pytest.fixture(scope="module")
def vit_b():
    return build_backbone("ViT-B-16", RANDOM_WEIGHTS, (3, 6, 9, 12))


def _images(n, size, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _open_clip_tokens(backbone, x):
    """open_clip's forward_intermediates: the residual stream after the chosen blocks (0-based), (B, C, h, w)."""
    out = backbone.visual.forward_intermediates(x, indices=[i - 1 for i in backbone.layers], intermediates_only=True)
    return out["image_intermediates"]


@pytest.mark.parametrize("name", ["vit_l", "vit_b"])
@torch.no_grad()
def test_our_tokens_equal_open_clip_forward_at_native_size(name, request):
    backbone = request.getfixturevalue(name)
    native = backbone.visual.image_size[0]  # 336 / 224: position embeddings used as they are
    x = _images(1, native)
    ours, reference = backbone(x).features, _open_clip_tokens(backbone, x)
    grid = native // backbone.patch_size
    assert [f.shape for f in ours] == [(1, backbone.feature_info[0].channels, grid, grid)] * 4
    for mine, ref in zip(ours, reference):
        assert torch.allclose(mine, ref, atol=1e-4 * ref.abs().max(), rtol=1e-4)  # our loop == open_clip's


@pytest.mark.parametrize("name", ["vit_l", "vit_b"])
@torch.no_grad()
def test_a_batch_of_two_gives_the_per_image_results_of_batch_one(name, request):
    """Guards against a batch-first / sequence-first mix-up in the block loop (any size shows it: 4 x 4 patches)."""
    backbone = request.getfixturevalue(name)
    x = _images(2, 4 * backbone.patch_size, seed=1)
    batch = backbone(x).features
    singles = [backbone(x[i : i + 1]).features for i in range(2)]
    for level, both in enumerate(batch):
        for i in range(2):
            assert torch.allclose(both[i], singles[i][level][0], atol=1e-4 * both.abs().max(), rtol=1e-4)
        assert not torch.allclose(both[0], both[1])  # two different images (the check can fail)


def _reference_resize(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """open_clip.model.resize_pos_embed (what VAND/FDSL ran) on a (1 + g*g, C) table."""
    from open_clip.model import resize_pos_embed

    class _Visual:
        grid_size = (grid, grid)

    class _Model:
        visual = _Visual()

    state = {"visual.positional_embedding": pos.clone()}
    resize_pos_embed(state, _Model())
    return state["visual.positional_embedding"]


@pytest.mark.parametrize("grid", [37, 13])  # 518 px main image, 182 px LFE window
def test_position_embeddings_are_resized_as_open_clip_bicubic_antialias(vit_l, grid):
    pos = vit_l.visual.positional_embedding.detach()  # 1 + 24 * 24 rows
    ours = vit_l._pos_embed(grid, grid, torch.float32)
    assert ours.shape == (1 + grid * grid, pos.shape[1])
    assert torch.allclose(ours, _reference_resize(pos, grid), atol=1e-6)
    if grid == 13:  # shrinking: without antialias (our earlier resize) the table differs, so the test can fail
        old = F.interpolate(
            pos[1:].reshape(1, 24, 24, -1).permute(0, 3, 1, 2), size=(13, 13), mode="bicubic", align_corners=False
        ).permute(0, 2, 3, 1).reshape(169, -1)
        assert (old - ours[1:]).abs().max() > 1e-3 * pos.abs().max()
