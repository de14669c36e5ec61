"""The few-shot class loop for every method: per class, draw support -> setup -> predict -> post-process -> metrics.

The detector follows `common.contract` (setup / predict / report and its own input and post-processing spec).
Classes run one at a time, so the banks and maps of one class are freed before the next (peak memory does not grow
with the number of classes). `evaluate_sharded` shares classes out over torchrun ranks; `ResumeRecords` keeps one
JSON record per finished class so a rerun skips them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from common import distributed
from common.anomaly_map import upsample_map
from common.backbones import backbone_seconds
from common.contract import PostSpec, post_process, post_spec
from common.evaluation import check_eval_inputs
from common.few_shot import sample_support
from common.metrics import compute_metrics
from common.timing import enabled as timing_enabled
from common.timing import timing_if_requested
from common.utils import UserError, atomic_write_json
from data.dataset import AnomalyDataset, load_images, read_image
from data.meta import load_meta
from engine.records import ClassObserver, ClassRecords


@dataclass
class EvalConfig:
    """What the loop needs besides the detector (which declares its own input and post-processing spec).

    `image_size`, `mean`, `std`, `eval_size`, `smooth_sigma` and `class_score_fn` are accepted for callers written
    before the contract: they are used only where the detector does not declare the attribute itself.
    """

    dataset_root: str
    k_shot: int
    seed: int
    image_size: int | None = None
    mean: tuple | None = None
    std: tuple | None = None
    class_names: list[str] | None = None
    batch_size: int = 8
    eval_size: int | None = None
    smooth_sigma: float | None = None
    num_workers: int = 0
    device: torch.device = torch.device("cpu")
    class_score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    vis_dir: str | None = None  # heat-map PNG panels per test image when set (an observer, see `PanelWriter`)
    support_draw: int = 0
    class_done: Callable[[str, ClassResult], None] | None = None  # called after each class (e.g. to record it)
    observers: Sequence[ClassObserver] = ()
    # PCSNet paper mode: test images and masks are resized to resize_size, then centre-cropped to the image size; the
    # support images are handed to detector.setup uncropped at resize_size (PCSNet makes its pseudo anomalies
    # there and crops them itself, as the original). None = squash to the image size.
    resize_size: int | None = None
    resample: str = "bicubic"  # image resize filter (PCSNet paper mode: lanczos, PIL's ANTIALIAS)


@dataclass
class ClassResult:
    metrics: dict
    support: list[str]
    n_images: int
    seconds: float  # setup + test
    extra: dict = field(default_factory=dict)
    setup_seconds: float | None = None  # support decode + detector.setup (bank building, PCSNet's training)
    backbone_seconds: float | None = None  # backbone forwards during the test loop
    data_seconds: float | None = None  # waiting for decoded test batches during the test loop


@dataclass(frozen=True)
class InputSpec:
    image_size: int
    mean: tuple
    std: tuple


def _specs(detector: Any, cfg: EvalConfig) -> tuple[InputSpec, PostSpec]:
    """The detector's own specs; the config's legacy fields fill only what the detector does not declare."""

    def pick(name: str, legacy: Any) -> Any:
        value = getattr(detector, name, None)
        return legacy if value is None else value

    inputs = InputSpec(int(pick("image_size", cfg.image_size)), tuple(pick("mean", cfg.mean)),
                       tuple(pick("std", cfg.std)))  # fmt: skip
    if all(hasattr(detector, name) for name in ("mean", "std", "image_size", "smooth_sigma")):
        post = post_spec(detector)
    else:  # a detector written before the contract: the caller's config says how to post-process
        post = PostSpec(int(cfg.eval_size or inputs.image_size), float(cfg.smooth_sigma or 0.0), cfg.class_score_fn)
    return inputs, post


def evaluate(detector: Any, cfg: EvalConfig, progress: bool = True) -> tuple[dict[str, ClassResult], float]:
    """Run the few-shot protocol over every (selected) class. Returns per-class results and total seconds.

    Backbone forwards are timed only when FSAD_TIMING=1 (common.timing; the benchmark sets it); otherwise
    `backbone_seconds` is None and no timing hook runs.
    """
    with timing_if_requested():
        return _evaluate(detector, cfg, progress)


def _evaluate(detector: Any, cfg: EvalConfig, progress: bool) -> tuple[dict[str, ClassResult], float]:
    meta = load_meta(cfg.dataset_root)
    check_eval_inputs(meta, cfg.dataset_root, cfg.class_names, cfg.k_shot, cfg.seed, cfg.support_draw)
    inputs, post = _specs(detector, cfg)
    panels = [PanelWriter(cfg.vis_dir, cfg.dataset_root, cfg.resize_size)] if cfg.vis_dir else []
    observers = list(cfg.observers) + panels
    load_size = cfg.resize_size or inputs.image_size
    crop = inputs.image_size if cfg.resize_size else None
    dataset = AnomalyDataset(cfg.dataset_root, "test", cfg.class_names, load_size, inputs.mean, inputs.std,
                             meta=meta, crop_size=crop, resample=cfg.resample)  # fmt: skip
    out: dict[str, ClassResult] = {}
    total = 0.0
    for class_name in dataset.class_names:
        indices = list(dataset.class_indices[class_name])
        support = sample_support(meta, class_name, cfg.k_shot, cfg.seed, draw=cfg.support_draw)
        start = time.perf_counter()
        support_images = load_images(cfg.dataset_root, support, load_size, inputs.mean, inputs.std,
                                     resample=cfg.resample)  # fmt: skip
        detector.setup(class_name, support_images.to(cfg.device))
        setup_seconds = time.perf_counter() - start
        backbone_start, data_seconds = backbone_seconds(), 0.0
        scores, labels, maps, masks, known, paths = [], [], [], [], [], []
        loader = DataLoader(Subset(dataset, indices), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
        size = post.size
        batches = iter(tqdm(loader, desc=f"{class_name}", disable=not progress, leave=False))
        while True:
            wait = time.perf_counter()
            batch = next(batches, None)
            data_seconds += time.perf_counter() - wait
            if batch is None:
                break
            with torch.inference_mode():
                pred_score, anomaly_map = post_process(detector.predict(batch["image"].to(cfg.device)), post)
            scores.append(pred_score.float().cpu())
            maps.append(anomaly_map.cpu().half())  # fp16 keeps a class's maps small; metrics upcast
            gt = batch["gt_mask"]
            if gt.shape[-1] != size:
                gt = (upsample_map(gt, size) > 0.5).float()
            masks.append(gt.reshape(-1, size, size).bool())
            labels.append(batch["gt_label"])
            known.append(batch["has_mask"])
            paths.extend(batch["img_path"])
        seconds = time.perf_counter() - start
        test_backbone = backbone_seconds() - backbone_start if timing_enabled() else None
        total += seconds
        score_np = torch.cat(scores).numpy()
        map_np = torch.cat(maps).float().numpy()
        label_np = torch.cat(labels).numpy()
        if post.score_fusion is not None:
            score_np = post.score_fusion(score_np, map_np)
        mask_np, known_np = torch.cat(masks).numpy(), torch.cat(known).numpy()
        metrics = compute_metrics(score_np, label_np, map_np, mask_np, known_np)
        out[class_name] = ClassResult(metrics, support, len(indices), seconds, setup_seconds=setup_seconds,
                                      backbone_seconds=test_backbone, data_seconds=data_seconds)  # fmt: skip
        if observers:
            record = ClassRecords(class_name, list(paths), label_np, np.asarray(score_np), map_np,
                                  mask_np.astype(np.uint8) if known_np.any() else None, metrics)  # fmt: skip
            for observer in observers:
                observer(record)
        if cfg.class_done is not None:
            cfg.class_done(class_name, out[class_name])
    return out, total


def evaluate_sharded(
    detector: Any, cfg: EvalConfig, progress: bool = True, payload: Callable[[], Any] | None = None
) -> tuple[dict[str, ClassResult], float, list]:
    """evaluate() with the classes shared out over the torchrun ranks: class i goes to rank i % world_size.

    Every class is set up and scored exactly as in a single process (support draws and per-class seeds depend on
    the class only), so the merged metrics are the single-process ones. Returns, on every rank, the per-class
    results in the single-process class order, the summed seconds and each rank's `payload()` (rank order).
    A UserError on any rank is raised on every rank (no rank is left waiting). Without torchrun: evaluate().
    """
    meta = load_meta(cfg.dataset_root)
    names = check_eval_inputs(meta, cfg.dataset_root, cfg.class_names, cfg.k_shot, cfg.seed, cfg.support_draw)
    mine = distributed.shard(names)
    try:
        per_class, seconds = (
            evaluate(detector, dataclasses.replace(cfg, class_names=mine), progress) if mine else ({}, 0.0)
        )
        part = ("ok", per_class, seconds, payload() if payload else None)
    except UserError as exc:
        if not distributed.is_distributed():
            raise
        part = ("error", str(exc), 0.0, None)
    parts = distributed.gather_objects(part)
    for status, message, _, _ in parts:
        if status == "error":
            raise UserError(message)
    merged = {name: result for _, results, _, _ in parts for name, result in results.items()}
    return {name: merged[name] for name in names}, sum(p[2] for p in parts), [p[3] for p in parts]


class ResumeRecords:
    """SAVE_DIR/classes/<class>.json: one record per finished class, so a rerun with `--resume` skips it.

    Each record carries the run key (dataset, k, seed, resolved options); a record written with another key is
    refused (UserError naming the differing keys), never silently mixed into the results.
    """

    def __init__(self, save_dir: str | Path, key: dict) -> None:
        self.folder = Path(save_dir) / "classes"
        self.key = json.loads(json.dumps(key, default=str))  # as JSON will store it

    def load(self, classes: Sequence[str]) -> dict[str, dict]:
        done = {}
        for name in classes:
            path = self.folder / f"{name}.json"
            if not path.is_file():
                continue
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise UserError(f"--resume: cannot read {path}: {exc}") from exc
            if record.get("run") != self.key:
                diffs = _differences(record.get("run") or {}, self.key)
                raise UserError(f"--resume: {path} was recorded with other options ({', '.join(diffs)}); "
                                "use the same options or another --save-dir")  # fmt: skip
            done[name] = record
        return done

    def write(self, name: str, result: ClassResult, report: dict | None = None) -> None:
        atomic_write_json(self.folder / f"{name}.json", {
            "run": self.key, "metrics": result.metrics, "support": result.support, "n_images": result.n_images,
            "seconds": result.seconds, "setup_seconds": result.setup_seconds,
            "backbone_seconds": result.backbone_seconds, "data_seconds": result.data_seconds, "report": report or {},
        })  # fmt: skip

    @staticmethod
    def to_result(record: dict) -> ClassResult:
        return ClassResult(record["metrics"], record["support"], record["n_images"], record["seconds"],
                           setup_seconds=record.get("setup_seconds"), backbone_seconds=record.get("backbone_seconds"),
                           data_seconds=record.get("data_seconds"))  # fmt: skip


def _differences(old: dict, new: dict) -> list[str]:
    """Keys whose values differ; for a nested mapping (the options), its differing keys instead of its name."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        out += _differences(a, b) if isinstance(a, dict) and isinstance(b, dict) else [key]
    return out


class PanelWriter:
    """Observer: image | heat-map PNG panels of every test image under FOLDER/<class>/ (one colour scale a class).

    With `resize` (PCSNet paper mode) the image is resized to it and centre-cropped to the map size, as the maps were.
    """

    def __init__(self, folder: str | Path, dataset_root: str | Path, resize: int | None = None) -> None:
        self.folder, self.root, self.resize = Path(folder), Path(dataset_root), resize

    def __call__(self, record: ClassRecords) -> None:
        import cv2

        from common.visualization import save_panel

        maps = record.anomaly_maps
        size = maps.shape[-1] if maps.size else 1
        vmax = float(np.quantile(maps, 0.999)) if maps.size else 1.0
        vmin = float(maps.min()) if maps.size else 0.0
        for rel, anomaly_map in zip(record.image_paths, maps):
            side = self.resize or size
            image = cv2.resize(read_image(self.root / rel), (side, side), interpolation=cv2.INTER_AREA)
            if self.resize:
                top = int(round((side - size) / 2.0))
                image = np.ascontiguousarray(image[top : top + size, top : top + size])
            name = rel.replace("/", "_").rsplit(".", 1)[0] + ".png"
            save_panel(self.folder / record.class_name / name, image, anomaly_map, vmin=vmin, vmax=vmax)
