"""Synthetic datasets for tests: a small MVTec-layout tree of PNGs with rectangular defects and masks.

Use `from tests.fixtures import make_mvtec_tree`; then `scan_mvtec_layout` / `python data/mvtec.py --root`
builds its meta.json. `tree_digest` hashes a tree to check that a command left it unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _texture(rng: np.random.Generator, size: int, tint: np.ndarray) -> np.ndarray:
    """A smooth gradient in the class's tint plus mild noise, `(size, size, 3)` uint8."""
    ramp = np.linspace(0.6, 1.0, size, dtype=np.float64)
    base = 150.0 * ramp[None, :, None] * ramp[:, None, None] * tint[None, None, :]
    noise = rng.normal(0.0, 8.0, size=(size, size, 3))
    return np.clip(base + 40.0 + noise, 0, 255).astype(np.uint8)


def _rectangle(rng: np.random.Generator, size: int) -> tuple[int, int, int, int]:
    """A random rectangle (top, left, height, width) fully inside a size x size image."""
    low, high = max(2, size // 8), max(3, size // 3)
    height, width = int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))
    top, left = int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1))
    return top, left, height, width


def _save(array: np.ndarray, path: Path, grayscale: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    (image.convert("L") if grayscale else image).save(path)


def make_mvtec_tree(
    root: str | os.PathLike,
    classes: Iterable[str] = ("a", "b"),
    n_train: int = 6,
    n_test_good: int = 3,
    defects: Mapping[str, int] = {"crack": 3},  # read only, never mutated
    size: int = 64,
    with_masks: bool = True,
    grayscale: bool = False,
    seed: int = 0,
) -> Path:
    """Write ROOT/<class>/{train/good, test/good, test/<defect>, ground_truth/<defect>} with PNG files.

    Images are named 000.png, 001.png, ... Each defect image carries a bright rectangle; its mask
    `ground_truth/<defect>/<stem>_mask.png` (0/255, mode L) marks the same rectangle.

    Args:
        root: folder to create (may exist).
        classes: class folder names.
        n_train: normal training images per class.
        n_test_good: normal test images per class.
        defects: defect type -> number of anomalous test images per class.
        size: image side in pixels (square images).
        with_masks: write ground_truth masks (False: image-level labels only).
        grayscale: save images as 8-bit grayscale (mode L) instead of RGB.
        seed: RNG seed; the same arguments always give the same bytes.

    Returns:
        `root` as a Path.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for class_name in classes:
        tint = rng.uniform(0.5, 1.0, size=3)
        folders = [("train/good", n_train, None), ("test/good", n_test_good, None)]
        folders += [(f"test/{defect}", count, defect) for defect, count in defects.items()]
        for folder, count, defect in folders:
            for index in range(count):
                image = _texture(rng, size, tint)
                stem = f"{index:03d}"
                if defect is not None:
                    top, left, height, width = _rectangle(rng, size)
                    image[top : top + height, left : left + width] = rng.integers(200, 256, size=3, dtype=np.uint8)
                    if with_masks:
                        mask = np.zeros((size, size), dtype=np.uint8)
                        mask[top : top + height, left : left + width] = 255
                        _save(mask, root / class_name / "ground_truth" / defect / f"{stem}_mask.png", False)
                _save(image, root / class_name / folder / f"{stem}.png", grayscale)
    return root


def make_mvtec_dataset(root: str | os.PathLike, **tree_options) -> Path:
    """`make_mvtec_tree(root, **tree_options)` plus its meta.json, as `python data/mvtec.py --root ROOT` writes it."""
    from data.meta import scan_mvtec_layout, write_meta

    root = Path(make_mvtec_tree(root, **tree_options))
    write_meta(root, scan_mvtec_layout(root, verbose=False))
    return root


def tree_digest(root: str | os.PathLike, exclude: Iterable[str] = ("meta.json",)) -> dict[str, str]:
    """Map each file's path (relative to `root`) to the sha256 of its bytes, leaving out `exclude` names."""
    root, skip = Path(root), set(exclude)
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.relative_to(root).as_posix() not in skip
    }


VISA_HEADER = ("object", "split", "label", "image", "mask")


def make_visa_tree(
    root: str | os.PathLike,
    classes: Iterable[str] = ("pcb1", "candle"),
    n_train: int = 3,
    n_test_good: int = 2,
    n_test_bad: int = 2,
    size: int = 48,
    header: Iterable[str] = VISA_HEADER,
    seed: int = 0,
) -> Path:
    """Write a tiny VisA-style tree and ROOT/split_csv/1cls.csv (columns in `header` order).

    Images are JPEGs under `<cls>/Data/Images/{Normal,Anomaly}/`; masks are PNGs under `<cls>/Data/Masks/Anomaly/`
    with values 0/1 (like VisA's, not 0/255). The last anomaly of each class has an empty mask cell. Rows of
    the classes are interleaved, so the class order is that of first appearance, not alphabetical.

    Returns:
        `root` as a Path.
    """
    root, header = Path(root), list(header)
    rng = np.random.default_rng(seed)
    rows_by_class: dict[str, list[dict]] = {}
    for class_name in classes:
        tint, rows = rng.uniform(0.5, 1.0, size=3), []
        plan = (("train", n_train, "normal"), ("test", n_test_good, "normal"), ("test", n_test_bad, "anomaly"))
        for split, count, label in plan:
            for index in range(count):
                image = _texture(rng, size, tint)
                folder = "Anomaly" if label == "anomaly" else "Normal"
                stem = f"{split}_{index:03d}"
                row = {"object": class_name, "split": split, "label": label, "mask": ""}
                row["image"] = f"{class_name}/Data/Images/{folder}/{stem}.JPG"
                if label == "anomaly":
                    top, left, height, width = _rectangle(rng, size)
                    image[top : top + height, left : left + width] = 255
                    if index < count - 1:
                        mask = np.zeros((size, size), dtype=np.uint8)
                        mask[top : top + height, left : left + width] = 1
                        row["mask"] = f"{class_name}/Data/Masks/Anomaly/{stem}.png"
                        _save(mask, root / row["mask"], False)
                (root / row["image"]).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(root / row["image"], format="JPEG", quality=95)
                rows.append(row)
        rows_by_class[class_name] = rows
    ordered = [row for group in itertools.zip_longest(*rows_by_class.values()) for row in group if row is not None]
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(header)] + [",".join(row.get(name, "x") for name in header) for row in ordered]
    csv_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Import into a test module to run it with one torch thread: on a busy shared CPU, 2 OpenMP threads
    spin-wait (a 64 px forward took 1 s instead of 20 ms with 1 thread)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_script(path: str | os.PathLike, name: str):
    """Import a script file (scripts/*.py are not a package) as a module, fresh on every call."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_predict_parts(base: Path) -> tuple[Path, Path]:
    """3 good references (64 px) and a query folder: 2 good + 2 crack images, one of each resized to 96 x 80.

    Returns (reference folder, query folder).
    """
    tree = make_mvtec_tree(base / "tree", classes=("part",), n_train=3, n_test_good=2, defects={"crack": 2}, size=64)
    queries = base / "queries"
    queries.mkdir()
    for kind in ("good", "crack"):
        for i, src in enumerate(sorted((tree / "part" / "test" / kind).iterdir())):
            Image.open(src).resize((96, 80) if i % 2 else (64, 64)).save(queries / f"{kind}_{i}.png")
    return tree / "part" / "train" / "good", queries

