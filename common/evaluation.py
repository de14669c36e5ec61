"""One few-shot evaluation loop for every method: per class, draw support -> setup -> predict -> metrics.

A detector is any object with
    setup(class_name: str, support_images: Tensor (k, 3, S, S)) -> None      # build banks / train on the support
    predict(images: Tensor (B, 3, S, S)) -> (pred_score (B,) or None, anomaly_map (B, h, w))
A pred_score of None means "the maximum of the post-processed (upsampled, smoothed) map".
Classes are processed one at a time, so banks and maps of one class are freed before the next (peak memory does
not grow with the number of classes).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from common import distributed
from common.anomaly_map import gaussian_smooth, image_score_max, upsample_map
from common.backbones import backbone_seconds
from common.few_shot import sample_support
from common.metrics import compute_metrics
from common.utils import UserError
from data.dataset import AnomalyDataset, load_images
from data.meta import load_meta


class Detector(Protocol):
    def setup(self, class_name: str, support_images: torch.Tensor) -> None: ...

    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]: ...


@dataclass
class EvalConfig:
    dataset_root: str
    k_shot: int
    seed: int
    image_size: int
    mean: tuple
    std: tuple
    class_names: list[str] | None = None
    batch_size: int = 8
    eval_size: int | None = None  # resolution of pixel metrics (FDSL: 240); default image_size
    smooth_sigma: float = 0.0  # gaussian on the upsampled map before metrics (PCSNet/PatchCore: 4)
    num_workers: int = 0
    device: torch.device = torch.device("cpu")
    # Scores of one class -> final scores (e.g. FDSL's transductive per-class min-max fusion); None = as predicted
    class_score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    vis_dir: str | None = None  # heat-map PNG panels per test image when set
    support_draw: int = 0
    class_done: Callable[[str, ClassResult], None] | None = None  # called after each class (e.g. to record it)
    # PCSNet paper mode: test images and masks are resized to resize_size, then centre-cropped to image_size; the
    # support images are handed to detector.setup uncropped at resize_size (PCSNet makes its pseudo anomalies
    # there and crops them itself, as the original). None = squash to image_size.
    resize_size: int | None = None
    resample: str = "bicubic"  # image resize filter (PCSNet paper mode: lanczos, PIL's ANTIALIAS)
    report_images: int | None = None  # report.html examples per group; None = no report (see write_run_report)


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


def timing_breakdown(per_class: dict[str, ClassResult]) -> dict:
    """results.json `timing` keys beyond the contract's: where the seconds went (None when a class lacks them).

    `test_seconds_per_image` excludes the set-up, so it compares across methods whose set-up differs (a bank vs a
    training run); `backbone_share` is the test loop's fraction of time in the backbone forward.
    """
    results = list(per_class.values())
    n_images = sum(r.n_images for r in results)
    out = {"setup_seconds": None, "test_seconds": None, "test_seconds_per_image": None, "backbone_seconds": None,
           "backbone_share": None, "data_seconds": None}  # fmt: skip
    if not results or any(r.setup_seconds is None or r.backbone_seconds is None for r in results):
        return out
    setup = sum(r.setup_seconds for r in results)
    test = sum(r.seconds - r.setup_seconds for r in results)
    backbone = sum(r.backbone_seconds for r in results)
    out.update(setup_seconds=setup, test_seconds=test, test_seconds_per_image=test / max(n_images, 1),
               backbone_seconds=backbone, backbone_share=backbone / test if test > 0 else None,
               data_seconds=sum(r.data_seconds or 0.0 for r in results))  # fmt: skip
    return out


def check_eval_inputs(
    meta: dict, root: str | Path, class_names: list[str] | None, k_shot: int, seed: int, draw: int = 0
) -> list[str]:
    """Check the classes and every class's support draw before any model work; return the classes to evaluate.

    Raises:
        UserError: an unknown class, a k-shot below 1 or above a class's normal training images, naming the flag and
            ROOT/meta.json.
    """
    path = Path(root) / "meta.json"
    if k_shot < 1:
        raise UserError(f"--k-shot must be at least 1 (got {k_shot})")
    known = list(meta["test"])
    if class_names:
        unknown = [name for name in class_names if name not in known]
        if unknown:
            raise UserError(
                f"unknown class(es) {', '.join(unknown)} (--class-name): {path} has {', '.join(known) or 'none'}"
            )
    wanted = [name for name in known if not class_names or name in class_names]
    if not wanted:
        raise UserError(f"{path} lists no test classes; regenerate it (python data/mvtec.py --root {root})")
    for name in wanted:
        pool = [item for item in meta["train"].get(name, []) if item["anomaly"] == 0]
        if not pool:
            raise UserError(
                f"class '{name}' has no normal training images in {path}, so no support can be drawn; add "
                f"{name}/train/good images or choose other classes with --class-name"
            )
        if k_shot > len(pool):
            raise UserError(
                f"--k-shot {k_shot} is larger than the {len(pool)} normal training images of class '{name}' in {path}; "
                f"use --k-shot {len(pool)} or fewer"
            )
        sample_support(meta, name, k_shot, seed, draw=draw)
    return wanted


def evaluate(detector: Detector, cfg: EvalConfig, progress: bool = True) -> tuple[dict[str, ClassResult], float]:
    """Run the few-shot protocol over every (selected) class. Returns per-class results and total seconds."""
    meta = load_meta(cfg.dataset_root)
    check_eval_inputs(meta, cfg.dataset_root, cfg.class_names, cfg.k_shot, cfg.seed, cfg.support_draw)
    load_size = cfg.resize_size or cfg.image_size
    crop = cfg.image_size if cfg.resize_size else None
    dataset = AnomalyDataset(cfg.dataset_root, "test", cfg.class_names, load_size, cfg.mean, cfg.std, meta=meta,
                             crop_size=crop, resample=cfg.resample)  # fmt: skip
    out: dict[str, ClassResult] = {}
    total = 0.0
    for class_name in dataset.class_names:
        indices = list(dataset.class_indices[class_name])
        support = sample_support(meta, class_name, cfg.k_shot, cfg.seed, draw=cfg.support_draw)
        start = time.perf_counter()
        support_images = load_images(cfg.dataset_root, support, load_size, cfg.mean, cfg.std,
                                     resample=cfg.resample).to(cfg.device)  # fmt: skip
        detector.setup(class_name, support_images)
        setup_seconds = time.perf_counter() - start
        backbone_start, data_seconds = backbone_seconds(), 0.0
        scores, labels, maps, masks, known, paths = [], [], [], [], [], []
        loader = DataLoader(Subset(dataset, indices), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
        size = cfg.eval_size or cfg.image_size
        batches = iter(tqdm(loader, desc=f"{class_name}", disable=not progress, leave=False))
        while True:
            wait = time.perf_counter()
            batch = next(batches, None)
            data_seconds += time.perf_counter() - wait
            if batch is None:
                break
            with torch.inference_mode():
                pred_score, anomaly_map = detector.predict(batch["image"].to(cfg.device))
                anomaly_map = upsample_map(anomaly_map, size)
                if cfg.smooth_sigma > 0:
                    anomaly_map = gaussian_smooth(anomaly_map, cfg.smooth_sigma)
                if pred_score is None:
                    pred_score = image_score_max(anomaly_map)
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
        test_backbone = backbone_seconds() - backbone_start
        total += seconds
        score_np = torch.cat(scores).numpy()
        map_np = torch.cat(maps).float().numpy()
        label_np = torch.cat(labels).numpy()
        if cfg.class_score_fn is not None:
            score_np = cfg.class_score_fn(score_np, map_np)
        metrics = compute_metrics(score_np, label_np, map_np, torch.cat(masks).numpy(), torch.cat(known).numpy())
        if cfg.vis_dir:
            _save_panels(Path(cfg.vis_dir) / class_name, cfg.dataset_root, paths, map_np, size, cfg.resize_size)
        extra = {}
        if cfg.report_images is not None:  # report hook (issue 15), after the timing: the engine will own it
            mask_np = torch.cat(masks).numpy().astype(np.uint8) if torch.cat(known).any() else None
            extra["report_section"] = _report_section(cfg, class_name, paths, label_np, score_np, map_np, mask_np,
                                                      metrics)  # fmt: skip
        out[class_name] = ClassResult(metrics, support, len(indices), seconds, setup_seconds=setup_seconds,
                                      backbone_seconds=test_backbone, data_seconds=data_seconds,
                                      extra=extra)  # fmt: skip
        if cfg.class_done is not None:
            cfg.class_done(class_name, out[class_name])
    return out, total


def evaluate_sharded(
    detector: Detector, cfg: EvalConfig, progress: bool = True, payload: Callable[[], Any] | None = None
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


def _save_panels(
    folder: Path, root: str, paths: list[str], maps: np.ndarray, size: int, resize: int | None = None
) -> None:
    """Heat-map panels; with `resize` the image is resized to it and centre-cropped to `size`, as the maps were."""
    import cv2

    from common.visualization import save_panel
    from data.dataset import read_image

    vmax = float(np.quantile(maps, 0.999)) if maps.size else 1.0
    vmin = float(maps.min()) if maps.size else 0.0
    for rel, anomaly_map in zip(paths, maps):
        side = resize or size
        image = cv2.resize(read_image(Path(root) / rel), (side, side), interpolation=cv2.INTER_AREA)
        if resize:
            top = int(round((side - size) / 2.0))
            image = np.ascontiguousarray(image[top : top + size, top : top + size])
        name = rel.replace("/", "_").rsplit(".", 1)[0] + ".png"
        save_panel(folder / name, image, anomaly_map, vmin=vmin, vmax=vmax)


def minmax_fusion(image_scores: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """VAND/FDSL few-shot image score: 0.5 * (score + per-class min-max of the map maxima).

    Transductive: it normalises with the statistics of the whole test set of the class.
    """
    peak = maps.reshape(len(maps), -1).max(axis=1)
    span = peak.max() - peak.min()
    peak = (peak - peak.min()) / span if span > 0 else np.zeros_like(peak)
    return 0.5 * (image_scores + peak)


# ---- report hook (issue 15) --------------------------------------------------------------------------------------
# evaluate() renders each class's report section while its maps are in memory (only the HTML is kept, and it
# travels with ClassResult across torchrun ranks); the CLIs call write_run_report() right after write_results().
# The engine (issue 15's other half) will replace this with an observer receiving report.ClassRecords.
DEFAULT_REPORT_IMAGES = 6


def add_report_arguments(parser: Any) -> Any:
    """--report-images N and --no-report for an argparse CLI (fdsl.test has them as TestConfig fields)."""
    parser.add_argument("--report-images", type=int, default=DEFAULT_REPORT_IMAGES,
                        help="SAVE_DIR/report.html: example images per group and class (worst normals, worst "
                             f"anomalies; default {DEFAULT_REPORT_IMAGES}; 0 = curves and tables only)")  # fmt: skip
    parser.add_argument("--no-report", action="store_true", help="do not write SAVE_DIR/report.html")
    return parser


def report_images_option(report_images: int, no_report: bool) -> int | None:
    """EvalConfig.report_images from the flags: None with --no-report.

    Raises:
        UserError: a negative --report-images.
    """
    if report_images < 0:
        raise UserError(f"--report-images must be 0 or more (got {report_images})")
    return None if no_report else int(report_images)


def _report_section(cfg: EvalConfig, class_name: str, paths: list[str], labels: np.ndarray, scores: np.ndarray,
                    maps: np.ndarray, masks: np.ndarray | None, metrics: dict) -> str:  # fmt: skip
    from report import ClassRecords, render_class_section

    records = ClassRecords(class_name, [str(Path(cfg.dataset_root) / p) for p in paths], labels, scores, maps,
                           masks, metrics)  # fmt: skip
    return render_class_section(records, cfg.report_images)


def write_run_report(
    save_dir: str | Path, results: dict, per_class: dict[str, ClassResult], report_images: int | None
) -> Path | None:
    """SAVE_DIR/report.html beside results.json (call it after write_results). With --no-report (None), a
    report.html left by an earlier run in SAVE_DIR is removed: it would describe other results."""
    path = Path(save_dir) / "report.html"
    if report_images is None:
        path.unlink(missing_ok=True)
        return None
    from report import RenderedClass, write_report

    sections = [RenderedClass(c, r.extra["report_section"]) for c, r in per_class.items()
                if "report_section" in r.extra]  # fmt: skip
    return write_report(save_dir, results, sections, max_images=report_images)


# ---- end of the report hook --------------------------------------------------------------------------------------
