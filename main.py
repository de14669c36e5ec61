"""PCSNet few-shot anomaly detection: train one model per class on k support images, then evaluate once.

Usage (design/CONTRACT.md):
    python main.py --data-root DIR --k-shot K --seed S --save-dir OUT [--class-name all|NAME]
                   [--backbone NAME] [--image-size N] [--epochs N] [--device D]
Writes OUT/results.json, OUT/log.txt and OUT/checkpoints/<class>.pt. Settings: dataclass defaults (the CPU
setting) < `--config FILE` (e.g. configs/pcsnet/paper.yaml) < flags.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # repo root, so `common`/`pcsnet` import from anywhere

from common.utils import UserError, check_writable_dir, cli_entry, parse_device, set_seed  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The CONTRACT flags plus PCSNet's own (None = take the config's value)."""
    p = argparse.ArgumentParser(description="PCSNet (TNNLS 2024) few-shot anomaly detection: train per class, test.")
    p.add_argument("--data-root", required=True, metavar="DIR", help="dataset folder with meta.json")
    p.add_argument("--k-shot", type=int, required=True, help="support images per class (>= 1)")
    p.add_argument("--seed", type=int, default=0, help="support draw, pseudo anomalies and init (default 0)")
    p.add_argument("--save-dir", required=True, metavar="OUT", help="results.json, log.txt, checkpoints/")
    p.add_argument("--class-name", default="all", help="'all' (default) or one class name")
    p.add_argument("--backbone", help="efficientnet_lite0 (default, offline) | wide_resnet50_2 (paper)")
    p.add_argument("--pretrained", help="weights file for wide_resnet50_2 (else the local torch cache)")
    p.add_argument("--image-size", type=int, help="input side in pixels (default 256; paper 224)")
    p.add_argument("--epochs", type=int, help="training epochs per class (default 50, as the paper)")
    p.add_argument("--device", default=None, help="cpu, a CUDA index such as 0, or cuda:N (default: best available)")
    p.add_argument("--config", metavar="YAML", help="config file, e.g. configs/pcsnet/paper.yaml")
    p.add_argument("--grid-size", type=int, help="feature grid side (paper 64; default image size / 8)")
    p.add_argument("--cas-width", type=int, help="CAS channels (paper 896; default 128)")
    p.add_argument("--refresh-prototypes", type=int, help="recompute the prototypes every N epochs (0 = at init only)")
    p.add_argument("--aug-pool", type=int, help="pseudo anomalies precomputed per support image (0 = fresh per step)")
    p.add_argument("--batch-size", type=int, help="clean support images per training step (default 2)")
    p.add_argument("--pdc-mode", choices=("softmax", "bce"), help="L_PDC form (default softmax ranking)")
    p.add_argument("--fuse-pfa", type=float, help="add this weight x the PFA distance map to the CAS map (default 0)")
    p.add_argument("--vis-dir", metavar="DIR", help="write heat-map PNG panels of every test image here")
    p.add_argument("--no-checkpoints", action="store_true", help="do not write checkpoints/<class>.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def resolve_config(args: argparse.Namespace):
    """Dataclass < YAML < flags."""
    from pcsnet.config import load_config

    overrides = {
        "backbone": args.backbone, "pretrained": args.pretrained, "image_size": args.image_size,
        "epochs": args.epochs, "grid_size": args.grid_size, "cas_width": args.cas_width,
        "refresh_prototypes": args.refresh_prototypes, "aug_pool": args.aug_pool, "batch_size": args.batch_size,
        "pdc_mode": args.pdc_mode, "fuse_pfa": args.fuse_pfa,
    }  # fmt: skip
    if args.no_checkpoints:
        overrides["save_checkpoints"] = False
    return load_config(args.config, overrides)


def check_args(args: argparse.Namespace) -> None:
    if args.k_shot < 1:
        raise UserError(f"--k-shot must be at least 1, got {args.k_shot}")
    root = Path(args.data_root)
    if not root.is_dir():
        raise UserError(f"--data-root {root} is not a folder")
    if args.config and not Path(args.config).is_file():
        raise UserError(f"--config {args.config} does not exist")
    save = Path(args.save_dir).resolve()
    if save == root.resolve() or root.resolve() in save.parents:
        raise UserError(f"--save-dir {args.save_dir} is inside the dataset folder {root}; choose another folder")


def select_classes(meta: dict, class_name: str) -> list[str]:
    """The test classes to run: all of them, or the one named (UserError listing the known ones otherwise)."""
    from data.meta import class_names

    known = class_names(meta, "test")
    if class_name == "all":
        return known
    if class_name not in known:
        raise UserError(f"unknown class '{class_name}' (--class-name); known: {', '.join(known)}")
    return [class_name]


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Train and evaluate PCSNet on every selected class; write results.json and log.txt."""
    args = build_parser().parse_args(argv)
    check_args(args)
    cfg = resolve_config(args)
    device = parse_device(args.device)
    save_dir = check_writable_dir(args.save_dir)

    from common.backbones import build_backbone
    from common.evaluation import EvalConfig, evaluate
    from common.few_shot import sample_support
    from common.results import build_results, write_results
    from data.meta import load_meta
    from pcsnet.config import config_to_dict
    from pcsnet.trainer import PCSNetDetector

    meta = load_meta(args.data_root)
    classes = select_classes(meta, args.class_name)
    for name in classes:  # fail on a bad class or k before loading any weights
        sample_support(meta, name, args.k_shot, args.seed)
    set_seed(args.seed)
    backbone = build_backbone(cfg.backbone, pretrained=cfg.pretrained, layers=cfg.layers, device=device)
    detector = PCSNetDetector(
        backbone, cfg, args.seed, save_dir if cfg.save_checkpoints else None,
        support_paths=lambda name: sample_support(meta, name, args.k_shot, args.seed), progress=not args.quiet,
    )  # fmt: skip
    eval_cfg = EvalConfig(
        dataset_root=args.data_root, k_shot=args.k_shot, seed=args.seed, image_size=cfg.image_size,
        mean=backbone.mean, std=backbone.std, class_names=classes, batch_size=cfg.test_batch_size,
        smooth_sigma=cfg.smooth_sigma, device=device, vis_dir=args.vis_dir,
    )  # fmt: skip
    start = time.perf_counter()
    per_class, _ = evaluate(detector, eval_cfg, progress=not args.quiet)
    total = time.perf_counter() - start
    train_s = detector.train_seconds
    test_s = {c: r.seconds - train_s.get(c, 0.0) for c, r in per_class.items()}
    n_images = sum(r.n_images for r in per_class.values())
    extra = {"pcsnet": {
        "config": config_to_dict(cfg),
        "train_seconds": train_s,
        "test_seconds_per_image": sum(test_s.values()) / max(n_images, 1),
        "final_losses": {c: h[-1] if h else None for c, h in detector.histories.items()},
    }}  # fmt: skip
    results = build_results(
        "pcsnet", args.data_root, args.k_shot, args.seed, cfg.backbone, cfg.image_size,
        {c: r.metrics for c, r in per_class.items()}, {c: r.support for c, r in per_class.items()},
        n_images, total, extra=extra,
    )  # fmt: skip
    log = [f"{c}: train {train_s.get(c, 0.0):.1f} s, test {test_s[c] / max(per_class[c].n_images, 1):.3f} s/image"
           for c in per_class]  # fmt: skip
    write_results(save_dir, results, log)
    print(Path(save_dir, "log.txt").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
