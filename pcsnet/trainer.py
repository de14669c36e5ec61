"""Per-class PCSNet training on the k support images and the detector used by common.evaluation.

Schedule (docs/design/pcsnet.md section 4, with the section 9 fixes): prototypes from the support images at
initialisation (optionally refreshed), then `epochs` passes over the support in batches of `batch_size` clean
images. Each step also takes one pseudo-anomalous version of every clean image in the batch; the clean and the
pseudo-anomalous images together form the batch of L_PDC and L_SEG (the original replaced half of the clean
batch instead, which needs >= 2 shots). Backbone features of the support are computed once; the pseudo
anomalies come from a pool of `aug_pool` precomputed variants per support image (0 = fresh each step).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common.anomaly_map import upsample_map
from common.backbones import Backbone
from common.contract import DetectorOutput, require_setup
from common.utils import atomic_torch_save
from pcsnet.config import PCSNetConfig, config_to_dict, load_config
from pcsnet.losses import afs_loss, nfc_loss, pdc_loss, seg_loss, total_loss
from pcsnet.model import PCSNet
from pcsnet.nsa import NSAParams, make_pseudo_anomalies, nsa_params
from pcsnet.prototypes import knn_distances

Levels = list[torch.Tensor]  # backbone feature levels [(B, C_l, H_l, W_l)]


def class_seed(seed: int, class_name: str) -> list[int]:
    """Seed material of one (run seed, class): a class's training does not depend on the classes before it."""
    return [int(seed) % (2**32), zlib.crc32(class_name.encode("utf-8"))]


@torch.no_grad()
def extract_levels(backbone: Backbone, images: torch.Tensor, chunk: int = 8) -> Levels:
    """Frozen backbone features of (B, 3, S, S) images, in chunks; float32, contiguous (no autograd history)."""
    parts = [backbone(images[i : i + chunk]).features for i in range(0, len(images), chunk)]
    return [torch.cat([p[j] for p in parts]).float().contiguous() for j in range(len(parts[0]))]


class PseudoAnomalySource:
    """Pseudo-anomalous versions of the support images with their masks and backbone features.

    pool > 0: `pool` variants per support image drawn up front (k * pool backbone passes in total); pool = 0:
    a fresh NSA draw and backbone pass for every image of every step (the original's behaviour).
    """

    def __init__(
        self,
        backbone: Backbone,
        support: torch.Tensor,
        class_name: str,
        rng: np.random.Generator,
        pool: int,
        params: NSAParams | None = None,
    ):
        self.backbone, self.support, self.class_name, self.rng, self.pool = backbone, support, class_name, rng, pool
        self.params = params or nsa_params(class_name)
        self.k = len(support)
        if pool > 0:
            variants = [self._draw(torch.arange(self.k)) for _ in range(pool)]  # pool x (levels, masks)
            self.levels = [torch.cat([v[0][j] for v in variants]) for j in range(len(variants[0][0]))]
            self.masks = torch.cat([v[1] for v in variants])  # (pool * k, 1, S, S), variant-major

    def _draw(self, idx: torch.Tensor) -> tuple[Levels, torch.Tensor]:
        mean, std = self.backbone.mean, self.backbone.std
        images, masks = make_pseudo_anomalies(self.support[idx].cpu(), self.class_name, self.rng, mean, std,
                                              self.params)  # fmt: skip
        device = self.support.device
        return extract_levels(self.backbone, images.to(device)), masks.to(device)

    def sample(self, idx: torch.Tensor) -> tuple[Levels, torch.Tensor]:
        """Pseudo-anomalous levels and masks (len(idx), 1, S, S) for the support images `idx`."""
        if self.pool == 0:
            return self._draw(idx)
        variant = torch.from_numpy(self.rng.integers(0, self.pool, size=len(idx)))
        rows = (variant * self.k + idx).to(self.masks.device)
        return [lv[rows] for lv in self.levels], self.masks[rows]


def build_optimizer(model: PCSNet, cfg: PCSNetConfig) -> torch.optim.Optimizer:
    """Adam (amsgrad), lr 1e-3 for the descriptor and r, 1e-4 for CAS, weight decay 1e-5 (section 4)."""
    groups = [
        {"params": list(model.descriptor.parameters()) + [model.r_param], "lr": cfg.lr_adaptor},
        {"params": list(model.cas.parameters()), "lr": cfg.lr_cas},
    ]
    return torch.optim.Adam(groups, amsgrad=True, weight_decay=cfg.weight_decay)


def train_step(
    model: PCSNet, clean: Levels, aug: Levels, masks: torch.Tensor, cfg: PCSNetConfig, opt: torch.optim.Optimizer
) -> dict[str, float]:
    """One update on B clean images and their B pseudo-anomalous versions.

    Args:
        clean, aug: backbone levels of the clean and the pseudo-anomalous images (B each).
        masks: (B, 1, S, S) pseudo-anomaly masks of `aug` at the input resolution.

    Returns:
        The loss terms and the total as floats.
    """
    b, size = masks.shape[0], masks.shape[-1]
    out = model([torch.cat([c, a]) for c, a in zip(clean, aug)], out_size=size)
    knn = out["knn"][..., : model.nn_loss]  # 3-NN distances for the losses
    grid_mask = F.adaptive_avg_pool2d(masks, model.grid).flatten(1) > 0.5  # mask on the feature grid (B, N)
    target = torch.cat([torch.zeros(b, device=masks.device), masks.flatten(1).amax(1)])  # empty mask -> normal
    r, alpha = model.r, cfg.alpha
    terms = {
        "nfc": nfc_loss(knn[:b], r, cfg.nu),
        "afs": afs_loss(knn[b:], grid_mask, r, alpha, cfg.nu),
        "pdc": pdc_loss(knn, target, model.pdc_top, cfg.pdc_mode, margin=(r**2 + (r + alpha) ** 2) / 2),
        "seg": seg_loss(out["logits"], torch.cat([torch.zeros_like(masks), masks])),
    }
    loss = total_loss(terms, cfg.loss_weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    record = {k: float(v.detach()) for k, v in terms.items()}
    return {**record, "total": float(loss.detach()), "r": float(model.r.detach())}


def train_class(
    backbone: Backbone, cfg: PCSNetConfig, class_name: str, support: torch.Tensor, seed: int, progress: bool = True
) -> tuple[PCSNet, list[dict]]:
    """Train one class's PCSNet on its support images.

    Args:
        backbone: frozen feature extractor (on the support's device).
        cfg: run config.
        class_name: selects the NSA parameters and the rotation variant.
        support: (k, 3, S, S) normalised support images, any k >= 1.
        seed: run seed (combined with the class name).
        progress: show a tqdm bar over epochs.

    Returns:
        The trained model (eval mode) and the per-epoch mean loss terms.
    """
    torch.manual_seed(zlib.crc32(str(class_seed(seed, class_name)).encode()))
    rng = np.random.default_rng(class_seed(seed, class_name))
    channels = [info.channels for info in backbone.feature_info]
    model = PCSNet(channels, cfg, rotation=class_name in cfg.rotation_classes).to(support.device)
    clean_levels = extract_levels(backbone, support)  # cached once: the backbone is frozen
    model.set_prototypes(clean_levels)  # C from the initial descriptor, as the original
    if cfg.r_init == "auto":
        with torch.no_grad():
            model.eval()  # BN of the rotation variant: no running-stat update
            model.init_radius(knn_distances(model.descriptor(clean_levels), model.prototypes, model.nn_loss))
    params = nsa_params(class_name, cfg.nsa_default_bounds, cfg.nsa_default_patches)
    source = PseudoAnomalySource(backbone, support, class_name, rng, cfg.aug_pool, params)
    opt = build_optimizer(model, cfg)
    model.train()
    history = []
    for epoch in tqdm(range(cfg.epochs), desc=f"train {class_name}", disable=not progress, leave=False):
        if cfg.refresh_prototypes and epoch > 0 and epoch % cfg.refresh_prototypes == 0:
            model.set_prototypes(clean_levels)
        order = torch.from_numpy(rng.permutation(len(support)))
        steps = [train_step(model, [lv[idx] for lv in clean_levels], *source.sample(idx), cfg, opt)
                 for idx in order.split(cfg.batch_size)]  # fmt: skip
        history.append({key: float(np.mean([s[key] for s in steps])) for key in steps[0]})
    model.eval()
    with torch.no_grad():  # scale of the PFA map on the clean support (used only by --fuse-pfa)
        out = model(clean_levels)
        model.pfa_scale.fill_(float(model.pfa_map(out["knn"]).amax().clamp_min(1e-6)))
    return model, history


class PCSNetDetector:
    """PCSNet under the detector contract (common/contract.py): `setup` trains the class model, `predict` scores.

    Args:
        backbone: frozen backbone on `device`.
        cfg: run config.
        seed: run seed.
        save_dir: checkpoints go to SAVE_DIR/checkpoints/<class>.pt when given and cfg.save_checkpoints.
        support_paths: maps a class to its support image paths (recorded in the checkpoint).
        progress: tqdm bars.
    """

    def __init__(
        self,
        backbone: Backbone,
        cfg: PCSNetConfig,
        seed: int,
        save_dir: str | Path | None = None,
        support_paths: Callable[[str], list[str]] | None = None,
        progress: bool = True,
    ):
        self.backbone, self.cfg, self.seed = backbone, cfg, seed
        self.save_dir = Path(save_dir) if save_dir else None
        self.support_paths, self.progress = support_paths, progress
        self.model: PCSNet | None = None
        self.class_name: str | None = None
        self.train_seconds: dict[str, float] = {}
        self.histories: dict[str, list[dict]] = {}
        # input and post-processing spec (common/contract.py)
        self.mean, self.std, self.image_size = backbone.mean, backbone.std, int(cfg.image_size)
        self.smooth_sigma, self.eval_size, self.score_fusion = float(cfg.smooth_sigma), None, None

    def report(self) -> dict:
        """The class last set up: its training seconds and final losses (engine.runner collects one per class)."""
        history = self.histories.get(self.class_name) or []
        last = history[-1] if history else None
        return {"train_seconds": self.train_seconds.get(self.class_name), "final_loss": last}

    def setup(self, class_name: str, support_images: torch.Tensor) -> None:
        """Train the class model on (k, 3, S, S) support images and save its checkpoint."""
        start = time.perf_counter()
        self.class_name = class_name
        self.model, history = train_class(self.backbone, self.cfg, class_name, support_images, self.seed, self.progress)
        self.train_seconds[class_name] = time.perf_counter() - start
        self.histories[class_name] = history
        if self.save_dir is not None and self.cfg.save_checkpoints:
            paths = self.support_paths(class_name) if self.support_paths else []
            save_checkpoint(self.save_dir / "checkpoints" / f"{class_name}.pt", self.model, self.cfg, class_name,
                            paths, history)  # fmt: skip

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> DetectorOutput:
        """(B, 3, S, S) -> (None, anomaly_map (B, S, S) unsmoothed).

        The map is the CAS output plus `fuse_pfa` x the PFA distance map (default 1; the paper's 0 = CAS only, a
        deviation measured in docs/STATUS.md). The score None means "the maximum of the smoothed map" (sigma 4):
        the caller (evaluate(), the predict CLI) smooths the map anyway, so it is not smoothed twice.
        """
        require_setup(self.model is not None, type(self).__name__)
        size = images.shape[-1]
        out = self.model(extract_levels(self.backbone, images, chunk=len(images)), out_size=size)
        anomaly_map = out["logits"][:, 0]
        if self.cfg.fuse_pfa:
            anomaly_map = anomaly_map + self.cfg.fuse_pfa * upsample_map(self.model.pfa_map(out["knn"]), size)
        return DetectorOutput(None, anomaly_map)


def save_checkpoint(
    path: Path, model: PCSNet, cfg: PCSNetConfig, class_name: str, support: list[str], history: list[dict]
) -> Path:
    """Atomically write the class model with its resolved config, support paths and loss history."""
    state = {
        "config": config_to_dict(cfg),
        "class_name": class_name,
        "backbone_channels": model.backbone_channels,
        "rotation": class_name in cfg.rotation_classes,
        "support": list(support),
        "history": history,
        "state_dict": model.state_dict(),
    }
    return atomic_torch_save(state, path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[PCSNet, PCSNetConfig, dict]:
    """Rebuild a class model from `save_checkpoint`'s file. Returns (model in eval mode, config, raw dict)."""
    state = torch.load(path, map_location=device, weights_only=False)
    cfg = load_config(overrides=state["config"])
    model = PCSNet(state["backbone_channels"], cfg, rotation=state["rotation"]).to(device)
    model.load_state_dict(state["state_dict"])
    return model.eval(), cfg, state
