"""Training-free nearest-neighbour baseline (PatchCore-style few-shot, no coreset).

Patch features of the k support images form a bank; a test patch's anomaly score is its distance to the nearest
bank patch; the map is upsampled, smoothed (sigma 4) and its maximum is the image score.

    python -m baseline.knn --dataset-root demo_data/surfaces --k-shot 4 --seed 0 --save-dir runs/knn
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from common import config
from common.anomaly_map import GAUSSIAN_SIGMA
from common.backbones import build_backbone, resolve_image_size
from common.contract import DetectorOutput, require_setup
from common.evaluation import DEFAULT_REPORT_IMAGES, report_images_option
from common.memory_bank import MemoryBank
from common.patch_knn import knn_embed
from common.utils import PRECISIONS, UserError, cli_entry, parse_int_list, set_seed

_opt = config.option


@dataclass
class KNNConfig:
    """`python -m baseline.knn` options (flags and `--config FILE` are generated from these fields)."""

    dataset_root: str = _opt("", "MVTec-layout dataset with meta.json", required=True, aliases=("--data-root",))
    k_shot: int = _opt(0, "support images per class", required=True)
    seed: int = _opt(0, "seed of the support draw")
    save_dir: str = _opt("", "output folder for results.json and log.txt", required=True)
    class_name: str = _opt("all", "'all' or a comma-separated list of classes")
    backbone: str = _opt("efficientnet_lite0", "backbone name (common.backbones)")
    pretrained: str | None = _opt(None, "CLIP tag/file or WRN weights file")
    layers: str | None = _opt(None, "comma-separated backbone levels (default per backbone)")
    grid_stride: int | None = _opt(None, "stride (px) of the map's grid; levels finer than it are area-averaged onto "
                                   "it (default: the finest level's stride)")  # fmt: skip
    image_size: int | None = _opt(None, "input size (default: the backbone's)")
    metric: str = _opt("l2", "patch distance: l2 (PatchCore) or cosine (AnomalyDINO)", choices=("l2", "cosine"))
    nn_backend: str = _opt("auto", "auto: faiss on CPU (faster here), torch on CUDA",
                           choices=("auto", "torch", "faiss"))  # fmt: skip
    coreset: float = _opt(1.0, "fraction of support patches kept in the bank, greedy k-center as PatchCore (1.0 = all, "
                          "exact)")  # fmt: skip
    smooth_sigma: float = _opt(GAUSSIAN_SIGMA, "gaussian sigma (px) on the upsampled map before the metrics and the "
                               "image score, its maximum (PatchCore: 4)")  # fmt: skip
    batch_size: int = _opt(16, "test batch size")
    num_workers: int | None = _opt(None, "DataLoader workers decoding test images (default: 0 on CPU, up to 4 on CUDA)")
    device: str = _opt("cpu", "cpu, a CUDA index (0) or cuda:N")
    precision: str = _opt("fp32", "backbone forward: fp32, or bf16 / fp16 autocast (fp16: CUDA only)",
                          choices=PRECISIONS)  # fmt: skip
    vis: int = _opt(0, "save image | heat-map panels under SAVE_DIR/vis", choices=(0, 1))
    progress: int = _opt(1, "progress bars", choices=(0, 1), off_flag="--quiet")
    resume: int = _opt(0, "record each finished class in SAVE_DIR/classes/ and skip the ones an earlier run with the "
                       "same options recorded", choices=(0, 1))  # fmt: skip
    report_images: int = _opt(DEFAULT_REPORT_IMAGES, "SAVE_DIR/report.html: example images per group and class "
                              "(worst normals, worst anomalies; 0 = curves and tables only)")  # fmt: skip
    no_report: int = _opt(0, "do not write SAVE_DIR/report.html (and remove one an earlier run left there)",
                          choices=(0, 1))  # fmt: skip


class KNNDetector(nn.Module):
    """Nearest-neighbour patch scorer over a frozen backbone.

    Args:
        backbone: a `common.backbones.Backbone`.
        metric: `l2` (PatchCore) or `cosine` (AnomalyDINO).
        pool: size of the local average pooling that gives each patch its neighbourhood (PatchCore: 3).
        nn_backend: `auto`, `torch` or `faiss`.
        coreset: fraction of the support patches kept in the bank by greedy k-center selection (PatchCore);
            1.0 keeps them all (exact nearest-neighbour search).
        smooth_sigma: gaussian sigma (px) of the post-processing (PatchCore: 4).
        image_size: input side S (default: the backbone's); a multiple of its patch size.
        grid_stride: the map's grid is S / grid_stride (finer levels area-averaged onto it; `knn_embed`); default
            the finest level's grid.
    """

    eval_size = None  # metrics at the input size
    score_fusion = None  # the image score is the map maximum, per image

    def __init__(
        self,
        backbone: nn.Module,
        metric: str = "l2",
        pool: int = 3,
        nn_backend: str = "auto",
        coreset: float = 1.0,
        image_size: int | None = None,
        smooth_sigma: float = GAUSSIAN_SIGMA,
        grid_stride: int | None = None,
    ):
        super().__init__()
        self.grid_stride = grid_stride
        self.smooth_sigma = float(smooth_sigma)  # PatchCore's gaussian on the upsampled map
        self.backbone, self.pool, self.coreset, self.metric = backbone, pool, coreset, metric
        self.bank = MemoryBank(metric=metric, backend=nn_backend)
        self.class_name: str | None = None
        self.mean, self.std = backbone.mean, backbone.std
        self.image_size = resolve_image_size(backbone, image_size)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, h, w, C) locally pooled, level-concatenated patch features."""
        size = None if self.grid_stride is None else (images.shape[-2] // self.grid_stride,
                                                      images.shape[-1] // self.grid_stride)  # fmt: skip
        return knn_embed(self.backbone(images).features, self.pool, size)

    @torch.inference_mode()
    def setup(self, class_name: str, support_images: torch.Tensor) -> None:
        """Fill the bank with every patch of the support images: (k, 3, H, W) -> (k*h*w, C)."""
        self.class_name = class_name
        self.bank.fit(self.embed(support_images).flatten(0, 2), coreset_ratio=self.coreset)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> DetectorOutput:
        """(B, 3, H, W) -> (None, (B, h, w) distance map); the image score is taken from the smoothed map."""
        require_setup(self.class_name is not None, type(self).__name__)
        emb = self.embed(images)
        b, h, w, c = emb.shape
        dist, _ = self.bank.search(emb.reshape(-1, c), k=1)
        return DetectorOutput(None, dist.reshape(b, h, w))

    def report(self) -> dict:
        """results.json extras: the distance, the coreset fraction and the bank's size."""
        return {"metric": self.metric, "coreset": self.coreset, "bank_bytes": self.bank.nbytes}


def check_config(cfg: KNNConfig) -> None:
    if cfg.smooth_sigma < 0:
        raise UserError(f"--smooth-sigma must be >= 0 (got {cfg.smooth_sigma:g})")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {cfg.batch_size})")
    if not 0.0 < cfg.coreset <= 1.0:
        raise UserError(f"--coreset must be in (0, 1] (got {cfg.coreset})")
    if cfg.image_size is not None and cfg.image_size < 1:
        raise UserError(f"--image-size must be positive (got {cfg.image_size})")
    if cfg.grid_stride is not None and cfg.grid_stride < 1:
        raise UserError(f"--grid-stride must be positive (got {cfg.grid_stride})")


def build_parser():
    return config.build_parser(KNNConfig, "python -m baseline.knn", __doc__.splitlines()[0], default_config="")


@cli_entry
def main(argv: list[str] | None = None) -> int:
    from engine.runner import print_summary, request_from, run_eval

    cfg = config.resolve_config(KNNConfig, build_parser(), argv)
    check_config(cfg)
    layers = parse_int_list(cfg.layers, "--layers")
    classes = None if cfg.class_name == "all" else cfg.class_name.split(",")

    def build(device: torch.device, meta: dict) -> KNNDetector:
        set_seed(cfg.seed)
        backbone = build_backbone(cfg.backbone, cfg.pretrained, layers, device, precision=cfg.precision)
        return KNNDetector(backbone, cfg.metric, nn_backend=cfg.nn_backend, coreset=cfg.coreset,
                           image_size=cfg.image_size, smooth_sigma=cfg.smooth_sigma,
                           grid_stride=cfg.grid_stride)  # fmt: skip

    request = request_from(cfg, "knn", class_names=classes, progress=bool(cfg.progress), resume=bool(cfg.resume),
                           vis_dir=f"{cfg.save_dir}/vis" if cfg.vis else None,
                           report_images=report_images_option(cfg.report_images, bool(cfg.no_report)))  # fmt: skip
    results = run_eval(request, build, backbone=cfg.backbone, options=asdict(cfg))
    print_summary(results, cfg.save_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
