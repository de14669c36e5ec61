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

from fdsl.model import feature_discrepancy, flatten_tokens

# k = 1: a support patch is matched against the patches of its own image at least this many cells away (Chebyshev),
# so its "nearest normal" is not itself or its overlapping neighbours.
SELF_EXCLUDE_RADIUS = 2
EPS = 1e-6


@dataclass
class LevelStats:
    """Normal statistics of one level, from the support (see the module docstring)."""

    channel_scale: torch.Tensor  # (C,)
    fd_mean: float
    fd_std: float
    asl_mean: float = 0.0
    asl_std: float = 1.0


def _self_discrepancy(feature: torch.Tensor, signed: bool, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FD of one image (1, C, h, w) against its own patches farther than `radius` cells: dev (1, C, h, w), max cos."""
    _, c, h, w = feature.shape
    tokens = flatten_tokens(feature.float())
    sim = tokens @ tokens.T
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ys, xs = ys.flatten().to(feature.device), xs.flatten().to(feature.device)
    near = ((ys[:, None] - ys[None]).abs() <= radius) & ((xs[:, None] - xs[None]).abs() <= radius)
    sim = sim.masked_fill(near, -2.0)
    best, idx = sim.max(dim=1)
    deviation = tokens - tokens[idx]
    if not signed:
        deviation = deviation.abs()
    return deviation.reshape(1, h, w, c).permute(0, 3, 1, 2), best.reshape(1, h, w)


def leave_one_out(
    support: list[torch.Tensor], signed: bool = False, chunk_size: int = 4096, radius: int = SELF_EXCLUDE_RADIUS
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """FD of every support image against the other support images, per level.

    Args:
        support: per level (k, C, h, w) L2-normalised support features.
        signed: deviation f - n instead of |f - n| (the checkpoint's `signed`).
        radius: with k = 1, the neighbourhood excluded from the self-match.

    Returns:
        per level (deviation (k, C, h, w), fd (k, h, w) = 1 - max cos).
    """
    out = []
    for feature in support:
        k = feature.shape[0]
        devs, fds = [], []
        for i in range(k):
            query = feature[i : i + 1]
            if k == 1:
                dev, max_cos = _self_discrepancy(query, signed, radius)
            else:
                rest = torch.cat([feature[:i], feature[i + 1 :]])
                dev, max_cos = feature_discrepancy(query, flatten_tokens(rest).contiguous(), signed, chunk_size)
            devs.append(dev)
            fds.append(1.0 - max_cos)
        out.append((torch.cat(devs), torch.cat(fds)))
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
