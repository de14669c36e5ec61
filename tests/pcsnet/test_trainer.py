"""Training on a toy backbone (k = 1 and k = 3), the detector contract and the checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from common.backbones import Backbone, BackboneOutput, FeatureInfo
from pcsnet.config import PCSNetConfig
from pcsnet.trainer import PCSNetDetector, PseudoAnomalySource, load_checkpoint, train_class

SIZE = 32


class ToyBackbone(Backbone):
    """Three random conv levels at strides 4 / 8 / 16 (a stand-in with the Backbone interface)."""

    def __init__(self):
        info = [FeatureInfo(4, 4, "l1"), FeatureInfo(6, 8, "l2"), FeatureInfo(8, 16, "l3")]
        super().__init__("toy", info, (0.5,) * 3, (0.5,) * 3, SIZE, 8)
        torch.manual_seed(0)
        self.l1, self.l2, self.l3 = nn.Conv2d(3, 4, 4, 4), nn.Conv2d(4, 6, 2, 2), nn.Conv2d(6, 8, 2, 2)
        self.freeze()

    def forward(self, x):
        a = self.l1(x)
        b = self.l2(a)
        c = self.l3(b)
        return BackboneOutput([a, b, c], c.mean(dim=(2, 3)))


def cfg(**kw) -> PCSNetConfig:
    base = dict(image_size=SIZE, grid_stride=4, cas_width=8, epochs=3, aug_pool=2)
    return PCSNetConfig(**{**base, **kw})


def support(k: int) -> torch.Tensor:
    return torch.rand(k, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(k)) * 2 - 1


@pytest.mark.parametrize("k", [1, 3])
def test_train_any_k_finite_and_seeded(k):
    backbone = ToyBackbone()
    model, history = train_class(backbone, cfg(), "my_class", support(k), seed=0, progress=False)
    assert len(history) == 3 and all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    again, history2 = train_class(backbone, cfg(), "my_class", support(k), seed=0, progress=False)
    assert history == history2  # same seed: same pseudo anomalies, init and batch order
    assert torch.equal(model.prototypes, again.prototypes)


def test_refresh_prototypes_changes_them():
    backbone = ToyBackbone()
    fixed, _ = train_class(backbone, cfg(epochs=3), "c", support(2), seed=0, progress=False)
    fresh, _ = train_class(backbone, cfg(epochs=3, refresh_prototypes=1), "c", support(2), seed=0, progress=False)
    assert not torch.allclose(fixed.prototypes, fresh.prototypes)


def test_fresh_and_pooled_pseudo_anomalies():
    import numpy as np

    backbone, sup = ToyBackbone(), support(2)
    pooled = PseudoAnomalySource(backbone, sup, "c", np.random.default_rng(0), pool=3)
    assert pooled.masks.shape == (6, 1, SIZE, SIZE)
    levels, masks = pooled.sample(torch.tensor([1, 0]))
    assert levels[0].shape == (2, 4, 8, 8) and masks.shape == (2, 1, SIZE, SIZE)
    fresh = PseudoAnomalySource(backbone, sup, "c", np.random.default_rng(0), pool=0)
    assert fresh.sample(torch.tensor([0]))[1].shape == (1, 1, SIZE, SIZE)


def test_detector_predict_and_checkpoint_round_trip(tmp_path):
    backbone = ToyBackbone()
    config = cfg(fuse_pfa=0.5)
    detector = PCSNetDetector(backbone, config, seed=1, save_dir=tmp_path, support_paths=lambda c: ["x.png"],
                              progress=False)  # fmt: skip
    detector.setup("grid", support(2))  # a rotation class: reduced descriptor
    images = support(3)
    score, amap = detector.predict(images)
    assert score is None  # "the maximum of the smoothed map", taken by the caller that smooths it
    assert amap.shape == (3, SIZE, SIZE) and torch.isfinite(amap).all()
    model, loaded_cfg, state = load_checkpoint(tmp_path / "checkpoints" / "grid.pt")
    assert state["support"] == ["x.png"] and state["rotation"] and loaded_cfg == config
    for key, value in detector.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    detector.model = model
    score2, amap2 = detector.predict(images)
    assert score2 is None and torch.allclose(amap, amap2)


def test_auto_radius_starts_on_the_support_distance_scale():
    from pcsnet.prototypes import knn_distances

    backbone, sup = ToyBackbone(), support(3)
    model, _ = train_class(backbone, cfg(epochs=0), "c", sup, seed=0, progress=False)
    with torch.no_grad():
        from pcsnet.trainer import extract_levels

        knn = knn_distances(model.descriptor(extract_levels(backbone, sup)), model.prototypes, 3)
    assert float(model.r.detach()) ** 2 == pytest.approx(float(knn.mean()), rel=1e-5)
    paper, _ = train_class(backbone, cfg(epochs=0, r_mode="linear", r_init=1e-5), "c", sup, seed=0, progress=False)
    assert float(paper.r.detach()) == pytest.approx(1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_support_bank_pfa_map_is_the_3nn_to_every_adapted_support_patch_by_hand(k, tmp_path):
    """`pfa_bank: support`: the fused PFA map = mean of the 3 smallest euclidean distances to all k*G*G adapted
    support patches, divided by the largest such map of a support image against the other k - 1 (k = 1: itself)."""
    from pcsnet.prototypes import DIST_EPS
    from pcsnet.trainer import extract_levels

    backbone, sup, images = ToyBackbone(), support(k), support(4)[:2]
    detector = PCSNetDetector(backbone, cfg(pfa_bank="support", fuse_pfa=1000.0), seed=1, save_dir=tmp_path,
                              support_paths=lambda c: ["x.png"] * k, progress=False)  # fmt: skip
    detector.setup("c", sup)
    model = detector.model
    with torch.no_grad():
        feats = model.descriptor(extract_levels(backbone, sup))  # (k, D, G, G)
        query = model.descriptor(extract_levels(backbone, images))
        grid = feats.shape[-1]

        def mean3(q, bank):  # q (B, D, G, G), bank (M, D) -> (B, G, G), brute force (squared distances clamped
            # at DIST_EPS before the root, as knn_distances: a patch's distance to itself is sqrt(DIST_EPS))
            d = torch.cdist(q.permute(0, 2, 3, 1).reshape(-1, q.shape[1]), bank).pow(2).clamp_min(DIST_EPS).sqrt()
            return d.sort(dim=1).values[:, :3].mean(1).reshape(q.shape[0], grid, grid)

        tokens = [feats[i].reshape(feats.shape[1], -1).T for i in range(k)]
        if k == 1:
            scale = mean3(feats, tokens[0]).max()
        else:
            scale = max(mean3(feats[i : i + 1], torch.cat(tokens[:i] + tokens[i + 1 :])).max() for i in range(k))
        expected = mean3(query, torch.cat(tokens)) / scale
        out = model(extract_levels(backbone, images))
        # rtol: faiss's |q|^2 + |b|^2 - 2 q.b leaves a support patch ~1e-3 from itself (float32), which moves the scale
        assert torch.allclose(model.pfa_map(model.pfa_knn(out)), expected, rtol=5e-3, atol=1e-4)
        protos = model.pfa_map(out["knn"]) * model.pfa_scale / scale  # the default's prototype map differs
        assert not torch.allclose(protos, expected, atol=1e-2)
    amap = detector.predict(images)[1]
    model2, _, _ = load_checkpoint(tmp_path / "checkpoints" / "c.pt")  # the bank is saved with the model
    assert torch.equal(model2.support_bank, model.support_bank)
    assert model2.support_bank.shape == (k * grid**2, feats.shape[1])
    detector.model = model2
    assert torch.allclose(detector.predict(images)[1], amap)


@pytest.mark.parametrize("k", [1, 2])
def test_knn_weight_adds_the_knn_baseline_map_over_its_support_maximum_by_hand(k):
    """`knn_weight w`: the map gains w x (euclidean distance of the 3 x 3 pooled levels 2 and 3 to the nearest
    support patch) / (the largest such distance of a support image against the other k - 1; k = 1: its own patches
    more than 2 cells away), upsampled bilinearly; training is unchanged (same seed: same CAS and PFA maps)."""
    from common.anomaly_map import upsample_map
    from common.patch_knn import knn_embed
    from pcsnet.trainer import extract_levels

    backbone, sup, images = ToyBackbone(), support(k), support(4)[:3]
    plain = PCSNetDetector(backbone, cfg(knn_weight=0.0), seed=1, progress=False)
    blend = PCSNetDetector(backbone, cfg(knn_weight=0.5, knn_levels="baseline"), seed=1, progress=False)
    plain.setup("c", sup)
    blend.setup("c", sup)
    with torch.no_grad():
        emb_s = knn_embed(extract_levels(backbone, sup)[1:])  # levels 2 and 3 of 1-3 (lite0: the kNN baseline's)
        emb_q = knn_embed(extract_levels(backbone, images)[1:])
    g, c = emb_s.shape[1], emb_s.shape[-1]
    cells = [(y, x) for y in range(g) for x in range(g)]
    if k == 1:  # on this 4 x 4 grid the inner cells have no patch more than 2 cells away: they do not count
        far = {(y, x): [(v, u) for v, u in cells if max(abs(v - y), abs(u - x)) > 2] for y, x in cells}
        peak = max(min(float((emb_s[0, y, x] - emb_s[0, v, u]).norm()) for v, u in far[y, x])
                   for y, x in cells if far[y, x])  # fmt: skip
    else:
        peak = max(min(float((emb_s[i, y, x] - emb_s[j, v, u]).norm()) for j in range(k) if j != i for v, u in cells)
                   for i in range(k) for y, x in cells)  # fmt: skip
    d = torch.cdist(emb_q.reshape(-1, c), emb_s.reshape(-1, c)).min(1).values.reshape(3, g, g)
    expected = plain.predict(images)[1] + 0.5 * upsample_map(d / peak, SIZE)
    assert torch.allclose(blend.predict(images)[1], expected, rtol=1e-4, atol=1e-4)
    assert (expected - plain.predict(images)[1]).abs().max() > 0.05


def test_knn_levels_all_adds_every_level_on_the_grid():
    """`knn_levels: all`: the term's embedding has every PCSNet level, the finer ones area-averaged onto PCSNet's
    grid (knn_embed with size, checked by hand in tests/common/test_patch_knn.py); k = 2, one leave-one-out peak."""
    from common.anomaly_map import upsample_map
    from common.patch_knn import knn_embed
    from pcsnet.trainer import extract_levels

    backbone, sup, images = ToyBackbone(), support(2), support(4)[:3]
    plain = PCSNetDetector(backbone, cfg(knn_weight=0.0, grid_stride=8), seed=1, progress=False)
    every = PCSNetDetector(backbone, cfg(knn_weight=0.5, grid_stride=8, knn_levels="all"), seed=1, progress=False)
    plain.setup("c", sup)
    every.setup("c", sup)
    with torch.no_grad():
        emb_s = knn_embed(extract_levels(backbone, sup), size=(4, 4))
        emb_q = knn_embed(extract_levels(backbone, images), size=(4, 4))
    assert emb_s.shape == (2, 4, 4, 4 + 6 + 8)
    c = emb_s.shape[-1]
    peak = max(float(torch.cdist(emb_s[i].reshape(-1, c), emb_s[1 - i].reshape(-1, c)).min(1).values.max())
               for i in range(2))  # fmt: skip
    d = torch.cdist(emb_q.reshape(-1, c), emb_s.reshape(-1, c)).min(1).values.reshape(3, 4, 4)
    expected = plain.predict(images)[1] + 0.5 * upsample_map(d / peak, SIZE)
    assert torch.allclose(every.predict(images)[1], expected, rtol=1e-4, atol=1e-4)
