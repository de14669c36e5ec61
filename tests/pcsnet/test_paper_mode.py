"""PCSNet paper-mode switches (issue 14, PCSNet items 2, 4, 5, 7) on small tensors and a toy backbone."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.backbones import Backbone, BackboneOutput, FeatureInfo
from common.utils import UserError
from data.dataset import center_crop, preprocess_image, preprocess_mask
from pcsnet.config import PCSNetConfig, load_config
from pcsnet.model import Descriptor, PCSNet
from pcsnet.trainer import CHECKPOINT_FORMAT, PseudoAnomalySource, load_checkpoint, save_checkpoint, train_class
from tests.pcsnet.test_trainer import ToyBackbone, cfg, support

MEAN = STD = (0.5, 0.5, 0.5)


# ------------------------------------------------------------------------------------ item 2: resize -> crop
def test_resize_256_crop_224_moves_image_and_mask_alike():
    """A 256 px frame (resize is then the identity): the crop starts at (16, 16), for the image and the mask."""
    image = np.zeros((256, 256, 3), np.uint8)
    image[20:30, 40:50] = 255
    mask = np.zeros((256, 256), bool)
    mask[20:30, 40:50] = True
    x = preprocess_image(image, 256, MEAN, STD, crop=224)
    m = preprocess_mask(mask, 256, crop=224)
    assert x.shape == (3, 224, 224) and m.shape == (1, 224, 224)
    rows, cols = torch.nonzero(m[0], as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 13, 24, 33)  # 20-16 .. 29-16, 40-16 .. 49-16
    assert torch.equal(x[0] > 0, m[0] > 0)  # the bright square sits exactly under the mask
    # the squash to 224 (CPU default) puts the square elsewhere: what the paper crop changes
    squashed = preprocess_mask(mask, 224)
    assert not torch.equal(squashed, m)


def test_center_crop_offsets_match_torchvision():
    import torchvision.transforms.functional as TF

    x = torch.arange(2 * 73 * 73, dtype=torch.float32).view(2, 1, 73, 73)
    assert torch.equal(center_crop(x, 64), TF.center_crop(x, [64, 64]))
    assert center_crop(x, None) is x


def test_resize_auto_scales_with_the_image_size():
    assert load_config("configs/pcsnet/paper.yaml").resolved_resize() == 256
    assert load_config("configs/pcsnet/paper.yaml", {"image_size": 64}).resolved_resize() == 73
    assert PCSNetConfig().resolved_resize() is None  # CPU default: squash, unchanged
    with pytest.raises(UserError, match="resize_size"):
        PCSNetConfig(resize_size=100).validate()  # smaller than the 256 px image


class _Identity(Backbone):
    """The image itself as the one feature level (to look at what the trainer feeds the backbone)."""

    def __init__(self):
        super().__init__("identity", [FeatureInfo(3, 1, "x")], MEAN, STD, 64, 3)

    def forward(self, x):
        return BackboneOutput([x], x.mean(dim=(2, 3)))


def test_pseudo_anomalies_made_before_the_crop_and_masks_cropped_alike():
    torch.manual_seed(0)
    full = torch.rand(2, 3, 73, 73) * 2 - 1
    source = PseudoAnomalySource(_Identity(), full, "carpet", np.random.default_rng(0), pool=0, crop=64)
    (aug,), masks = source.sample(torch.arange(2))
    clean = center_crop(full, 64)
    assert aug.shape == (2, 3, 64, 64) and masks.shape == (2, 1, 64, 64)
    changed = (aug - clean).abs().amax(dim=1, keepdim=True) > 1e-2
    inside = masks > 0.5
    assert inside.any()
    iou = float((changed & inside).sum() / (changed | inside).sum())
    assert iou > 0.9  # the cropped mask marks what changed in the cropped image
    assert float((changed & center_crop(inside.new_zeros(2, 1, 73, 73), 64)).sum()) == 0


# ------------------------------------------------------------------------- item 5: reducer -> avg-pool order
def test_reduce_first_runs_the_reducer_before_the_pool():
    torch.manual_seed(0)
    levels = [torch.randn(2, 8, 8, 8), torch.randn(2, 12, 4, 4)]
    paper = Descriptor([8, 12], grid=8, reduced=True, reduce_order="reduce_first").eval()
    ours = copy.deepcopy(paper)
    ours.reduce_first = False
    with torch.no_grad():
        got, got_ours = paper(levels), ours(levels)
        red, coord = paper.reducers[0], paper.coords[0]
        expected = coord(F.avg_pool2d(red(levels[0]), 3, stride=1, padding=1))  # original order, level 1
        expected_ours = coord(red(F.avg_pool2d(levels[0], 3, stride=1, padding=1)))
    torch.testing.assert_close(got[:, :4], expected)
    torch.testing.assert_close(got_ours[:, :4], expected_ours)
    assert (got - got_ours).abs().max() > 1e-3  # the ReLU in the reducer makes the order matter
    plain = Descriptor([8, 12], grid=8, reduced=False, reduce_order="reduce_first")
    plain_ours = copy.deepcopy(plain)
    plain_ours.reduce_first = False
    with torch.no_grad():  # without a reducer (non-rotation classes) both orders are the same
        torch.testing.assert_close(plain(levels), plain_ours(levels))


# ------------------------------------------------------------------------------ item 4: prototype BN mode
def _levels(k: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(k)
    return [torch.randn(k, 4, 8, 8, generator=g) + 1.0, torch.randn(k, 6, 4, 4, generator=g) - 0.5]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_prototypes_computed_in_the_configured_bn_mode(mode):
    torch.manual_seed(0)
    model = PCSNet([4, 6], PCSNetConfig(grid_size=8, cas_width=4, prototype_bn=mode), rotation=True).eval()
    reference = copy.deepcopy(model.descriptor)
    bn = model.descriptor.reducers[0][1]
    levels = _levels(2)
    model.set_prototypes(levels, chunk=2)
    with torch.no_grad():
        expected = reference.train(mode == "train")(levels).mean(0).flatten(1).t()
    torch.testing.assert_close(model.prototypes, expected)
    moved = float(bn.running_mean.abs().max())
    assert (moved > 1e-3) if mode == "train" else moved == 0.0  # train mode updates the running statistics
    assert not model.training  # back in the caller's mode


# ----------------------------------------------------------------------------------- item 7: checkpoints
def test_fp16_checkpoint_round_trip_is_tagged_small_and_weights_only(tmp_path):
    backbone = ToyBackbone()
    config = cfg(epochs=1, cas_width=48)  # weights dominate the file
    model, history = train_class(backbone, config, "grid", support(2), seed=0, progress=False)
    fp32 = save_checkpoint(tmp_path / "a.pt", model, config, "grid", ["x.png"], history)
    half_cfg = cfg(epochs=1, cas_width=48, checkpoint_dtype="fp16")
    fp16 = save_checkpoint(tmp_path / "b.pt", model, half_cfg, "grid", ["x.png"], history)
    raw = torch.load(fp16, weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["dtype"] == "fp16"
    assert all(v.dtype == torch.float16 for v in raw["state_dict"].values() if v.is_floating_point())
    assert fp16.stat().st_size < 0.6 * fp32.stat().st_size
    exact, _, _ = load_checkpoint(fp32)
    half, loaded_cfg, _ = load_checkpoint(fp16)
    assert loaded_cfg == half_cfg
    for key, value in model.state_dict().items():
        assert torch.equal(exact.state_dict()[key], value), key
        assert half.state_dict()[key].dtype == value.dtype  # cast back to fp32
        torch.testing.assert_close(half.state_dict()[key], value, rtol=1e-3, atol=1e-3)


class _NotATensor:
    pass


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "config": {}, "state_dict": {}, "payload": _NotATensor()}, path)
    with pytest.raises(UserError, match="weights_only"):
        load_checkpoint(path)
    torch.save({"format": "pcsnet-checkpoint/99", "config": {}, "state_dict": {}}, path)
    with pytest.raises(UserError, match="format"):
        load_checkpoint(path)


# ---------------------------------------------------------------- the original's mixed batch (paper.yaml)
def _spy(model: PCSNet) -> list[tuple[list[torch.Tensor], bool]]:
    calls, forward = [], model.forward

    def spy(levels, out_size=None, cas=True):
        calls.append(([lv.detach().clone() for lv in levels], cas))
        return forward(levels, out_size=out_size, cas=cas)

    model.forward = spy
    return calls


@pytest.mark.parametrize("b", [2, 4, 1])
def test_replace_half_swaps_half_of_the_clean_batch(b):
    from pcsnet.trainer import build_optimizer, train_step

    torch.manual_seed(0)
    config = PCSNetConfig(grid_size=8, cas_width=4, mix_batch="replace_half")
    model = PCSNet([4, 6], config)
    g = torch.Generator().manual_seed(1)
    clean = [torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 6, 4, 4, generator=g)]
    aug = [torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 6, 4, 4, generator=g)]
    masks = torch.zeros(b, 1, 32, 32)
    masks[:, :, 8:16, 8:16] = 1.0
    calls = _spy(model)
    terms = train_step(model, clean, aug, masks, config, build_optimizer(model, config), rng=np.random.default_rng(0))
    assert all(np.isfinite(v) for v in terms.values())
    if b == 1:  # one image cannot be half swapped: the clean + pseudo-anomalous batch, one forward
        assert len(calls) == 1 and calls[0][0][0].shape[0] == 2
        return
    assert [cas for _, cas in calls] == [False, False, True]  # A(x), A(x_aug) without CAS, then A(x_mix) with it
    assert torch.equal(calls[0][0][0], clean[0]) and torch.equal(calls[1][0][0], aug[0])
    mixed = calls[2][0]
    swapped = [i for i in range(b) if torch.equal(mixed[0][i], aug[0][i])]
    kept = [i for i in range(b) if torch.equal(mixed[0][i], clean[0][i])]
    assert len(swapped) == b // 2 and sorted(swapped + kept) == list(range(b))
    assert all(torch.equal(mixed[1][i], aug[1][i]) for i in swapped)  # every level swapped together


# ---------------------------------------------------------------------- resize filter (PIL ANTIALIAS)
def test_lanczos_resize_as_pil_antialias(tmp_path):
    from PIL import Image

    from data.dataset import AnomalyDataset, read_image
    from data.meta import scan_mvtec_layout, write_meta
    from tests.fixtures import make_mvtec_tree

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(80, 80, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(image).resize((73, 73), Image.LANCZOS), dtype=np.float32) / 255.0
    expected = torch.from_numpy((expected - 0.5) / 0.5).permute(2, 0, 1)
    got = preprocess_image(image, 73, MEAN, STD, crop=64, resample="lanczos")
    torch.testing.assert_close(got, center_crop(expected, 64))
    assert (got - preprocess_image(image, 73, MEAN, STD, crop=64)).abs().max() > 1e-3  # bicubic differs
    with pytest.raises(UserError, match="resize filter"):
        preprocess_image(image, 73, MEAN, STD, resample="nearest-ish")
    root = make_mvtec_tree(tmp_path / "t", classes=("a",), n_train=1, size=80)
    write_meta(root, scan_mvtec_layout(root, verbose=False))
    ds = AnomalyDataset(root, "test", image_size=73, mean=MEAN, std=STD, crop_size=64, resample="lanczos")
    item = ds[0]
    direct = preprocess_image(read_image(root / item["img_path"]), 73, MEAN, STD, crop=64, resample="lanczos")
    assert torch.equal(item["image"], direct) and item["gt_mask"].shape == (1, 64, 64)
