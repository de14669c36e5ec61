"""The kNN baseline's patch distance, as a building block: the baseline itself and a term other methods add.

A patch is described by its backbone levels, each averaged over its 3 x 3 neighbourhood (PatchCore's local
aggregation) and concatenated on the finest level's grid; its anomaly score is the euclidean distance to the nearest
support patch. `baseline.knn.KNNDetector` is exactly this. FDSL (`--knn-weight`) and PCSNet (`knn_weight`) can add
the same distance map, computed from the backbone pass they already run, to their own maps; they need it in units of
the normal spread, so `SupportKNN` also scores every support image leave-one-out against the others (k = 1: against
its own patches outside a small neighbourhood, as FDSL's support calibration), without looking at a test image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.backbones import align_features
from common.memory_bank import MemoryBank

KNN_POOL = 3  # PatchCore's neighbourhood
SELF_EXCLUDE_RADIUS = 2  # k = 1: patches closer than this many cells (Chebyshev) are not a support patch's "normal"
EPS = 1e-6


def knn_embed(features: list[torch.Tensor], pool: int = KNN_POOL, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Backbone levels [(B, C_l, h_l, w_l)] -> (B, h, w, sum C_l): 3 x 3 averaged (zero padding, as PatchCore's
    reference code), aligned to one grid, concatenated along channels.

    The grid is the finest level's, or `size`: levels finer than `size` are then area-averaged down to it (FDSL's
    kNN term adds a stride-4 level on its stride-8 grid), coarser ones bilinearly upsampled as always.
    """
    if pool > 1:
        features = [F.avg_pool2d(f, pool, stride=1, padding=pool // 2) for f in features]
    if size is not None:
        size = (int(size[0]), int(size[1]))
        features = [F.adaptive_avg_pool2d(f, size) if f.shape[-2] > size[0] or f.shape[-1] > size[1] else f
                    for f in features]  # fmt: skip
    return torch.cat(align_features(features, size), dim=1).permute(0, 2, 3, 1).float()


def near_cells(h: int, w: int, radius: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(h*w, h*w) bool, row-major cells: True where two cells are at most `radius` apart (Chebyshev), itself included.
    The k = 1 self-matches (here and fdsl.calibration) exclude these."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return ((ys[:, None] - ys[None]).abs() <= radius) & ((xs[:, None] - xs[None]).abs() <= radius)


def self_nearest_distance(embedding: torch.Tensor, radius: int = SELF_EXCLUDE_RADIUS) -> torch.Tensor:
    """(h, w, C) one image's patches -> (h, w) euclidean distance of each to the nearest of its own patches more
    than `radius` cells away."""
    h, w, c = embedding.shape
    tokens = embedding.reshape(-1, c).float()
    far = torch.cdist(tokens, tokens).masked_fill(near_cells(h, w, radius, tokens.device), float("inf"))
    return far.min(dim=1).values.reshape(h, w)


class SupportKNN:
    """The kNN distance map of one class, with the normal spread of that distance on the support.

    Args:
        pool: neighbourhood side of `knn_embed`.
        backend: nearest-neighbour backend of `common.memory_bank` (`auto`: faiss on CPU).
        size: grid of the map (`knn_embed`; default the finest level's).

    After `fit`: `normal` (k, h, w) the leave-one-out distance maps of the support, and `mean`, `std`, `max` of them.
    """

    def __init__(self, pool: int = KNN_POOL, backend: str = "auto", size: tuple[int, int] | None = None) -> None:
        self.pool, self.backend, self.size = pool, backend, size
        self.bank = MemoryBank(metric="l2", backend=backend)
        self.normal: torch.Tensor | None = None
        self.mean = self.std = self.max = 0.0

    def fit(self, features: list[torch.Tensor]) -> SupportKNN:
        """Bank of the k support images' patches from their backbone levels [(k, C_l, h_l, w_l)], and their
        leave-one-out normal maps."""
        emb = knn_embed(features, self.pool, self.size)  # (k, h, w, C)
        self.bank.fit(emb.flatten(0, 2))
        self.normal = self.leave_one_out(emb)
        values = self.normal[torch.isfinite(self.normal)]  # k = 1 on a grid of <= 5 cells: some have no far patch
        if values.numel() == 0:
            values = torch.zeros(1)
        self.mean = float(values.mean())
        self.std = float(values.std(unbiased=False).clamp_min(EPS))
        self.max = float(values.max().clamp_min(EPS))
        return self

    def leave_one_out(self, emb: torch.Tensor) -> torch.Tensor:
        """(k, h, w, C) support embeddings -> (k, h, w): each image's distances to the other k - 1 images' patches
        (k = 1: `self_nearest_distance`)."""
        k, h, w, c = emb.shape
        if k == 1:
            return self_nearest_distance(emb[0])[None]
        maps = []
        for i in range(k):
            rest = MemoryBank(metric="l2", backend=self.backend).fit(torch.cat([emb[:i], emb[i + 1 :]]).flatten(0, 2))
            maps.append(rest.search(emb[i].reshape(-1, c), k=1)[0].reshape(h, w))
        return torch.stack(maps)

    def distances(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Backbone levels of B query images -> (B, h, w) distance of each patch to its nearest support patch."""
        emb = knn_embed(features, self.pool, self.size)
        b, h, w, c = emb.shape
        return self.bank.search(emb.reshape(-1, c), k=1)[0].reshape(b, h, w)

    def zscores(self, features: list[torch.Tensor]) -> torch.Tensor:
        """`distances` in units of the support's normal spread: (d - mean) / std."""
        return (self.distances(features) - self.mean) / self.std
