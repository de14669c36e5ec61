"""PCSNet configuration: one dataclass, YAML files in configs/pcsnet/, command-line flags on top.

Precedence: dataclass defaults < YAML (`--config FILE`) < flags given on the command line. The dataclass defaults
are the CPU setting (efficientnet_lite0, 32x32 grid at 256 px, CAS width 64, r on the distance scale, map = CAS +
PFA distance map; the last two deviate from the paper, see docs/STATUS.md); `configs/pcsnet/paper.yaml` holds
the paper's setting (wide_resnet50_2, 224 px, 64x64 grid, CAS width 896). The resolved config is saved in every
checkpoint and in results.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from common.utils import UserError

# docs/design/pcsnet.md section 2: classes whose descriptor first halves the channels (conv-BN-ReLU x2 + conv).
ROTATION_CLASSES = ("grid", "screw", "bracket_black", "bracket_brown", "tubes")
# Reference sizes of the original code (64x64 grid): the k of the kNN prior for CAS, the top pixels of L_PDC and
# the PFENet pyramid bins are given for 4096 grid positions and are rescaled to the grid actually used.
REF_GRID = 64
PAPER_NN_CAS = 200  # docs/design/pcsnet.md section 2: S = the 200 smallest distances per pixel
PAPER_PDC_TOP = 50  # section 2: L_PDC averages the 50 largest pixel 3-NN distances
PAPER_PYRAMID_BINS = (60, 30, 15, 8)  # section 3: PFENet FEM bins on the 64 grid
PAPER_RESIZE, PAPER_CROP = 256, 224  # section 4: resize to 256, centre-crop 224 (images and masks alike)
PAPER_EVAL_EVERY = 10  # section 5: the original tests after epochs 0, 10, 20, 30, 40
REDUCE_ORDERS = ("pool_first", "reduce_first")
BN_MODES = ("eval", "train")
SELECTIONS = ("last", "best-of-evals")
CHECKPOINT_DTYPES = ("fp32", "fp16")
MIX_BATCHES = ("append", "replace_half")


@dataclass
class PCSNetConfig:
    """Every knob of a PCSNet run (paper values in comments; see docs/design/pcsnet.md)."""

    backbone: str = "efficientnet_lite0"  # paper: wide_resnet50_2
    pretrained: str | None = None  # weights file for wide_resnet50_2 (torch cache otherwise)
    layers: tuple[int, ...] = (1, 2, 3)  # paper: WRN layer1..layer3; lite0 levels 1..3 (strides 4/8/16)
    image_size: int = 256  # paper: 224 (the crop)
    resize_size: int | str | None = None  # paper "auto": resize to image_size * 256 / 224, centre-crop image_size;
    # None squashes the full frame to image_size (the CPU default)
    resample: str = "bicubic"  # image resize filter; paper "lanczos" (PIL ANTIALIAS, as the original)
    grid_size: int | None = None  # paper: 64; None = image_size // grid_stride
    grid_stride: int = 8  # used when grid_size is None: 256 px -> 32x32 (CPU cost, see the README)
    nn_cas: int | None = None  # paper 200 at 64x64; None = 200 scaled by grid^2 / 64^2
    nn_loss: int = 3  # paper: 3-NN distances in the losses
    pdc_top: int | None = None  # paper 50 at 64x64; None = scaled like nn_cas
    cas_width: int = 64  # paper: 896 (~120M parameters); 32/64/128/256 measured equal on the demo (docs/STATUS.md)
    cas_in_channels: int | None = None  # paper: 896 (the first 896 descriptor channels); None = all
    cas_dropout: float = 0.1
    rotation_classes: tuple[str, ...] = ROTATION_CLASSES
    reduce_order: str = "pool_first"  # paper "reduce_first": rotation reducer, then the 3x3 avg-pool
    prototype_bn: str = "eval"  # BN mode of the descriptor while C is computed; paper "train" (as in training)
    wrn_export: str = "relu"  # wide_resnet50_2 features: paper "leaky_relu" of the pre-activation sums
    epochs: int = 50  # paper: 50
    batch_size: int = 2  # paper: 2 clean support images per step (+ their pseudo-anomalous versions)
    lr_adaptor: float = 1e-3  # paper: descriptor and r
    lr_cas: float = 1e-3  # paper: 1e-4 (too few steps at k <= 8 for the CAS head; docs/STATUS.md)
    weight_decay: float = 1e-5
    r_init: float | str = "auto"  # paper: 1e-5; "auto" = sqrt of the mean clean support 3-NN distance at init
    r_mode: str = "log"  # paper: "linear" (r itself is trained); "log" trains log r (scale-free steps)
    alpha: float = 0.2  # paper: margin
    nu: float = 1e-3  # paper: hinge losses divided by nu
    loss_weights: tuple[float, float, float, float] = (1.0, 1.0, 50.0, 40.0)  # NFC, AFS, PDC, SEG
    pdc_mode: str = "softmax"  # softmax (the original's batch CE, a ranking loss) | bce
    mix_batch: str = "append"  # L_PDC/L_SEG batch: the B clean + their B pseudo-anomalous images (any k); paper
    # "replace_half": the B clean images with B/2 of them swapped for their pseudo-anomalous version (needs B >= 2)
    refresh_prototypes: int = 10  # paper 0 = once at init; N = recompute every N epochs (docs/STATUS.md)
    nsa_default_bounds: tuple[float, float] | None = (0.02, 0.15)  # NSA half-width bounds (lo, hi) of classes not
    # in the MVTec/MPDD tables, both axes; None = (0.03, 0.4) as the tables' large classes
    nsa_default_patches: int | None = None  # NSA patch count of classes not in the tables (None = 2)
    aug_pool: int = 8  # pseudo-anomalous variants precomputed per support image; 0 = fresh every step
    fuse_pfa: float = 1.0  # paper 0 (CAS map only); weight of the support-normalised PFA distance map added to it
    smooth_sigma: float = 4.0  # paper: gaussian sigma 4 on the map before the image score (max)
    test_batch_size: int = 8
    num_workers: int | None = None  # DataLoader workers decoding test images; None = 0 on CPU, CPUs - 1 (<= 4) on CUDA
    precision: str = "fp32"  # backbone forward: fp32, or bf16 / fp16 autocast (fp16: CUDA only)
    save_checkpoints: bool = True  # paper.yaml: False (the original saves nothing; --save-checkpoints opts in)
    checkpoint_dtype: str = "fp32"  # paper.yaml: fp16 (a 120M-parameter CAS is ~480 MB per class in fp32)
    select: str = "last"  # "best-of-evals": also test every eval_every epochs, report the best (transductive)
    eval_every: int = PAPER_EVAL_EVERY
    extra: dict = field(default_factory=dict)  # free-form notes carried into results.json

    def resolved_grid(self) -> int:
        """Side of the feature grid (docs/design/pcsnet.md section 1: 64 for the paper)."""
        return int(self.grid_size) if self.grid_size else max(1, self.image_size // self.grid_stride)

    def resolved_resize(self) -> int | None:
        """Side the images are resized to before the centre crop to image_size; None = no crop (squash)."""
        if self.resize_size == "auto":
            return max(self.image_size, round(self.image_size * PAPER_RESIZE / PAPER_CROP))
        return None if self.resize_size is None else int(self.resize_size)

    def scaled(self, reference: int, grid: int) -> int:
        """A count defined for the 64x64 grid, rescaled to `grid` x `grid` positions (at least 1)."""
        return max(1, round(reference * grid * grid / (REF_GRID * REF_GRID)))

    def _r_number_ok(self) -> bool:
        number = isinstance(self.r_init, (int, float)) and not isinstance(self.r_init, bool)
        return number and (self.r_mode == "linear" or self.r_init > 0)

    def validate(self) -> PCSNetConfig:
        """Raise UserError for values the model cannot run with."""
        checks = [
            (self.image_size >= 16, f"image size must be at least 16, got {self.image_size}"),
            (self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.cas_width >= 1, f"CAS width must be >= 1, got {self.cas_width}"),
            (self.refresh_prototypes >= 0, "refresh-prototypes must be >= 0"),
            (self.aug_pool >= 0, "aug-pool must be >= 0"),
            (self.r_mode in ("linear", "log"), f"r_mode must be linear or log, got {self.r_mode!r}"),
            (
                self.r_init == "auto" or self._r_number_ok(),
                f"r_init must be 'auto' or a number (> 0 with r_mode log), got {self.r_init!r}",
            ),
            (self.pdc_mode in ("softmax", "bce"), f"pdc_mode must be softmax or bce, got {self.pdc_mode!r}"),
            (len(self.loss_weights) == 4, "loss_weights needs 4 values (NFC, AFS, PDC, SEG)"),
            (self.nn_loss >= 1, "nn_loss must be >= 1"),
            (self.reduce_order in REDUCE_ORDERS, f"reduce_order must be one of {', '.join(REDUCE_ORDERS)}"),
            (self.prototype_bn in BN_MODES, f"prototype_bn must be one of {', '.join(BN_MODES)}"),
            (self.checkpoint_dtype in CHECKPOINT_DTYPES, f"checkpoint_dtype must be {' or '.join(CHECKPOINT_DTYPES)}"),
            (self.resample in ("bicubic", "lanczos"), f"resample must be bicubic or lanczos, got {self.resample!r}"),
            (self.mix_batch in MIX_BATCHES, f"mix_batch must be one of {', '.join(MIX_BATCHES)}"),
            (self.select in SELECTIONS, f"select must be one of {', '.join(SELECTIONS)}"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (
                self.resize_size in (None, "auto") or _int_at_least(self.resize_size, self.image_size),
                f"resize_size must be 'auto', null or a size >= the image size {self.image_size}, "
                f"got {self.resize_size!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        return self


def _int_at_least(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


_TUPLE_FIELDS = {"layers", "loss_weights", "rotation_classes", "nsa_default_bounds"}


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> PCSNetConfig:
    """Dataclass defaults, then the YAML file (if any), then `overrides` (None values are ignored).

    Raises:
        UserError: unreadable YAML or unknown keys (named).
    """
    values: dict = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise UserError(f"config {path} must be a mapping of option: value")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in dataclasses.fields(PCSNetConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UserError(f"unknown PCSNet option(s) {', '.join(unknown)}" + (f" in {path}" if path else ""))
    for key in _TUPLE_FIELDS & set(values):
        values[key] = None if values[key] is None else tuple(values[key])
    return PCSNetConfig(**values).validate()


def config_to_dict(cfg: PCSNetConfig) -> dict:
    """A JSON/YAML-friendly dict (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
