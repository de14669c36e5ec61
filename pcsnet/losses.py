"""PCSNet losses (docs/design/pcsnet.md section 2): L = L_NFC + L_AFS + 50 L_PDC + 40 L_SEG.

All distances are Euclidean pixel-to-prototype distances d (B, N, k) (N grid pixels, k nearest prototypes).
As in the original code they are compared with r^2 and (r + alpha)^2 (CFA's convention), and the hinge terms
are divided by nu = 1e-3.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nfc_loss(knn: torch.Tensor, r: torch.Tensor, nu: float) -> torch.Tensor:
    """L_NFC, normal feature compactness: mean over clean pixels and their k nearest of max(0, d - r^2) / nu.

    Args:
        knn: (B, N, k) distances of the clean support features.
        r: scalar radius.
        nu: slack weight (paper 1e-3).
    """
    return F.relu(knn - r**2).mean() / nu


def afs_loss(knn: torch.Tensor, mask: torch.Tensor, r: torch.Tensor, alpha: float, nu: float) -> torch.Tensor:
    """L_AFS, abnormal feature separation (the intended formula; the original reduced over the image width, 9.3).

    Mean over pseudo-anomalous pixels (mask) and their k nearest of max(0, (r + alpha)^2 - d) / nu.

    Args:
        knn: (B, N, k) distances of the pseudo-anomalous features.
        mask: (B, N) bool, pixels inside the pseudo-anomaly mask on the grid.
        r: scalar radius; alpha: margin (paper 0.2); nu: slack weight.

    Returns:
        Scalar; 0 (still attached to the graph) when no pixel is masked.
    """
    hinge = F.relu((r + alpha) ** 2 - knn)  # (B, N, k)
    if not bool(mask.any()):
        return hinge.sum() * 0.0
    return hinge[mask].mean() / nu


def image_disparity(knn: torch.Tensor, top: int) -> torch.Tensor:
    """s_i of L_PDC: mean of the `top` largest values among all pixels' k-NN distances of image i.

    Args:
        knn: (B, N, k).
        top: paper 50 on the 64x64 grid ("selected pixels" of Fig. 2).

    Returns:
        (B,) scores.
    """
    flat = knn.flatten(1)
    return flat.topk(min(top, flat.shape[1]), dim=1).values.mean(dim=1)


def pdc_loss(
    knn: torch.Tensor, target: torch.Tensor, top: int, mode: str = "softmax", margin: torch.Tensor | None = None
) -> torch.Tensor:
    """L_PDC, pixel-level disparity classification.

    `softmax` (default): for each anomalous image p, -log(e^{s_p} / (e^{s_p} + sum_n e^{s_n})) over the normal
    images n of the batch, averaged over p. With one clean and one anomalous image this is exactly the original
    (CrossEntropyLoss on the 1-D score vector = softplus(s_n - s_a)); with more images it stays a ranking loss
    instead of the original's softmax over the whole batch, which also ranks anomalies against each other.
    `bce`: per-image binary cross-entropy on the logit s_i - margin (margin: the midpoint of r^2 and (r+alpha)^2).

    Args:
        knn: (B, N, k) distances.
        target: (B,) 1 for pseudo-anomalous images, 0 for clean ones.
        top: number of largest pixel distances averaged into s_i.
        mode: `softmax` or `bce`.
        margin: scalar, needed by `bce`.

    Returns:
        Scalar; 0 for `softmax` when the batch lacks anomalous or normal images.
    """
    s = image_disparity(knn, top)
    target = target.to(s.dtype)
    if mode == "bce":
        return F.binary_cross_entropy_with_logits(s - margin, target)
    pos, neg = s[target > 0.5], s[target <= 0.5]
    if pos.numel() == 0 or neg.numel() == 0:
        return s.sum() * 0.0
    logits = torch.cat([pos[:, None], neg[None, :].expand(pos.numel(), -1)], dim=1)  # (P, 1 + Nn)
    return -F.log_softmax(logits, dim=1)[:, 0].mean()


def seg_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_SEG: MSE between the CAS output (B, 1, S, S) (no sigmoid, as the original) and the mask (B, 1, S, S)."""
    return F.mse_loss(logits, mask)


def total_loss(terms: dict[str, torch.Tensor], weights: tuple[float, float, float, float]) -> torch.Tensor:
    """L = w_1 L_NFC + w_2 L_AFS + w_3 L_PDC + w_4 L_SEG (paper weights 1, 1, 50, 40)."""
    names = ("nfc", "afs", "pdc", "seg")
    return sum(w * terms[n] for w, n in zip(weights, names))
