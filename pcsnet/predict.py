"""Inspect your own parts with PCSNet: a model trained on a few good images, then scores and heat maps.

    python -m pcsnet.predict --reference good/ --images new/ --out runs/inspect [--threshold T]
           [--epochs 50] [--cas-width 64] [--image-size 256] [--backbone efficientnet_lite0] [--config YAML] ...

PCSNet trains in `setup`, as main.py does per class (no checkpoint needed). The leave-one-out threshold trains one
more model per reference (k + 1 trainings in all; 3 for k = 1, which uses the mirror image as a second reference):
`--threshold T` skips those k. Outputs as `python -m baseline.predict`; see docs/PREDICT.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from common.utils import UserError, cli_entry, set_seed
from engine.predict_run import add_predict_arguments, run_cli, unify_switches

if TYPE_CHECKING:
    from pcsnet.trainer import PCSNetDetector


def build_pcsnet_detector(
    references: list[np.ndarray],
    device: torch.device | str = "cpu",
    config: str | None = None,
    backbone: str | None = None,
    pretrained: str | None = None,
    image_size: int | None = None,
    epochs: int | None = None,
    cas_width: int | None = None,
    grid_size: int | None = None,
    batch_size: int | None = None,
    aug_pool: int | None = None,
    fuse_pfa: float | None = None,
    seed: int = 0,
    progress: bool = False,
    **unknown: Any,
) -> PCSNetDetector:
    """PCSNet as a predict detector (builder contract: engine/registry.py): `setup` trains the class model.

    Args:
        references: RGB uint8 good images (unused: the predictor calls `setup`, which trains on them).
        device: torch device.
        config: PCSNet YAML (e.g. configs/pcsnet/paper.yaml); None = the dataclass defaults (CPU setting).
        backbone, pretrained, image_size, epochs, cas_width, grid_size, batch_size, aug_pool, fuse_pfa: override
            the config (None = keep it), as main.py's flags.
        seed: seed of the pseudo anomalies and the initialisation.
        progress: tqdm bar over the training epochs.

    Returns:
        A `PCSNetDetector` (it declares its own input and post-processing spec; checkpoints not saved).

    Raises:
        UserError: unknown options, an unreadable config or values the model cannot run with.
    """
    from common.backbones import build_backbone
    from pcsnet.config import load_config
    from pcsnet.trainer import PCSNetDetector

    if unknown:
        raise UserError(f"unknown PCSNet option(s): {', '.join(sorted(unknown))}")
    overrides = {
        "backbone": backbone, "pretrained": pretrained, "image_size": image_size, "epochs": epochs,
        "cas_width": cas_width, "grid_size": grid_size, "batch_size": batch_size, "aug_pool": aug_pool,
        "fuse_pfa": fuse_pfa, "save_checkpoints": False,
    }  # fmt: skip
    cfg = load_config(config, overrides)
    set_seed(seed)
    model = build_backbone(cfg.backbone, pretrained=cfg.pretrained, layers=cfg.layers, device=torch.device(device),
                           wrn_export=cfg.wrn_export)  # fmt: skip
    return PCSNetDetector(model, cfg, seed, save_dir=None, progress=progress)


def loo_cost_note(k: int, epochs: int | str) -> str:
    """What the leave-one-out threshold costs with PCSNet (k references)."""
    loo = max(k, 2)  # k = 1: the reference and its mirror image
    return (
        f"note: the leave-one-out threshold trains {loo} extra PCSNet model(s) ({loo + 1} trainings of {epochs} "
        f"epochs for {k} reference(s)); --threshold T skips them"
    )


def build_parser() -> argparse.ArgumentParser:
    from pcsnet.config import PCSNetConfig as D  # noqa: N814 - the defaults shown in the help are the dataclass's

    p = argparse.ArgumentParser(prog="python -m pcsnet.predict", description=__doc__.splitlines()[0])
    add_predict_arguments(p)
    p.add_argument("--config", metavar="YAML", default=None, help="PCSNet config, e.g. configs/pcsnet/paper.yaml")
    p.add_argument("--backbone", default=None, help="efficientnet_lite0 (default, offline) | wide_resnet50_2 (paper)")
    p.add_argument("--pretrained", default=None, help="weights file for wide_resnet50_2")
    p.add_argument("--image-size", type=int, default=None, help=f"input side in pixels (default {D.image_size})")
    p.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {D.epochs})")
    p.add_argument("--cas-width", type=int, default=None, help=f"CAS channels (default {D.cas_width}; paper 896)")
    p.add_argument("--grid-size", type=int, default=None, help="feature grid side (default image size / 8)")
    p.add_argument("--aug-pool", type=int, default=None, help="pseudo anomalies precomputed per reference")
    p.add_argument("--seed", type=int, default=0, help="pseudo anomalies and initialisation (default 0)")
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    unify_switches(args)  # --progress 0 = --quiet
    options = {
        "config": args.config,
        "backbone": args.backbone,
        "pretrained": args.pretrained,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "cas_width": args.cas_width,
        "grid_size": args.grid_size,
        "aug_pool": args.aug_pool,
        "seed": args.seed,
        "progress": not args.quiet,
    }

    def build(references: list[np.ndarray], device: torch.device, **opts: Any) -> PCSNetDetector:
        detector = build_pcsnet_detector(references, device, **opts)
        if args.threshold is None:
            print(loo_cost_note(len(references), detector.cfg.epochs))
        return detector

    build_fn: Callable[..., Any] = build
    return run_cli(args, "pcsnet", build_fn, options)


if __name__ == "__main__":
    sys.exit(main())
