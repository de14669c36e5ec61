"""Train the FDSL head (ASL per level + shared NAM) on an auxiliary dataset's test split with masks.

    python -m fdsl.train --dataset-root DIR --save-dir OUT [--backbone NAME] [--epochs N] [--use-nam 0|1] ...

Original (docs/design/fdsl.md section 5): frozen backbone, FD features against a training bank of 10 normal train
images per class, focal + dice on every map (raw and NAM) at the image size, Adam lr 1e-3 betas (0.5, 0.999),
batch 8, mosaic (MVTec) or zoom crops (VisA). Writes OUT/epoch_<E>.pth, OUT/last.pth, OUT/config.json.

Data-parallel under torchrun (DDP, gloo on CPU / nccl on CUDA): `--batch-size` stays the global batch and each
of the N processes takes 1/N of every batch; rank 0 recalibrates BatchNorm and writes every file. `--resume`
continues from the newest checkpoint in OUT (head, optimiser, every rank's RNG states, epoch).
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from collections import defaultdict

import numpy as np
import torch
from tqdm import tqdm

from common import distributed
from common.backbones import build_backbone
from common.few_shot import sample_support
from common.utils import (
    UserError,
    atomic_write_json,
    check_output_outside,
    check_writable_dir,
    cli_entry,
    parse_device,
    resolve_workers,
    set_seed,
)
from data.dataset import AnomalyDataset, load_images
from data.meta import load_meta
from fdsl.augment import crop_size, mosaic, zoom_crop
from fdsl.calibration import leave_one_out, level_stats
from fdsl.checkpoint import (
    check_resume_config,
    latest_checkpoint,
    remove_stale_temporaries,
    resolve_pretrained,
    save_checkpoint,
)
from fdsl.config import ADAM_BETAS, CNN_FD_MATCH, TrainConfig, build_parser, resolve_config, resolve_precision
from fdsl.model import FDSLHead, default_feature_pool, discrepancies, extract_levels, fdsl_loss, flatten_tokens


class FeatureCache:
    """FD deviations of un-augmented training images (they do not change between epochs), on CPU in fp16."""

    def __init__(self, budget_mb: int) -> None:
        self.budget, self.used = budget_mb * 2**20, 0
        self.items: dict[int, tuple[list[torch.Tensor], torch.Tensor]] = {}

    def get(self, index: int):
        return self.items.get(index)

    def put(self, index: int, deviations: list[torch.Tensor], mask: torch.Tensor) -> None:
        """deviations: per level (C_l, G, G); mask (1, S, S). Skipped once the budget is used up."""
        entry = ([d.detach().to("cpu", torch.float16) for d in deviations], mask.detach().to("cpu", torch.bool))
        size = sum(t.numel() * t.element_size() for t in entry[0]) + entry[1].numel()
        if self.used + size <= self.budget:
            self.items[index] = entry
            self.used += size


def select_training_items(dataset: AnomalyDataset) -> tuple[list[int], int]:
    """Indices of items usable for pixel supervision: normals and anomalies with a mask. Returns (kept, skipped)."""
    kept = [i for i, it in enumerate(dataset.items) if int(it["anomaly"]) == 0 or it["mask_path"]]
    return kept, len(dataset.items) - len(kept)


@torch.inference_mode()
def build_training_banks(
    cfg: TrainConfig, meta: dict, classes: list[str], backbone, size: int, device
) -> tuple[dict, dict | None]:
    """Per class, the normalised patch tokens of `train_k_shot` normal train images: {class: [(M, C_l)]}, and with
    `--input-norm support` each level's channel RMS of the bank's leave-one-out deviation {class: [(C_l,)]}
    (fdsl/calibration.py, as the test measures it on the support), else None."""
    banks, scales = {}, ({} if cfg.input_norm == "support" else None)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    for name in classes:
        pool = [it for it in meta["train"].get(name, []) if int(it["anomaly"]) == 0]
        if not pool:
            raise UserError(f"class '{name}' of {cfg.dataset_root} has no normal train images for its training bank")
        k = min(cfg.train_k_shot, len(pool))
        if k < cfg.train_k_shot:
            log(f"note: class '{name}' has only {len(pool)} normal train images; training bank uses {k}")
        paths = sample_support(meta, name, k, cfg.seed)
        images = load_images(cfg.dataset_root, paths, size, backbone.mean, backbone.std).to(device)
        feats = extract_levels(backbone(images).features, cfg.feature_pool)
        banks[name] = [flatten_tokens(f).to(dtype) for f in feats]
        if scales is not None:
            loo = leave_one_out(feats, bool(cfg.signed), match=cfg.fd_match)
            scales[name] = [level_stats(dev, fd).channel_scale.to(device) for dev, fd in loo]
    return banks, scales


@torch.inference_mode()
def compute_deviations(
    backbone, images: torch.Tensor, classes: list[str], banks: dict, signed: bool, pool: int = 1,
    scales: dict | None = None, match: str = "level",
) -> list:
    """Frozen backbone + FD for a batch of mixed classes. images (B, 3, S, S) -> per level (B, C_l, G, G).

    `match`: `level` or `joint` nearest reference patch (fdsl.model.discrepancies). With `scales` ({class: [(C_l,)]},
    `--input-norm support`) each deviation is divided by its class's channel RMS.
    """
    feats = extract_levels(backbone(images).features, pool)
    out = [torch.empty_like(f) for f in feats]
    for name in set(classes):
        rows = torch.tensor([i for i, c in enumerate(classes) if c == name], device=images.device)
        results = discrepancies([f[rows] for f in feats], banks[name], match, signed)
        for level, (dev, _) in enumerate(results):
            if scales is not None:
                dev = dev / scales[name][level][None, :, None, None]
            out[level][rows] = dev
    return out


class BatchBuilder:
    """Applies the augmentations and fetches cached FD features; computes the rest with the frozen backbone."""

    def __init__(
        self, cfg: TrainConfig, dataset: AnomalyDataset, kept: list[int], backbone, banks, device, scales=None
    ) -> None:
        self.cfg, self.dataset, self.backbone, self.banks, self.device = cfg, dataset, backbone, banks, device
        self.scales = scales  # {class: [(C_l,)]} with --input-norm support (compute_deviations)
        self.by_class = defaultdict(list)
        for i in kept:
            self.by_class[dataset.items[i]["cls_name"]].append(i)
        self.cache = FeatureCache(cfg.cache_mb)
        self.rng = np.random.default_rng(cfg.seed)

    def _augmented(self, index: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An augmented (image, mask) for this item, or None if it stays as it is this time."""
        item = self.dataset.items[index]
        if self.cfg.aug_rate > 0 and rng.random() < self.cfg.aug_rate:  # 2x2 same-class mosaic
            picks = rng.choice(self.by_class[item["cls_name"]], size=4, replace=True)
            samples = [self.dataset[int(j)] for j in picks]
            return mosaic(torch.stack([s["image"] for s in samples]), torch.stack([s["gt_mask"] for s in samples]))
        if self.cfg.use_crop:
            side = crop_size(bool(item["anomaly"]), self.dataset.image_size, rng)
            if side is not None:
                sample = self.dataset[index]
                return zoom_crop(sample["image"], sample["gt_mask"], side, rng)
        return None

    def load(self, index: int, augment: bool, rng: np.random.Generator, cached) -> tuple:
        """Decode (and augment) one item: ("cached",) when its cached FD features serve, else (image, mask, clean).

        `cached` is the set of cached indices (a snapshot of it in a DataLoader worker); `clean` = un-augmented.
        """
        augmented = self._augmented(index, rng) if augment else None
        if augmented is None and index in cached:
            return ("cached",)
        image, mask = augmented if augmented is not None else self._plain(index)
        return image, mask, augmented is None

    def build(self, indices: list[int], augment: bool = True) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Deviations per level (B, C_l, G, G) and masks (B, 1, S, S) for one batch of dataset indices."""
        return self.finish(indices, [self.load(i, augment, self.rng, self.cache.items) for i in indices])

    def finish(self, indices: list[int], loaded: list[tuple]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """FD features of the loaded items (the cache for the rest): per level (B, C_l, G, G), masks (B, 1, S, S)."""
        slots: list = [self.cache.get(i) if len(got) == 1 else None for i, got in zip(indices, loaded)]
        todo = [pos for pos, got in enumerate(loaded) if len(got) == 3]
        if todo:
            classes = [self.dataset.items[indices[p]]["cls_name"] for p in todo]
            devs = compute_deviations(
                self.backbone,
                torch.stack([loaded[p][0] for p in todo]).to(self.device),
                classes,
                self.banks,
                bool(self.cfg.signed),
                self.cfg.feature_pool,
                self.scales,
                self.cfg.fd_match,
            )
            for j, pos in enumerate(todo):
                slots[pos] = ([d[j] for d in devs], loaded[pos][1])
                if loaded[pos][2]:
                    self.cache.put(indices[pos], *slots[pos])
        deviations = [torch.stack([s[0][lv].to(self.device).float() for s in slots]) for lv in range(len(slots[0][0]))]
        masks = torch.stack([s[1].to(self.device).float() for s in slots])
        return deviations, masks

    def _plain(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.dataset[index]
        return sample["image"], sample["gt_mask"]


class _WorkerItems(torch.utils.data.Dataset):
    """DataLoader view of a BatchBuilder: item (index, seed) -> `BatchBuilder.load` in a worker process.

    Each item draws its augmentation from its own generator (seeded by the main process), so the result does not
    depend on which worker ran it. Only the image work moves: FD features and the cache stay in the main process.
    """

    def __init__(self, builder: BatchBuilder) -> None:
        self.builder = builder
        self.cached = frozenset(builder.cache.items)  # snapshot: items cached before the epoch starts

    def __len__(self) -> int:
        return len(self.builder.dataset.items)

    def __getitem__(self, key: tuple[int, int]) -> tuple:
        index, seed = key
        return self.builder.load(index, True, np.random.default_rng(seed), self.cached)


def _keep_list(batch: list) -> list:
    return batch


def _loaded_batches(builder: BatchBuilder, batches: list[list[int]], workers: int):
    """Yield (indices, loaded items) per batch: in this process (workers 0, the original order of random draws)
    or decoded by `workers` DataLoader processes (each item with a seed drawn here, in order)."""
    if workers == 0:
        for indices in batches:
            yield indices, [builder.load(i, True, builder.rng, builder.cache.items) for i in indices]
        return
    keyed = [[(i, int(builder.rng.integers(2**62))) for i in indices] for indices in batches]
    loader = torch.utils.data.DataLoader(
        _WorkerItems(builder), batch_sampler=keyed, collate_fn=_keep_list, num_workers=workers
    )
    for indices, loaded in zip(batches, loader):
        yield indices, loaded


def train_epoch(
    head, optimizer, builder: BatchBuilder, kept: list[int], cfg: TrainConfig, epoch: int, order_rng
) -> float:
    """One pass over the shuffled training items. Returns this process's mean loss.

    `order_rng` draws the permutation (the same on every rank). Under DDP the order is padded to a multiple of the
    world size (as DistributedSampler does) and rank r takes items r, r + N, ... of every global batch.
    """
    order = order_rng.permutation(kept).tolist()
    world, rank = distributed.world_size(), distributed.rank()
    if world > 1:
        order = (order * world)[: math.ceil(len(order) / world) * world]
    head.train()
    total, steps = 0.0, 0
    batches = range(0, len(order), cfg.batch_size)
    show = cfg.progress and distributed.is_main()
    local = [order[start : start + cfg.batch_size][rank::world] for start in batches]  # BN sees B*G*G rows: enough
    bar = tqdm(local, desc=f"epoch {epoch}/{cfg.epochs}", disable=not show, file=sys.stdout)
    amp = builder.device.type == "cuda" and cfg.precision in ("auto", "fp16")  # the original: head under autocast too
    for _, loaded in zip(bar, _loaded_batches(builder, local, cfg.num_workers or 0)):
        deviations, masks = builder.finish(*loaded)
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):  # no GradScaler, as the original
            loss = fdsl_loss(head(deviations), masks)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, steps = total + loss.item(), steps + 1
        bar.set_postfix(loss=f"{total / steps:.4f}")
    return total / max(steps, 1)


@torch.no_grad()
def recalibrate_batchnorm(head: FDSLHead, builder: BatchBuilder, kept: list[int], batch_size: int) -> None:
    """Recompute every BatchNorm's running statistics as the exact average over the un-augmented training set.

    Not in the original: with few steps (small auxiliary sets, e.g. the demo's ~15 steps per epoch) the running
    averages (momentum 0.1) lag behind the weights and eval-mode maps are wrong; the original's ~1000 steps hide
    this. Measured on demo fabric after 2 epochs: pixel AUROC of the eval-mode NAM map 0.22 -> 0.78.
    """
    norms = [m for m in head.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average = the exact mean over all batches
    head.train()
    for start in range(0, len(kept), batch_size):
        head(builder.build(kept[start : start + batch_size], augment=False)[0])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    head.eval()


def _check(cfg: TrainConfig) -> None:
    for name in ("epochs", "batch_size", "train_k_shot"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    if not 0 <= cfg.aug_rate <= 1:
        raise UserError(f"--aug-rate must be in [0, 1] (got {cfg.aug_rate})")
    if cfg.batch_size % distributed.world_size():
        raise UserError(
            f"--batch-size {cfg.batch_size} is the global batch: it must be a multiple of the "
            f"{distributed.world_size()} processes"
        )


def prefill_cache(builder: BatchBuilder, kept: list[int], batch_size: int) -> None:
    """Cache the un-augmented FD features of the training items, in a fixed order, until the budget is full.

    Un-augmented items then always read the same fp16 values, whether this run started at epoch 1 or resumed:
    without it a resumed run would compute in fp32 what the uninterrupted one read from its fp16 cache.
    """
    for start in range(0, len(kept), batch_size):
        chunk = kept[start : start + batch_size]
        before = len(builder.cache.items)
        builder.build(chunk, augment=False)
        if len(builder.cache.items) - before < len(chunk):
            return


def rng_state(device: torch.device, builder: BatchBuilder, order_rng) -> dict:
    """Every RNG this process draws from: torch (CPU and CUDA), numpy and python globals, the augmentation and
    order generators. Tensors, ints and containers only, so checkpoints still load with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
        "builder": builder.rng.bit_generator.state,
        "order": order_rng.bit_generator.state,
    }


def set_rng_state(state: dict, device: torch.device, builder: BatchBuilder, order_rng) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    builder.rng.bit_generator.state = state["builder"]
    order_rng.bit_generator.state = state["order"]


def load_resume_point(cfg: TrainConfig, config: dict) -> dict | None:
    """The newest checkpoint in SAVE_DIR to resume from (checked against this run's options), or None."""
    found = latest_checkpoint(cfg.save_dir)
    if found is None:
        log(f"note: --resume: no checkpoint in {cfg.save_dir} yet; training from epoch 1")
        return None
    path, state = found
    if "resume" not in state:
        raise UserError(f"--resume: {path} has no optimiser/RNG state (written before --resume existed)")
    check_resume_config(path, state["config"], config)
    world = state["resume"]["world_size"]
    if world != distributed.world_size():
        raise UserError(
            f"--resume: {path} was written by a run with {world} process(es), this one has "
            f"{distributed.world_size()}; resume with the same number of processes (NPROC)"
        )
    log(f"resuming from {path} (epoch {state['epoch']})")
    return state


def log(message: str) -> None:
    """print on rank 0 only."""
    if distributed.is_main():
        print(message)


def run(cfg: TrainConfig) -> dict:
    """Train and write the checkpoints. Returns the resolved config (as saved)."""
    _check(cfg)
    meta = load_meta(cfg.dataset_root)
    check_output_outside(cfg.save_dir, cfg.dataset_root, "--save-dir")
    check_writable_dir(cfg.save_dir)
    device = distributed.init(parse_device(cfg.device))
    if distributed.is_main():
        for stale in remove_stale_temporaries(cfg.save_dir):
            print(f"note: removed {stale}, a partial file left by an interrupted run")
    set_seed(cfg.seed)
    cfg.pretrained = resolve_pretrained(cfg.backbone, cfg.pretrained)
    precision, tf32 = resolve_precision(cfg.precision, device, cfg.tf32)
    backbone = build_backbone(cfg.backbone, cfg.pretrained, cfg.layers, device, bool(cfg.quick_gelu), precision)
    cfg.num_workers = resolve_workers(cfg.num_workers, device)
    cfg.image_size = cfg.image_size or backbone.default_image_size
    cfg.fd_match = cfg.fd_match or (CNN_FD_MATCH if backbone.kind == "cnn" else "level")  # as fdsl.test tests it
    if cfg.image_size % backbone.patch_size:
        raise UserError(
            f"--image-size {cfg.image_size} must be a multiple of {backbone.name}'s patch/stride {backbone.patch_size}"
        )
    cfg.layers = list(getattr(backbone, "layers", cfg.layers) or [])
    if cfg.feature_pool is None:
        cfg.feature_pool = default_feature_pool(backbone.kind)
    config = {**dataclasses.asdict(cfg), "precision_used": precision, "tf32_used": tf32}
    resume = load_resume_point(cfg, config) if cfg.resume else None
    if distributed.is_main():
        atomic_write_json(f"{cfg.save_dir}/config.json", config)
    dataset = AnomalyDataset(cfg.dataset_root, "test", None, cfg.image_size, backbone.mean, backbone.std, meta=meta)
    kept, skipped = select_training_items(dataset)
    if skipped:
        log(f"note: {skipped} anomalous test images without masks are left out (no pixel supervision)")
    if len(kept) < 2:
        raise UserError(f"{cfg.dataset_root} has fewer than 2 test images with masks to train on")
    banks, scales = build_training_banks(cfg, meta, dataset.class_names, backbone, cfg.image_size, device)
    head = FDSLHead([info.channels for info in backbone.feature_info], use_nam=bool(cfg.use_nam)).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=cfg.lr, betas=ADAM_BETAS)
    builder = BatchBuilder(cfg, dataset, kept, backbone, banks, device, scales)
    order_rng = builder.rng  # one process: one generator for order and augmentation, as before DDP existed
    if distributed.is_distributed():  # the same order on every rank, rank-specific augmentation draws
        order_rng = np.random.default_rng(cfg.seed)
        builder.rng = np.random.default_rng([cfg.seed, distributed.rank()])
    prefill_cache(builder, kept, cfg.batch_size)
    first = 1
    if resume is not None:
        head.load_state_dict(resume["head"], strict=True)
        optimizer.load_state_dict(resume["resume"]["optimizer"])
        set_rng_state(resume["resume"]["rng"][distributed.rank()], device, builder, order_rng)
        first = resume["epoch"] + 1
    model = head
    if distributed.is_distributed():
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(head, device_ids=ids)
    log(
        f"training FDSL on {len(kept)} images of {len(dataset.class_names)} classes ({backbone.name}, "
        f"{cfg.image_size} px, levels {cfg.layers}, device {device}, {distributed.world_size()} process(es), "
        f"precision {precision}{' + TF32' if tf32 else ''}, {cfg.num_workers} loader worker(s), "
        f"BatchNorm recalibration {'on' if cfg.recalibrate_bn else 'off'})"
    )
    if first > cfg.epochs:
        log(f"{cfg.save_dir} already holds epoch {first - 1} of {cfg.epochs}: nothing to train")
    for epoch in range(first, cfg.epochs + 1):
        start = time.perf_counter()
        loss = float(
            np.mean(distributed.gather_objects(train_epoch(model, optimizer, builder, kept, cfg, epoch, order_rng)))
        )
        rngs = distributed.gather_objects(rng_state(device, builder, order_rng))
        if distributed.is_main():  # DDP hands rank 0's BatchNorm buffers to the others at the next forward
            if cfg.recalibrate_bn:
                recalibrate_batchnorm(head, builder, kept, cfg.batch_size)
            resume_state = {
                "optimizer": optimizer.state_dict(),
                "rng": rngs,
                "world_size": distributed.world_size(),
            }
            path = save_checkpoint(f"{cfg.save_dir}/epoch_{epoch}.pth", head, backbone, config, epoch, resume_state)
            save_checkpoint(f"{cfg.save_dir}/last.pth", head, backbone, config, epoch, resume_state)
            print(f"epoch {epoch}: loss {loss:.4f}, {time.perf_counter() - start:.1f} s -> {path}", flush=True)
    distributed.cleanup()
    return config


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = build_parser(TrainConfig, "python -m fdsl.train", __doc__.split("\n\n")[0], "train.yaml")
    run(resolve_config(TrainConfig, parser, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
