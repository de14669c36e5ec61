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
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from common import config
from common.backbones import CNN_NAMES
from common.utils import UserError, cli_entry
from fdsl.config import TestConfig

if TYPE_CHECKING:
    from fdsl.detector import FDSLDetector

# The TestConfig fields a predict run takes (defaults, help and choices are TestConfig's: one source).
PREDICT_FIELDS = ("checkpoint", "image_score", "win_mode", "win_size", "win_stride", "win_weight", "win_zoom",
                  "win_encode", "win_use_nam", "use_nam", "use_img_idx", "fd_weight", "map_norm", "fd_match",
                  "knn_weight", "knn_layers", "coreset", "backbone", "pretrained", "image_size", "precision",
                  "smooth_sigma", "eval_size", "chunk_size")  # fmt: skip
# Where predict differs from fdsl.test: no test set, so no transductive `paper` fusion: each image's own score.
PREDICT_DEFAULTS = {"image_score": None}  # None: `map` for CNN backbones (fdsl.test's default), `max` for ViTs
PREDICT_IMAGE_SCORES = ("max", "map")
# The demo head (the default before the dev benchmark's broad head, fdsl.checkpoint.SHIPPED_HEAD; kept for the
# seconds-long registry runs and tests): trained on the demo `surfaces` set with efficientnet_lite0 at 256 px.
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "weights" / "demo_efficientnet_lite0.pth"


def build_fdsl_detector(
    references: list[np.ndarray], device: torch.device | str = "cpu", **options: Any
) -> FDSLDetector:
    """FDSL as a predict detector (builder contract: engine/registry.py), built exactly as `python -m fdsl.test` does.

    Args:
        references: RGB uint8 good images (unused: the predictor calls `setup`; the signature is the registry's).
        device: torch device.
        **options: any of `PREDICT_FIELDS`, with fdsl.test's meaning and defaults (fdsl/config.py TestConfig),
            except `image_score` (default `max`; `paper` needs a whole test set). `checkpoint` None = the shipped
            head (efficientnet_lite0 only, `fdsl.checkpoint.SHIPPED_HEAD`). The map is post-processed as in fdsl.test
            (upsampled to `eval_size`, smoothed with `smooth_sigma`), so predict and test give the same maps.

    Returns:
        An `FDSLDetector`; it declares its own input and post-processing spec (common/contract.py).

    Raises:
        UserError: no/missing/unreadable/incompatible checkpoint, bad option values or unknown options.
    """
    from fdsl.checkpoint import default_checkpoint, load_checkpoint
    from fdsl.test import build_detector, check_test_config

    unknown = sorted(set(options) - set(PREDICT_FIELDS))
    if unknown:
        raise UserError(f"unknown FDSL option(s): {', '.join(unknown)}")
    values = {**PREDICT_DEFAULTS, **options}
    values["checkpoint"] = default_checkpoint(values.get("checkpoint"), values.get("backbone"))
    if values["image_score"] not in (*PREDICT_IMAGE_SCORES, None):
        raise UserError(f"--image-score must be max or map, got {values['image_score']!r}")
    cfg = TestConfig(**values, k_shot=1, progress=0)
    config.check_choices(cfg)
    check_test_config(cfg)
    state = load_checkpoint(cfg.checkpoint)
    if cfg.image_score is None and (cfg.backbone or state["backbone"]) not in CNN_NAMES:
        cfg = dataclasses.replace(cfg, image_score="max")  # no test set: the ViT default cannot be `paper`
    try:
        detector, _, _ = build_detector(cfg, state, torch.device(device), meta={})
    except ValueError as exc:  # window geometry that does not fit the grid
        raise UserError(f"FDSL options do not fit: {exc}") from exc
    return detector


def build_parser() -> argparse.ArgumentParser:
    from engine.predict_run import add_predict_arguments

    p = argparse.ArgumentParser(prog="python -m fdsl.predict", description=__doc__.splitlines()[0])
    add_predict_arguments(p)
    helps = {
        "checkpoint": "FDSL checkpoint from python -m fdsl.train (default: the shipped efficientnet_lite0 head, "
        "fdsl/weights/devbench_efficientnet_lite0.pth)",
        "image_score": "max = FDSL's own score; map = the maximum of the smoothed map (default: map for CNN "
        "backbones, max for ViT backbones)",
    }
    config.add_fields(p, TestConfig, PREDICT_FIELDS, PREDICT_DEFAULTS, helps)
    for action in p._actions:  # no test set in a predict run: the transductive `paper` fusion is not offered
        if action.dest == "image_score":
            action.choices = PREDICT_IMAGE_SCORES
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from engine.predict_run import PREDICT_FLAGS, run_cli
    from fdsl.checkpoint import default_checkpoint

    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k not in PREDICT_FLAGS}
    given["checkpoint"] = default_checkpoint(given.get("checkpoint"), given.get("backbone"))
    resolved = TestConfig(**{**PREDICT_DEFAULTS, **given}, k_shot=1)  # every option, for threshold.json
    options = {name: getattr(resolved, name) for name in PREDICT_FIELDS}
    return run_cli(args, "fdsl", build_fdsl_detector, options)


if __name__ == "__main__":
    sys.exit(main())
