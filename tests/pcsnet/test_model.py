"""PCSNet model pieces: shapes, the distance identity, CoordConv, CAS and the config precedence."""

from __future__ import annotations

import math

import pytest
import torch

from common.utils import UserError
from pcsnet.config import PCSNetConfig, load_config
from pcsnet.model import CAS, CoordConv, Descriptor, PCSNet, pyramid_bins
from pcsnet.prototypes import compute_prototypes, distance_map, knn_distances, squared_distances

CHANNELS = [6, 10, 12]  # three toy levels at strides 4 / 8 / 16 of a 64 px input


def toy_levels(b: int, size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, size // s, size // s, generator=g) for c, s in zip(CHANNELS, (4, 8, 16))]


def small_cfg(**kw) -> PCSNetConfig:
    return PCSNetConfig(image_size=64, grid_stride=8, cas_width=8, **kw)


def test_descriptor_shapes_and_widths():
    levels = toy_levels(3)
    assert Descriptor(CHANNELS, grid=8)(levels).shape == (3, sum(CHANNELS), 8, 8)
    reduced = Descriptor(CHANNELS, grid=8, reduced=True)
    assert reduced.out_channels == sum(c // 2 for c in CHANNELS)
    assert reduced(levels).shape == (3, reduced.out_channels, 8, 8)


def test_coordconv_sees_position():
    conv = CoordConv(1, 1)
    with torch.no_grad():
        conv.conv.weight.zero_()
        conv.conv.weight[0, 1] = 1.0  # pick the row-coordinate channel
        conv.conv.bias.zero_()
    out = conv(torch.zeros(1, 1, 5, 3))[0, 0]
    assert torch.allclose(out[:, 0], torch.linspace(-1, 1, 5))
    assert torch.allclose(out[:, 0], out[:, 2])


def test_distance_identity_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    feats, protos = torch.randn(2, 5, 4, 4, generator=g), torch.randn(20, 5, generator=g)
    brute = torch.cdist(feats.flatten(2).transpose(1, 2), protos[None].expand(2, -1, -1))  # (2, 16, 20)
    assert torch.allclose(squared_distances(feats, protos).clamp_min(0).sqrt(), brute, atol=1e-4)
    knn = knn_distances(feats, protos, k=7)  # no autograd: the faiss path on CPU
    assert torch.allclose(knn, brute.sort(dim=-1).values[..., :7], atol=1e-4)
    trained = knn_distances(feats.clone().requires_grad_(True), protos, k=7)  # training: matmul + topk
    assert torch.allclose(trained.detach(), knn, atol=1e-4)
    assert distance_map(knn, 4).shape == (2, 7, 4, 4)


def test_zero_distance_has_no_nan_and_finite_grad():
    protos = torch.randn(16, 5)
    feats = protos.t().reshape(1, 5, 4, 4).clone().requires_grad_(True)  # every pixel IS a prototype
    knn = knn_distances(feats, protos, k=3)
    assert torch.isfinite(knn).all() and knn[..., 0].max() < 5e-3  # float32 cancellation in the identity
    knn.sum().backward()
    assert torch.isfinite(feats.grad).all()


def test_prototypes_are_per_position_means():
    feats = torch.randn(3, 4, 2, 2)
    protos = compute_prototypes(feats)
    assert protos.shape == (4, 4)
    assert torch.allclose(protos[1], feats[:, :, 0, 1].mean(0))


def test_cas_output_shape_and_bins():
    assert pyramid_bins(64) == [60, 30, 15, 8]
    assert pyramid_bins(32) == [30, 15, 8, 4]
    cas = CAS(in_channels=6, prior_channels=5, width=8, bins=pyramid_bins(16))
    assert cas(torch.randn(2, 6, 16, 16), torch.randn(2, 5, 16, 16)).shape == (2, 1, 16, 16)


def test_pcsnet_forward_shapes_and_prototypes():
    cfg = small_cfg()
    model = PCSNet(CHANNELS, cfg)
    assert model.grid == 8 and model.nn_cas == 3 and model.pdc_top == 1  # 200 and 50 scaled to 8x8
    support = toy_levels(2)
    model.set_prototypes(support)
    out = model(toy_levels(3, seed=1), out_size=64)
    assert out["features"].shape == (3, sum(CHANNELS), 8, 8)
    assert out["knn"].shape == (3, 64, max(model.nn_cas, model.nn_loss))
    assert out["logits"].shape == (3, 1, 64, 64)
    # the support's own features sit exactly on the prototypes when k = 1
    model.set_prototypes([lv[:1] for lv in support])
    assert model.eval()([lv[:1] for lv in support])["knn"][..., 0].max() < 5e-3


def test_cas_in_channels_slice():
    model = PCSNet(CHANNELS, small_cfg(cas_in_channels=10))
    assert model.cas_in == 10
    assert model.cas.init_merge[0][0].in_channels == 10 + model.nn_cas


def test_config_precedence(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("cas_width: 896\nepochs: 7\nlayers: [1, 2]\n")
    cfg = load_config(yaml_file, {"epochs": 3, "backbone": None})
    assert (cfg.cas_width, cfg.epochs, cfg.layers, cfg.backbone) == (896, 3, (1, 2), "efficientnet_lite0")
    yaml_file.write_text("no_such_option: 1\n")
    with pytest.raises(UserError, match="no_such_option"):
        load_config(yaml_file)
    with pytest.raises(UserError):
        load_config(overrides={"pdc_mode": "focal"})


def test_paper_yaml_loads():
    cfg = load_config("configs/pcsnet/paper.yaml")
    assert cfg.backbone == "wide_resnet50_2" and cfg.cas_width == 896 and cfg.resolved_grid() == 64
    assert (cfg.fuse_pfa, cfg.knn_weight, cfg.pseudo_anomalies) == (0.0, 0.0, "nsa")  # CAS map only, as the paper
    model_cfg = PCSNetConfig(image_size=224, grid_size=64)
    assert model_cfg.scaled(200, 64) == 200 and model_cfg.scaled(200, 32) == 50


def test_radius_modes_and_auto_init_from_support_distances():
    paper = PCSNet(CHANNELS, small_cfg(r_mode="linear", r_init=1e-5))
    assert float(paper.r.detach()) == pytest.approx(1e-5) and float(paper.r_param.detach()) == pytest.approx(1e-5)
    log = PCSNet(CHANNELS, small_cfg(r_mode="log", r_init=2.0))
    assert float(log.r.detach()) == pytest.approx(2.0) and float(log.r_param.detach()) == pytest.approx(0.6931472)
    knn = torch.tensor([[[1.0, 4.0, 7.0, 100.0]], [[2.0, 5.0, 8.0, 100.0]]])  # only the nn_loss = 3 nearest count
    for model in (paper, log):
        assert model.init_radius(knn) == pytest.approx(math.sqrt(4.5))
        assert float(model.r.detach()) ** 2 == pytest.approx(4.5)
    with pytest.raises(UserError, match="r_init"):
        small_cfg(r_mode="log", r_init=0.0).validate()
    with pytest.raises(UserError, match="r_mode"):
        small_cfg(r_mode="cubic").validate()
