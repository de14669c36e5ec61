"""The development benchmark's data: many offline sources, test defects from their own generators, LOSO folds.

    python -m data.devbench --root devbench_data [--seed 0] [--small]

Writes three things under ROOT:
- ROOT/test: one MVTec-layout dataset (meta.json), one class per source. Normals are views of the source; the
  defects come from `data.test_defects` (crack, scratch, dark_spot, stain, missing; masks), code that no method
  trains on. `textile_real` holds the real image-level defects of `conformal-clip-data` (local, global; no masks).
- ROOT/aux/<source>: the auxiliary training corpus for learned parts (FDSL's head): other views of the same source
  (disjoint draws) with training-time anomalies from `common.pseudo_anomaly` (the demo's six kinds and NSA
  cut-paste), masked.
- ROOT/folds/<group>: for each source group, a dataset root that hard-links the aux classes of every OTHER group
  (leave-one-source-out: a head tested on a group never saw it). `textile_real` and `fabric` are one group (the
  same textile images).

Sources (each a class): scikit-image textures brick, gravel, grass, moon (crater field), cell (microscopy); the
coins photo (an object field); conformal-clip-data's textile as grey fabric; two renders of our own, a machined
washer and a perforated plate, aligned like production images with small pose jitter; and textile_real.
Deterministic: the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from common.pseudo_anomaly import DEFECT_KINDS, nsa_cutpaste, synthesize_defect
from common.utils import UserError, cli_entry
from data.demo import (  # one generator per (seed, name) and byte-stable PNGs, as the demo
    _rng,
    _write_png,
    prepare_build_root,
)
from data.meta import scan_mvtec_layout, write_meta
from data.test_defects import TEST_FAMILIES, draw_test_defect

MARKER = ".devbench_data"
SIZE = 256
TEXTURES = {"brick": "brick", "gravel": "gravel", "grass": "grass", "moon": "moon", "cell": "cell", "coins": "coins"}
RENDERS = ("washer", "plate")
SOURCES = (*TEXTURES, "fabric", *RENDERS, "textile_real")
GROUP = {name: name for name in SOURCES} | {"textile_real": "textile", "fabric": "textile"}
QUICK_SOURCES = ("brick", "coins", "fabric", "washer", "textile_real")
COUNTS = {"train": 24, "good": 16, "per_family": 4}  # test split: 16 good + 5 families x 4 defects
SMALL_COUNTS = {"train": 8, "good": 4, "per_family": 1}
AUX_COUNTS = {"train": 10, "good": 8, "per_kind": 3, "nsa": 4}  # aux: 10 references, 8 good, 6 x 3 + 4 anomalies
TEXTILE_FIRST = {"nominal": 601, "local": 201, "global": 201}  # disjoint from data/demo.py's textile ranges
TEXTILE_REAL_DEFECTS = 10  # per real defect kind


# ----------------------------------------------------------------------------------------------- sources
def _grey(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:
        image = cv2.cvtColor(image[..., :3], cv2.COLOR_RGB2GRAY)
    return image


def _texture_view(texture: np.ndarray, rng: np.random.Generator, rotate: bool) -> np.ndarray:
    """A random square crop (45-75% of the short side) at SIZE px, flips/rot90 if `rotate`, mild photometric jitter."""
    short = min(texture.shape[:2])
    side = int(rng.integers(int(0.45 * short), int(0.75 * short) + 1))
    y, x = (int(v) for v in rng.integers(0, np.array(texture.shape[:2]) - side + 1))
    view = cv2.resize(texture[y : y + side, x : x + side], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    view = view.astype(np.float32)
    if rotate:
        view = np.rot90(view[:, ::-1] if rng.random() < 0.5 else view, int(rng.integers(4)))
    view = (view - view.mean()) * rng.uniform(0.92, 1.08) + view.mean() + rng.uniform(-8, 8)
    return np.ascontiguousarray(np.clip(np.rint(view), 0, 255).astype(np.uint8))


def _pose(rng: np.random.Generator, shift: float, angle: float) -> np.ndarray:
    a = np.deg2rad(rng.uniform(-angle, angle))
    tx, ty = rng.uniform(-shift, shift, 2)
    c = SIZE / 2
    return np.float32([[np.cos(a), -np.sin(a), c + tx - c * np.cos(a) + c * np.sin(a)],
                       [np.sin(a), np.cos(a), c + ty - c * np.sin(a) - c * np.cos(a)]])  # fmt: skip


def _sensor(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lens blur, a lighting gradient and sensor noise: what makes two photos of the same part differ."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE - 0.5
    gx, gy = rng.uniform(-12, 12, 2)
    out = cv2.GaussianBlur(image, (0, 0), 0.8) + gx * xx + gy * yy + rng.normal(0, 2.5, image.shape)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def render_washer(rng: np.random.Generator) -> np.ndarray:
    """A machined washer on a dark table: turned rings on the face, a key notch, small pose jitter."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) - SIZE / 2
    r, theta = np.hypot(xx, yy), np.arctan2(yy, xx)
    face = 165 + 6 * np.sin(r * 1.9) + 10 * np.cos(theta - 0.8)  # lathe marks and a light from one side
    image = np.where((r < 100) & (r > 42), face, 55.0).astype(np.float32)
    image[(r >= 100) & (r < 104)] = 120  # chamfer
    image[(r > 38) & (r <= 42)] = 110
    notch = (np.abs(theta - np.pi / 2) < 0.09) & (r > 88) & (r < 104)
    image[notch] = 55
    image += cv2.GaussianBlur(np.random.default_rng(7).normal(0, 8, image.shape).astype(np.float32), (0, 0), 2)
    image = cv2.warpAffine(image, _pose(rng, 4, 4), (SIZE, SIZE), borderValue=55)
    return _sensor(image, rng)


def render_plate(rng: np.random.Generator) -> np.ndarray:
    """A perforated steel plate: a regular grid of holes with bright rims, brushed surface, slight pose jitter."""
    image = np.full((SIZE + 64, SIZE + 64), 150.0, np.float32)
    brushed = cv2.GaussianBlur(np.random.default_rng(11).normal(0, 10, image.shape).astype(np.float32), (41, 1), 0)
    image += brushed
    for cy in range(16, SIZE + 64, 32):
        for cx in range(16, SIZE + 64, 32):
            cv2.circle(image, (cx, cy), 10, 200, -1, cv2.LINE_AA)
            cv2.circle(image, (cx, cy), 8, 35, -1, cv2.LINE_AA)
    image = cv2.warpAffine(image, _pose(rng, 3, 1.5), (SIZE + 64, SIZE + 64), borderValue=150)[32:-32, 32:-32]
    return _sensor(np.ascontiguousarray(image), rng)


def _textile_file(kind: str, index: int) -> Path:
    try:
        import conformal_clip_data
    except ImportError as exc:
        raise UserError("the dev benchmark needs the pip package conformal-clip-data") from exc
    folder = {"nominal": conformal_clip_data.nominal_dir, "local": conformal_clip_data.local_dir,
              "global": conformal_clip_data.global_dir}[kind]()  # fmt: skip
    path = Path(folder) / f"textile_{index:04d}.jpg"
    if not path.is_file():
        raise UserError(f"{path} is missing from the conformal-clip-data package (reinstall it)")
    return path


class ViewSource:
    """Draws grey uint8 (SIZE, SIZE) normal views of one source from its own generator stream."""

    def __init__(self, name: str, rng: np.random.Generator, textile_offset: int = 0):
        self.name, self.rng, self._next = name, rng, TEXTILE_FIRST["nominal"] + textile_offset
        if name in TEXTURES:
            from skimage import data as skdata

            self.texture = _grey(getattr(skdata, TEXTURES[name])())

    def draw(self) -> np.ndarray:
        if self.name in TEXTURES:
            return _texture_view(self.texture, self.rng, rotate=self.name != "coins")
        if self.name == "washer":
            return render_washer(self.rng)
        if self.name == "plate":
            return render_plate(self.rng)
        path = _textile_file("nominal", self._next)  # fabric: the next unused nominal textile image
        self._next += 1
        return cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)


# ----------------------------------------------------------------------------------------------- builders
def build_test_class(root: Path, name: str, seed: int, counts: dict) -> None:
    """ROOT/test/<name>: train/good, test/good and the five test families with masks (or textile_real)."""
    class_dir = root / "test" / name
    if name == "textile_real":
        return _build_textile_real(class_dir, counts)
    rng = _rng(seed, f"test/{name}")
    views = ViewSource(name, rng)
    for j in range(counts["train"]):
        _write_png(class_dir / "train" / "good" / f"{j:03d}.png", views.draw())
    for j in range(counts["good"]):
        _write_png(class_dir / "test" / "good" / f"{j:03d}.png", views.draw())
    for family in TEST_FAMILIES:
        for j in range(counts["per_family"]):
            image, mask = draw_test_defect(views.draw(), family, rng)
            _write_png(class_dir / "test" / family / f"{j:03d}.png", image)
            _write_png(class_dir / "ground_truth" / family / f"{j:03d}_mask.png", mask.astype(np.uint8) * 255)


def _build_textile_real(class_dir: Path, counts: dict) -> None:
    """Real textile photos as they are (250 px RGB jpg): nominal images and the real local/global defects."""
    first = TEXTILE_FIRST["nominal"] + 200  # fabric (test and aux) uses the 200 nominal images before these
    n_def = TEXTILE_REAL_DEFECTS if counts is COUNTS else counts["per_family"]
    plan = [("train/good", "nominal", first, counts["train"]),
            ("test/good", "nominal", first + counts["train"], counts["good"]),
            ("test/local", "local", TEXTILE_FIRST["local"], n_def),
            ("test/global", "global", TEXTILE_FIRST["global"], n_def)]  # fmt: skip
    for folder, kind, start, count in plan:
        (class_dir / folder).mkdir(parents=True, exist_ok=True)
        for j in range(count):
            shutil.copyfile(_textile_file(kind, start + j), class_dir / folder / f"{j:03d}.jpg")


def build_aux_class(root: Path, name: str, seed: int, small: bool) -> None:
    """ROOT/aux/<name>/<name>: other views of the source with the training-time anomalies (masked)."""
    if name == "textile_real":
        return  # its group's aux data is fabric's
    counts = {k: max(1, v // 3) for k, v in AUX_COUNTS.items()} if small else AUX_COUNTS
    rng = _rng(seed, f"aux/{name}")
    views = ViewSource(name, rng, textile_offset=100)  # fabric aux: nominal images 701.., test uses 601..
    class_dir = root / "aux" / name / name
    for j in range(counts["train"]):
        _write_png(class_dir / "train" / "good" / f"{j:03d}.png", views.draw())
    for j in range(counts["good"]):
        _write_png(class_dir / "test" / "good" / f"{j:03d}.png", views.draw())
    scales = np.linspace(0.0, 0.8, counts["per_kind"])
    for kind in DEFECT_KINDS:
        for j, scale in enumerate(scales):
            grey = views.draw()
            foreign = views.draw() if kind == "foreign" else None
            out, mask = synthesize_defect(np.repeat(grey[..., None], 3, 2), kind, rng, float(scale), foreign)
            _write_png(class_dir / "test" / kind / f"{j:03d}.png", out[..., 0])
            _write_png(class_dir / "ground_truth" / kind / f"{j:03d}_mask.png", mask.astype(np.uint8) * 255)
    j = 0
    while j < counts["nsa"]:
        grey = views.draw()
        out, mask = nsa_cutpaste(np.repeat(grey[..., None], 3, 2), rng, ((0.03, 0.2), (0.03, 0.2)), num_patches=2)
        if mask.any():
            _write_png(class_dir / "test" / "nsa" / f"{j:03d}.png", out[..., 0])
            _write_png(class_dir / "ground_truth" / "nsa" / f"{j:03d}_mask.png", mask.astype(np.uint8) * 255)
            j += 1


ALL_FOLD = "all"  # ROOT/folds/all: every aux class (the corpus of the shipped head, tested on none of these)


def build_folds(root: Path, sources: tuple[str, ...]) -> list[str]:
    """ROOT/folds/<group>: hard links to the aux classes of every other group, with its own meta.json."""
    groups = sorted({GROUP[s] for s in sources})
    for group in [*groups, ALL_FOLD]:
        fold = root / "folds" / group
        for name in sources:
            src = root / "aux" / name / name
            if GROUP[name] == group or not src.is_dir():
                continue
            for path in src.rglob("*.png"):
                dest = fold / name / path.relative_to(src)
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, dest)
                except OSError:
                    shutil.copyfile(path, dest)
        write_meta(fold, scan_mvtec_layout(fold, verbose=False))
    return groups


def build(root: Path, seed: int = 0, small: bool = False, sources: tuple[str, ...] = SOURCES) -> dict:
    """Build everything; returns the test meta.json dict."""
    prepare_build_root(root, MARKER, ("test", "aux", "folds"), "data/devbench.py")
    counts = SMALL_COUNTS if small else COUNTS
    for name in sources:
        build_test_class(root, name, seed, counts)
        build_aux_class(root, name, seed, small)
    meta = scan_mvtec_layout(root / "test", verbose=False)
    write_meta(root / "test", meta)
    build_folds(root, sources)
    return meta


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Build the development benchmark's datasets (test, aux, LOSO folds).")
    p.add_argument("--root", default="devbench_data", help="output folder (default devbench_data)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same bytes)")
    p.add_argument("--sources", default="all", help=f"'all' or a comma-separated subset of {', '.join(SOURCES)}")
    p.add_argument("--small", action="store_true", help="a few images per class (tests)")
    args = p.parse_args(argv)
    sources = SOURCES if args.sources == "all" else tuple(args.sources.split(","))
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise UserError(f"--sources: unknown {', '.join(unknown)}; choose from {', '.join(SOURCES)}")
    start = time.perf_counter()
    meta = build(Path(args.root), args.seed, args.small, sources)
    n = sum(len(v) for v in meta["test"].values())
    print(f"wrote {args.root}/test ({len(meta['test'])} classes, {n} test images), aux/ and folds/ "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
