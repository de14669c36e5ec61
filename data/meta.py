"""Read, validate and write meta.json, and scan MVTec-layout trees into it.

meta.json (docs/design/CONTRACT.md): `{"train": {cls: [item]}, "test": {cls: [item]}}` with
item = `{"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}`; paths are relative to the dataset
root with forward slashes, `mask_path` is "" where there is none and `anomaly` is 0 or 1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from common.utils import UserError, atomic_write_json

META_NAME = "meta.json"
SPLITS = ("train", "test")
ITEM_KEYS = ("img_path", "mask_path", "cls_name", "specie_name", "anomaly")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
NORMAL_FOLDER = "good"
MASK_SUFFIX = "_mask"
GENERATORS = "python data/mvtec.py --root {root} (or data/visa.py / data/mpdd.py)"


# ----------------------------------------------------------------------------------------------- read / write


def check_dataset_folder(root: str | os.PathLike) -> None:
    """UserError unless `root` is an existing folder (a missing path and a file get different messages)."""
    root = Path(root)
    if root.is_dir():
        return
    if root.exists():
        raise UserError(f"dataset folder {root} is a file, not a folder (an archive must be unpacked first)")
    raise UserError(f"dataset folder {root} does not exist")


def load_meta(root: str | os.PathLike, check_files: bool = True) -> dict:
    """Read and validate ROOT/meta.json.

    Args:
        root: dataset root folder.
        check_files: also check that every listed image and mask exists and is not empty (one `stat` per file, so
            a run stops before it loads a model, not at the missing file).

    Returns:
        The meta dict, `{"train": {cls: [item]}, "test": {cls: [item]}}`.

    Raises:
        UserError: the folder or file is missing, the JSON is corrupt or its structure is wrong.
    """
    root = Path(root)
    check_dataset_folder(root)
    path = root / META_NAME
    if not path.is_file():
        raise UserError(f"{path} not found: create it first with `{GENERATORS.format(root=root)}`")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            f"regenerate it with `{GENERATORS.format(root=root)}`"
        ) from exc
    validate_meta(meta, root, check_files=check_files)
    return meta


def _check_item(item: Any, where: str, class_name: str) -> None:
    """Raise UserError (prefixed by `where`) unless `item` is a well-formed meta.json item."""
    if not isinstance(item, dict):
        raise UserError(f"{where}: expected an object with keys {', '.join(ITEM_KEYS)}, got {type(item).__name__}")
    missing = [key for key in ITEM_KEYS if key not in item]
    unknown = [str(key) for key in item if key not in ITEM_KEYS]
    if missing or unknown:
        parts = ([f"missing key(s) {', '.join(missing)}"] if missing else []) + (
            [f"unknown key(s) {', '.join(unknown)}"] if unknown else []
        )
        raise UserError(f"{where}: {'; '.join(parts)} (an item has exactly {', '.join(ITEM_KEYS)})")
    for key in ("img_path", "mask_path", "cls_name", "specie_name"):
        if not isinstance(item[key], str):
            raise UserError(f"{where}: '{key}' must be a string, got {item[key]!r}")
    if not item["img_path"]:
        raise UserError(f"{where}: 'img_path' is empty")
    if item["cls_name"] != class_name:
        raise UserError(f"{where}: cls_name '{item['cls_name']}' differs from its class key '{class_name}'")
    anomaly = item["anomaly"]
    if type(anomaly) is not int or anomaly not in (0, 1):  # bool and 1.0 are not valid labels
        raise UserError(f"{where}: 'anomaly' must be 0 or 1, got {anomaly!r}")


def validate_meta(meta: Any, root: str | os.PathLike, check_files: bool = False) -> None:
    """Check the structure of a meta dict; optionally that every referenced file exists.

    Args:
        meta: the parsed meta.json content.
        root: dataset root (named in messages and used to resolve paths).
        check_files: also check that every `img_path` and non-empty `mask_path` exists under `root`.

    Raises:
        UserError: naming ROOT/meta.json and the first problem found.
    """
    path = Path(root) / META_NAME
    if not isinstance(meta, dict):
        raise UserError(f"{path}: top level must be an object with keys 'train' and 'test'")
    unknown = [key for key in meta if key not in SPLITS]
    if unknown:
        raise UserError(f"{path}: unknown split(s) {', '.join(map(repr, unknown))}; expected 'train' and 'test'")
    missing = [split for split in SPLITS if split not in meta]
    if missing:
        raise UserError(f"{path}: missing split(s) {', '.join(map(repr, missing))}")
    for split in SPLITS:
        classes = meta[split]
        if not isinstance(classes, dict):
            raise UserError(f"{path}: '{split}' must map class names to lists of items")
        for class_name, items in classes.items():
            if not isinstance(items, list):
                raise UserError(f"{path}: {split}/{class_name} must be a list of items")
            for index, item in enumerate(items):
                _check_item(item, f"{path}: {split}/{class_name} item {index}", class_name)
    if check_files:
        _check_files_exist(meta, Path(root), path)


def _check_files_exist(meta: dict, root: Path, path: Path) -> None:
    """Raise UserError naming the first image or mask listed in `meta` that is missing or empty (0 bytes)."""
    for split in SPLITS:
        for items in meta[split].values():
            for item in items:
                for key in ("img_path", "mask_path"):
                    rel = item[key]
                    if not rel:
                        continue
                    try:
                        size = (root / rel).stat().st_size if (root / rel).is_file() else None
                    except OSError:
                        size = None
                    if size is None:
                        raise UserError(
                            f"{path}: {key} {root / rel} does not exist; restore the file or regenerate meta.json "
                            f"with `{GENERATORS.format(root=root)}`"
                        )
                    if size == 0:
                        raise UserError(f"{path}: {key} {root / rel} is empty (0 bytes); replace or remove the file")


def write_meta(root: str | os.PathLike, meta: dict) -> Path:
    """Validate `meta` and write it atomically to ROOT/meta.json (indent 4, trailing newline).

    Nothing else in ROOT is created or changed (the temporary file is renamed over meta.json).

    Returns:
        The path written.
    """
    root = Path(root)
    check_dataset_folder(root)
    validate_meta(meta, root)
    return atomic_write_json(root / META_NAME, meta, indent=4)


def class_names(meta: dict, split: str = "test") -> list[str]:
    """Class names of one split, in meta.json order."""
    if split not in meta:
        raise UserError(f"meta.json has no split '{split}' (it has {', '.join(meta)})")
    return list(meta[split])


def format_summary(meta: dict) -> str:
    """One line per class with its train/test normal and anomalous counts, plus notes on gaps.

    Notes: a class with no training images (no few-shot support can be drawn) and defect types whose
    images have no masks (they count for image-level metrics only).
    """
    lines = []
    names = list(dict.fromkeys([*meta["train"], *meta["test"]]))
    for name in names:
        train, test = meta["train"].get(name, []), meta["test"].get(name, [])
        train_bad = sum(item["anomaly"] for item in train)
        bad = [item for item in test if item["anomaly"]]
        unmasked = [item for item in bad if not item["mask_path"]]
        species = ", ".join(sorted({item["specie_name"] for item in unmasked if item["specie_name"]}))
        line = f"{name}: train {len(train) - train_bad} normal" + (f", {train_bad} anomalous" if train_bad else "")
        line += f" | test {len(test) - len(bad)} normal, {len(bad)} anomalous"
        if not train:
            line += "  [note: no training images, so no few-shot support for this class]"
        if not test:
            line += "  [note: no test images]"
        if unmasked:
            where = f" ({species})" if species else ""
            line += f"  [note: {len(unmasked)} anomalous without masks{where}: image-level only]"
        lines.append(line)
    total_train = sum(len(v) for v in meta["train"].values())
    total_test = sum(len(v) for v in meta["test"].values())
    lines.append(f"{len(names)} classes, {total_train} train images, {total_test} test images")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- MVTec scanner


def _images_in(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name (extension case-insensitive)."""
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS), key=lambda p: p.name
    )


def _subfolders(folder: Path) -> list[Path]:
    """Sub-folders of `folder` sorted by name, skipping hidden ones (.ipynb_checkpoints, .git, ...)."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _pair_masks(images: list[Path], image_dir: Path, mask_dir: Path) -> dict[str, Path]:
    """Map each image name to its mask in `mask_dir` by stem: `<stem>_mask.<ext>` first, else `<stem>.<ext>`.

    Raises:
        UserError: an image without a mask, a mask without an image, or two masks with the same stem.
    """
    masks: dict[str, Path] = {}
    for mask in _images_in(mask_dir):
        if mask.stem in masks:
            raise UserError(f"two masks with the same name stem in {mask_dir}: {masks[mask.stem].name} and {mask.name}")
        masks[mask.stem] = mask
    paired: dict[str, Path] = {}
    for image in images:
        stem = next((s for s in (image.stem + MASK_SUFFIX, image.stem) if s in masks), None)
        if stem is None:
            raise UserError(
                f"image {image} has no mask in {mask_dir} (expected {image.stem}{MASK_SUFFIX}.png or {image.stem}.png)"
            )
        paired[image.name] = masks.pop(stem)
    if masks:
        orphan = masks[min(masks)]
        raise UserError(f"mask {orphan} has no matching image in {image_dir}")
    return paired


def _item(root: Path, image: Path, mask: Path | None, class_name: str, specie: str, anomaly: int) -> dict:
    rel_mask = mask.relative_to(root).as_posix() if mask is not None else ""
    return {
        "img_path": image.relative_to(root).as_posix(),
        "mask_path": rel_mask,
        "cls_name": class_name,
        "specie_name": specie,
        "anomaly": anomaly,
    }


def _scan_phase(root: Path, class_dir: Path, phase: str) -> list[dict]:
    """Items of CLASS/PHASE: `good/` is normal, any other sub-folder is a defect type (anomaly 1)."""
    phase_dir = class_dir / phase
    if not phase_dir.is_dir():
        return []
    loose = _images_in(phase_dir)
    if loose:
        raise UserError(f"image {loose[0]} sits directly in {phase_dir}: put images in good/ or a defect-type folder")
    items: list[dict] = []
    for specie_dir in _subfolders(phase_dir):
        specie, images = specie_dir.name, _images_in(specie_dir)
        if specie == NORMAL_FOLDER:
            items += [_item(root, image, None, class_dir.name, specie, 0) for image in images]
            continue
        mask_dir = class_dir / "ground_truth" / specie
        masks = _pair_masks(images, specie_dir, mask_dir) if mask_dir.is_dir() else {}
        items += [_item(root, image, masks.get(image.name), class_dir.name, specie, 1) for image in images]
    return items


def _check_orphan_mask_folders(class_dir: Path) -> None:
    """A ground_truth/<defect>/ folder with masks but no test/<defect>/ or train/<defect>/ is an error."""
    gt_dir = class_dir / "ground_truth"
    if not gt_dir.is_dir():
        return
    for mask_dir in (p for p in _subfolders(gt_dir) if p.name != NORMAL_FOLDER):
        if any((class_dir / phase / mask_dir.name).is_dir() for phase in SPLITS):
            continue
        masks = _images_in(mask_dir)
        if masks:
            raise UserError(f"mask {masks[0]} has no matching image: there is no {class_dir / 'test' / mask_dir.name}")


def _header_size(path: Path, what: str) -> tuple[int, int]:
    """(width, height) from an image file's header (nothing is decoded), or a UserError naming the file."""
    from PIL import Image, UnidentifiedImageError  # here: the generators start faster without PIL

    if path.stat().st_size == 0:
        raise UserError(f"{what} {path} is empty (0 bytes); replace or remove it, then run this again")
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise UserError(f"{what} {path} is not a readable image ({exc}); replace or remove it") from exc


def check_image_headers(meta: dict, root: str | os.PathLike, listed_in: str | os.PathLike | None = None) -> None:
    """Check every listed image and mask: present, not empty, a readable image header, mask size = image size.

    Only headers are read (about 0.1 ms a file), so a truncated body is found later, when the image is decoded.

    Args:
        meta: the meta dict.
        root: the dataset root the paths are relative to.
        listed_in: the file the paths came from (e.g. VisA's csv), named in the message of a missing file.

    Raises:
        UserError: naming the first bad file.
    """
    root = Path(root)
    source = f" (listed in {listed_in})" if listed_in else ""
    fix = f"restore it or correct {listed_in}" if listed_in else "restore it or remove it from the tree"
    for split in SPLITS:
        for items in meta[split].values():
            for item in items:
                image = root / item["img_path"]
                if not image.is_file():
                    raise UserError(f"image {image}{source} does not exist; {fix}")
                size = _header_size(image, "image")
                if item["mask_path"]:
                    mask = root / item["mask_path"]
                    if not mask.is_file():
                        raise UserError(f"mask {mask}{source} does not exist; {fix}")
                    mask_size = _header_size(mask, "mask")
                    if mask_size != size:
                        raise UserError(
                            f"mask {mask} is {mask_size[0]}x{mask_size[1]} but its image {image} is "
                            f"{size[0]}x{size[1]}; a mask must have its image's size"
                        )


def scan_mvtec_layout(root: str | os.PathLike, verbose: bool = True) -> dict:
    """Build a meta dict from an MVTec-layout tree (MVTec AD, MPDD, custom data).

    Classes are the sorted sub-folders of `root` that have a `train/` or `test/` folder. `train/good` and
    `test/good` are normal; `test/<defect>` is anomalous, with masks in `ground_truth/<defect>/` named
    `<stem>_mask.<ext>` or `<stem>.<ext>` and paired by stem. A defect without a ground_truth folder gets
    mask_path "" (image-level only). A class without `train/` gets an empty train list.

    Args:
        root: dataset root.
        verbose: print a per-class summary (format_summary) on stdout.

    Returns:
        The meta dict; every class appears in both splits.

    Raises:
        UserError: missing root, no class folders, or masks that do not pair with images.
    """
    root = Path(root)
    check_dataset_folder(root)
    class_dirs = [p for p in _subfolders(root) if any((p / phase).is_dir() for phase in SPLITS)]
    if not class_dirs:
        hint = ": it looks like one class folder, pass its parent" if (root / "test").is_dir() else ""
        raise UserError(f"no class folders with train/ or test/ under {root}{hint}")
    meta: dict[str, dict[str, list[dict]]] = {split: {} for split in SPLITS}
    for class_dir in class_dirs:
        _check_orphan_mask_folders(class_dir)
        for split in SPLITS:
            meta[split][class_dir.name] = _scan_phase(root, class_dir, split)
    check_image_headers(meta, root)
    if verbose:
        print(format_summary(meta))
    return meta
