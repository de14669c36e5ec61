"""Training-free nearest-neighbour baseline (PatchCore-style few-shot, no coreset).

Patch features of the k support images form a bank; a test patch's anomaly score is its distance to the nearest
bank patch; the map is upsampled, smoothed (sigma 4) and its maximum is the image score.

    python -m baseline.knn --dataset-root demo_data/surfaces --k-shot 4 --seed 0 --save-dir runs/knn
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.anomaly_map import GAUSSIAN_SIGMA
from common.backbones import align_features, build_backbone, resolve_image_size
from common.evaluation import (
    EvalConfig,
    add_report_arguments,
    check_eval_inputs,
    evaluate,
    report_images_option,
    timing_breakdown,
    write_run_report,
)
from common.memory_bank import MemoryBank
from common.results import build_results, format_table, write_results
from common.utils import (
    PRECISIONS,
    UserError,
    check_output_outside,
    check_writable_dir,
    cli_entry,
    parse_device,
    parse_int_list,
    resolve_workers,
    set_seed,
)
from data.meta import load_meta


class KNNDetector(nn.Module):
    """Nearest-neighbour patch scorer over a frozen backbone.

    Args:
        backbone: a `common.backbones.Backbone`.
        metric: `l2` (PatchCore) or `cosine` (AnomalyDINO).
        pool: size of the local average pooling that gives each patch its neighbourhood (PatchCore: 3).
        nn_backend: `auto`, `torch` or `faiss`.
        coreset: fraction of the support patches kept in the bank by greedy k-center selection (PatchCore);
            1.0 keeps them all (exact nearest-neighbour search).
    """

    def __init__(
        self, backbone: nn.Module, metric: str = "l2", pool: int = 3, nn_backend: str = "auto", coreset: float = 1.0
    ):
        super().__init__()
        self.backbone, self.pool, self.coreset = backbone, pool, coreset
        self.bank = MemoryBank(metric=metric, backend=nn_backend)
        self.class_name: str | None = None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, h, w, C) locally pooled, level-concatenated patch features."""
        features = self.backbone(images).features
        if self.pool > 1:
            features = [F.avg_pool2d(f, self.pool, stride=1, padding=self.pool // 2) for f in features]
        return torch.cat(align_features(features), dim=1).permute(0, 2, 3, 1).float()

    @torch.inference_mode()
    def setup(self, class_name: str, support_images: torch.Tensor) -> None:
        """Fill the bank with every patch of the support images: (k, 3, H, W) -> (k*h*w, C)."""
        self.class_name = class_name
        self.bank.fit(self.embed(support_images).flatten(0, 2), coreset_ratio=self.coreset)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> tuple[None, torch.Tensor]:
        """(B, 3, H, W) -> (None, (B, h, w) distance map); the image score is taken from the smoothed map."""
        emb = self.embed(images)
        b, h, w, c = emb.shape
        dist, _ = self.bank.search(emb.reshape(-1, c), k=1)
        return None, dist.reshape(b, h, w)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m baseline.knn", description=__doc__.splitlines()[0])
    p.add_argument("--dataset-root", required=True, help="MVTec-layout dataset with meta.json")
    p.add_argument("--k-shot", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dir", required=True)
    p.add_argument("--class-name", default="all", help="'all' or a comma-separated list of classes")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--pretrained", default=None, help="CLIP tag/file or WRN weights file")
    p.add_argument("--layers", default=None, help="comma-separated backbone levels (default per backbone)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: the backbone's)")
    p.add_argument("--metric", choices=("l2", "cosine"), default="l2")
    p.add_argument(
        "--nn-backend",
        choices=("auto", "torch", "faiss"),
        default="auto",
        help="auto: faiss on CPU (faster here), torch on CUDA",
    )
    p.add_argument(
        "--coreset",
        type=float,
        default=1.0,
        help="fraction of support patches kept in the bank, greedy k-center as PatchCore (default 1.0 = all, exact)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers decoding test images (default: 0 on CPU, up to 4 on CUDA)")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="backbone forward: fp32, or bf16 / fp16 autocast (fp16: CUDA only)")  # fmt: skip
    p.add_argument("--vis", action="store_true", help="save image | heat-map panels under SAVE_DIR/vis")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_report_arguments(p)
    return p


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {args.batch_size})")
    if not 0.0 < args.coreset <= 1.0:
        raise UserError(f"--coreset must be in (0, 1] (got {args.coreset})")
    if args.image_size is not None and args.image_size < 1:
        raise UserError(f"--image-size must be positive (got {args.image_size})")
    report_images = report_images_option(args.report_images, args.no_report)
    device = parse_device(args.device)
    workers = resolve_workers(args.num_workers, device)
    layers = parse_int_list(args.layers, "--layers")
    # every input check before the backbone loads: the dataset, the classes and their support draws, the output
    classes = None if args.class_name == "all" else args.class_name.split(",")
    meta = load_meta(args.dataset_root)
    check_eval_inputs(meta, args.dataset_root, classes, args.k_shot, args.seed)
    check_output_outside(args.save_dir, args.dataset_root, "--save-dir")
    check_writable_dir(args.save_dir)
    set_seed(args.seed)
    backbone = build_backbone(args.backbone, args.pretrained, layers, device, precision=args.precision)
    size = resolve_image_size(backbone, args.image_size)
    detector = KNNDetector(backbone, args.metric, nn_backend=args.nn_backend, coreset=args.coreset)
    cfg = EvalConfig(
        args.dataset_root, args.k_shot, args.seed, size, backbone.mean, backbone.std, classes,
        batch_size=args.batch_size, smooth_sigma=GAUSSIAN_SIGMA, device=device, num_workers=workers,
        vis_dir=f"{args.save_dir}/vis" if args.vis else None, report_images=report_images,
    )  # fmt: skip
    per_class, seconds = evaluate(detector, cfg, progress=not args.quiet)
    results = build_results(
        "knn", args.dataset_root, args.k_shot, args.seed, args.backbone, size,
        {c: r.metrics for c, r in per_class.items()}, {c: r.support for c, r in per_class.items()},
        sum(r.n_images for r in per_class.values()), seconds,
        extra={"metric": args.metric, "coreset": args.coreset, "bank_bytes": detector.bank.nbytes},
        timing=timing_breakdown(per_class),
    )  # fmt: skip
    write_results(args.save_dir, results)
    report = write_run_report(args.save_dir, results, per_class, report_images)
    print(format_table(results))
    print(f"results: {args.save_dir}/results.json  ({results['timing']['seconds_per_image']:.3f} s/image)"
          + (f"  report: {report}" if report else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
