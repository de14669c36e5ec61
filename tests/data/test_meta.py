"""meta.json: the MVTec-layout scanner, load/validate/write, and the generator CLIs (mvtec, mpdd, visa)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.utils import UserError
from data import mpdd, mvtec, visa
from data.dataset import read_image, read_mask
from data.meta import class_names, load_meta, scan_mvtec_layout, validate_meta, write_meta
from tests.fixtures import make_mvtec_tree, make_visa_tree, tree_digest

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


# ------------------------------------------------------------------------------------------------ scanner


def test_scan_counts_labels_and_paths(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_mvtec_tree(tmp_path / "ds", classes=("b", "a"), defects={"crack": 3, "scratch": 2})
    meta = scan_mvtec_layout(root)
    assert list(meta) == ["train", "test"]
    assert class_names(meta, "train") == class_names(meta, "test") == ["a", "b"]
    for name in ("a", "b"):
        train, test = meta["train"][name], meta["test"][name]
        assert len(train) == 6 and all(i["anomaly"] == 0 and i["specie_name"] == "good" for i in train)
        assert all(i["mask_path"] == "" and i["img_path"].startswith(f"{name}/train/good/") for i in train)
        assert [i["anomaly"] for i in test].count(0) == 3
        assert sorted(i["specie_name"] for i in test if i["anomaly"]) == ["crack"] * 3 + ["scratch"] * 2
        for item in test:
            assert item["cls_name"] == name and "\\" not in item["img_path"] and not item["img_path"].startswith("/")
            assert (root / item["img_path"]).is_file()
            if item["anomaly"]:
                stem = Path(item["img_path"]).stem
                assert item["mask_path"] == f"{name}/ground_truth/{item['specie_name']}/{stem}_mask.png"
            else:
                assert item["mask_path"] == "" and item["specie_name"] == "good"
    out = capsys.readouterr().out
    assert "a: train 6 normal | test 3 normal, 5 anomalous" in out


def test_class_discovery_uses_folders_with_train_or_test(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_mvtec_tree(tmp_path, classes=("bottle",), defects={"crack": 1})
    make_mvtec_tree(tmp_path, classes=("zz_test_only",), n_train=0, defects={"crack": 1})
    (root / "notes" / "good").mkdir(parents=True)  # no train/ or test/: not a class
    (root / ".cache" / "test" / "good").mkdir(parents=True)  # hidden: not a class
    (root / "readme.md").write_text("not a class\n")
    meta = scan_mvtec_layout(root)
    assert class_names(meta, "test") == ["bottle", "zz_test_only"]
    assert meta["train"]["zz_test_only"] == [] and len(meta["test"]["zz_test_only"]) == 4
    out = capsys.readouterr().out
    assert "zz_test_only: train 0 normal" in out and "no training images" in out


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_masks_pair_by_stem_not_by_sorted_position(tmp_path: Path) -> None:
    # Sorted images: 1, 10, 2; sorted masks: 10_mask, 1_mask, 2 -> pairing by position would mis-pair 1 and 10.
    root = tmp_path
    _write(root / "c/train/good/0.png", np.zeros((32, 32, 3), np.uint8))
    areas = {}
    for stem, mask_name in (("1", "1_mask.png"), ("2", "2.png"), ("10", "10_mask.png")):
        rows = int(stem) + 2
        image, mask = np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.uint8)
        image[:rows, :5], mask[:rows, :5] = 255, 255
        areas[stem] = rows * 5
        _write(root / f"c/test/crack/{stem}.PNG", image)  # upper-case extension is an image too
        _write(root / f"c/ground_truth/crack/{mask_name}", mask)
    items = scan_mvtec_layout(root, verbose=False)["test"]["c"]
    assert [Path(i["img_path"]).name for i in items] == ["1.PNG", "10.PNG", "2.PNG"]
    assert [Path(i["mask_path"]).name for i in items] == ["1_mask.png", "10_mask.png", "2.png"]
    for item in items:
        mask = read_mask(root / item["mask_path"])
        assert mask.sum() == areas[Path(item["img_path"]).stem]
        assert (read_image(root / item["img_path"])[mask] == 255).all()


def test_defect_without_ground_truth_folder_is_image_level(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_mvtec_tree(tmp_path, classes=("a",), defects={"crack": 2, "scratch": 2})
    shutil.rmtree(root / "a/ground_truth/scratch")
    items = scan_mvtec_layout(root)["test"]["a"]
    assert {i["mask_path"] for i in items if i["specie_name"] == "scratch"} == {""}
    assert all(i["mask_path"] for i in items if i["specie_name"] == "crack")
    assert "2 anomalous without masks (scratch): image-level only" in capsys.readouterr().out


@pytest.mark.parametrize(
    "breakage, named",
    [
        (lambda r: (r / "a/ground_truth/crack/001_mask.png").unlink(), "a/test/crack/001.png"),
        (
            lambda r: shutil.copy(r / "a/ground_truth/crack/000_mask.png", r / "a/ground_truth/crack/007_mask.png"),
            "a/ground_truth/crack/007_mask.png",
        ),
        (
            lambda r: shutil.copy(r / "a/ground_truth/crack/000_mask.png", r / "a/ground_truth/crack/000.png"),
            "a/ground_truth/crack/000.png",
        ),
        (
            lambda r: shutil.copytree(r / "a/ground_truth/crack", r / "a/ground_truth/dent"),
            "a/ground_truth/dent/000_mask.png",
        ),
        (lambda r: shutil.copy(r / "a/test/good/000.png", r / "a/test/loose.png"), "a/test/loose.png"),
    ],
    ids=["image-without-mask", "mask-without-image", "two-masks-one-image", "mask-folder-without-images", "loose"],
)
def test_broken_trees_raise_naming_the_file(tmp_path: Path, breakage, named: str) -> None:
    root = make_mvtec_tree(tmp_path, classes=("a",))
    breakage(root)
    with pytest.raises(UserError, match=re.escape(str(root / named))):
        scan_mvtec_layout(root, verbose=False)


def test_missing_or_empty_root(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'nope'} does not exist")):
        scan_mvtec_layout(tmp_path / "nope")
    (tmp_path / "empty" / "stuff").mkdir(parents=True)
    with pytest.raises(UserError, match=re.escape(f"no class folders with train/ or test/ under {tmp_path / 'empty'}")):
        scan_mvtec_layout(tmp_path / "empty")
    root = make_mvtec_tree(tmp_path / "ds", classes=("a",))
    with pytest.raises(UserError, match="pass its parent"):
        scan_mvtec_layout(root / "a")


# ------------------------------------------------------------------------------------------------ load / write


def test_write_then_load_round_trip_changes_only_meta_json(tmp_path: Path) -> None:
    root = make_mvtec_tree(tmp_path, classes=("a", "b"))
    meta = scan_mvtec_layout(root, verbose=False)
    before = tree_digest(root)
    path = write_meta(root, meta)
    assert path == root / "meta.json"
    assert path.read_text() == json.dumps(meta, indent=4) + "\n"
    assert tree_digest(root) == before  # nothing else written, no temp file left
    assert load_meta(root) == meta
    validate_meta(meta, root, check_files=True)


def test_load_meta_missing_file_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"meta\.json not found.*python data/mvtec\.py --root"):
        load_meta(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_meta(tmp_path / "missing")


def test_load_meta_corrupt_json(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text('{"train": {')
    with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'meta.json'} is not valid JSON")):
        load_meta(tmp_path)


GOOD_ITEM = {"img_path": "a/test/good/0.png", "mask_path": "", "cls_name": "a", "specie_name": "good", "anomaly": 0}
NO_LABEL_ITEM = {key: value for key, value in GOOD_ITEM.items() if key != "anomaly"}


@pytest.mark.parametrize(
    "meta, problem",
    [
        ([], "top level must be an object"),
        ({"test": {}}, "missing split.*'train'"),
        ({"train": {}, "test": {}, "val": {}}, "unknown split.*'val'"),
        ({"train": {}, "test": {"a": {}}}, "test/a must be a list"),
        ({"train": {}, "test": {"a": [{**GOOD_ITEM, "anomaly": None}]}}, "'anomaly' must be 0 or 1"),
        ({"train": {}, "test": {"a": [NO_LABEL_ITEM]}}, "missing key.*anomaly"),
        ({"train": {}, "test": {"a": [{**GOOD_ITEM, "anomaly": 2}]}}, "'anomaly' must be 0 or 1"),
        ({"train": {}, "test": {"a": [{**GOOD_ITEM, "anomaly": True}]}}, "'anomaly' must be 0 or 1"),
        ({"train": {}, "test": {"a": [{**GOOD_ITEM, "cls_name": "b"}]}}, "differs from its class key"),
        ({"train": {}, "test": {"a": [{**GOOD_ITEM, "img_path": 3}]}}, "'img_path' must be a string"),
        ({"train": {}, "test": {"a": ["x"]}}, "test/a item 0"),
    ],
)
def test_load_meta_rejects_bad_structure(tmp_path: Path, meta: object, problem: str) -> None:
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "meta.json")) + ".*" + problem):
        load_meta(tmp_path)


def test_validate_check_files_names_first_missing(tmp_path: Path) -> None:
    root = make_mvtec_tree(tmp_path, classes=("a",))
    meta = scan_mvtec_layout(root, verbose=False)
    missing = root / "a/ground_truth/crack/002_mask.png"
    missing.unlink()
    validate_meta(meta, root)  # structure only: fine
    with pytest.raises(UserError, match=re.escape(f"mask_path {missing} does not exist")):
        validate_meta(meta, root, check_files=True)


def test_write_meta_refuses_bad_meta_or_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing split"):
        write_meta(tmp_path, {"test": {}})
    assert not (tmp_path / "meta.json").exists()
    with pytest.raises(UserError, match="does not exist"):
        write_meta(tmp_path / "nope", {"train": {}, "test": {}})
    assert not (tmp_path / "nope").exists()


def test_class_names_keep_meta_order() -> None:
    meta = {"train": {"z": [], "a": []}, "test": {"m": [], "b": []}}
    assert class_names(meta) == ["m", "b"] and class_names(meta, "train") == ["z", "a"]
    with pytest.raises(UserError, match="no split 'val'"):
        class_names(meta, "val")


# ------------------------------------------------------------------------------------------------ CLIs


def test_mvtec_cli_writes_only_meta_json(tmp_path: Path) -> None:
    root = make_mvtec_tree(tmp_path / "ds", classes=("a", "b"))
    before = tree_digest(root)
    result = run_cli("data/mvtec.py", "--root", str(root))
    assert result.returncode == 0, result.stderr
    assert "a: train 6 normal | test 3 normal, 3 anomalous" in result.stdout
    assert load_meta(root) == scan_mvtec_layout(root, verbose=False)
    assert tree_digest(root) == before
    assert sorted(p.name for p in root.iterdir()) == ["a", "b", "meta.json"]


def test_mpdd_cli_in_process(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_mvtec_tree(tmp_path / "ds", classes=("tubes",))
    assert mpdd.main(["--root", str(root)]) == 0
    assert class_names(load_meta(root)) == ["tubes"] and "tubes: train 6 normal" in capsys.readouterr().out


def test_mvtec_cli_broken_tree_exits_2_with_one_line_and_writes_nothing(tmp_path: Path) -> None:
    root = make_mvtec_tree(tmp_path / "ds", classes=("a",))
    (root / "a/ground_truth/crack/000_mask.png").unlink()
    before = tree_digest(root)
    result = run_cli("data/mvtec.py", "--root", str(root))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: image ") and str(root) in lines[0], result.stderr
    assert tree_digest(root) == before and not (root / "meta.json").exists()


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_mvtec_cli_bad_root_in_process(tmp_path: Path, capsys: pytest.CaptureFixture, case: str) -> None:
    root = tmp_path / "ds"
    if case == "empty":
        root.mkdir()
    assert mvtec.main(["--root", str(root)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1 and str(root) in captured.err
    assert captured.out == ""
    assert sorted(tmp_path.rglob("*")) == ([root] if case == "empty" else [])


@pytest.mark.parametrize("script", ["mvtec.py", "mpdd.py", "visa.py"])
def test_cli_help_from_data_folder(script: str) -> None:
    # `cd data && python mvtec.py`: the scripts put the repo root on sys.path themselves.
    result = run_cli(script, "--help", cwd=REPO / "data")
    assert result.returncode == 0 and "--root" in result.stdout, result.stderr


def test_cli_default_root_is_next_to_script() -> None:
    default = REPO / "data" / "mvtec"
    if default.exists():
        pytest.skip("data/mvtec exists here: running the generator would write its meta.json")
    result = run_cli("mvtec.py", cwd=REPO / "data")
    assert result.returncode == 2 and f"{default} does not exist" in result.stderr


# ------------------------------------------------------------------------------------------------ VisA


def test_visa_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Columns in a non-standard order: they must be read by name, not position.
    root = make_visa_tree(tmp_path, header=("image", "label", "mask", "object", "split"))
    before = tree_digest(root)
    assert visa.main(["--root", str(root), "--check-files"]) == 0
    meta = load_meta(root)
    assert class_names(meta, "test") == class_names(meta, "train") == ["pcb1", "candle"]  # csv order
    for name in ("pcb1", "candle"):
        train, test = meta["train"][name], meta["test"][name]
        assert len(train) == 3 and all(i["anomaly"] == 0 for i in train)
        assert [i["anomaly"] for i in test] == [0, 0, 1, 1]
        assert all(i["specie_name"] == "" and i["cls_name"] == name for i in train + test)
        assert test[2]["mask_path"] == f"{name}/Data/Masks/Anomaly/test_000.png"
        assert test[3]["mask_path"] == "" and test[0]["mask_path"] == ""
        assert test[2]["img_path"] == f"{name}/Data/Images/Anomaly/test_000.JPG"
    mask = read_mask(root / meta["test"]["pcb1"][2]["mask_path"])
    assert mask.dtype == bool and mask.any()  # 0/1 mask values are foreground
    assert tree_digest(root) == before
    assert "pcb1: train 3 normal | test 2 normal, 2 anomalous" in capsys.readouterr().out


def test_visa_missing_csv(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(UserError, match=r"split_csv/1cls\.csv not found.*required"):
        visa.read_visa_csv(tmp_path)
    assert visa.main(["--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_visa_missing_column(tmp_path: Path) -> None:
    root = make_visa_tree(tmp_path, header=("object", "split", "label", "image"))
    with pytest.raises(UserError, match=r"1cls\.csv: missing column\(s\) mask"):
        visa.read_visa_csv(root)


@pytest.mark.parametrize("old, new, problem", [(",train,", ",val,", "split 'val'"), (",normal,", ",ok,", "label 'ok'")])
def test_visa_bad_cells(tmp_path: Path, old: str, new: str, problem: str) -> None:
    root = make_visa_tree(tmp_path)
    csv_path = root / "split_csv/1cls.csv"
    csv_path.write_text(csv_path.read_text().replace(old, new, 1))
    with pytest.raises(UserError, match=rf"1cls\.csv line 2: {problem}"):
        visa.read_visa_csv(root)


def test_visa_check_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_visa_tree(tmp_path)
    missing = root / "candle/Data/Images/Normal/train_001.JPG"
    missing.unlink()
    assert visa.main(["--root", str(root), "--check-files"]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (root / "meta.json").exists()
    assert visa.main(["--root", str(root)]) == 0  # without the check, the csv alone decides
