"""data/dataset.py: image/mask reading, preprocessing, AnomalyDataset and load_images."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from common.utils import UserError
from data import visa
from data.dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AnomalyDataset,
    load_images,
    preprocess_image,
    preprocess_mask,
    read_image,
    read_mask,
)
from data.meta import scan_mvtec_layout, write_meta
from tests.fixtures import make_mvtec_tree, make_visa_tree

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def build(root: Path, **kwargs) -> Path:
    """A synthetic MVTec tree with its meta.json written."""
    root = make_mvtec_tree(root, **kwargs)
    write_meta(root, scan_mvtec_layout(root, verbose=False))
    return root


# ------------------------------------------------------------------------------------------------ reading


def test_read_image_converts_modes_to_rgb_uint8(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, size=(5, 7), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    out = read_image(tmp_path / "gray.png")
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    assert (out == gray[:, :, None]).all()

    rgba = rng.integers(0, 256, size=(5, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert (read_image(tmp_path / "rgba.png") == rgba[:, :, :3]).all()

    deep = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # 16-bit grayscale PNG
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert read_image(tmp_path / "deep.png")[0].tolist() == [[0, 0, 0], [100, 100, 100], [255, 255, 255]]

    palette = Image.fromarray(gray).convert("P")
    palette.save(tmp_path / "palette.png")
    assert read_image(tmp_path / "palette.png").shape == (5, 7, 3)


def _truncated_png(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:400])


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.write_text("not an image"), "cannot read"),
        (_truncated_png, "cannot read"),
    ],
    ids=["missing", "zero-byte", "garbage", "truncated"],
)
@pytest.mark.parametrize("reader", [read_image, read_mask])
def test_unreadable_files_raise_user_error_naming_them(tmp_path: Path, make, problem: str, reader) -> None:
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(UserError, match=re.escape(str(path))) as info:
        reader(path)
    assert problem in str(info.value)


def test_read_mask_binarises_any_nonzero(tmp_path: Path) -> None:
    values = np.array([[0, 1, 2], [0, 255, 0]], dtype=np.uint8)  # VisA-style small label values
    Image.fromarray(values).save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png")
    assert mask.dtype == bool and mask.tolist() == [[False, True, True], [False, True, False]]
    color = np.zeros((2, 3, 3), dtype=np.uint8)
    color[1, 2, 0] = 1  # a dark red pixel, which an L conversion would round to 0
    Image.fromarray(color).save(tmp_path / "rgb.png")
    assert read_mask(tmp_path / "rgb.png").tolist() == [[False] * 3, [False, False, True]]


# ------------------------------------------------------------------------------------------------ preprocessing


def test_preprocess_image_normalises_and_squashes() -> None:
    flat = np.full((10, 20, 3), 128, dtype=np.uint8)
    out = preprocess_image(flat, 16, IMAGENET_MEAN, IMAGENET_STD)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    expected = (128 / 255 - MEAN) / STD
    assert torch.allclose(out, expected.expand(3, 16, 16), atol=1e-5)
    halves = np.zeros((20, 40, 3), dtype=np.uint8)
    halves[:, 20:] = 255  # a wide image: a squash keeps both halves, a centre crop would not
    pixels = preprocess_image(halves, 16) * STD + MEAN
    assert torch.allclose(pixels[:, :, :6], torch.zeros(1), atol=0.02)
    assert torch.allclose(pixels[:, :, 10:], torch.ones(1), atol=0.02)
    with pytest.raises(UserError, match="image size must be a positive integer"):
        preprocess_image(flat, 0)


def test_preprocess_mask_is_binary_and_resized() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[:20, :20] = True
    out = preprocess_mask(mask, 20)
    assert out.shape == (1, 20, 20) and out.dtype == torch.float32
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert out.sum() == 100 and out[0, :10, :10].all()
    thin = np.zeros((64, 64), dtype=bool)
    thin[:, 0] = True  # one column: averaged below 0.5 when shrunk 8x, so it vanishes
    assert preprocess_mask(thin, 8).sum() == 0


# ------------------------------------------------------------------------------------------------ dataset


def test_dataset_round_trip(tmp_path: Path) -> None:
    root = build(tmp_path, classes=("a", "b"), defects={"crack": 2, "scratch": 1})
    shutil.rmtree(root / "a/ground_truth/scratch")
    shutil.rmtree(root / "b/ground_truth/scratch")
    write_meta(root, scan_mvtec_layout(root, verbose=False))
    ds = AnomalyDataset(root, "test", image_size=32)
    assert len(ds) == 12 and ds.class_names == ["a", "b"]
    assert ds.class_indices == {"a": range(6), "b": range(6, 12)}
    for index in range(len(ds)):
        sample = ds[index]
        assert set(sample) == {"image", "gt_mask", "gt_label", "has_mask", "class_name", "specie_name", "img_path"}
        assert sample["class_name"] == ("a" if index < 6 else "b")
        assert sample["image"].shape == (3, 32, 32) and sample["gt_mask"].shape == (1, 32, 32)
        assert set(sample["gt_mask"].unique().tolist()) <= {0.0, 1.0}
        specie = sample["specie_name"]
        assert sample["gt_label"] == int(specie != "good")
        assert sample["has_mask"] == (specie != "scratch")
        if specie == "crack":
            mask_path = root / sample["img_path"].replace("/test/", "/ground_truth/").replace(".png", "_mask.png")
            assert torch.equal(sample["gt_mask"], preprocess_mask(read_mask(mask_path), 32))
            assert sample["gt_mask"].sum() > 0
        else:
            assert sample["gt_mask"].sum() == 0
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["has_mask"].dtype == torch.bool
    assert len(batch["img_path"]) == 4
    train = AnomalyDataset(root, "train", image_size=32)
    assert len(train) == 12 and all(item["anomaly"] == 0 for item in train.items)


def test_dataset_grayscale_gives_three_equal_channels(tmp_path: Path) -> None:
    root = build(tmp_path, classes=("g",), grayscale=True)
    image = AnomalyDataset(root, "test", image_size=24)[0]["image"]
    pixels = image * STD + MEAN
    assert image.shape == (3, 24, 24)
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[1], pixels[2], atol=1e-5)


def test_dataset_class_selection(tmp_path: Path) -> None:
    root = build(tmp_path, classes=("a", "b", "c"))
    assert {item["cls_name"] for item in AnomalyDataset(root, class_names=["b"]).items} == {"b"}
    assert AnomalyDataset(root, class_names="c").class_names == ["c"]
    assert AnomalyDataset(root, class_names=["c", "a"]).class_names == ["a", "c"]  # meta order
    with pytest.raises(UserError, match=r"unknown class name.*zip.*known: a, b, c"):
        AnomalyDataset(root, class_names=["a", "zip"])
    with pytest.raises(UserError, match="no split 'val'"):
        AnomalyDataset(root, split="val")


def test_dataset_without_meta_json_says_how_to_make_it(tmp_path: Path) -> None:
    root = make_mvtec_tree(tmp_path)
    with pytest.raises(UserError, match=r"python data/mvtec\.py"):
        AnomalyDataset(root)
    meta = scan_mvtec_layout(root, verbose=False)
    assert len(AnomalyDataset(root, meta=meta)) == 12  # an in-memory meta needs no file


def test_mask_size_mismatch_names_both_files(tmp_path: Path) -> None:
    root = build(tmp_path, classes=("a",), size=48)
    mask_path = root / "a/ground_truth/crack/001_mask.png"
    Image.fromarray(np.full((40, 48), 255, dtype=np.uint8)).save(mask_path)
    ds = AnomalyDataset(root, image_size=16)
    index = next(i for i, item in enumerate(ds.items) if item["mask_path"].endswith("001_mask.png"))
    with pytest.raises(UserError) as info:
        ds[index]
    assert str(mask_path) in str(info.value) and str(root / "a/test/crack/001.png") in str(info.value)


def test_dataset_reports_truncated_image(tmp_path: Path) -> None:
    root = build(tmp_path, classes=("a",))
    broken = root / ("a/test/good/001.png")
    broken.write_bytes(broken.read_bytes()[:100])
    ds = AnomalyDataset(root, image_size=16)
    index = next(i for i, item in enumerate(ds.items) if item["img_path"] == "a/test/good/001.png")
    with pytest.raises(UserError, match=re.escape(str(broken))):
        ds[index]


def test_load_images_matches_dataset(tmp_path: Path) -> None:
    root = build(tmp_path, classes=("a",))
    ds = AnomalyDataset(root, "train", image_size=32)
    paths = [ds.items[3]["img_path"], ds.items[0]["img_path"]]
    support = load_images(root, paths, 32, IMAGENET_MEAN, IMAGENET_STD)
    assert support.shape == (2, 3, 32, 32)
    assert torch.equal(support[0], ds[3]["image"]) and torch.equal(support[1], ds[0]["image"])
    assert load_images(root, [], 32).shape == (0, 3, 32, 32)
    with pytest.raises(UserError, match=r"a/train/good/999\.png does not exist"):
        load_images(root, ["a/train/good/999.png"], 32)


def test_visa_masks_reach_the_dataset(tmp_path: Path) -> None:
    root = make_visa_tree(tmp_path, classes=("pcb1",))
    assert visa.main(["--root", str(root)]) == 0
    ds = AnomalyDataset(root, image_size=24)
    labels = [(s["gt_label"], s["has_mask"], float(s["gt_mask"].sum()) > 0) for s in (ds[i] for i in range(len(ds)))]
    assert labels == [(0, True, False), (0, True, False), (1, True, True), (1, False, False)]
