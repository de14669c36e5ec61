"""Seeded k-shot support sampling from a class's train normals (never from test)."""

from __future__ import annotations

import zlib

import numpy as np

from common.utils import UserError


def _class_rng(seed: int, class_name: str) -> np.random.Generator:
    # One generator per (seed, class): a class's draw does not depend on which classes ran before it,
    # unlike the original codes, which drew from the global torch RNG.
    return np.random.default_rng([int(seed) % (2**32), zlib.crc32(class_name.encode("utf-8"))])


def sample_support(
    meta: dict, class_name: str, k_shot: int, seed: int, replacement: bool = False, draw: int = 0
) -> list[str]:
    """Draw k normal training images of one class.

    Args:
        meta: a loaded meta.json dict (`{"train": {cls: [item]}, "test": ...}`).
        class_name: the class to draw from.
        k_shot: number of support images (>= 1).
        seed: the run's seed; the same (seed, class, draw) always gives the same images.
        replacement: sample with replacement (the original FDSL/PCSNet behaviour; duplicates possible).
        draw: index of an independent extra draw (FDSL's legacy second draw for the window bank uses 1).

    Returns:
        The chosen `img_path` values (relative to the dataset root), in the order drawn.
    """
    if k_shot < 1:
        raise UserError(f"k-shot must be at least 1 (got {k_shot})")
    items = meta.get("train", {}).get(class_name)
    if items is None:
        raise UserError(f"class '{class_name}' has no train split in meta.json")
    pool = sorted(item["img_path"] for item in items if int(item.get("anomaly", 0)) == 0)
    if not pool:
        raise UserError(f"class '{class_name}' has no normal training images to draw support from")
    if k_shot > len(pool) and not replacement:
        raise UserError(f"k-shot {k_shot} is larger than the {len(pool)} normal training images of '{class_name}'")
    rng = _class_rng(seed, class_name)
    for _ in range(draw):  # advance to the requested independent draw
        rng.choice(len(pool), size=k_shot, replace=replacement)
    chosen = rng.choice(len(pool), size=k_shot, replace=replacement)
    return [pool[i] for i in chosen]
