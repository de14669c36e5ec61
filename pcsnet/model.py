"""PCSNet: the PFA descriptor with CoordConv, prototypes and distances, and the CAS segmentation head.

docs/design/pcsnet.md sections 1-3. The frozen backbone lives outside this module (it is shared by every class and is
not saved in checkpoints); `PCSNet` takes the backbone's feature levels.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pcsnet.config import PAPER_NN_CAS, PAPER_PDC_TOP, PAPER_PYRAMID_BINS, REF_GRID, PCSNetConfig
from pcsnet.prototypes import compute_prototypes, distance_map, knn_distances


class CoordConv(nn.Module):
    """1x1 conv over the input plus two channels of normalised row and column indices in [-1, 1] (CFA/PCSNet).

    The coordinates are made on the input's device and dtype (the original called `.cuda()` and crashed on CPU).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels + 2, out_channels, kernel_size=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, C_out, H, W)."""
        b, _, h, w = x.shape
        rows = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
        cols = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
        return self.conv(torch.cat([x, rows, cols], dim=1))


def _reducer(channels: int, reduced: int) -> nn.Sequential:
    """Rotation classes (section 2): 1x1 conv-BN-ReLU, conv-BN-ReLU, conv, all without bias, C -> C/2."""
    return nn.Sequential(
        nn.Conv2d(channels, reduced, 1, bias=False), nn.BatchNorm2d(reduced), nn.ReLU(inplace=True),
        nn.Conv2d(reduced, reduced, 1, bias=False), nn.BatchNorm2d(reduced), nn.ReLU(inplace=True),
        nn.Conv2d(reduced, reduced, 1, bias=False),
    )  # fmt: skip


class Descriptor(nn.Module):
    """The PFA adaptor: per level 3x3 avg-pool and (reducer) -> 1x1 CoordConv -> bilinear resize -> concat.

    Widths come from the backbone's declared channels (WRN 256/512/1024 -> 1792, lite0 24/40/112 -> 176; the
    rotation variant halves each level). `reduce_order`: `reduce_first` runs the rotation reducer before the
    avg-pool, as the original; `pool_first` (our CPU default) pools first. Without a reducer the two are equal.
    """

    def __init__(self, channels: list[int], grid: int, reduced: bool = False, reduce_order: str = "pool_first"):
        super().__init__()
        self.grid, self.reduce_first = grid, reduce_order == "reduce_first"
        widths = [max(1, c // 2) if reduced else c for c in channels]
        self.reducers = nn.ModuleList(_reducer(c, w) if reduced else nn.Identity() for c, w in zip(channels, widths))
        self.coords = nn.ModuleList(CoordConv(w, w) for w in widths)
        self.out_channels = sum(widths)

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """Backbone levels [(B, C_l, H_l, W_l)] -> adapted features (B, D, G, G)."""
        out = []
        for feat, reducer, coord in zip(levels, self.reducers, self.coords):
            feat = feat.float()
            if self.reduce_first:
                feat = F.avg_pool2d(reducer(feat), kernel_size=3, stride=1, padding=1)
            else:
                feat = reducer(F.avg_pool2d(feat, kernel_size=3, stride=1, padding=1))
            feat = coord(feat)
            if feat.shape[-1] != self.grid or feat.shape[-2] != self.grid:
                feat = F.interpolate(feat, size=(self.grid, self.grid), mode="bilinear", align_corners=False)
            out.append(feat)
        return torch.cat(out, dim=1)


def _conv(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.ReLU(inplace=True))


def _double3x3(width: int) -> nn.Sequential:
    return nn.Sequential(_conv(width, width, 3), _conv(width, width, 3))


def _up(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)


class CAS(nn.Module):
    """Context-aware segmentation: PFENet's feature-enrichment module (section 3), aux heads dropped.

    Per pyramid bin: pool G, resize the prior, merge (1x1), add the previous scale (1x1 over both), refine
    (two 3x3), upsample to the grid; then merge all scales (1x1), refine (two 3x3) and classify (3x3, 1x1 -> 1).
    """

    def __init__(self, in_channels: int, prior_channels: int, width: int, bins: list[int], dropout: float = 0.1):
        super().__init__()
        self.bins = list(bins)
        self.init_merge = nn.ModuleList(_conv(in_channels + prior_channels, width, 1) for _ in self.bins)
        self.alpha_conv = nn.ModuleList(_conv(2 * width, width, 1) for _ in self.bins[1:])
        self.beta_conv = nn.ModuleList(_double3x3(width) for _ in self.bins)
        self.res1 = _conv(len(self.bins) * width, width, 1)
        self.res2 = _double3x3(width)
        self.cls = nn.Sequential(_conv(width, width, 3), nn.Dropout2d(dropout), nn.Conv2d(width, 1, 1))

    def forward(self, feat: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """feat (B, C, G, G), prior (B, K, G, G) -> logits (B, 1, G, G) (no sigmoid, as the original)."""
        grid = feat.shape[-1]
        pyramid: list[torch.Tensor] = []
        for i, size in enumerate(self.bins):
            merged = self.init_merge[i](torch.cat([F.adaptive_avg_pool2d(feat, size), _up(prior, size)], dim=1))
            if i > 0:  # PFENet: previous scale (already at the grid) resized to this bin, 1x1 over both
                merged = merged + self.alpha_conv[i - 1](torch.cat([merged, _up(pyramid[-1], size)], dim=1))
            merged = merged + self.beta_conv[i](merged)
            pyramid.append(_up(merged, grid))
        out = self.res1(torch.cat(pyramid, dim=1))
        out = out + self.res2(out)
        return self.cls(out)


def pyramid_bins(grid: int) -> list[int]:
    """The original bins 60/30/15/8 on the 64 grid, scaled to `grid` (distinct, >= 1)."""
    bins = [max(1, round(b * grid / REF_GRID)) for b in PAPER_PYRAMID_BINS]
    return sorted(set(bins), reverse=True)


class PCSNet(nn.Module):
    """Descriptor + prototypes C (buffer) + learnable radius r + CAS for one class.

    Args:
        channels: backbone channels per level (from `backbone.feature_info`).
        cfg: the run's config (grid, kNN sizes, CAS width).
        rotation: use the reduced-channel descriptor (rotation-sensitive classes).
    """

    def __init__(self, channels: list[int], cfg: PCSNetConfig, rotation: bool = False):
        super().__init__()
        self.grid = cfg.resolved_grid()
        self.backbone_channels = list(channels)
        positions = self.grid * self.grid
        self.descriptor = Descriptor(channels, self.grid, reduced=rotation, reduce_order=cfg.reduce_order)
        self.prototype_bn_train = cfg.prototype_bn == "train"
        dim = self.descriptor.out_channels
        self.cas_in = min(cfg.cas_in_channels or dim, dim)  # original: the first 896 channels only (bug 9.8)
        self.nn_cas = min(cfg.nn_cas or cfg.scaled(PAPER_NN_CAS, self.grid), positions)
        self.nn_loss = min(cfg.nn_loss, positions)
        self.pdc_top = cfg.pdc_top or cfg.scaled(PAPER_PDC_TOP, self.grid)
        self.cas = CAS(self.cas_in, self.nn_cas, cfg.cas_width, pyramid_bins(self.grid), cfg.cas_dropout)
        # Radius r of L_NFC / L_AFS, trained with the descriptor: r itself (paper) or log r. "auto" is a placeholder
        # until init_radius() sets it from the support distances.
        self.r_log = cfg.r_mode == "log"
        r0 = 1.0 if cfg.r_init == "auto" else float(cfg.r_init)
        self.r_param = nn.Parameter(torch.tensor(math.log(r0) if self.r_log else r0))
        self.register_buffer("prototypes", torch.zeros(positions, dim))  # C: frozen, in the state_dict
        self.register_buffer("pfa_scale", torch.ones(()))  # support-based scale of the PFA map (fusion only)
        # `pfa_bank: support` (ours): the fused PFA map measures each test patch against every adapted support patch
        # instead of the per-position prototypes (their mean over the k images blurs unaligned parts and textures
        # more as k grows); filled by set_support_bank after training, saved with the model
        self.pfa_bank = cfg.pfa_bank
        self.register_buffer("support_bank", torch.zeros(0, dim))

    @property
    def r(self) -> torch.Tensor:
        """The radius r (a differentiable function of the trained parameter)."""
        return self.r_param.exp() if self.r_log else self.r_param

    @torch.no_grad()
    def init_radius(self, clean_knn: torch.Tensor) -> float:
        """Put r on the distance scale: r^2 = the mean of the clean support's nn_loss-NN distances; returns r.

        Distances are Euclidean (about 6 for lite0 features) while the paper compares them with r^2 from
        r = 1e-5; at lr 1e-3 r cannot reach that scale in a few hundred steps, so L_NFC stays a plain pull and
        L_AFS ((r + alpha)^2 - d < 0) is never active.
        """
        r = float(clean_knn[..., : self.nn_loss].mean().clamp_min(1e-12).sqrt())
        self.r_param.fill_(math.log(r) if self.r_log else r)
        return r

    @torch.no_grad()
    def set_prototypes(self, support_levels: list[torch.Tensor], chunk: int = 8) -> None:
        """C = per-position mean of the adapted support features, without gradients.

        BatchNorm (the rotation reducer's) runs in eval mode (the CPU default), or with `prototype_bn: train` in
        train mode as in training and as the original: batch statistics over chunks of `chunk` images (the
        original's loader batch) and a running-statistics update. The frozen backbone is outside (bug 9.5 fix).
        """
        was_training = self.training
        self.train(self.prototype_bn_train)
        k = len(support_levels[0])
        feats = [self.descriptor([lv[i : i + chunk] for lv in support_levels]) for i in range(0, k, chunk)]
        self.prototypes.copy_(compute_prototypes(torch.cat(feats)))
        self.train(was_training)

    def forward(
        self, levels: list[torch.Tensor], out_size: int | None = None, cas: bool = True
    ) -> dict[str, torch.Tensor]:
        """Run PFA and CAS.

        Args:
            levels: backbone features [(B, C_l, H_l, W_l)].
            out_size: side of the returned logits (the input size); None keeps the grid.
            cas: False stops after the distances (no `logits`): the original's A(x) and A(x_aug) passes.

        Returns:
            dict with `features` (B, D, G, G), `knn` (B, G*G, nn_cas) ascending distances (the first nn_loss feed
            the losses), `logits` (B, 1, S, S) CAS output.
        """
        feats = self.descriptor(levels)
        knn = knn_distances(feats, self.prototypes, max(self.nn_cas, self.nn_loss))
        if not cas:
            return {"features": feats, "knn": knn}
        prior = distance_map(knn[..., : self.nn_cas], self.grid)  # S: the 200-NN map of Fig. 2
        logits = self.cas(feats[:, : self.cas_in], prior)
        if out_size is not None and out_size != self.grid:
            logits = _up(logits, out_size)  # original: bilinear, align_corners=True, to the input size
        return {"features": feats, "knn": knn, "logits": logits}

    @torch.no_grad()
    def set_support_bank(self, support_levels: list[torch.Tensor], chunk: int = 8) -> torch.Tensor:
        """Keep every adapted support patch (k*G*G, D) for `pfa_bank: support` (eval-mode descriptor); returns the
        adapted support features (k, D, G, G) it computed."""
        was_training = self.training
        self.eval()
        k = len(support_levels[0])
        feats = torch.cat([self.descriptor([lv[i : i + chunk] for lv in support_levels]) for i in range(0, k, chunk)])
        self.support_bank = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]).contiguous()
        self.train(was_training)
        return feats

    def pfa_knn(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The distances the fused PFA map uses: to the prototypes (`out["knn"]`, the paper) or, with
        `pfa_bank: support` and a filled bank, the nn_loss nearest adapted support patches. (B, G*G, K)."""
        if self.pfa_bank == "support" and self.support_bank.numel():
            return knn_distances(out["features"], self.support_bank, self.nn_loss)
        return out["knn"]

    def pfa_map(self, knn: torch.Tensor) -> torch.Tensor:
        """(B, G*G, K) distances -> (B, G, G) mean of the nn_loss nearest, divided by the support scale."""
        b = knn.shape[0]
        return knn[..., : self.nn_loss].mean(-1).view(b, self.grid, self.grid) / self.pfa_scale
