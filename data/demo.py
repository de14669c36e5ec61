"""Build three small offline MVTec-layout demo datasets from images that pip packages ship, then their meta.json.

    python data/demo.py --root DIR [--seed 0] [--size 256]

- DIR/textile/textile: the simulated textile images of `conformal-clip-data` (250x250 jpg, copied as they are):
  train/good nominal 1..100, test/good nominal 101..200, test/local and test/global 1..100; no masks
  (image-level only).
- DIR/materials/fabric: textile nominal images 301..500 at SIZE px, with six synthetic defect kinds
  (common.pseudo_anomaly) and their masks; "foreign" pastes another fabric image rotated by 90 degrees.
- DIR/materials/{moon,cell,tissue}: random views of scikit-image's moon, cell and immunohistochemistry images
  (grey), built like surfaces below, so FDSL's auxiliary training set has several classes on either side.
- DIR/surfaces/{brick,grass,gravel}: random crops (128..384 px, resized to SIZE) of scikit-image's 512x512
  textures with flips/rot90 and a small brightness/contrast jitter, and the same six defect kinds; "foreign"
  pastes one of the other two textures.

Deterministic: the same seed gives the same bytes. DIR must be new, empty, or an earlier demo build (marked by
a `.demo_data` file); a rebuild replaces its textile/, materials/ and surfaces/ folders.
"""

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys
import time  # noqa: E402
import zlib  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from common.pseudo_anomaly import DEFECT_KINDS, synthesize_defect  # noqa: E402
from common.utils import UserError, check_writable_dir, cli_entry  # noqa: E402
from data.meta import scan_mvtec_layout, write_meta  # noqa: E402

DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "demo_data"
MARKER = ".demo_data"
DATASETS = ("textile", "materials", "surfaces")
SURFACE_CLASSES = ("brick", "grass", "gravel")
# materials: the textile-derived "fabric" class plus scikit-image images disjoint from the surfaces textures, so that
# FDSL's train-on-one-dataset, test-on-the-other protocol has several training classes on either side.
MATERIAL_TEXTURES = {"moon": "moon", "cell": "cell", "tissue": "immunohistochemistry"}
TEXTILE_RANGES = {  # (source folder, first index, count) for each output folder, at full size
    "train/good": ("nominal", 1, 100),
    "test/good": ("nominal", 101, 100),
    "test/local": ("local", 1, 100),
    "test/global": ("global", 1, 100),
}
FABRIC_FIRST = 301  # materials/fabric uses nominal textile images 301.., disjoint from the textile dataset's 1..200
FABRIC_COUNTS = (80, 60, 10)  # train/good, test/good, images per defect kind
SURFACE_COUNTS = (40, 30, 6)
CROP_RANGE = (128, 384)  # side of the random square crop in the 512x512 scikit-image texture
SMALL_DIVISOR = 5  # --small (tests): about 5x fewer images


def _count(n: int, small: bool) -> int:
    return max(1, n // SMALL_DIVISOR) if small else n


def _rng(seed: int, name: str) -> np.random.Generator:
    """An independent generator per dataset/class, so classes do not depend on each other's draws."""
    return np.random.default_rng([seed % 2**64, zlib.crc32(name.encode())])


def _write_png(path: Path, array: np.ndarray) -> None:
    """Write a grey (H, W) or BGR (H, W, 3) uint8 array as PNG (same array -> same bytes)."""
    ok, data = cv2.imencode(".png", array)
    if not ok:
        raise OSError(f"could not encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.tobytes())


def _textile_dir(kind: str) -> Path:
    try:
        import conformal_clip_data
    except ImportError as exc:
        raise UserError("the demo needs the pip package conformal-clip-data (pip install -r requirements.txt)") from exc
    folders = {
        "nominal": conformal_clip_data.nominal_dir,
        "local": conformal_clip_data.local_dir,
        "global": conformal_clip_data.global_dir,
    }
    return Path(folders[kind]())


def _textile_file(kind: str, index: int) -> Path:
    path = _textile_dir(kind) / f"textile_{index:04d}.jpg"
    if not path.is_file():
        raise UserError(f"{path} is missing from the conformal-clip-data package (reinstall it)")
    return path


def _write_defects(
    class_dir: Path,
    images: list[np.ndarray],
    per_kind: int,
    rng: np.random.Generator,
    foreign_fn: Callable[[int], np.ndarray],
) -> None:
    """test/<kind>/NNN.png and ground_truth/<kind>/NNN_mask.png for each kind, scales evenly tiny..large.

    Args:
        class_dir: the class folder.
        images: grey uint8 (H, W) sources, len(DEFECT_KINDS) * per_kind of them, used in order.
        per_kind: images per defect kind.
        rng: generator for the defects.
        foreign_fn: index -> grey uint8 (H, W) texture for kind "foreign".
    """
    scales = np.linspace(0.0, 1.0, per_kind) if per_kind > 1 else np.array([0.5])
    for k, kind in enumerate(DEFECT_KINDS):
        for j, scale in enumerate(scales):
            index = k * per_kind + j
            image = np.repeat(images[index][..., None], 3, axis=2)
            foreign = foreign_fn(index) if kind == "foreign" else None
            out, mask = synthesize_defect(image, kind, rng, scale=float(scale), foreign=foreign)
            _write_png(class_dir / "test" / kind / f"{j:03d}.png", out[..., 0])  # grey in, grey out
            _write_png(class_dir / "ground_truth" / kind / f"{j:03d}_mask.png", mask.astype(np.uint8) * 255)


def build_textile(root: Path, small: bool) -> None:
    """DIR/textile/textile: conformal-clip-data images copied as they are (image-level anomalies only)."""
    class_dir = root / "textile" / "textile"
    for folder, (kind, first, count) in TEXTILE_RANGES.items():
        out_dir = class_dir / folder
        out_dir.mkdir(parents=True, exist_ok=True)
        for j in range(_count(count, small)):
            shutil.copyfile(_textile_file(kind, first + j), out_dir / f"{j:03d}.jpg")


def build_fabric(root: Path, seed: int, size: int, small: bool) -> None:
    """DIR/materials/fabric: nominal textile images 301.. at SIZE px with six masked defect kinds."""
    n_train, n_good, per_kind = (_count(n, small) for n in FABRIC_COUNTS)
    n_defect = per_kind * len(DEFECT_KINDS)
    images = []
    for j in range(n_train + n_good + n_defect):
        grey = cv2.imread(str(_textile_file("nominal", FABRIC_FIRST + j)), cv2.IMREAD_GRAYSCALE)
        if grey is None:
            raise UserError(f"cannot read {_textile_file('nominal', FABRIC_FIRST + j)}")
        images.append(cv2.resize(grey, (size, size), interpolation=cv2.INTER_CUBIC))
    class_dir = root / "materials" / "fabric"
    for j, image in enumerate(images[:n_train]):
        _write_png(class_dir / "train" / "good" / f"{j:03d}.png", image)
    for j, image in enumerate(images[n_train : n_train + n_good]):
        _write_png(class_dir / "test" / "good" / f"{j:03d}.png", image)
    sources = images[n_train + n_good :]

    def foreign(index: int) -> np.ndarray:  # another defect source image, rotated: a texture orientation change
        return np.ascontiguousarray(np.rot90(sources[(index + 1) % len(sources)]))

    _write_defects(class_dir, sources, per_kind, _rng(seed, "fabric"), foreign)


def _random_view(texture: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (CROP_RANGE px) resized to SIZE, flipped/rotated, with brightness/contrast jitter."""
    side = int(rng.integers(CROP_RANGE[0], CROP_RANGE[1] + 1))
    y, x = (int(v) for v in rng.integers(0, np.array(texture.shape[:2]) - side + 1))
    crop = texture[y : y + side, x : x + side]
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    view = cv2.resize(crop, (size, size), interpolation=interpolation).astype(np.float32)
    if rng.random() < 0.5:
        view = view[:, ::-1]
    view = np.rot90(view, int(rng.integers(4)))
    contrast, brightness = rng.uniform(0.9, 1.1), rng.uniform(-10, 10)
    view = (view - view.mean()) * contrast + view.mean() + brightness
    return np.ascontiguousarray(np.clip(np.rint(view), 0, 255).astype(np.uint8))


def _load_texture(name: str) -> np.ndarray:
    """A scikit-image sample image as grey uint8 (H, W)."""
    from skimage import data as skdata

    image = getattr(skdata, name)()
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image


def _build_views(dataset_dir: Path, textures: dict[str, np.ndarray], seed: int, size: int, small: bool) -> None:
    """One class per texture: random views as good images, six masked defect kinds; foreign = the other textures."""
    n_train, n_good, per_kind = (_count(n, small) for n in SURFACE_COUNTS)
    names = list(textures)
    for name in names:
        rng = _rng(seed, f"{dataset_dir.name}/{name}")
        class_dir = dataset_dir / name
        for j in range(n_train):
            _write_png(class_dir / "train" / "good" / f"{j:03d}.png", _random_view(textures[name], size, rng))
        for j in range(n_good):
            _write_png(class_dir / "test" / "good" / f"{j:03d}.png", _random_view(textures[name], size, rng))
        sources = [_random_view(textures[name], size, rng) for _ in range(per_kind * len(DEFECT_KINDS))]
        others = [other for other in names if other != name]

        def foreign(index: int, others: list[str] = others, rng: np.random.Generator = rng) -> np.ndarray:
            return _random_view(textures[others[index % len(others)]], size, rng)

        _write_defects(class_dir, sources, per_kind, rng, foreign)


def build_surfaces(root: Path, seed: int, size: int, small: bool) -> None:
    """DIR/surfaces/{brick,grass,gravel}: random views of scikit-image textures with six masked defect kinds."""
    _build_views(root / "surfaces", {name: _load_texture(name) for name in SURFACE_CLASSES}, seed, size, small)


def build_materials(root: Path, seed: int, size: int, small: bool) -> None:
    """DIR/materials/{fabric,moon,cell,tissue}: textile fabric plus three scikit-image sources."""
    build_fabric(root, seed, size, small)
    textures = {name: _load_texture(source) for name, source in MATERIAL_TEXTURES.items()}
    _build_views(root / "materials", textures, seed, size, small)


def prepare_build_root(root: Path, marker: str, folders: tuple[str, ...], maker: str) -> None:
    """Refuse a folder with files not made by `maker`; clear the `folders` of an earlier build; leave the marker."""
    if root.exists() and not root.is_dir():
        raise UserError(f"--root {root} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not (root / marker).is_file():
        raise UserError(f"--root {root} is not empty and was not made by {maker} (no {marker}): use a new folder")
    check_writable_dir(root)
    try:
        for name in folders:
            path = root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        (root / marker).write_text(f"made by {maker}; a rebuild replaces {', '.join(f + '/' for f in folders)}\n")
    except OSError as exc:
        raise UserError(f"cannot prepare --root {root}: {exc.strerror or exc}; choose a writable folder") from exc


def _summary(metas: dict[str, dict]) -> str:
    """Table: dataset, class, train, test good, test defect, defect kinds."""
    header = ("dataset", "class", "train", "test good", "test defect", "defect kinds")
    rows = []
    for dataset, meta in metas.items():
        for name, items in meta["test"].items():
            kinds = sorted({item["specie_name"] for item in items if item["anomaly"]})
            bad = sum(item["anomaly"] for item in items)
            row = (dataset, name, len(meta["train"][name]), len(items) - bad, bad, ", ".join(kinds))
            rows.append(tuple(str(v) for v in row))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Build the offline demo datasets (textile, materials, surfaces).")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help=f"output folder (default {DEFAULT_ROOT})")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same bytes)")
    parser.add_argument("--size", type=int, default=256, help="side of the materials and surfaces images (px)")
    parser.add_argument("--small", action="store_true", help=argparse.SUPPRESS)  # tests: about 5x fewer images
    return parser.parse_args(argv)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 64 <= args.size <= 1024:
        raise UserError(f"--size {args.size} is out of range: use 64..1024")
    start = time.perf_counter()
    root = Path(args.root)
    prepare_build_root(root, MARKER, DATASETS, "data/demo.py")
    try:
        build_textile(root, args.small)
        build_materials(root, args.seed, args.size, args.small)
        build_surfaces(root, args.seed, args.size, args.small)
    except OSError as exc:  # disk full, permissions: name the folder (a write error often carries no file name)
        where = f" ({exc.filename})" if exc.filename else ""
        raise UserError(
            f"cannot write the demo datasets in {root}: {exc.strerror or exc}{where}; free some space or choose "
            "another --root, then run again (the partial build is replaced)"
        ) from exc
    metas = {}
    for dataset in DATASETS:
        metas[dataset] = scan_mvtec_layout(root / dataset, verbose=False)
        write_meta(root / dataset, metas[dataset])
    print(_summary(metas))
    print(f"wrote {', '.join(str(root / d / 'meta.json') for d in DATASETS)} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
