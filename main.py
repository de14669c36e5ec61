"""PCSNet few-shot anomaly detection: train one model per class on k support images, then evaluate once.

Usage (docs/design/CONTRACT.md):
    python main.py --data-root DIR --k-shot K --seed S --save-dir OUT [--class-name all|NAME]
                   [--backbone NAME] [--image-size N] [--epochs N] [--device D]
    python main.py            # the paper protocol (as the original's usage): configs/pcsnet/paper.yaml, k = 2,
                              # data from --data-root, else $MVTEC_ROOT, else ./data/mvtec; OUT = runs/pcsnet_paper
Writes OUT/results.json, OUT/log.txt and OUT/checkpoints/<class>.pt. Settings: dataclass defaults (the CPU
setting) < `--config FILE` (e.g. configs/pcsnet/paper.yaml) < flags. `--paper` is the no-argument run with flags
on top (e.g. `python main.py --paper --k-shot 8 --select best-of-evals`).
Under torchrun (`torchrun --standalone --nproc_per_node N main.py ...`) class i runs on rank i % N and rank 0
writes the merged results. `--resume` records each finished class in OUT/classes/<class>.json and skips them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from common.config import add_fields
from common.evaluation import add_report_arguments, report_images_option
from common.utils import (  # noqa: E402
    UserError,
    cli_entry,
    resolve_workers,
    set_seed,
)
from pcsnet.config import PCSNetConfig

REPO = Path(__file__).resolve().parent
PAPER_CONFIG = REPO / "configs" / "pcsnet" / "paper.yaml"
PAPER_K_SHOT = 2  # docs/design/pcsnet.md section 4: the original hard-codes k = 2
PAPER_SAVE_DIR = "runs/pcsnet_paper"
PAPER_DATA_ROOT = "./data/mvtec"
# The PCSNet options that are flags of main.py (`--image-size`, ...; generated from the PCSNetConfig fields, with
# their help and default); every option, these included, is also a YAML key and a `--set KEY=VALUE`.
FLAG_FIELDS = ("backbone", "pretrained", "image_size", "epochs", "grid_size", "cas_width", "refresh_prototypes",
               "aug_pool", "batch_size", "pdc_mode", "fuse_pfa", "knn_weight", "knn_levels", "num_workers",
               "precision", "select")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The CONTRACT flags plus PCSNet's own (None = take the config's value)."""
    p = argparse.ArgumentParser(description="PCSNet (TNNLS 2024) few-shot anomaly detection: train per class, test.")
    p.add_argument("--data-root", "--dataset-root", dest="data_root", metavar="DIR",
                   help="dataset folder with meta.json (required, except in paper mode)")  # fmt: skip
    p.add_argument("--k-shot", type=int, help="support images per class (>= 1; required, except in paper mode: 2)")
    p.add_argument("--seed", type=int, default=0, help="support draw, pseudo anomalies and init (default 0)")
    p.add_argument("--save-dir", metavar="OUT",
                   help=f"results.json, log.txt, checkpoints/ (required, except in paper mode: {PAPER_SAVE_DIR})")
    p.add_argument("--paper", action="store_true",
                   help="the paper protocol, as `python main.py` with no arguments: --config configs/pcsnet/paper.yaml"
                   f", k {PAPER_K_SHOT}, data root $MVTEC_ROOT or {PAPER_DATA_ROOT}, save dir {PAPER_SAVE_DIR}")
    p.add_argument("--class-name", default="all", help="'all' (default) or one class name")
    p.add_argument("--device", default=None, help="cpu, a CUDA index such as 0, or cuda:N (default: best available)")
    p.add_argument("--config", metavar="YAML", help="config file, e.g. configs/pcsnet/paper.yaml")
    add_fields(p, PCSNetConfig, FLAG_FIELDS)  # unset flags stay out of the namespace: the config's value holds
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any PCSNet config option (YAML value), e.g. --set lr_cas=0.001; repeatable")  # fmt: skip
    p.add_argument("--vis-dir", metavar="DIR", help="write heat-map PNG panels of every test image here")
    p.add_argument("--vis", nargs="?", type=int, const=1, default=0, choices=(0, 1),
                   help="heat-map panels under SAVE_DIR/vis (as baseline.knn; a bare --vis = --vis 1)")
    p.add_argument("--no-checkpoints", action="store_true", help="do not write checkpoints/<class>.pt")
    p.add_argument("--save-checkpoints", action="store_true",
                   help="write checkpoints/<class>.pt where the config does not (paper.yaml: off, fp16 when on)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--resume",
        action="store_true",
        help="record each finished class in OUT/classes/<class>.json and skip the classes recorded there by an "
        "earlier run with the same options (refuses records from other options)",
    )
    add_report_arguments(p)
    return p


def resolve_config(args: argparse.Namespace):
    """Dataclass < YAML < flags."""
    import yaml

    from pcsnet.config import load_config

    overrides = {name: getattr(args, name) for name in FLAG_FIELDS if hasattr(args, name)}
    if args.no_checkpoints and args.save_checkpoints:
        raise UserError("--no-checkpoints and --save-checkpoints contradict each other; give one")
    if args.no_checkpoints or args.save_checkpoints:
        overrides["save_checkpoints"] = args.save_checkpoints
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-3 as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        overrides[key.strip().replace("-", "_")] = parsed
    return load_config(args.config, overrides)


def apply_paper_defaults(args: argparse.Namespace) -> None:
    """Paper mode (`python main.py` alone, or --paper): fill what the original's usage leaves out; say what ran."""
    if not args.paper:
        return
    if args.config is None:
        args.config = str(PAPER_CONFIG)
    if args.data_root is None:
        args.data_root = os.environ.get("MVTEC_ROOT") or PAPER_DATA_ROOT
        args.data_root_source = "$MVTEC_ROOT" if os.environ.get("MVTEC_ROOT") else "default"
    if args.k_shot is None:
        args.k_shot = PAPER_K_SHOT
    if args.save_dir is None:
        args.save_dir = PAPER_SAVE_DIR
    print(f"paper protocol: config {args.config}, data {args.data_root}, k {args.k_shot}, seed {args.seed}, "
          f"classes {args.class_name}, results in {args.save_dir}", flush=True)  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    for flag, value in (("--data-root", args.data_root), ("--k-shot", args.k_shot), ("--save-dir", args.save_dir)):
        if value is None:
            raise UserError(f"{flag} is required (or run `python main.py` with no arguments, or --paper, for the "
                            "paper protocol)")  # fmt: skip
    if args.k_shot < 1:
        raise UserError(f"--k-shot must be at least 1, got {args.k_shot}")
    report_images_option(args.report_images, args.no_report)
    resolve_workers(getattr(args, "num_workers", None))  # a negative count fails here, before any model work
    root = Path(args.data_root)
    if not root.is_dir():
        if getattr(args, "data_root_source", None):
            where = "$MVTEC_ROOT" if args.data_root_source == "$MVTEC_ROOT" else f"the default {PAPER_DATA_ROOT}"
            raise UserError(f"no dataset at {root} ({where}): put MVTec AD there and run `python data/mvtec.py "
                            f"--root {root}`, or set MVTEC_ROOT / pass --data-root DIR")  # fmt: skip
        raise UserError(f"--data-root {root} is not a folder")
    if args.config and not Path(args.config).is_file():
        raise UserError(f"--config {args.config} does not exist")
    save = Path(args.save_dir).resolve()
    if save == root.resolve() or root.resolve() in save.parents:
        raise UserError(f"--save-dir {args.save_dir} is inside the dataset folder {root}; choose another folder")


def run_extra(cfg, reports: dict[str, dict], per_class: dict, log: list[str]) -> dict:
    """results.json's `pcsnet` block (and `best_of_evals` with --select best-of-evals); fills `log` (log.txt)."""
    from pcsnet.config import config_to_dict

    train_s = {c: reports[c]["train_seconds"] for c in per_class}
    test_s = {c: r.seconds - (train_s[c] or 0.0) for c, r in per_class.items()}
    n_images = sum(r.n_images for r in per_class.values())
    extra = {"pcsnet": {
        "config": config_to_dict(cfg),
        "train_seconds": train_s,
        "test_seconds_per_image": sum(test_s.values()) / max(n_images, 1),
        "final_losses": {c: reports[c].get("final_loss") for c in per_class},
    }}  # fmt: skip
    log += [f"{c}: train {train_s[c] or 0.0:.1f} s, test {test_s[c] / max(r.n_images, 1):.3f} s/image"
            for c, r in per_class.items()]  # fmt: skip
    if cfg.select == "best-of-evals":
        from pcsnet.selection import results_block

        evals = {c: reports[c]["evals"] for c in per_class if reports[c].get("evals") is not None}
        extra["best_of_evals"] = results_block(evals, list(per_class))  # beside, never instead of, the last epoch's
        best = extra["best_of_evals"]["mean"]
        log.append("best-of-evals (TRANSDUCTIVE, picked on the test set, as the original reports): "
                   + ", ".join(f"{k} {v:.4f}" for k, v in best.items() if v is not None))  # fmt: skip
    return extra


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Train and evaluate PCSNet on every selected class; write results.json and log.txt."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.paper = args.paper or not argv  # no arguments at all: the original's `python main.py`
    apply_paper_defaults(args)
    check_args(args)
    cfg = resolve_config(args)
    if cfg.backbone == "wide_resnet50_2":
        from common.backbones import wrn_weights_path

        wrn_weights_path(cfg.pretrained)  # missing weights: one line before any folder or model work
    import torch

    from common import distributed
    from common.backbones import build_backbone
    from common.few_shot import sample_support
    from engine.loop import EvalConfig
    from engine.runner import EvalRequest, run_eval
    from pcsnet.config import config_to_dict
    from pcsnet.trainer import PCSNetDetector

    def build(device: torch.device, meta: dict) -> PCSNetDetector:
        set_seed(args.seed)
        backbone = build_backbone(cfg.backbone, pretrained=cfg.pretrained, layers=cfg.layers, device=device,
                                  precision=cfg.precision, wrn_export=cfg.wrn_export)  # fmt: skip
        detector = PCSNetDetector(
            backbone, cfg, args.seed, Path(args.save_dir) if cfg.save_checkpoints else None,
            support_paths=lambda name: sample_support(meta, name, args.k_shot, args.seed),
            progress=not args.quiet and distributed.is_main(),
        )  # fmt: skip
        if cfg.select == "best-of-evals":
            from pcsnet.selection import BestOfEvals

            # the intermediate passes score through a snapshot of the model, so the spec is given here
            detector.on_eval = BestOfEvals(detector, EvalConfig(
                dataset_root=args.data_root, k_shot=args.k_shot, seed=args.seed, image_size=cfg.image_size,
                mean=backbone.mean, std=backbone.std, batch_size=cfg.test_batch_size,
                num_workers=resolve_workers(cfg.num_workers, device), smooth_sigma=cfg.smooth_sigma, device=device,
                resize_size=cfg.resolved_resize(), resample=cfg.resample,
            ))  # fmt: skip
        return detector

    request = EvalRequest(
        "pcsnet", args.data_root, args.k_shot, args.seed, args.save_dir,
        class_names=None if args.class_name == "all" else [args.class_name], batch_size=cfg.test_batch_size,
        num_workers=cfg.num_workers, device=args.device, progress=not args.quiet,
        vis_dir=args.vis_dir or (f"{args.save_dir}/vis" if args.vis else None),
        resume=args.resume, report_images=report_images_option(args.report_images, args.no_report),
    )  # fmt: skip
    log: list[str] = []
    options = {k: v for k, v in config_to_dict(cfg).items() if k != "save_checkpoints"}  # the --resume key
    run_eval(request, build, backbone=cfg.backbone, options=options, merge_last_report=False,
             extra=lambda _, reports, per_class: run_extra(cfg, reports, per_class, log), notes=lambda _: log,
             eval_fields={"resize_size": cfg.resolved_resize(), "resample": cfg.resample})  # fmt: skip
    if distributed.is_main():
        print(Path(args.save_dir, "log.txt").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
