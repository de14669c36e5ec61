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
from typing import Any

from common import config
from common.utils import PRECISIONS, UserError

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
RESAMPLES = ("bicubic", "lanczos")
R_MODES = ("linear", "log")
PDC_MODES = ("softmax", "bce")


def _opt(default: Any, help: str, **extra: Any) -> Any:  # noqa: A002 - argparse's name
    """`common.config.option`, but a tuple default stays a tuple (the resolved config and checkpoints keep tuples)."""
    if isinstance(default, tuple):
        return field(default=default, metadata={"help": help, **extra})
    return config.option(default, help, **extra)


@dataclass
class PCSNetConfig:
    """Every knob of a PCSNet run (paper values in the help; see docs/design/pcsnet.md). The fields in
    `main.FLAG_FIELDS` are command-line flags; every field is a YAML key and a `--set KEY=VALUE`."""

    backbone: str = _opt("efficientnet_lite0", "backbone: efficientnet_lite0 (offline) | wide_resnet50_2 (paper)")
    pretrained: str | None = _opt(None, "weights file for wide_resnet50_2 (else the local torch cache); 'random' = "
                                  "the architecture with random weights (tests, timing; said loudly)")  # fmt: skip
    layers: tuple[int, ...] = _opt((1, 2, 3), "backbone levels; paper: WRN layer1..layer3; lite0 levels 1..3 "
                                   "(strides 4/8/16)")  # fmt: skip
    image_size: int = _opt(256, "input side in pixels (paper: 224, the crop)")
    resize_size: int | str | None = _opt(None, "'auto' (paper): resize to image_size * 256 / 224, centre-crop "
                                         "image_size; null squashes the full frame to image_size")  # fmt: skip
    resample: str = _opt("bicubic", "image resize filter; paper lanczos (PIL ANTIALIAS, as the original)",
                         choices=RESAMPLES)  # fmt: skip
    grid_size: int | None = _opt(None, "feature grid side (paper 64); None = image size / grid_stride")
    grid_stride: int = _opt(8, "used when grid_size is None: 256 px -> 32x32 (CPU cost, see the README)")
    nn_cas: int | None = _opt(None, "k of the kNN prior for CAS (paper 200 at 64x64); None = 200 scaled by grid^2 / "
                              "64^2")  # fmt: skip
    nn_loss: int = _opt(3, "k of the k-NN distances in the losses (paper 3)")
    pdc_top: int | None = _opt(None, "pixels averaged by L_PDC (paper 50 at 64x64); None = scaled like nn_cas")
    cas_width: int = _opt(64, "CAS channels (paper 896, ~120M parameters; 32/64/128/256 measured equal on the demo, "
                          "docs/STATUS.md)")  # fmt: skip
    cas_in_channels: int | None = _opt(None, "descriptor channels fed to CAS (paper 896, the first 896); None = all")
    cas_dropout: float = _opt(0.1, "CAS dropout")
    rotation_classes: tuple[str, ...] = _opt(ROTATION_CLASSES, "classes whose descriptor first halves the channels")
    reduce_order: str = _opt("pool_first", "paper reduce_first: rotation reducer, then the 3x3 avg-pool",
                             choices=REDUCE_ORDERS)  # fmt: skip
    prototype_bn: str = _opt("eval", "BN mode of the descriptor while the prototypes are computed; paper train (as in "
                             "training)", choices=BN_MODES)  # fmt: skip
    wrn_export: str = _opt("relu", "wide_resnet50_2 features: paper leaky_relu of the pre-activation sums")
    epochs: int = _opt(50, "training epochs per class (paper 50)")
    batch_size: int = _opt(2, "clean support images per training step, plus their pseudo-anomalous versions (paper 2)")
    lr_adaptor: float = _opt(1e-3, "learning rate of the descriptor and r (paper 1e-3)")
    lr_cas: float = _opt(1e-3, "CAS learning rate (paper 1e-4: too few steps at k <= 8 for the CAS head; "
                         "docs/STATUS.md)")  # fmt: skip
    weight_decay: float = _opt(1e-5, "weight decay")
    r_init: float | str = _opt("auto", "initial radius r (paper 1e-5); auto = sqrt of the mean clean support 3-NN "
                               "distance at init")  # fmt: skip
    r_mode: str = _opt("log", "paper linear (r itself is trained); log trains log r (scale-free steps)",
                       choices=R_MODES)  # fmt: skip
    alpha: float = _opt(0.2, "margin alpha (paper 0.2)")
    nu: float = _opt(1e-3, "hinge losses divided by nu (paper 1e-3)")
    loss_weights: tuple[float, float, float, float] = _opt((1.0, 1.0, 50.0, 40.0), "NFC, AFS, PDC, SEG loss weights")
    pdc_mode: str = _opt("softmax", "L_PDC form: softmax (the original's batch CE, a ranking loss) | bce",
                         choices=PDC_MODES)  # fmt: skip
    mix_batch: str = _opt("append", "L_PDC/L_SEG batch: append = the B clean + their B pseudo-anomalous images "
                          "(any k); paper replace_half = B/2 of the B clean images swapped for their "
                          "pseudo-anomalous version (needs B >= 2)", choices=MIX_BATCHES)  # fmt: skip
    refresh_prototypes: int = _opt(10, "recompute the prototypes every N epochs (paper 0 = at init only; "
                                   "docs/STATUS.md)")  # fmt: skip
    nsa_default_bounds: tuple[float, float] | None = _opt((0.02, 0.15), "NSA half-width bounds (lo, hi) of classes not "
                                                          "in the MVTec/MPDD tables, both axes; None = (0.03, 0.4) as "
                                                          "the tables' large classes")  # fmt: skip
    nsa_default_patches: int | None = _opt(None, "NSA patch count of classes not in the tables (None = 2)")
    pseudo_anomalies: str = _opt("mixed", "nsa (the paper) | mixed: half NSA, half common.pseudo_anomaly's kinds "
                                 "(ours; chosen on the dev benchmark)", choices=("nsa", "mixed"))  # fmt: skip
    aug_pool: int = _opt(8, "pseudo anomalies precomputed per support image (0 = fresh every step)")
    pfa_bank: str = _opt("prototypes", "what the fused PFA map measures against: prototypes (per-position means of "
                         "the adapted support, as the paper's PFA) | support (every adapted support patch; ours)",
                         choices=("prototypes", "support"))  # fmt: skip
    fuse_pfa: float = _opt(1.0, "weight x the support-normalised PFA distance map added to the CAS map (paper 0)")
    knn_weight: float = _opt(0.5, "weight x the kNN baseline's distance map (3 x 3 pooled levels, euclidean, same "
                             "backbone pass; common/patch_knn.py), normalised by its leave-one-out maximum on the "
                             "support, added to the map (ours, chosen on the dev benchmark; paper 0)")  # fmt: skip
    knn_levels: str = _opt("all", "levels of the kNN term: all = every PCSNet level, finer ones area-averaged onto "
                           "the grid (ours, chosen on the dev benchmark, session 7) | baseline = the kNN baseline's "
                           "(lite0: 2 and 3; session 6)", choices=("baseline", "all"))  # fmt: skip
    smooth_sigma: float = _opt(2.0, "gaussian sigma on the map before the image score, its max (ours: 2, chosen on the "
                               "dev benchmark, session 7; paper 4)")  # fmt: skip
    test_batch_size: int = _opt(8, "test batch size")
    num_workers: int | None = _opt(None, "DataLoader workers decoding test images; None = 0 on CPU, CPUs - 1 (<= 4) "
                                   "on CUDA")  # fmt: skip
    precision: str = _opt("fp32", "backbone forward: fp32, or bf16 / fp16 autocast (fp16: CUDA only)",
                          choices=PRECISIONS)  # fmt: skip
    save_checkpoints: bool = _opt(True, "write checkpoints/<class>.pt (paper.yaml: false, as the original saves "
                                  "nothing)")  # fmt: skip
    checkpoint_dtype: str = _opt("fp32", "checkpoint weights dtype (paper.yaml: fp16; a 120M-parameter CAS is "
                                 "~480 MB per class in fp32)", choices=CHECKPOINT_DTYPES)  # fmt: skip
    select: str = _opt("last", "last: the last epoch's model; best-of-evals: ALSO test after epochs 0, eval_every, "
                       "2 x eval_every, ... and report the best of each metric in results.json 'best_of_evals' "
                       "(transductive: it picks on the test set, as the original); the top-level numbers stay the "
                       "last epoch's", choices=SELECTIONS)  # fmt: skip
    eval_every: int = _opt(PAPER_EVAL_EVERY, "epochs between the test passes of --select best-of-evals")
    extra: dict = field(default_factory=dict, metadata={"help": "free-form notes carried into results.json"})

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
        """Raise UserError for values the model cannot run with (a field's declared choices first)."""
        checks = [
            (self.image_size >= 16, f"image size must be at least 16, got {self.image_size}"),
            (self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.test_batch_size >= 1, f"test_batch_size must be >= 1, got {self.test_batch_size}"),
            (self.cas_width >= 1, f"CAS width must be >= 1, got {self.cas_width}"),
            (self.refresh_prototypes >= 0, "refresh-prototypes must be >= 0"),
            (self.aug_pool >= 0, "aug-pool must be >= 0"),
            (
                self.r_init == "auto" or self._r_number_ok(),
                f"r_init must be 'auto' or a number (> 0 with r_mode log), got {self.r_init!r}",
            ),
            (len(self.loss_weights) == 4, "loss_weights needs 4 values (NFC, AFS, PDC, SEG)"),
            (self.nn_loss >= 1, "nn_loss must be >= 1"),
            (self.knn_weight >= 0, f"knn_weight must be >= 0, got {self.knn_weight}"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (
                self.resize_size in (None, "auto") or _int_at_least(self.resize_size, self.image_size),
                f"resize_size must be 'auto', null or a size >= the image size {self.image_size}, "
                f"got {self.resize_size!r}",
            ),
        ]
        for f in dataclasses.fields(self):  # the declared choices (YAML keys and --set name them, not only flags)
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices is not None and value not in choices:
                raise UserError(f"{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
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
        UserError: an unreadable YAML file, unknown keys (named), a value outside a field's choices, or values the
            model cannot run with.
    """
    values = {} if path is None else config.read_yaml(Path(path), PCSNetConfig, explicit=True)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(PCSNetConfig)})
    if unknown:
        raise UserError(f"unknown PCSNet option(s) {', '.join(unknown)}")
    values.update(given)
    for key in _TUPLE_FIELDS & set(values):
        values[key] = None if values[key] is None else tuple(values[key])
    return PCSNetConfig(**values).validate()


def config_to_dict(cfg: PCSNetConfig) -> dict:
    """A JSON/YAML-friendly dict (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
