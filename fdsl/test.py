"""Few-shot test of a trained FDSL head: per class, k support images -> banks -> FD/ASL/NAM (+ LFE) maps.

    python -m fdsl.test --dataset-root DIR --checkpoint FILE --k-shot K --seed S --save-dir OUT
           [--win-mode nan|mul|onlywin] [--win-size 13] [--win-stride 2] [--win-weight 0.5] [--use-nam 0|1] ...

Writes OUT/results.json (docs/design/CONTRACT.md, plus image_score, fd_weight, use_nam, use_img_idx, memory) and
OUT/log.txt (the per-class table).
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from common import distributed
from common.backbones import CNN_NAMES, LITE_NAMES, Backbone, align_features, build_backbone, resolve_image_size
from common.contract import minmax_fusion
from common.evaluation import report_images_option
from common.few_shot import sample_support
from common.results import format_table
from common.utils import UserError, cli_entry, parse_int_list, resolve_workers
from data.dataset import load_images
from fdsl.checkpoint import build_head, default_checkpoint, load_checkpoint, resolve_pretrained
from fdsl.config import (
    CNN_FD_MATCH,
    CNN_FD_WEIGHT,
    CNN_IMAGE_SCORE,
    CNN_KNN_LAYERS,
    CNN_KNN_WEIGHT,
    CNN_MAP_NORM,
    CNN_SMOOTH_SIGMA,
    TestConfig,
    build_parser,
    resolve_config,
    resolve_precision,
)
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
                  "input_norm", "fd_match", "signed", "aug_rate", "use_crop", "epochs", "train_k_shot",
                  "seed")  # fmt: skip


def check_test_config(cfg: TestConfig) -> None:
    if cfg.k_shot < 1:
        raise UserError(f"--k-shot must be at least 1 (got {cfg.k_shot})")
    report_images_option(cfg.report_images, bool(cfg.no_report))
    if not 0 <= cfg.win_weight <= 1 or not 0 <= (0 if cfg.fd_weight is None else cfg.fd_weight) <= 1:
        raise UserError("--win-weight and --fd-weight must be in [0, 1]")
    resolve_workers(cfg.num_workers)  # a negative count fails before any model work
    if not 0 < cfg.coreset <= 1:
        raise UserError(f"--coreset must be in (0, 1] (got {cfg.coreset})")
    if cfg.win_zoom is not None and cfg.win_zoom <= 0:
        raise UserError(f"--win-zoom must be positive (got {cfg.win_zoom})")
    if cfg.smooth_sigma is not None and cfg.smooth_sigma < 0:
        raise UserError(f"--smooth-sigma must be >= 0, got {cfg.smooth_sigma}")
    if cfg.batch_size < 1 or cfg.eval_size < 1:
        raise UserError("--batch-size and --eval-size must be at least 1")


def resolve_test_config(cfg: TestConfig, state: dict) -> TestConfig:
    """A new config with backbone / weights / image size / NAM filled from the checkpoint (`cfg` is not changed).

    Raises:
        UserError: a NAM request (`--use-nam 1`) for a checkpoint trained without NAM.
    """
    trained = state["config"]
    backbone = cfg.backbone or state["backbone"]
    cnn = backbone in CNN_NAMES
    if cfg.use_nam and not state["use_nam"]:
        raise UserError(f"--use-nam 1 but {cfg.checkpoint} was trained without NAM (--use-nam 0)")
    cfg = dataclasses.replace(
        cfg,
        backbone=backbone,
        pretrained=resolve_pretrained(backbone, cfg.pretrained or trained.get("pretrained")),
        image_size=cfg.image_size or trained["image_size"],
        use_nam=int(state["use_nam"]) if cfg.use_nam is None else cfg.use_nam,
        fd_weight=cfg.fd_weight if cfg.fd_weight is not None else (CNN_FD_WEIGHT if cnn else 0.0),
        map_norm=cfg.map_norm or (CNN_MAP_NORM if cnn else "none"),
        fd_match=cfg.fd_match or (CNN_FD_MATCH if cnn else "level"),
        image_score=cfg.image_score or (CNN_IMAGE_SCORE if cnn else "paper"),
        smooth_sigma=cfg.smooth_sigma if cfg.smooth_sigma is not None else (CNN_SMOOTH_SIGMA if cnn else 0.0),
    )
    if cfg.knn_weight is None:  # the kNN term blends z-scores: on by default only where the maps are standardised
        cfg = dataclasses.replace(cfg, knn_weight=CNN_KNN_WEIGHT if cnn and cfg.map_norm == "support" else 0.0)
    return cfg  # an explicit --knn-weight is checked by the detector (build_detector: one-line error)


def resolve_knn_layers(text: str | None, backbone: Backbone) -> tuple[int, ...]:
    """`--knn-layers` -> backbone levels of the kNN term (`own`: FDSL's; `finer`: plus the level below its finest,
    efficientnet_lite only; default `finer` there, else `own`)."""
    own = tuple(backbone.layers)
    text = text or (CNN_KNN_LAYERS if backbone.name in LITE_NAMES else "own")
    if text == "own":
        return own
    if text == "finer":
        if backbone.name not in LITE_NAMES:
            raise UserError(f"--knn-layers finer needs an efficientnet_lite backbone (got {backbone.name}); use own")
        return own if min(own) == 0 else (min(own) - 1, *own)
    levels = tuple(parse_int_list(text, "--knn-layers"))
    if len(set(levels)) != len(levels):
        raise UserError(f"--knn-layers {text!r} repeats a level")
    return levels


def build_detector(
    cfg: TestConfig, state: dict, device: torch.device, meta: dict
) -> tuple[FDSLDetector, TestConfig, dict]:
    """Backbone (checked against the checkpoint), head and window geometry; returns the detector, the fully
    resolved config (checkpoint values, and window defaults that depend on the backbone kind; `cfg` is unchanged)
    and what this device runs: `{"precision": fp32|bf16|fp16, "tf32": bool}` (`--precision auto` resolved)."""
    cfg = resolve_test_config(cfg, state)
    trained = state["config"]
    precision, tf32_used = resolve_precision(cfg.precision, device, cfg.tf32)
    runtime = {"precision": precision, "tf32": tf32_used}
    backbone = build_backbone(
        cfg.backbone, cfg.pretrained, trained.get("layers") or None, device, bool(trained.get("quick_gelu", 0)),
        precision,
    )
    head = build_head(state, backbone, cfg.checkpoint).to(device)
    resolve_image_size(backbone, cfg.image_size)
    knn_layers = resolve_knn_layers(cfg.knn_layers, backbone) if cfg.knn_weight > 0 else ()
    cfg = dataclasses.replace(cfg, knn_layers=",".join(map(str, knn_layers)) or None)
    with torch.inference_mode():  # the finest level's grid = the windows' grid
        probe = backbone(torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=device))
    grid = align_features(probe.features)[0].shape[-1]
    geometry = None
    cfg = dataclasses.replace(cfg, win_encode=cfg.win_encode or (CNN_WIN_ENCODE if backbone.kind == "cnn" else "crop"))
    check_encode_mode(cfg.win_encode, backbone.kind)
    if cfg.win_resolution == "zoomed" and cfg.win_mode != "nan" and (cfg.win_encode != "shared" or cfg.use_img_idx):
        raise UserError("--win-resolution zoomed needs --win-encode shared and --use-img-idx 0")
    if cfg.win_mode != "nan":
        zoom = cfg.win_zoom if cfg.win_zoom is not None else (CNN_WIN_ZOOM if backbone.kind == "cnn" else 1.0)
        cfg = dataclasses.replace(cfg, win_zoom=zoom)
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
        map_norm=cfg.map_norm,
        fd_match=cfg.fd_match,
        knn_weight=cfg.knn_weight,
        knn_layers=knn_layers,
        input_norm=trained.get("input_norm") or "none",  # checkpoints from before the option: none
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

    try:
        detector = FDSLDetector(
            backbone, head, opts, geometry, window_support_fn, image_size=cfg.image_size,
            smooth_sigma=cfg.smooth_sigma, eval_size=cfg.eval_size,
            score_fusion=minmax_fusion if cfg.image_score == "paper" else None,
        )  # fmt: skip
    except ValueError as exc:  # options the detector cannot combine (e.g. calibration with crop-encoded windows)
        raise UserError(str(exc)) from exc
    return detector, cfg, runtime


def results_extra(cfg: TestConfig, state: dict, runtime: dict) -> dict:
    """results.json keys of FDSL known from the resolved config, the checkpoint and the resolved precision (the
    detector's report adds bank_bytes)."""
    return {
        "image_score": cfg.image_score
        + (" (transductive per-class min-max fusion)" if cfg.image_score == "paper" else " (per image)"),
        "fd_weight": cfg.fd_weight,
        "map_norm": cfg.map_norm,
        "fd_match": cfg.fd_match,
        "knn_weight": cfg.knn_weight,
        "knn_layers": cfg.knn_layers,  # backbone levels of the kNN term (None: no term)
        "input_norm": state["config"].get("input_norm") or "none",
        "coreset": cfg.coreset,
        "smooth_sigma": cfg.smooth_sigma,
        "use_nam": bool(cfg.use_nam),
        "use_img_idx": bool(cfg.use_img_idx),
        "img_idx_match": cfg.img_idx_match,
        "win_use_nam": bool(cfg.win_use_nam and cfg.use_nam),  # NAM applied to the stitched window map
        "checkpoint_epoch": int(state["epoch"]),
        "protocol": cfg.protocol,
        "precision": runtime["precision"],
        "tf32": runtime["tf32"],
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
    }


def run(cfg: TestConfig) -> dict:
    """Evaluate and write results.json / log.txt. Returns the results dict (the input `cfg` is not changed).

    Under torchrun the classes are shared out over the ranks (class i -> rank i % world size); every rank returns
    the merged results and only rank 0 writes them.
    """
    from engine.runner import request_from, run_eval

    check_test_config(cfg)
    cfg = dataclasses.replace(cfg, checkpoint=default_checkpoint(cfg.checkpoint, cfg.backbone))
    state = load_checkpoint(cfg.checkpoint)
    resolved = resolve_test_config(cfg, state)  # backbone-independent values, for the request and resume key
    built: list[tuple[TestConfig, dict]] = []

    def build(device: torch.device, meta: dict) -> FDSLDetector:
        detector, final, runtime = build_detector(cfg, state, device, meta)
        built.append((final, runtime))
        return detector

    def notes(results: dict) -> list[str]:
        return [f"image score: {results['image_score']}; fd_weight {built[0][0].fd_weight}; "
                f"use_nam {built[0][0].use_nam}; "
                f"bank bytes (last class): {results['bank_bytes']}"]  # fmt: skip

    request = request_from(resolved, "fdsl", class_names=cfg.class_name, progress=bool(cfg.progress),
                           vis_dir=f"{cfg.save_dir}/images" if cfg.save_images else None,
                           report_images=report_images_option(cfg.report_images, bool(cfg.no_report)))  # fmt: skip
    return run_eval(request, build, backbone=lambda _: built[0][0].backbone,
                    extra=lambda *_: results_extra(built[0][0], state, built[0][1]), win_mode=cfg.win_mode,
                    options=dataclasses.asdict(resolved), notes=notes)  # fmt: skip


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
