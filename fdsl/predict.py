"""Inspect your own parts with a trained FDSL head: a few good images in, scores and heat maps out.

    python -m fdsl.predict --reference good/ --images new/ --out runs/inspect --checkpoint last.pth
           [--win-mode nan|mul|onlywin] [--win-size 13] [--win-stride 2] [--win-weight 0.5] [--fd-weight 0]
           [--backbone NAME] [--pretrained TAG] [--image-size N] [--threshold T] [--device cpu] ...

The head comes from `python -m fdsl.train`; backbone, weights and image size default to the checkpoint's. The
image score is each image's own FDSL score (fdsl.test's `--image-score max`): the `paper` fusion is a per-class
min-max over a whole test set, which a predict run does not have. Outputs as `python -m baseline.predict`
(OUT/predictions.csv, OUT/threshold.json, OUT/panels/); see docs/PREDICT.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from common.anomaly_map import GAUSSIAN_SIGMA
from common.predict_run import add_predict_arguments, run_cli
from common.utils import UserError, cli_entry

if TYPE_CHECKING:
    from fdsl.detector import FDSLDetector

WIN_MODES = ("nan", "mul", "onlywin")
# The head that ships with the package: trained on the demo `surfaces` set (skimage brick/grass/gravel with
# synthetic defects, no textile images) with efficientnet_lite0 at 256 px; the command is in docs/PREDICT.md.
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "demo_efficientnet_lite0.pth"
DEMO_BACKBONE = "efficientnet_lite0"


def default_checkpoint(checkpoint: str | None, backbone: str | None) -> str:
    """The checkpoint to use: the given one, else the shipped demo head for efficientnet_lite0."""
    if checkpoint:
        return str(checkpoint)
    if backbone in (None, DEMO_BACKBONE) and DEMO_CHECKPOINT.is_file():
        return str(DEMO_CHECKPOINT)
    raise UserError(
        "FDSL needs a checkpoint: --checkpoint FILE written by python -m fdsl.train (the shipped demo head "
        f"{DEMO_CHECKPOINT.name} only fits --backbone {DEMO_BACKBONE})"
    )


def build_fdsl_detector(
    references: list[np.ndarray],
    device: torch.device | str = "cpu",
    checkpoint: str | None = None,
    win_mode: str = "nan",
    win_size: int = 13,
    win_stride: int = 2,
    win_weight: float = 0.5,
    win_zoom: float | None = None,
    win_encode: str | None = None,
    win_use_nam: int = 1,
    use_nam: int | None = None,
    use_img_idx: int = 0,
    fd_weight: float = 0.0,
    backbone: str | None = None,
    pretrained: str | None = None,
    image_size: int | None = None,
    smooth_sigma: float = GAUSSIAN_SIGMA,
    chunk_size: int = 4096,
    image_score: str = "max",
    **unknown: Any,
) -> FDSLDetector:
    """FDSL as a predict detector (builder contract in common/predict.py), built as `python -m fdsl.test` does.

    Args:
        references: RGB uint8 good images (unused here: the banks are filled by `setup`).
        device: torch device.
        checkpoint: FDSL checkpoint written by `python -m fdsl.train`; None = the shipped demo head
            (efficientnet_lite0 only, `DEMO_CHECKPOINT`).
        win_mode: LFE windows: `nan` (off), `mul` (blend) or `onlywin`.
        win_size, win_stride, win_weight, win_zoom, win_encode, win_use_nam, use_img_idx: window options (see
            fdsl.test; win_encode None = shared for CNNs, crop for ViTs).
        use_nam: use the NAM outputs (None = as trained).
        fd_weight: a in (1 - a) * ASL + a * training-free FD map.
        backbone, pretrained, image_size: default to the checkpoint's; the backbone must match it.
        smooth_sigma: gaussian sigma (px) on the upsampled map (panels and outline; the score is FDSL's own).
        chunk_size: query rows per similarity matmul.
        image_score: `max` = FDSL's own score (mean over levels of the level maps' maxima); `map` = the
            maximum of the smoothed final map.

    Returns:
        An `FDSLDetector` with `mean`, `std`, `image_size` and `smooth_sigma` attributes.

    Raises:
        UserError: no/missing/unreadable/incompatible checkpoint, bad option values or unknown options.
    """
    from fdsl.checkpoint import load_checkpoint
    from fdsl.config import TestConfig
    from fdsl.test import build_detector, check_test_config

    del references
    if unknown:
        raise UserError(f"unknown FDSL option(s): {', '.join(sorted(unknown))}")
    checkpoint = default_checkpoint(checkpoint, backbone)
    if image_score not in ("max", "map"):
        raise UserError(f"--image-score must be max or map, got {image_score!r}")
    if win_mode not in WIN_MODES:
        raise UserError(f"--win-mode must be one of {', '.join(WIN_MODES)}, got {win_mode!r}")
    if smooth_sigma < 0:
        raise UserError(f"--smooth-sigma must be >= 0, got {smooth_sigma}")
    cfg = TestConfig(
        checkpoint=str(checkpoint), backbone=backbone, pretrained=pretrained, image_size=image_size,
        win_mode=win_mode, win_size=win_size, win_stride=win_stride, win_weight=win_weight, win_zoom=win_zoom,
        win_encode=win_encode, win_use_nam=int(win_use_nam), use_nam=use_nam, use_img_idx=int(use_img_idx),
        fd_weight=fd_weight, image_score=image_score, smooth_sigma=smooth_sigma, chunk_size=chunk_size, k_shot=1,
        progress=0,
    )  # fmt: skip
    check_test_config(cfg)
    state = load_checkpoint(cfg.checkpoint)
    try:
        detector, model = build_detector(cfg, state, torch.device(device), meta={})
    except ValueError as exc:  # window geometry that does not fit the grid
        raise UserError(f"FDSL options do not fit: {exc}") from exc
    detector.mean, detector.std, detector.image_size = model.mean, model.std, int(cfg.image_size)
    detector.smooth_sigma = float(smooth_sigma)
    return detector


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fdsl.predict", description=__doc__.splitlines()[0])
    add_predict_arguments(p)
    p.add_argument(
        "--checkpoint",
        default=None,
        help="FDSL checkpoint from python -m fdsl.train (default: the shipped efficientnet_lite0 demo head)",
    )
    p.add_argument(
        "--image-score",
        choices=("max", "map"),
        default="max",
        help="max = FDSL's own score; map = the maximum of the smoothed map",
    )
    p.add_argument("--win-mode", choices=WIN_MODES, default="nan", help="LFE windows: off, blend, windows only")
    p.add_argument("--win-size", type=int, default=13, help="window side in cells of the finest feature grid")
    p.add_argument("--win-stride", type=int, default=2, help="window stride in cells")
    p.add_argument("--win-weight", type=float, default=0.5, help="w: (1 - w) * main + w * windows")
    p.add_argument("--win-zoom", type=float, default=None, help="crop zoom (default: 1 for ViT, 2 for CNNs)")
    p.add_argument(
        "--win-encode",
        choices=("crop", "shared"),
        default=None,
        help="window features: encode every crop, or cut from one zoomed encode (CNN only; default: shared for CNNs)",
    )
    p.add_argument("--use-nam", type=int, choices=(0, 1), default=None, help="NAM outputs (default: as trained)")
    p.add_argument("--fd-weight", type=float, default=0.0, help="a in (1 - a) * ASL + a * FD (default 0)")
    p.add_argument("--backbone", default=None, help="default: the checkpoint's (must match it)")
    p.add_argument("--pretrained", default=None, help="CLIP tag or weights file (default: the checkpoint's)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the checkpoint's)")
    p.add_argument("--smooth-sigma", type=float, default=GAUSSIAN_SIGMA, help="gaussian sigma (px) on the map")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = {
        "checkpoint": default_checkpoint(args.checkpoint, args.backbone),
        "image_score": args.image_score,
        "win_mode": args.win_mode,
        "win_size": args.win_size,
        "win_stride": args.win_stride,
        "win_weight": args.win_weight,
        "win_zoom": args.win_zoom,
        "win_encode": args.win_encode,
        "use_nam": args.use_nam,
        "fd_weight": args.fd_weight,
        "backbone": args.backbone,
        "pretrained": args.pretrained,
        "image_size": args.image_size,
        "smooth_sigma": args.smooth_sigma,
    }
    return run_cli(args, "fdsl", build_fdsl_detector, options)


if __name__ == "__main__":
    sys.exit(main())
