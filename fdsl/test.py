"""Few-shot test of a trained FDSL head: per class, k support images -> banks -> FD/ASL/NAM (+ LFE) maps.

    python -m fdsl.test --dataset-root DIR --checkpoint FILE --k-shot K --seed S --save-dir OUT
           [--win-mode nan|mul|onlywin] [--win-size 13] [--win-stride 2] [--win-weight 0.5] [--use-nam 0|1] ...

Writes OUT/results.json (design/CONTRACT.md, plus image_score, fd_weight, use_nam, use_img_idx, memory) and
OUT/log.txt (the per-class table).
"""

from __future__ import annotations

import sys

import torch

from common import distributed
from common.backbones import align_features, build_backbone, resolve_image_size
from common.evaluation import (
    EvalConfig,
    evaluate_sharded,
    minmax_fusion,
    report_images_option,
    timing_breakdown,
    write_run_report,
)
from common.few_shot import sample_support
from common.results import build_results, format_table, write_results
from common.utils import UserError, check_output_outside, check_writable_dir, cli_entry, parse_device, resolve_workers
from data.dataset import load_images
from data.meta import load_meta
from fdsl.checkpoint import build_head, load_checkpoint, resolve_pretrained
from fdsl.config import TestConfig, build_parser, resolve_config, resolve_precision
from fdsl.detector import DetectorOptions, FDSLDetector
from fdsl.windows import WindowGeometry, check_encode_mode

# --win-zoom default. CNN: a crop encoded at its own size gives the same features as the full image (translation
# equivariance), so the crop is zoomed; 2x measured best on the demo data (see the report / README). ViT: 1, the
# original (winZipSize = win-size).
CNN_WIN_ZOOM = 2.0
# --win-encode default for CNNs: `shared` (one zoomed encode per image) measured as accurate as `crop` on the demo
# data and much faster (see the README, FDSL section). ViT: `crop`, the paper.
CNN_WIN_ENCODE = "shared"
# Training options that change the numbers, copied from the checkpoint into results.json (`train_options`).
TRAIN_SWITCHES = ("protocol", "recalibrate_bn", "precision_used", "tf32_used", "num_workers", "feature_pool",
                  "signed", "aug_rate", "use_crop", "epochs", "train_k_shot", "seed")  # fmt: skip


def check_test_config(cfg: TestConfig) -> None:
    if cfg.k_shot < 1:
        raise UserError(f"--k-shot must be at least 1 (got {cfg.k_shot})")
    report_images_option(cfg.report_images, bool(cfg.no_report))
    if not 0 <= cfg.win_weight <= 1 or not 0 <= cfg.fd_weight <= 1:
        raise UserError("--win-weight and --fd-weight must be in [0, 1]")
    resolve_workers(cfg.num_workers)  # a negative count fails before any model work
    if not 0 < cfg.coreset <= 1:
        raise UserError(f"--coreset must be in (0, 1] (got {cfg.coreset})")
    if cfg.win_zoom is not None and cfg.win_zoom <= 0:
        raise UserError(f"--win-zoom must be positive (got {cfg.win_zoom})")
    if cfg.batch_size < 1 or cfg.eval_size < 1:
        raise UserError("--batch-size and --eval-size must be at least 1")


def resolve_test_config(cfg: TestConfig, state: dict) -> dict:
    """Fill backbone / image size / NAM from the checkpoint; a NAM request without a trained NAM is an error."""
    trained = state["config"]
    cfg.backbone = cfg.backbone or state["backbone"]
    cfg.pretrained = resolve_pretrained(cfg.backbone, cfg.pretrained or trained.get("pretrained"))
    cfg.image_size = cfg.image_size or trained["image_size"]
    if cfg.use_nam is None:
        cfg.use_nam = int(state["use_nam"])
    elif cfg.use_nam and not state["use_nam"]:
        raise UserError(f"--use-nam 1 but {cfg.checkpoint} was trained without NAM (--use-nam 0)")
    return trained


def build_detector(cfg: TestConfig, state: dict, device: torch.device, meta: dict) -> tuple[FDSLDetector, object]:
    """Backbone (checked against the checkpoint), head and the window geometry."""
    trained = resolve_test_config(cfg, state)
    precision, cfg.tf32_used = resolve_precision(cfg.precision, device, cfg.tf32)
    cfg.precision_used = precision
    backbone = build_backbone(
        cfg.backbone, cfg.pretrained, trained.get("layers") or None, device, bool(trained.get("quick_gelu", 0)),
        precision,
    )
    head = build_head(state, backbone, cfg.checkpoint).to(device)
    resolve_image_size(backbone, cfg.image_size)
    with torch.inference_mode():  # the finest level's grid = the windows' grid
        probe = backbone(torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=device))
    grid = align_features(probe.features)[0].shape[-1]
    geometry = None
    cfg.win_encode = cfg.win_encode or (CNN_WIN_ENCODE if backbone.kind == "cnn" else "crop")
    check_encode_mode(cfg.win_encode, backbone.kind)
    if cfg.win_resolution == "zoomed" and cfg.win_mode != "nan" and (cfg.win_encode != "shared" or cfg.use_img_idx):
        raise UserError("--win-resolution zoomed needs --win-encode shared and --use-img-idx 0")
    if cfg.win_mode != "nan":
        zoom = cfg.win_zoom if cfg.win_zoom is not None else (CNN_WIN_ZOOM if backbone.kind == "cnn" else 1.0)
        cfg.win_zoom = zoom
        geometry = WindowGeometry(grid, cfg.win_size, cfg.win_stride, cfg.image_size // grid, zoom, cfg.win_encode)
        geometry.starts  # noqa: B018 - validates win-size / win-stride against the grid now
    opts = DetectorOptions(
        win_mode=cfg.win_mode,
        win_weight=cfg.win_weight,
        use_nam=bool(cfg.use_nam),
        win_use_nam=bool(cfg.win_use_nam),
        win_resolution=cfg.win_resolution,
        use_img_idx=bool(cfg.use_img_idx),
        img_idx_match=cfg.img_idx_match,
        map_size=(cfg.eval_size or cfg.image_size) if cfg.map_align_corners else None,
        map_align_corners=bool(cfg.map_align_corners),
        autocast=precision == "fp16",
        fd_weight=cfg.fd_weight,
        signed=bool(trained.get("signed", 0)),
        feature_pool=int(trained.get("feature_pool") or 1),
        score_from_map=cfg.image_score == "map",  # checkpoints from before the option: no pooling
        chunk_size=cfg.chunk_size,
        coreset=cfg.coreset,
    )
    window_support_fn = None
    if cfg.legacy_second_draw and geometry is not None:  # the original's second, different draw for the windows

        def window_support_fn(class_name: str) -> torch.Tensor:
            paths = sample_support(meta, class_name, cfg.k_shot, cfg.seed, draw=1)
            return load_images(cfg.dataset_root, paths, cfg.image_size, backbone.mean, backbone.std).to(device)

    return FDSLDetector(backbone, head, opts, geometry, window_support_fn), backbone


def run(cfg: TestConfig) -> dict:
    """Evaluate and write results.json / log.txt. Returns the results dict.

    Under torchrun the classes are shared out over the ranks (class i -> rank i % world size); every rank returns
    the merged results and only rank 0 writes them.
    """
    check_test_config(cfg)
    meta = load_meta(cfg.dataset_root)
    state = load_checkpoint(cfg.checkpoint)
    check_output_outside(cfg.save_dir, cfg.dataset_root, "--save-dir")
    check_writable_dir(cfg.save_dir)
    device = distributed.init(parse_device(cfg.device))
    detector, backbone = build_detector(cfg, state, device, meta)
    eval_cfg = EvalConfig(
        dataset_root=cfg.dataset_root,
        k_shot=cfg.k_shot,
        seed=cfg.seed,
        image_size=cfg.image_size,
        mean=backbone.mean,
        std=backbone.std,
        class_names=cfg.class_name,
        batch_size=cfg.batch_size,
        eval_size=cfg.eval_size,
        smooth_sigma=cfg.smooth_sigma,
        num_workers=resolve_workers(cfg.num_workers, device),
        device=device,
        class_score_fn=minmax_fusion if cfg.image_score == "paper" else None,
        vis_dir=f"{cfg.save_dir}/images" if cfg.save_images else None,
        report_images=report_images_option(cfg.report_images, bool(cfg.no_report)),
    )
    per_class, seconds, memories = evaluate_sharded(
        detector, eval_cfg, bool(cfg.progress) and distributed.is_main(), payload=lambda: detector.memory
    )
    owner = (len(per_class) - 1) % distributed.world_size()  # the rank that ran the last class
    extra = {
        "image_score": cfg.image_score
        + (" (transductive per-class min-max fusion)" if cfg.image_score == "paper" else " (per image)"),
        "fd_weight": cfg.fd_weight,
        "coreset": cfg.coreset,
        "smooth_sigma": cfg.smooth_sigma,
        "use_nam": bool(cfg.use_nam),
        "use_img_idx": bool(cfg.use_img_idx),
        "img_idx_match": cfg.img_idx_match,
        "win_use_nam": bool(cfg.win_use_nam and cfg.use_nam),  # NAM applied to the stitched window map
        "checkpoint_epoch": int(state["epoch"]),
        "protocol": cfg.protocol,
        "precision": cfg.precision_used,
        "tf32": cfg.tf32_used,
        "map_align_corners": bool(cfg.map_align_corners),
        "train_recalibrate_bn": bool(state["config"].get("recalibrate_bn", 1)),
        "train_precision": state["config"].get("precision_used", "fp32"),
        "train_options": {k: state["config"].get(k) for k in TRAIN_SWITCHES},  # None: before the option existed
        "pretrained": str(cfg.pretrained),
        "win_size": cfg.win_size,
        "win_stride": cfg.win_stride,
        "win_weight": cfg.win_weight,
        "win_zoom": cfg.win_zoom,
        "win_encode": cfg.win_encode,
        "win_resolution": cfg.win_resolution,
        "legacy_second_draw": bool(cfg.legacy_second_draw),
        "checkpoint": str(cfg.checkpoint),
        "bank_bytes": memories[owner],
    }
    results = build_results(
        "fdsl",
        cfg.dataset_root,
        cfg.k_shot,
        cfg.seed,
        cfg.backbone,
        cfg.image_size,
        {c: r.metrics for c, r in per_class.items()},
        {c: r.support for c, r in per_class.items()},
        sum(r.n_images for r in per_class.values()),
        seconds,
        win_mode=cfg.win_mode,
        extra=extra,
        timing=timing_breakdown(per_class),
    )
    notes = [
        f"image score: {extra['image_score']}; fd_weight {cfg.fd_weight}; use_nam {cfg.use_nam}; "
        f"bank bytes (last class): {memories[owner]}"
    ]
    if distributed.is_main():
        write_results(cfg.save_dir, results, notes)
        write_run_report(cfg.save_dir, results, per_class, eval_cfg.report_images)
    distributed.cleanup()
    return results


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = build_parser(TestConfig, "python -m fdsl.test", __doc__.split("\n\n")[0], "test.yaml")
    cfg = resolve_config(TestConfig, parser, argv)
    results = run(cfg)
    if not distributed.is_main():
        return 0
    print(format_table(results))
    print(f"seconds per image: {results['timing']['seconds_per_image']:.4f}; written to {cfg.save_dir}/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
