"""Hand-made records for the report tests: a class of images on disk with known scores, maps and masks."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from PIL import Image

from report import ClassRecords


class ImgCollector(HTMLParser):
    """Every <img> of a page as its attribute dict."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))


def page_images(path: Path) -> list[dict]:
    parser = ImgCollector()
    parser.feed(Path(path).read_text())
    return parser.images


def make_class(root: Path, name: str = "widget", n_normal: int = 8, n_anomalous: int = 8, size: int = 32,
               masks: bool = True) -> ClassRecords:  # fmt: skip
    """Images i = 0.. on disk; normals first; score of image i = i / 100 except two crafted swaps."""
    rng = np.random.default_rng(0)
    folder = root / name / "test"
    folder.mkdir(parents=True, exist_ok=True)
    n = n_normal + n_anomalous
    paths, maps, gts = [], [], []
    for i in range(n):
        path = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
        gt = np.zeros((size, size), np.uint8)
        if i >= n_normal:
            gt[4:12, 4:12] = 1
        gts.append(gt)
        maps.append((rng.random((size, size)) * 0.1 + gt * 0.5).astype(np.float32))
    labels = np.array([0] * n_normal + [1] * n_anomalous)
    scores = np.arange(n, dtype=np.float64) / 100
    return ClassRecords(name, paths, labels, scores, np.stack(maps), np.stack(gts) if masks else None,
                        {"image_auroc": 1.0, "pixel_auroc": 0.9})  # fmt: skip


def results_for(records: list[ClassRecords], root: Path) -> dict:
    per_class = {r.class_name: {"image_auroc": 1.0, "pixel_auroc": 0.9} for r in records}
    return {"method": "knn", "dataset_root": str(root), "k_shot": 1, "seed": 0, "backbone": "test", "image_size": 32,
            "win_mode": None, "per_class": per_class, "mean": {"image_auroc": 1.0},
            "support": {r.class_name: [f"{r.class_name}/test/000.png"] for r in records},
            "timing": {"n_images": 16, "seconds_total": 1.0, "seconds_per_image": 0.06}}  # fmt: skip
