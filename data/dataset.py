"""Image/mask reading, preprocessing and the meta.json-backed `AnomalyDataset`.

Resize policy (VAND/FDSL): a square squash to `image_size` with PIL bicubic for images; masks are resized
bilinearly as 0/1 floats and binarised at > 0.5. Masks on disk are binarised with > 0 (VisA masks are not 0/255).
With `crop` (PCSNet paper mode: resize 256, crop 224) images and masks are then centre-cropped alike.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.utils import UserError
from data.meta import class_names as meta_class_names
from data.meta import load_meta, validate_meta

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# What PIL raises for unreadable, truncated or malformed files (UnidentifiedImageError is an OSError).
# A mask may hold 0 plus one defect value (0/255, 0/1) or a few instance labels; more levels mean a grey image.
MAX_MASK_LEVELS = 32
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# Image resize filters: bicubic (VAND/FDSL, our default) or lanczos (PIL's ANTIALIAS, the PCSNet/CFA original).
RESAMPLE = {"bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


def _open(path: str | os.PathLike, what: str) -> Image.Image:
    """Open and fully decode an image file, turning every failure into a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist")
    if path.stat().st_size == 0:
        raise UserError(f"{what} file {path} is empty (0 bytes); replace or remove it")
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later inside a transform
            return img.copy()
    except _DECODE_ERRORS as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"cannot read {what} file {path}: {reason}; replace or remove it") from exc


def _gray_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale a single-channel 16-bit/32-bit/float PIL image to uint8 `(H, W)` (16-bit: /257, floats in [0, 1]: *255)."""
    values = np.asarray(img).astype(np.float64)
    peak = values.max(initial=0)
    if img.mode == "F":
        values = values * 255.0 if peak <= 1.0 else values
    elif img.mode in _SIXTEEN_BIT_MODES or peak > 255:
        values = values / 257.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as RGB uint8 `(H, W, 3)`.

    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images are converted to 8-bit RGB.

    Raises:
        UserError: missing, zero-byte, truncated or unreadable file (named in the message).
    """
    img = _open(path, "image")
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        gray = _gray_to_uint8(img)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def _count_levels(values: np.ndarray) -> int:
    """Number of distinct values of a mask array (bincount for uint8, about 1 ms per megapixel)."""
    if values.dtype == np.uint8:
        return int(np.count_nonzero(np.bincount(values.ravel(), minlength=256)))
    return int(np.unique(values).size)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a mask as bool `(H, W)`: a pixel is defective iff its value is > 0 (in any colour channel).

    0/255 (MVTec), 0/1 and small instance labels 1, 2, ... (VisA) are all fine. A mask with more than
    MAX_MASK_LEVELS distinct values is a grey image (a photo, a JPEG-compressed or a resampled mask) whose
    binarisation at > 0 would swell every defect, so it is refused.

    Raises:
        UserError: missing, zero-byte, truncated, unreadable or non-binary file (named in the message).
    """
    img = _open(path, "mask")
    if img.mode == "LA":
        values = np.asarray(img)[:, :, 0]
    elif img.mode in ("1", "L", "I", "F", *_SIXTEEN_BIT_MODES):
        values = np.asarray(img)
    else:
        values = np.asarray(img.convert("RGB")).max(axis=2)  # palette / RGB(A) masks: any coloured pixel is a defect
    levels = _count_levels(values)
    if levels > MAX_MASK_LEVELS:
        raise UserError(
            f"mask file {path} is not a binary mask: it has {levels} grey levels (a JPEG, resampled or grey image?); "
            "save it as a PNG with 0 for good pixels and 255 (or instance labels 1, 2, ...) for defects"
        )
    return values > 0


def _check_size(image_size: int) -> int:
    """Return `image_size` as an int, raising UserError unless it is a positive integer (numpy ints accepted)."""
    try:
        size = operator.index(image_size)
    except TypeError:
        size = 0
    if isinstance(image_size, bool) or size < 1:
        raise UserError(f"image size must be a positive integer, got {image_size!r}")
    return int(size)


def center_crop(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """The central `size` x `size` window of `(..., H, W)` (torchvision CenterCrop's offsets); None = unchanged."""
    if size is None or (x.shape[-2] == size and x.shape[-1] == size):
        return x
    h, w = x.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"cannot centre-crop {size} x {size} from {h} x {w}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return x[..., top : top + size, left : left + size]


def preprocess_image(
    image: np.ndarray,
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop: int | None = None,
    resample: str = "bicubic",
) -> torch.Tensor:
    """Squash-resize an RGB uint8 `(H, W, 3)` image to `(3, S, S)` float, normalised with mean/std.

    PIL resize to (S, S) (`resample`: bicubic, or lanczos as PCSNet's original), then ToTensor (/255) and
    per-channel (x - mean) / std; with `crop` the central crop x crop window of that (output `(3, crop, crop)`).
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    size = _check_size(image_size)
    if resample not in RESAMPLE:
        raise UserError(f"unknown resize filter {resample!r}; use one of {', '.join(RESAMPLE)}")
    resized = Image.fromarray(image).resize((size, size), RESAMPLE[resample])
    tensor = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return center_crop((tensor - mean_t) / std_t, crop).contiguous()


def preprocess_mask(mask: np.ndarray, image_size: int, crop: int | None = None) -> torch.Tensor:
    """Resize a bool `(H, W)` mask to a `(1, S, S)` float tensor in {0, 1} (bilinear, then > 0.5), then centre-crop
    it to `crop` when given (exactly as `preprocess_image`)."""
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    size = _check_size(image_size)
    resized = Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.BILINEAR)
    return center_crop(torch.from_numpy((np.asarray(resized) > 0.5).astype(np.float32))[None], crop).contiguous()


def load_images(
    root: str | os.PathLike,
    img_paths: Sequence[str],
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    resample: str = "bicubic",
) -> torch.Tensor:
    """Read and preprocess images given relative to `root` (e.g. few-shot support) into `(k, 3, S, S)`."""
    size = _check_size(image_size)
    if not img_paths:
        return torch.zeros(0, 3, size, size)
    return torch.stack([preprocess_image(read_image(Path(root) / rel), size, mean, std, resample=resample)
                        for rel in img_paths])  # fmt: skip


class AnomalyDataset(Dataset):
    """One split of a meta.json dataset, items ordered class by class in meta order.

    `ds[i]` is a dict: `image` (3, S, S) float, `gt_mask` (1, S, S) float in {0, 1} (zeros for normals and
    for anomalies without a mask), `gt_label` int, `has_mask` bool (False only for an anomaly without a
    mask), `class_name`, `specie_name`, `img_path` (relative to root). `class_indices[name]` is the range
    of indices of one class.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "test",
        class_names: Sequence[str] | str | None = None,
        image_size: int = 256,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        meta: dict | None = None,
        crop_size: int | None = None,
        resample: str = "bicubic",
    ) -> None:
        """Select the items of `split` (and of `class_names`, default all) from `meta` or ROOT/meta.json.

        `crop_size`: resize to `image_size`, then centre-crop images and masks to `crop_size` (PCSNet paper mode).
        `resample`: the image resize filter (bicubic; lanczos for PCSNet paper mode).

        Raises:
            UserError: missing/corrupt meta.json, unknown split, or class names not in the split.
        """
        self.root = Path(root)
        if meta is None:
            meta = load_meta(self.root)
        else:
            validate_meta(meta, self.root)
        known = meta_class_names(meta, split)
        if class_names is None:
            wanted = known
        else:
            requested = [class_names] if isinstance(class_names, str) else list(class_names)
            unknown = [name for name in requested if name not in known]
            if unknown:
                raise UserError(
                    f"unknown class name(s) {', '.join(unknown)} for split '{split}' of {self.root / 'meta.json'}; "
                    f"known: {', '.join(known)}"
                )
            wanted = [name for name in known if name in requested]
        self.split = split
        self.class_names = wanted
        self.image_size = _check_size(image_size)
        self.crop_size = None if crop_size is None else _check_size(crop_size)
        self.resample = resample
        self.mean, self.std = tuple(mean), tuple(std)
        self.items: list[dict] = []
        self.class_indices: dict[str, range] = {}
        for name in wanted:
            start = len(self.items)
            self.items.extend(meta[split][name])
            self.class_indices[name] = range(start, len(self.items))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        image_path = self.root / item["img_path"]
        image = read_image(image_path)
        size = self.image_size
        label = int(item["anomaly"])
        has_mask = label == 0 or bool(item["mask_path"])
        if label and item["mask_path"]:
            mask_path = self.root / item["mask_path"]
            mask = read_mask(mask_path)
            if mask.shape != image.shape[:2]:
                raise UserError(
                    f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but image {image_path} is "
                    f"{image.shape[1]}x{image.shape[0]}; a mask must have its image's size"
                )
            gt_mask = preprocess_mask(mask, size, self.crop_size)
        else:
            side = self.crop_size or size
            gt_mask = torch.zeros(1, side, side)
        return {
            "image": preprocess_image(image, size, self.mean, self.std, self.crop_size, self.resample),
            "gt_mask": gt_mask,
            "gt_label": label,
            "has_mask": has_mask,
            "class_name": item["cls_name"],
            "specie_name": item["specie_name"],
            "img_path": item["img_path"],
        }
