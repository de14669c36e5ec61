"""FDSL's learnable head and its feature-discrepancy input (design: docs/design/fdsl.md, section 5).

- FD (Feature Discrepancy): per level, L2-normalised patch features; the "normal component" n_i is the cosine
  nearest reference patch, the "deviation component" d_i = |f_i - n_i| (original: alignMode `mulmax`, useAbs=1).
- ASL (Anomaly Score Learning): one token classifier per level, BN -> 512 -> 128 -> 32 -> 2 (softmax).
- NAM (Neighbor Aggregation Module, original `resConv`): one 2 -> 6 -> 2 5x5 conv stack shared by all levels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.backbones import align_features
from common.memory_bank import nearest_neighbors

# FDSL code (FDSLModel.py, docs/design/fdsl.md section 5): ASL hidden widths, NAM hidden channels and kernel.
ASL_HIDDEN = (512, 128, 32)
NAM_HIDDEN = 6
NAM_KERNEL = 5
# VAND focal loss (docs/design/fdsl.md section 2): gamma 2 on softmax probabilities, one-hot clamped by 1e-5.
FOCAL_GAMMA = 2.0
FOCAL_SMOOTH = 1e-5


def normalize_levels(features: list[torch.Tensor]) -> list[torch.Tensor]:
    """L2-normalise every patch feature along channels (original useNorm=1). (B, C, h, w) -> same shape."""
    return [F.normalize(f.float(), dim=1) for f in features]


def default_feature_pool(backbone_kind: str) -> int:
    """Local pooling FDSL applies to each level before the FD module: 1 (none) for every backbone.

    CLIP patch tokens already mix context through attention (the paper uses them as they are). For CNN levels a
    3 x 3 neighbourhood average (PatchCore's local aggregation, `--feature-pool 3`) was tried and lost: on the demo
    `surfaces` set (k=4, seed 0, efficientnet_lite0) the training-free FD map went from 78.0 / 46.1 pixel AUROC /
    AUPRO without pooling to 76.3 / 36.7 with it (it blurs small defects a second time, after the map smoothing).
    """
    del backbone_kind  # kept so a backbone-specific default can return without changing callers
    return 1


def extract_levels(
    features: list[torch.Tensor], pool: int = 1, size: tuple[int, int] | None = None
) -> list[torch.Tensor]:
    """Backbone levels -> FDSL's per-level features: local average pool, one grid, L2-normalised.

    Args:
        features: per level (B, C_l, h_l, w_l) from the backbone.
        pool: odd side of the stride-1 average pooling (1 = none); borders average only the cells inside.
        size: common grid (default: the finest level's).

    Returns:
        per level (B, C_l, h, w) float32 unit vectors along channels.
    """
    if pool > 1:
        features = [
            F.avg_pool2d(f.float(), pool, stride=1, padding=pool // 2, count_include_pad=False) for f in features
        ]
    return normalize_levels(align_features(features, size))


def flatten_tokens(feature: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B * h * w, C), row order (b, y, x)."""
    return feature.permute(0, 2, 3, 1).reshape(-1, feature.shape[1])


def deviation_map(tokens: torch.Tensor, normal: torch.Tensor, signed: bool, b: int, h: int, w: int) -> torch.Tensor:
    """d = f - n (|f - n| unless `signed`) of (B*h*w, C) tokens and their normal components -> (B, C, h, w)."""
    deviation = tokens - normal
    if not signed:
        deviation = deviation.abs()
    return deviation.reshape(b, h, w, -1).permute(0, 3, 1, 2)


def feature_discrepancy(
    query: torch.Tensor, bank: torch.Tensor, signed: bool = False, chunk_size: int = 4096, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """FD module on one level: deviation of each query patch from its nearest normal reference patch.

    Args:
        query: (B, C, h, w) L2-normalised query features.
        bank: (M, C) L2-normalised reference patches (the class's k-shot memory bank M_l^c).
        signed: return f - n instead of |f - n| (original useAbs=0).
        chunk_size: queries per similarity matmul (peak memory ~ chunk_size * M).
        backend: nearest-neighbour search, `auto` = faiss on CPU (about 2x faster here), torch matmul on CUDA.

    Returns:
        deviation (B, C, h, w) float32 and max_cos (B, h, w), the cosine to the nearest reference patch.
    """
    b, _, h, w = query.shape
    tokens = flatten_tokens(query)
    dist, idx = nearest_neighbors(
        tokens.to(bank.dtype), bank, k=1, metric="cosine", chunk_size=chunk_size, backend=backend
    )
    normal = bank.index_select(0, idx[:, 0]).float()  # n_i = M[argmax_j <f_i, M_j>]; d_i = f_i - n_i
    return deviation_map(tokens, normal, signed, b, h, w), (1.0 - dist[:, 0].float()).reshape(b, h, w)


def joint_discrepancy(
    queries: list[torch.Tensor], banks: list[torch.Tensor], signed: bool = False, chunk_size: int = 4096,
    backend: str = "auto",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """FD with ONE normal reference patch for all levels (`--fd-match joint`, ours).

    The paper matches every level on its own, so a query patch may take its level-2 normal component from one
    reference patch and its level-3 one from another: two partial matches can each look normal where no single
    normal patch does. Here the reference patch is the nearest on the concatenated unit-length levels (the largest
    mean cosine over levels), and each level's deviation is taken from that same patch.

    Args:
        queries: per level (B, C_l, h, w) L2-normalised features on one grid.
        banks: per level (M, C_l) reference patches, the same M rows (patches) in the same order on every level.

    Returns:
        per level (deviation (B, C_l, h, w), cos (B, h, w) to the shared reference patch).
    """
    b, _, h, w = queries[0].shape
    tokens = [flatten_tokens(q) for q in queries]
    _, idx = nearest_neighbors(
        torch.cat(tokens, 1).to(banks[0].dtype), torch.cat(banks, 1), k=1, metric="cosine", chunk_size=chunk_size,
        backend=backend,
    )  # fmt: skip
    out = []
    for t, bank in zip(tokens, banks):
        normal = bank.index_select(0, idx[:, 0]).float()
        out.append((deviation_map(t, normal, signed, b, h, w), (t * normal).sum(1).reshape(b, h, w)))
    return out


def discrepancies(
    queries: list[torch.Tensor], banks: list[torch.Tensor], match: str = "level", signed: bool = False,
    chunk_size: int = 4096,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """FD of every level: `level` = each level against its own nearest patch (the paper), `joint` = one shared
    nearest patch (`joint_discrepancy`). Returns per level (deviation (B, C_l, h, w), max cos (B, h, w))."""
    if match == "joint" and len(queries) > 1:
        return joint_discrepancy(queries, banks, signed, chunk_size)
    return [feature_discrepancy(q, bank, signed, chunk_size) for q, bank in zip(queries, banks)]


class ASL(nn.Module):
    """Anomaly Score Learning classifier of one level, applied to every token of the deviation map D_l.

    BatchNorm1d(C) (useFirstBatchNorm=1) -> [Linear (no bias) -> BN -> ReLU] x 3 (512, 128, 32) -> Linear -> 2.
    """

    def __init__(self, channels: int, hidden: tuple[int, ...] = ASL_HIDDEN) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(channels)]
        width = channels
        for out in hidden:
            layers += [nn.Linear(width, out, bias=False), nn.BatchNorm1d(out), nn.ReLU(inplace=True)]
            width = out
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, deviation: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) deviation -> (B, 2, h, w) softmax probabilities S_l (channel 1 = anomalous)."""
        b, _, h, w = deviation.shape
        logits = self.net(flatten_tokens(deviation))  # BN sees B*h*w rows, as in the original
        return logits.softmax(dim=1).reshape(b, h, w, 2).permute(0, 3, 1, 2)


class NAM(nn.Module):
    """Neighbor Aggregation Module: Conv(2->6, 5x5) -> ReLU -> Conv(6->2, 5x5) -> softmax, shared by all levels."""

    def __init__(self, hidden: int = NAM_HIDDEN, kernel: int = NAM_KERNEL) -> None:
        super().__init__()
        pad = kernel // 2  # "same" padding: each score sees its 5x5, then 9x9, neighbourhood
        self.net = nn.Sequential(
            nn.Conv2d(2, hidden, kernel, padding=pad), nn.ReLU(inplace=True), nn.Conv2d(hidden, 2, kernel, padding=pad)
        )

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, 2, h, w) probabilities -> refined (B, 2, h, w) probabilities."""
        return self.net(probs).softmax(dim=1)


class FDSLHead(nn.Module):
    """All trainable FDSL parts: one ASL per backbone level and the optional shared NAM."""

    def __init__(self, channels: list[int], use_nam: bool = True) -> None:
        super().__init__()
        self.channels = list(channels)
        self.asl = nn.ModuleList(ASL(c) for c in self.channels)
        self.nam = NAM() if use_nam else None

    @property
    def use_nam(self) -> bool:
        return self.nam is not None

    def level_maps(self, deviations: list[torch.Tensor]) -> list[torch.Tensor]:
        """Raw ASL maps [S_0, S_1, ...], each (B, 2, h, w)."""
        return [asl(d) for asl, d in zip(self.asl, deviations)]

    def forward(self, deviations: list[torch.Tensor]) -> list[torch.Tensor]:
        """Training output: [S_0, NAM(S_0), S_1, NAM(S_1), ...] with NAM, [S_0, S_1, ...] without; (B, 2, h, w)."""
        out = []
        for s in self.level_maps(deviations):
            out += [s, self.nam(s)] if self.nam is not None else [s]
        return out

    def score_maps(self, deviations: list[torch.Tensor], use_nam: bool = True) -> list[torch.Tensor]:
        """Test output: P(anomalous) per level, (B, h, w); the NAM outputs replace the raw ones when enabled."""
        return [self.level_score(level, d, use_nam) for level, d in enumerate(deviations)]

    def level_score(self, level: int, deviation: torch.Tensor, use_nam: bool = True) -> torch.Tensor:
        """P(anomalous) of one level's deviation (B, C_l, h, w) -> (B, h, w), through NAM when enabled."""
        probs = self.asl[level](deviation)
        if use_nam and self.nam is not None:
            probs = self.nam(probs)
        return probs[:, 1]

    def refine(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """NAM on a stitched P(anomalous) map (the LFE branch, original winuseConvRes=1). (B, h, w) -> (B, h, w)."""
        if self.nam is None:
            return anomaly_map
        return self.nam(torch.stack([1.0 - anomaly_map, anomaly_map], dim=1))[:, 1]


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """VAND focal loss on probabilities. probs (B, 2, H, W), target (B, 1, H, W) in {0, 1} -> scalar."""
    onehot = torch.cat([1.0 - target, target], dim=1).clamp(FOCAL_SMOOTH, 1.0 - FOCAL_SMOOTH)
    pt = (onehot * probs).sum(dim=1) + FOCAL_SMOOTH
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Binary dice loss, 1 - mean over images of (2|P.G| + 1) / (|P| + |G| + 1). prob, target (B, H, W)."""
    p, g = prob.flatten(1), target.flatten(1)
    dice = (2.0 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)
    return 1.0 - dice.mean()


def fdsl_loss(maps: list[torch.Tensor], gt_mask: torch.Tensor) -> torch.Tensor:
    """Sum over every map (raw and NAM) of focal + dice at the mask's resolution.

    Args:
        maps: list of (B, 2, h, w) probability maps (FDSLHead.forward).
        gt_mask: (B, 1, H, W) float {0, 1}.
    """
    size = gt_mask.shape[-2:]
    total = gt_mask.new_zeros(())
    for probs in maps:
        up = F.interpolate(probs, size=size, mode="bilinear", align_corners=True)  # as the original, 518 px
        total = total + focal_loss(up, gt_mask) + dice_loss(up[:, 1], gt_mask[:, 0])
    return total
