"""Backbone contract: declared levels match what forward returns; real weights behave like real weights."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from common.backbones import (
    TINY_VIT,
    align_features,
    build_backbone,
    build_efficientnet_lite0_classifier,
    build_efficientnet_lite_classifier,
)
from common.utils import UserError


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def tiny_vit():
    return build_backbone(TINY_VIT)


def test_lite0_classifies_a_cat_as_a_cat():
    model = build_efficientnet_lite0_classifier()
    image = Image.fromarray(skdata.chelsea()).resize((224, 224), Image.BICUBIC)
    x = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        top = model(x[None]).argmax(1).item()
    assert 281 <= top <= 285  # ImageNet cat classes (tabby .. Egyptian cat)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_lite1_lite2_load_strict_and_classify_a_cat(name):
    model = build_efficientnet_lite_classifier(name)  # load_state_dict(strict=True) inside
    image = Image.fromarray(skdata.chelsea()).resize((256, 256), Image.BICUBIC)
    x = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        probs = model(x[None]).softmax(1)[0]
    assert 281 <= probs.argmax().item() <= 285
    assert probs[281:286].sum() > 0.5  # most of the mass on the cat classes, not a lucky argmax


def test_lite2_levels_report_the_wider_channels():
    backbone = build_backbone("efficientnet_lite2")
    out = backbone(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in out.features] == [info.channels for info in backbone.feature_info] == [48, 120]


@pytest.mark.parametrize("name", ["efficientnet_lite0", TINY_VIT])
def test_feature_info_matches_outputs(name, lite0, tiny_vit):
    backbone = lite0 if name == "efficientnet_lite0" else tiny_vit
    size = 4 * max(info.stride for info in backbone.feature_info)
    out = backbone(torch.randn(2, 3, size, size))
    assert len(out.features) == len(backbone.feature_info)
    for feat, info in zip(out.features, backbone.feature_info):
        assert feat.shape == (2, info.channels, size // info.stride, size // info.stride)
    assert out.pooled.shape == (2, backbone.embed_dim)
    assert not any(p.requires_grad for p in backbone.parameters())


def test_vit_accepts_other_sizes_and_resizes_position_embeddings(tiny_vit):
    x = torch.randn(1, 3, 96, 128)
    out = tiny_vit(x)
    assert out.features[0].shape[-2:] == (12, 16)
    # at the native size the cached embedding is the parameter itself; at another size it is interpolated
    native = tiny_vit._pos_embed(8, 8, torch.float32)
    assert torch.equal(native, tiny_vit.visual.positional_embedding)
    assert tiny_vit._pos_embed(12, 16, torch.float32).shape == (1 + 12 * 16, native.shape[1])
    with pytest.raises(ValueError):
        tiny_vit(torch.randn(1, 3, 60, 64))


def test_vit_layers_are_block_outputs(tiny_vit):
    """Block i's features must change when only block i+1 onward is perturbed? No: they must not."""
    x = torch.randn(1, 3, 64, 64)
    before = tiny_vit(x).features
    last = tiny_vit.visual.transformer.resblocks[-1]
    saved = [p.clone() for p in last.parameters()]
    with torch.no_grad():
        for p in last.parameters():
            p.add_(0.5)
    after = tiny_vit(x).features
    with torch.no_grad():
        for p, s in zip(last.parameters(), saved):
            p.copy_(s)
    assert all(torch.allclose(a, b) for a, b in zip(before[:-1], after[:-1]))  # earlier blocks untouched
    assert not torch.allclose(before[-1], after[-1])


def test_clip_weights_file_round_trip(tmp_path, tiny_vit):
    path = tmp_path / "tiny.pt"
    state = {f"visual.{k}": v for k, v in tiny_vit.visual.state_dict().items()}
    torch.save(state, path)
    loaded = build_backbone(TINY_VIT, pretrained=str(path))
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(loaded(x).features[-1], tiny_vit(x).features[-1])


def test_missing_clip_weights_fail_fast_with_instructions():
    with pytest.raises(UserError, match="--pretrained"):
        build_backbone("ViT-L-14-336", pretrained="openai")
    with pytest.raises(UserError, match="does not exist"):
        build_backbone(TINY_VIT, pretrained="/nonexistent/weights.bin")


def test_unknown_backbone_and_bad_layers():
    with pytest.raises(UserError, match="unknown backbone"):
        build_backbone("resnet9000")
    with pytest.raises(UserError, match="levels"):
        build_backbone("efficientnet_lite0", layers=[7])


def test_wrn_without_weights_names_the_file(tmp_path):
    with pytest.raises(UserError, match="wide_resnet50_2"):
        build_backbone("wide_resnet50_2", pretrained=str(tmp_path / "missing.pth"))


def test_align_features_resizes_to_finest_grid():
    feats = [torch.randn(1, 4, 16, 16), torch.randn(1, 8, 8, 8)]
    aligned = align_features(feats)
    assert [f.shape for f in aligned] == [(1, 4, 16, 16), (1, 8, 16, 16)]
    assert aligned[0] is feats[0]


def test_fuse_conv_bn_keeps_outputs_and_leaves_the_activation():
    from timm.layers import BatchNormAct2d

    from common.backbones import fuse_conv_bn

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct2d(8, act_layer=torch.nn.ReLU6),
        torch.nn.Conv2d(8, 4, 1), torch.nn.BatchNorm2d(4),
    )  # fmt: skip
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, as a trained network has
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        before = model(x)
        assert fuse_conv_bn(model) == 2
        after = model(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model[1][-1], torch.nn.ReLU6)  # the BatchNormAct2d's activation stays
    assert torch.allclose(before, after, atol=1e-5)


def test_fused_lite0_features_equal_the_unfused_network(lite0):
    from common.backbones import build_efficientnet_lite0_classifier

    ref = build_efficientnet_lite0_classifier()  # BN not folded
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = ref.bn1(ref.conv_stem(x))
        for stage in ref.blocks[:5]:  # level 3 = the output of stage 4 (stride 16, 112 channels)
            y = stage(y)
        got = lite0(x).features[-1]
    assert torch.allclose(got, y, atol=1e-4 * y.abs().max().item())


def test_backbone_seconds_count_forwards_only_when_timing_is_on(tiny_vit):
    from common.backbones import backbone_seconds
    from common.timing import backbone_timing, enabled

    before = backbone_seconds()
    with torch.no_grad():
        tiny_vit(torch.randn(1, 3, 64, 64))
    assert backbone_seconds() == before and not enabled()  # off by default: no hook on the production path
    with backbone_timing(), torch.no_grad():
        assert enabled()
        tiny_vit(torch.randn(1, 3, 64, 64))
    after = backbone_seconds()
    assert after > before and not enabled()
    with torch.no_grad():
        tiny_vit(torch.randn(1, 3, 64, 64))
    assert backbone_seconds() == after  # the hooks are gone again


def test_allocator_keeps_freed_memory_unless_told_not_to():
    import subprocess
    import sys

    code = "import common.malloc as m; import common; print(m.is_applied())"
    env = {k: v for k, v in __import__("os").environ.items() if k != "FSAD_DEFAULT_MALLOC"}
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "FSAD_DEFAULT_MALLOC": "1"}, check=True)  # fmt: skip
    assert on.stdout.strip() == ("True" if sys.platform.startswith("linux") else "False")
    assert off.stdout.strip() == "False"


def test_bf16_autocast_returns_float32_features_close_to_fp32():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    fp32 = build_backbone(TINY_VIT)
    bf16 = build_backbone(TINY_VIT, precision="bf16")
    bf16.load_state_dict(fp32.state_dict())
    with torch.no_grad():
        a, b = fp32(x).features[-1], bf16(x).features[-1]
    assert b.dtype == torch.float32 and bf16.precision == "bf16"
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))
    assert (cos > 0.99).all() and not torch.equal(a, b)  # bf16 really ran, and stayed close


def test_fp16_without_cuda_and_unknown_precision_are_user_errors():
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on CUDA")
    with pytest.raises(UserError, match="CUDA"):
        build_backbone(TINY_VIT, precision="fp16")
    with pytest.raises(UserError, match="precision"):
        build_backbone(TINY_VIT, precision="int4")


def test_tapped_level_equals_the_backbone_built_with_it():
    """`tap(levels)` returns those levels in `extra` from the same forward; the declared levels are unchanged."""
    tapped = build_backbone("efficientnet_lite0").tap([1])
    both = build_backbone("efficientnet_lite0", layers=[1, 2, 3])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, ref = tapped(x), both(x)
    assert [f.shape[1] for f in out.features] == [info.channels for info in tapped.feature_info] == [40, 112]
    assert set(out.extra) == {1} and out.extra[1].shape == (2, 24, 16, 16)
    assert torch.equal(out.extra[1], ref.features[0])
    assert torch.equal(out.features[0], ref.features[1]) and torch.equal(out.features[1], ref.features[2])
    assert build_backbone("efficientnet_lite0").tap([2])(x).extra == {}  # a declared level is not repeated
    with pytest.raises(UserError, match="levels 0..4"):
        tapped.tap([7])
    with pytest.raises(UserError, match="cannot return extra levels"):
        build_backbone(TINY_VIT).tap([1])
