"""Per-class PCSNet training on the k support images and the detector used by common.evaluation.

Schedule (docs/design/pcsnet.md section 4, with the section 9 fixes): prototypes from the support images at
initialisation (optionally refreshed), then `epochs` passes over the support in batches of `batch_size` clean
images. Each step also takes one pseudo-anomalous version of every clean image in the batch; the clean and the
pseudo-anomalous images together form the batch of L_PDC and L_SEG (the original replaced half of the clean
batch instead, which needs >= 2 shots). Backbone features of the support are computed once; the pseudo
anomalies come from a pool of `aug_pool` precomputed variants per support image (0 = fresh each step).
With `resize_size` (paper mode) the support arrives uncropped at the resize size: the pseudo anomalies are made
there and then images and masks are centre-cropped to `image_size` alike, as the original (which cropped the
images but squashed the masks, bug 9.2).
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
from common.backbones import DEFAULT_CNN_LAYERS, Backbone
from common.contract import DetectorOutput, require_setup
from common.patch_knn import SupportKNN
from common.utils import UserError, atomic_torch_save
from data.dataset import center_crop
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
        crop: int | None = None,
        mixed: bool = False,
    ):
        self.backbone, self.support, self.class_name, self.rng, self.pool = backbone, support, class_name, rng, pool
        self.mixed = mixed  # NSA or common.pseudo_anomaly's kinds, half and half (pseudo_anomalies: mixed)
        self.crop = crop  # centre-crop side applied after the pseudo anomaly is made (paper mode); None = none
        self.params = params or nsa_params(class_name)
        self.k = len(support)
        if pool > 0:
            variants = [self._draw(torch.arange(self.k)) for _ in range(pool)]  # pool x (levels, masks)
            self.levels = [torch.cat([v[0][j] for v in variants]) for j in range(len(variants[0][0]))]
            self.masks = torch.cat([v[1] for v in variants])  # (pool * k, 1, S, S), variant-major

    def _draw(self, idx: torch.Tensor) -> tuple[Levels, torch.Tensor]:
        mean, std = self.backbone.mean, self.backbone.std
        images, masks = make_pseudo_anomalies(self.support[idx].cpu(), self.class_name, self.rng, mean, std,
                                              self.params, mixed=self.mixed)  # fmt: skip
        device = self.support.device
        images, masks = center_crop(images, self.crop), center_crop(masks, self.crop)
        return extract_levels(self.backbone, images.to(device).contiguous()), masks.to(device).contiguous()

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
    model: PCSNet,
    clean: Levels,
    aug: Levels,
    masks: torch.Tensor,
    cfg: PCSNetConfig,
    opt: torch.optim.Optimizer,
    rng: np.random.Generator | None = None,
) -> dict[str, float]:
    """One update on B clean images and their B pseudo-anomalous versions.

    Args:
        clean, aug: backbone levels of the clean and the pseudo-anomalous images (B each).
        masks: (B, 1, S, S) pseudo-anomaly masks of `aug` at the input resolution.
        rng: picks the swapped images of `mix_batch: replace_half` (default: a fixed generator).

    Returns:
        The loss terms and the total as floats.
    """
    b, size = masks.shape[0], masks.shape[-1]
    if cfg.mix_batch == "replace_half" and b >= 2:
        return _train_step_replace_half(model, clean, aug, masks, cfg, opt, rng or np.random.default_rng(0))
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
    return _update(model, terms, cfg, opt)


def _train_step_replace_half(
    model: PCSNet, clean: Levels, aug: Levels, masks: torch.Tensor, cfg: PCSNetConfig, opt, rng: np.random.Generator
) -> dict[str, float]:
    """The original's step (docs/design/pcsnet.md section 4): L_NFC from A(x), L_AFS from A(x_aug), and L_PDC plus
    CAS / L_SEG from A(x_mix), x_mix = x with B/2 random images swapped for their pseudo-anomalous version."""
    b, size = masks.shape[0], masks.shape[-1]
    swap = torch.zeros(b, dtype=torch.bool, device=masks.device)
    swap[torch.from_numpy(rng.choice(b, size=b // 2, replace=False)).to(masks.device)] = True
    pick = swap.view(-1, 1, 1, 1)
    mixed = [torch.where(pick, a, c) for c, a in zip(clean, aug)]
    mix_masks = masks * pick
    out_clean, out_aug = model(clean, cas=False), model(aug, cas=False)
    out = model(mixed, out_size=size)
    grid_mask = F.adaptive_avg_pool2d(masks, model.grid).flatten(1) > 0.5
    r, alpha, k = model.r, cfg.alpha, model.nn_loss
    terms = {
        "nfc": nfc_loss(out_clean["knn"][..., :k], r, cfg.nu),
        "afs": afs_loss(out_aug["knn"][..., :k], grid_mask, r, alpha, cfg.nu),
        "pdc": pdc_loss(out["knn"][..., :k], mix_masks.flatten(1).amax(1), model.pdc_top, cfg.pdc_mode,
                        margin=(r**2 + (r + alpha) ** 2) / 2),  # fmt: skip
        "seg": seg_loss(out["logits"], mix_masks),
    }
    return _update(model, terms, cfg, opt)


def _update(model: PCSNet, terms: dict[str, torch.Tensor], cfg: PCSNetConfig, opt) -> dict[str, float]:
    loss = total_loss(terms, cfg.loss_weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    record = {k: float(v.detach()) for k, v in terms.items()}
    return {**record, "total": float(loss.detach()), "r": float(model.r.detach())}


EvalHook = Callable[[int, PCSNet], None]  # (epoch, model in eval mode) -> None; --select best-of-evals


def support_crop(cfg: PCSNetConfig, support: torch.Tensor) -> int | None:
    """Paper mode: the centre crop to image_size of supports that arrive at the resize size (support given at
    image_size, e.g. by a caller that squashed it already, is used as it is); None = no crop."""
    return cfg.image_size if cfg.resolved_resize() and support.shape[-1] > cfg.image_size else None


def clean_support_levels(backbone: Backbone, cfg: PCSNetConfig, support: torch.Tensor) -> Levels:
    """Backbone levels of the (cropped) clean support images: computed once per class (the backbone is frozen)."""
    return extract_levels(backbone, center_crop(support, support_crop(cfg, support)).contiguous())


def train_class(
    backbone: Backbone,
    cfg: PCSNetConfig,
    class_name: str,
    support: torch.Tensor,
    seed: int,
    progress: bool = True,
    on_eval: EvalHook | None = None,
    clean_levels: Levels | None = None,
) -> tuple[PCSNet, list[dict]]:
    """Train one class's PCSNet on its support images.

    Args:
        backbone: frozen feature extractor (on the support's device).
        cfg: run config.
        class_name: selects the NSA parameters and the rotation variant.
        support: (k, 3, S, S) normalised support images, any k >= 1; (k, 3, R, R) uncropped at the resize size R in
            paper mode (cropped here to S after the pseudo anomalies are made).
        seed: run seed (combined with the class name).
        progress: show a tqdm bar over epochs.
        on_eval: called after epochs 0, eval_every, 2 * eval_every, ... (the original's test points) with the model
            in eval mode; the global torch RNG is restored afterwards, so training continues as without it.
        clean_levels: `clean_support_levels(backbone, cfg, support)` when the caller has them already.

    Returns:
        The trained model (eval mode) and the per-epoch mean loss terms.
    """
    torch.manual_seed(zlib.crc32(str(class_seed(seed, class_name)).encode()))
    rng = np.random.default_rng(class_seed(seed, class_name))
    channels = [info.channels for info in backbone.feature_info]
    model = PCSNet(channels, cfg, rotation=class_name in cfg.rotation_classes).to(support.device)
    crop = support_crop(cfg, support)
    if clean_levels is None:
        clean_levels = clean_support_levels(backbone, cfg, support)
    proto_chunk = cfg.batch_size if cfg.prototype_bn == "train" else 8  # train-mode BN: the original's loader batch
    model.set_prototypes(clean_levels, chunk=proto_chunk)  # C from the initial descriptor, as the original
    if cfg.r_init == "auto":
        with torch.no_grad():
            model.eval()  # BN of the rotation variant: no running-stat update
            model.init_radius(knn_distances(model.descriptor(clean_levels), model.prototypes, model.nn_loss))
    params = nsa_params(class_name, cfg.nsa_default_bounds, cfg.nsa_default_patches)
    source = PseudoAnomalySource(backbone, support, class_name, rng, cfg.aug_pool, params, crop=crop,
                                 mixed=cfg.pseudo_anomalies == "mixed")  # fmt: skip
    opt = build_optimizer(model, cfg)
    model.train()
    history = []
    for epoch in tqdm(range(cfg.epochs), desc=f"train {class_name}", disable=not progress, leave=False):
        if cfg.refresh_prototypes and epoch > 0 and epoch % cfg.refresh_prototypes == 0:
            model.set_prototypes(clean_levels, chunk=proto_chunk)
        order = torch.from_numpy(rng.permutation(len(support)))
        steps = [train_step(model, [lv[idx] for lv in clean_levels], *source.sample(idx), cfg, opt, rng=rng)
                 for idx in order.split(cfg.batch_size)]  # fmt: skip
        history.append({key: float(np.mean([s[key] for s in steps])) for key in steps[0]})
        if on_eval is not None and epoch % cfg.eval_every == 0:
            with torch.random.fork_rng(devices=[support.device] if support.device.type == "cuda" else []):
                _set_pfa_scale(model.eval(), clean_levels)
                on_eval(epoch, model)
            model.train()
    _set_pfa_scale(model.eval(), clean_levels)
    return model, history


@torch.no_grad()
def _set_pfa_scale(model: PCSNet, clean_levels: Levels) -> None:
    """Scale of the PFA map on the clean support (used only by --fuse-pfa); model in eval mode.

    Prototypes (the default before `pfa_bank`): the maximum of the map of the clean support. `pfa_bank: support`:
    the bank is filled from the support first; since a support patch is its own nearest neighbour there, the scale
    is the maximum of each support image's map against the other k - 1 images (leave-one-out; with k = 1 the image
    against itself: its map is the mean of 0 and its two nearest other patches).
    """
    model.pfa_scale.fill_(1.0)  # pfa_map divides by the current scale: measure the raw map
    if model.pfa_bank != "support":
        out = model(clean_levels)
        model.pfa_scale.fill_(float(model.pfa_map(out["knn"]).amax().clamp_min(1e-6)))
        return
    feats = model.set_support_bank(clean_levels)  # (k, D, G, G): the bank's rows, image by image
    k = len(feats)
    if k == 1:
        peak = model.pfa_map(knn_distances(feats, model.support_bank, model.nn_loss)).amax()
    else:
        per_image = model.support_bank.shape[0] // k
        peaks = []
        for i in range(k):
            rest = torch.cat([model.support_bank[: i * per_image], model.support_bank[(i + 1) * per_image :]])
            peaks.append(model.pfa_map(knn_distances(feats[i : i + 1], rest, model.nn_loss)).amax())
        peak = torch.stack(peaks).amax()
    model.pfa_scale.fill_(float(peak.clamp_min(1e-6)))


def knn_level_positions(backbone: str, layers: tuple[int, ...]) -> list[int]:
    """Positions in PCSNet's `layers` of the kNN baseline's levels for this backbone (lite0: levels 2, 3 of 1-3), so
    `knn_weight` adds the same map as `python -m baseline.knn`; all levels when none of them is there."""
    wanted = DEFAULT_CNN_LAYERS.get(backbone, ())
    return [i for i, level in enumerate(layers) if level in wanted] or list(range(len(layers)))


class PCSNetDetector:
    """PCSNet under the detector contract (common/contract.py): `setup` trains the class model, `predict` scores.

    Args:
        backbone: frozen backbone on `device`.
        cfg: run config.
        seed: run seed.
        save_dir: checkpoints go to SAVE_DIR/checkpoints/<class>.pt when given and cfg.save_checkpoints.
        support_paths: maps a class to its support image paths (recorded in the checkpoint).
        progress: tqdm bars.
        on_eval: called as on_eval(class, epoch, model) at the original's test points (--select best-of-evals).
    """

    def __init__(
        self,
        backbone: Backbone,
        cfg: PCSNetConfig,
        seed: int,
        save_dir: str | Path | None = None,
        support_paths: Callable[[str], list[str]] | None = None,
        progress: bool = True,
        on_eval: Callable[[str, int, PCSNet], None] | None = None,
    ):
        self.backbone, self.cfg, self.seed = backbone, cfg, seed
        self.on_eval = on_eval  # (class, epoch, model): the intermediate test passes of --select best-of-evals
        self.save_dir = Path(save_dir) if save_dir else None
        self.support_paths, self.progress = support_paths, progress
        self.model: PCSNet | None = None
        self.class_name: str | None = None
        self.train_seconds: dict[str, float] = {}
        self.histories: dict[str, list[dict]] = {}
        # input and post-processing spec (common/contract.py)
        self.mean, self.std, self.image_size = backbone.mean, backbone.std, int(cfg.image_size)
        self.smooth_sigma, self.eval_size, self.score_fusion = float(cfg.smooth_sigma), None, None
        self.knn: SupportKNN | None = None  # the kNN term of the class set up (cfg.knn_weight > 0)
        every = cfg.knn_levels == "all"
        layers = tuple(cfg.layers)
        self.knn_levels = list(range(len(layers))) if every else knn_level_positions(cfg.backbone, layers)
        self.knn_grid = (cfg.resolved_grid(),) * 2 if every else None  # the term's map on PCSNet's grid

    def report(self) -> dict:
        """The class last set up: its training seconds, final losses and, with an `on_eval` hook that keeps `evals`,
        its test passes (engine.runner collects one per class, into the --resume records too)."""
        history = self.histories.get(self.class_name) or []
        last = history[-1] if history else None
        out = {"train_seconds": self.train_seconds.get(self.class_name), "final_loss": last}
        passes = getattr(self.on_eval, "evals", None)  # --select best-of-evals (pcsnet.selection.BestOfEvals)
        if passes is not None:
            out["evals"] = passes.get(self.class_name)  # this class's test passes, for results.json best_of_evals
        return out

    def setup(self, class_name: str, support_images: torch.Tensor) -> None:
        """Train the class model on (k, 3, S, S) support images and save its checkpoint."""
        start = time.perf_counter()
        self.class_name = class_name
        hook = None if self.on_eval is None else lambda epoch, model: self.on_eval(class_name, epoch, model)
        # the kNN term first (no training): --select best-of-evals' test passes during training score with it too
        levels = clean_support_levels(self.backbone, self.cfg, support_images)  # one backbone pass for both
        self.knn = None
        if self.cfg.knn_weight > 0:  # the support's kNN bank and its leave-one-out normal maps (no autograd inputs)
            self.knn = SupportKNN(size=self.knn_grid).fit([levels[i] for i in self.knn_levels])
        self.model, history = train_class(self.backbone, self.cfg, class_name, support_images, self.seed, self.progress,
                                          on_eval=hook, clean_levels=levels)  # fmt: skip
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
        levels = extract_levels(self.backbone, images, chunk=len(images))
        out = self.model(levels, out_size=size)
        anomaly_map = out["logits"][:, 0]
        if self.cfg.fuse_pfa:
            pfa = self.model.pfa_map(self.model.pfa_knn(out))
            anomaly_map = anomaly_map + self.cfg.fuse_pfa * upsample_map(pfa, size)
        if self.knn is not None:
            knn = self.knn.distances([levels[i] for i in self.knn_levels]) / self.knn.max
            anomaly_map = anomaly_map + self.cfg.knn_weight * upsample_map(knn, size)
        return DetectorOutput(None, anomaly_map)


CHECKPOINT_FORMAT = "pcsnet-checkpoint/2"  # v2: format tag, tensors only (weights_only loading), fp16 option


def save_checkpoint(
    path: Path, model: PCSNet, cfg: PCSNetConfig, class_name: str, support: list[str], history: list[dict]
) -> Path:
    """Atomically write the class model with its resolved config, support paths and loss history.

    Plain types and tensors only, so `load_checkpoint` reads it with `weights_only=True`. Floating tensors are
    stored in `cfg.checkpoint_dtype` (fp16 halves the ~480 MB of a paper-width CAS; fp32 is exact).
    """
    dtype = torch.float16 if cfg.checkpoint_dtype == "fp16" else None
    weights = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v
               for k, v in model.state_dict().items()}  # fmt: skip
    state = {
        "format": CHECKPOINT_FORMAT,
        "dtype": cfg.checkpoint_dtype,
        "config": config_to_dict(cfg),
        "class_name": class_name,
        "backbone_channels": list(model.backbone_channels),
        "rotation": class_name in cfg.rotation_classes,
        "support": list(support),
        "history": history,
        "state_dict": weights,
    }
    return atomic_torch_save(state, path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[PCSNet, PCSNetConfig, dict]:
    """Rebuild a class model from `save_checkpoint`'s file. Returns (model in eval mode, config, raw dict).

    The file is read with `weights_only=True` (no arbitrary pickled objects run). Untagged files of the first
    format (the same keys, fp32) still load. fp16 weights are cast back to the model's fp32.

    Raises:
        UserError: unreadable file, pickled objects, another format tag, or weights that do not fit.
    """
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # UnpicklingError for objects outside the allow-list, OSError/RuntimeError otherwise
        raise UserError(f"cannot read PCSNet checkpoint {path} with weights_only=True: "
                        f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc  # fmt: skip
    if not isinstance(state, dict) or "state_dict" not in state or "config" not in state:
        raise UserError(f"{path} is not a PCSNet checkpoint (no state_dict/config)")
    tag = state.get("format", "pcsnet-checkpoint/1")
    if tag not in ("pcsnet-checkpoint/1", CHECKPOINT_FORMAT):
        raise UserError(f"{path} has checkpoint format {tag!r}; this version reads {CHECKPOINT_FORMAT!r}")
    cfg = load_config(overrides=state["config"])
    model = PCSNet(state["backbone_channels"], cfg, rotation=state["rotation"]).to(device)
    bank = state["state_dict"].get("support_bank")
    if bank is not None:  # its size is k * G * G: make room before loading
        model.support_bank = torch.empty(bank.shape, dtype=model.support_bank.dtype, device=device)
    try:
        model.load_state_dict(state["state_dict"])  # copy_ casts fp16 -> fp32
    except RuntimeError as exc:
        raise UserError(f"checkpoint {path} does not fit its own config: {str(exc).splitlines()[0]}") from exc
    return model.eval(), cfg, state
