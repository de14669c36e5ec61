"""FDSL configuration: dataclass defaults (the paper's), overridden by a YAML file, overridden by CLI flags.

Every dataclass field is a flag (`win_size` -> `--win-size`); the help text comes from the field's metadata.
Binary switches are 0/1 integers, as in the original scripts (`--use-nam 1`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from common.utils import PRECISIONS, UserError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "fdsl"
# FDSL code (train.py / trainAndTest.sh, fdsl.md section 5): optimiser, batch, training bank, augmentation.
ADAM_LR = 1e-3
ADAM_BETAS = (0.5, 0.999)
TRAIN_K_SHOT = 10
MOSAIC_RATE = 0.3
TRAIN_SEED = 111
EVAL_SIZE = 240  # calImage_size: maps and masks are compared at 240 px
PAPER_BACKBONE = "ViT-L-14-336"
# `auto`: fp16 autocast on CUDA, fp32 elsewhere: the original trains and tests under torch.cuda.amp.autocast.
FDSL_PRECISIONS = (*PRECISIONS, "auto")
PROTOCOLS = ("ours", "paper")  # a label: configs/fdsl/paper_*.yaml set `paper` together with the paper's switches


def _opt(default: Any, help: str, **extra: Any) -> Any:  # noqa: A002 - argparse's name
    """A dataclass field carrying its CLI help (and optional choices / nargs / required)."""
    meta = {"help": help, **extra}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    dataset_root: str = _opt("", "auxiliary dataset (its TEST split with masks is the training data)", required=True)
    save_dir: str = _opt("", "output folder for epoch_<E>.pth, last.pth, config.json", required=True)
    backbone: str = _opt(PAPER_BACKBONE, "backbone name (common.backbones): open_clip name, efficientnet_lite0, ...")
    pretrained: str | None = _opt(None, "CLIP tag or weights file (default: openai for open_clip models)")
    layers: list[int] | None = _opt(None, "backbone levels (ViT: 1-based blocks; CNN: level indices)", nargs="+")
    quick_gelu: int = _opt(0, "CLIP with QuickGELU (VAND/FDSL ran nn.GELU: 0)", choices=(0, 1))
    feature_pool: int | None = _opt(
        None,
        "local average pooling of each level before FD (default 1 = none, as the paper; 3 measured worse on CNNs)",
        choices=(1, 3, 5),
    )
    image_size: int | None = _opt(None, "input size (default: the backbone's, 518 for ViT-L-14-336)")
    epochs: int = _opt(5, "epochs (paper: 5 with MVTec as auxiliary data, 11 with VisA)")
    batch_size: int = _opt(8, "batch size")
    lr: float = _opt(ADAM_LR, "Adam learning rate (betas 0.5, 0.999)")
    use_nam: int = _opt(1, "Neighbor Aggregation Module (original useConvRes)", choices=(0, 1))
    signed: int = _opt(0, "signed deviation f - n instead of |f - n| (original useAbs=0)", choices=(0, 1))
    aug_rate: float = _opt(MOSAIC_RATE, "probability of the 2x2 same-class mosaic (paper: 0.3 on MVTec)")
    use_crop: int = _opt(0, "zoom-crop augmentation (paper: 1 on VisA), done in tensor space", choices=(0, 1))
    train_k_shot: int = _opt(TRAIN_K_SHOT, "normal training images per class in the training bank")
    seed: int = _opt(TRAIN_SEED, "random seed (original setup_seed(111))")
    device: str | None = _opt(None, "cpu or a CUDA index such as 0 (default: CUDA if available)")
    recalibrate_bn: int = _opt(
        1,
        "after each epoch, recompute BatchNorm statistics over the un-augmented training "
        "set (not in the original; needed when there are few steps)",
        choices=(0, 1),
    )
    precision: str = _opt(
        "fp32", "frozen backbone precision: fp32, bf16 / fp16 autocast, or auto = fp16 on CUDA, fp32 on CPU (paper)",
        choices=FDSL_PRECISIONS,
    )
    tf32: int = _opt(0, "allow TF32 matmuls/convolutions where fp32 runs on CUDA (paper mode: 1)", choices=(0, 1))
    protocol: str = _opt("ours", "label recorded in config.json (paper_*.yaml set paper)", choices=PROTOCOLS)
    cache_mb: int = _opt(2048, "RAM budget (MiB) for caching FD features of un-augmented images")
    num_workers: int | None = _opt(
        None, "DataLoader workers decoding and augmenting training images (default: 0 on CPU, up to 4 on CUDA)"
    )
    progress: int = _opt(1, "tqdm progress bar", choices=(0, 1))
    resume: int = _opt(
        0,
        "continue from the newest complete checkpoint in SAVE_DIR (model, optimiser, RNG states, epoch); a bare "
        "--resume means 1; starts afresh when there is none; refuses one written with other options",
        choices=(0, 1),
        nargs="?",
        const=1,
    )


@dataclass
class TestConfig:
    dataset_root: str = _opt("", "test dataset root (meta.json)", required=True)
    checkpoint: str = _opt("", "FDSL checkpoint (epoch_<E>.pth or last.pth)", required=True)
    k_shot: int = _opt(0, "support images per class", required=True)
    seed: int = _opt(0, "seed of the support draw", required=True)
    save_dir: str = _opt("", "output folder for results.json and log.txt", required=True)
    backbone: str | None = _opt(None, "backbone (default: the checkpoint's; must match it)")
    pretrained: str | None = _opt(None, "CLIP tag or weights file (default: the checkpoint's)")
    image_size: int | None = _opt(None, "input size (default: the checkpoint's)")
    precision: str = _opt(
        "fp32", "backbone forward precision: fp32, bf16 / fp16 autocast (fp16: CUDA only), or auto = fp16 on CUDA, "
        "fp32 on CPU (paper)",
        choices=FDSL_PRECISIONS,
    )
    tf32: int = _opt(0, "allow TF32 matmuls/convolutions where fp32 runs on CUDA (paper mode: 1)", choices=(0, 1))
    protocol: str = _opt("ours", "label recorded in results.json (paper_test.yaml sets paper)", choices=PROTOCOLS)
    map_align_corners: int = _opt(
        0, "upsample the test maps to --eval-size with align_corners=True, as the original (paper mode: 1)",
        choices=(0, 1),
    )
    win_mode: str = _opt(
        "nan", "LFE: nan = off, mul = blend with windows, onlywin = windows only", choices=("nan", "mul", "onlywin")
    )
    win_size: int = _opt(13, "window side in cells of the finest feature grid")
    win_stride: int = _opt(2, "window stride in cells (a last window flush with the border is added)")
    win_weight: float = _opt(0.5, "w: final = (1 - w) * main + w * windows, on maps and image scores")
    win_zoom: float | None = _opt(
        None,
        "resize each crop by this factor before encoding (default: 1 for ViT, "
        "2 for CNNs, whose crops add nothing at their own size)",
    )
    win_encode: str | None = _opt(
        None,
        "LFE window features: crop = encode every zoomed crop (the paper); shared = encode the zoomed image once "
        "and cut the windows from its features (CNN only; default: shared for CNNs, crop for ViTs)",
        choices=("crop", "shared"),
    )
    win_use_nam: int = _opt(1, "NAM on the stitched window map (original winuseConvRes)", choices=(0, 1))
    win_resolution: str = _opt(
        "grid",
        "LFE window map: grid = each window resized back to the main grid (the original's geometry); zoomed = kept at "
        "the zoomed grid (ours, --win-encode shared only: the windows add resolution for small defects)",
        choices=("grid", "zoomed"),
    )
    use_nam: int | None = _opt(None, "use the NAM outputs (default: as trained)", choices=(0, 1))
    use_img_idx: int = _opt(0, "image feature index memory bank for the windows", choices=(0, 1))
    img_idx_match: str = _opt(
        "pooled",
        "with --use-img-idx 1: pooled = every query window's tokens are matched against the pooled tokens of all the "
        "selected reference windows (the original); own = each query window only against its own selected window",
        choices=("pooled", "own"),
    )
    fd_weight: float = _opt(0.0, "blend a in (1 - a) * ASL + a * mean_l(1 - max cos); 0 = original code")
    coreset: float = _opt(
        1.0,
        "fraction of reference patches kept in the FD banks (greedy k-center, as PatchCore); 1 = all (exact, the "
        "paper). Less is faster and approximate; not used with --use-img-idx 1",
    )
    image_score: str = _opt(
        "paper",
        "paper = 0.5 * (score + per-class min-max of map maxima), TRANSDUCTIVE (uses "
        "the whole test set of the class); max = the image's own score (mean over levels of each level map's "
        "maximum); map = the maximum of the final map after upsampling and smoothing (as the kNN baseline)",
        choices=("paper", "max", "map"),
    )
    legacy_second_draw: int = _opt(0, "window bank from a second support draw, as the original", choices=(0, 1))
    smooth_sigma: float = _opt(
        0.0, "gaussian sigma (px) on the upsampled map before metrics; 0 = original, the kNN baseline / PatchCore use 4"
    )
    eval_size: int = _opt(EVAL_SIZE, "resolution of the pixel metrics (original calImage_size 240)")
    batch_size: int = _opt(8, "test batch size")
    class_name: list[str] | None = _opt(None, "classes to test (default: all)", nargs="+")
    save_images: int = _opt(0, "write heat-map PNG panels under SAVE_DIR/images", choices=(0, 1))
    chunk_size: int = _opt(4096, "query rows per similarity matmul")
    device: str | None = _opt(None, "cpu or a CUDA index such as 0 (default: CUDA if available)")
    num_workers: int | None = _opt(None, "DataLoader workers decoding test images (default: 0 on CPU, up to 4 on CUDA)")
    progress: int = _opt(1, "tqdm progress bars", choices=(0, 1))
    report_images: int = _opt(6, "SAVE_DIR/report.html: example images per group and class; 0 = curves and tables")
    no_report: int = _opt(0, "do not write SAVE_DIR/report.html (a bare --no-report means 1)", choices=(0, 1),
                          nargs="?", const=1)  # fmt: skip


def _arg_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    for name, kind in (("int", int), ("float", float)):
        if text.startswith(name) or text.startswith(f"list[{name}"):
            return kind
    return str


def build_parser(cls: type, prog: str, description: str, default_config: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per dataclass field; unspecified flags are left out of the namespace."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config",
        default=str(CONFIG_DIR / default_config),
        help="YAML file of defaults (flags override it; it overrides the built-in defaults)",
    )
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        shown = "required" if meta.pop("required", False) else f"default: {default}"
        help_text = f"{meta.pop('help')} ({shown})".replace("%", "%%")
        parser.add_argument(
            "--" + f.name.replace("_", "-"), type=_arg_type(f), default=argparse.SUPPRESS, help=help_text, **meta
        )
    return parser


def _read_yaml(path: Path, cls: type, explicit: bool) -> dict:
    if not path.is_file():
        if explicit:
            raise UserError(f"config file {path} does not exist")
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must be a mapping of option: value")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"config file {path}: unknown option(s) {', '.join(unknown)}")
    return data


def resolve_config(cls: type, parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """Parse argv and merge dataclass defaults <- YAML <- flags. Missing required options are a UserError."""
    args = vars(parser.parse_args(argv))
    config_path = Path(args.pop("config"))
    explicit = config_path != Path(parser.get_default("config"))
    values = {**_read_yaml(config_path, cls, explicit), **args}
    try:
        cfg = cls(**values)
    except TypeError as exc:
        raise UserError(f"bad configuration: {exc}") from exc
    for f in dataclasses.fields(cls):
        if f.metadata.get("required") and getattr(cfg, f.name) in ("", 0, None) and f.name not in values:
            raise UserError(f"missing required option --{f.name.replace('_', '-')}")
    return cfg


def resolve_precision(precision: str, device, tf32: int) -> tuple[str, bool]:
    """The backbone precision to run (`auto` -> fp16 on CUDA, fp32 elsewhere) and whether TF32 is on.

    TF32 (`tf32` 1) is switched on for this process's CUDA matmuls and convolutions; it only applies on CUDA.
    """
    import torch

    cuda = torch.device(device).type == "cuda"
    used = ("fp16" if cuda else "fp32") if precision == "auto" else precision
    if tf32 and cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return used, bool(tf32 and cuda)
