"""Inspect your own parts with the training-free kNN baseline: a few good images in, scores and heat maps out.

    python -m baseline.predict --reference good/ --images new/ --out runs/inspect [--threshold T]
           [--backbone efficientnet_lite0] [--image-size 256] [--device cpu]

Writes OUT/predictions.csv (image, width, height, score, decision, panel, error), OUT/threshold.json (rule, value,
leave-one-out scores of the references) and OUT/panels/<stem>.png (image | heat map | outline of the region above
the threshold), and prints a summary table. See docs/PREDICT.md.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

import numpy as np
import torch

from common.backbones import build_backbone
from common.utils import cli_entry, parse_int_list
from engine.predict_run import add_predict_arguments, run_cli

if TYPE_CHECKING:
    from baseline.knn import KNNDetector


def build_knn_detector(
    references: list[np.ndarray],
    device: torch.device | str = "cpu",
    backbone: str = "efficientnet_lite0",
    pretrained: str | None = None,
    layers: list[int] | None = None,
    image_size: int | None = None,
    metric: str = "l2",
    nn_backend: str = "auto",
) -> KNNDetector:
    """The kNN baseline as a predict detector (builder contract: engine/registry.py, detector: common/contract.py).

    Args:
        references: RGB uint8 good images (unused: the predictor calls `setup`; the signature is the registry's).
        device: torch device.
        backbone: `common.backbones` name.
        pretrained: CLIP tag/file or WRN weights file.
        layers: backbone levels (default per backbone).
        image_size: input side S (default: the backbone's); a multiple of the backbone's patch size.
        metric: `l2` or `cosine`.
        nn_backend: `auto` (faiss on CPU), `torch` or `faiss`.

    Returns:
        A `KNNDetector` on `device`; it declares its own `mean`, `std`, `image_size` and `smooth_sigma`.
    """
    from baseline.knn import KNNDetector

    model = build_backbone(backbone, pretrained, layers, torch.device(device))
    return KNNDetector(model, metric, nn_backend=nn_backend, image_size=image_size).to(device)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m baseline.predict", description=__doc__.splitlines()[0])
    add_predict_arguments(p)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--pretrained", default=None, help="CLIP tag/file or WRN weights file")
    p.add_argument("--layers", default=None, help="comma-separated backbone levels (default per backbone)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the backbone's)")
    p.add_argument("--metric", choices=("l2", "cosine"), default="l2")
    p.add_argument("--nn-backend", choices=("auto", "torch", "faiss"), default="auto")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    layers = parse_int_list(args.layers, "--layers")
    options = {
        "backbone": args.backbone,
        "pretrained": args.pretrained,
        "layers": layers,
        "image_size": args.image_size,
        "metric": args.metric,
        "nn_backend": args.nn_backend,
    }
    return run_cli(args, "knn", build_knn_detector, options)


if __name__ == "__main__":
    sys.exit(main())
