"""Support calibration: how far normal patches of *this* class lie from their nearest normal reference.

FDSL's maps are distances (FD: 1 - max cos) and probabilities (ASL) whose scale differs from class to class and level
to level, so a fixed blend of them, or of two levels, weights them differently on every class. Calibration measures
the normal spread on the k support images themselves, leave-one-out: each support image is scored against the banks
of the other k - 1 (with k = 1, against its own patches outside a small neighbourhood). That gives, per level,

- `channel_scale` (C,): the RMS of each channel of the normal deviation |f - n| (the head's input is divided by it
  when the checkpoint was trained with `--input-norm support`: the head then sees deviations in units of this
  class's normal variation, which is what can transfer from the auxiliary classes to a new one);
- `fd_mean`, `fd_std`: the mean and spread of the normal FD map, and later `asl_mean`, `asl_std` of the normal ASL
  logits, with which `--map-norm support` standardises each level's map before levels and maps are blended.

Nothing here looks at test images: the statistics come from the support alone (inductive).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.patch_knn import SELF_EXCLUDE_RADIUS, near_cells
from fdsl.model import deviation_map, discrepancies, flatten_tokens

# k = 1: a support patch is matched against the patches of its own image at least SELF_EXCLUDE_RADIUS cells away
# (Chebyshev), so its "nearest normal" is not itself or its overlapping neighbours.
EPS = 1e-6


@dataclass
class LevelStats:
    """Normal statistics of one level, from the support (see the module docstring)."""

    channel_scale: torch.Tensor  # (C,)
    fd_mean: float
    fd_std: float
    asl_mean: float = 0.0
    asl_std: float = 1.0


def _self_nearest(feature: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best cosine and index of each patch of (1, C, h, w) among its own patches farther than `radius` cells."""
    _, _, h, w = feature.shape
    tokens = flatten_tokens(feature.float())
    return (tokens @ tokens.T).masked_fill(near_cells(h, w, radius, tokens.device), -2.0).max(dim=1)


def _self_discrepancy(
    levels: list[torch.Tensor], signed: bool, radius: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """FD of one image against its own far patches, one shared match for the given levels [(1, C_l, h, w)]
    (the concatenated unit-length levels, rescaled to unit length: dot products = mean cosines).

    Returns per level (deviation (1, C_l, h, w), cos (1, h, w)).
    """
    _, idx = _self_nearest(torch.cat(levels, 1) / len(levels) ** 0.5, radius)
    out = []
    for feature in levels:
        _, _, h, w = feature.shape
        tokens = flatten_tokens(feature.float())
        normal = tokens[idx]
        out.append((deviation_map(tokens, normal, signed, 1, h, w), (tokens * normal).sum(1).reshape(1, h, w)))
    return out


def leave_one_out(
    support: list[torch.Tensor], signed: bool = False, chunk_size: int = 4096, radius: int = SELF_EXCLUDE_RADIUS,
    match: str = "level",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """FD of every support image against the other support images, per level.

    Args:
        support: per level (k, C, h, w) L2-normalised support features.
        signed: deviation f - n instead of |f - n| (the checkpoint's `signed`).
        radius: with k = 1, the neighbourhood excluded from the self-match.
        match: `level` or `joint` nearest patch, as the detector's FD (fdsl.model.discrepancies).

    Returns:
        per level (deviation (k, C, h, w), fd (k, h, w) = 1 - max cos).
    """
    groups = [support] if match == "joint" else [[f] for f in support]  # levels that share one match
    out = []
    for group in groups:
        k = group[0].shape[0]
        per_image = []
        for i in range(k):
            query = [f[i : i + 1] for f in group]
            if k == 1:
                per_image.append(_self_discrepancy(query, signed, radius))
            else:
                banks = [flatten_tokens(torch.cat([f[:i], f[i + 1 :]])).contiguous() for f in group]
                per_image.append(discrepancies(query, banks, match, signed, chunk_size))
        for level in range(len(group)):
            out.append((torch.cat([r[level][0] for r in per_image]), 1.0 - torch.cat([r[level][1] for r in per_image])))
    return out


def level_stats(deviation: torch.Tensor, fd: torch.Tensor) -> LevelStats:
    """Statistics of one level from its leave-one-out deviation (k, C, h, w) and FD map (k, h, w)."""
    scale = flatten_tokens(deviation.float()).pow(2).mean(0).sqrt().clamp_min(EPS)
    return LevelStats(scale, float(fd.mean()), float(fd.std(unbiased=False).clamp_min(EPS)))


def logit(prob: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)), with p clamped to [1e-6, 1 - 1e-6] so saturated softmax outputs stay finite."""
    p = prob.clamp(EPS, 1.0 - EPS)
    return (p / (1.0 - p)).log()


def standardise(values: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(values - mean) / std: in units of the normal spread on the support."""
    return (values - mean) / std
