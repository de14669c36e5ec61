"""data/demo.py: tree and meta.json counts, byte-identical rebuilds, refusal of a foreign folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from common.pseudo_anomaly import DEFECT_KINDS
from data.demo import MARKER, main
from data.meta import load_meta, validate_meta
from tests.fixtures import tree_digest

REPO = Path(__file__).resolve().parents[2]
# --small counts: (train, test good, images per defect kind)
EXPECTED = {
    ("textile", "textile"): (20, 20, {"local": 20, "global": 20}),
    ("materials", "fabric"): (16, 12, dict.fromkeys(DEFECT_KINDS, 2)),
    **{("materials", name): (8, 6, dict.fromkeys(DEFECT_KINDS, 1)) for name in ("moon", "cell", "tissue")},
    **{("surfaces", name): (8, 6, dict.fromkeys(DEFECT_KINDS, 1)) for name in ("brick", "grass", "gravel")},
}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "out"
    assert main(["--root", str(root), "--small", "--seed", "3"]) == 0
    return root


def test_tree_and_meta_counts(demo_root):
    assert (demo_root / MARKER).is_file()
    for (dataset, name), (n_train, n_good, defects) in EXPECTED.items():
        class_dir = demo_root / dataset / name
        assert len(list((class_dir / "train" / "good").iterdir())) == n_train
        assert len(list((class_dir / "test" / "good").iterdir())) == n_good
        for kind, count in defects.items():
            assert len(list((class_dir / "test" / kind).iterdir())) == count
        meta = load_meta(demo_root / dataset)
        validate_meta(meta, demo_root / dataset, check_files=True)
        train, test = meta["train"][name], meta["test"][name]
        assert len(train) == n_train and all(item["anomaly"] == 0 for item in train)
        assert sum(1 - item["anomaly"] for item in test) == n_good
        for kind, count in defects.items():
            items = [item for item in test if item["specie_name"] == kind]
            assert len(items) == count and all(item["anomaly"] == 1 for item in items)
            masked = dataset != "textile"  # textile's local/global anomalies are image-level only
            assert all(bool(item["mask_path"]) == masked for item in items)
    assert sorted(p.name for p in (demo_root / "surfaces").iterdir()) == ["brick", "grass", "gravel", "meta.json"]
    # the two masked datasets come from disjoint sources (FDSL trains on one and tests on the other)
    assert sorted(load_meta(demo_root / "materials")["test"]) == ["cell", "fabric", "moon", "tissue"]
    assert not (demo_root / "textile" / "textile" / "ground_truth").exists()


def test_images_and_masks(demo_root):
    textile = cv2.imread(str(demo_root / "textile/textile/train/good/000.jpg"), cv2.IMREAD_UNCHANGED)
    assert textile.shape[:2] == (250, 250)
    meta = load_meta(demo_root / "materials")
    areas = []
    for item in meta["test"]["fabric"]:
        image = cv2.imread(str(demo_root / "materials" / item["img_path"]), cv2.IMREAD_UNCHANGED)
        assert image.shape[:2] == (256, 256)
        if item["anomaly"]:
            mask = cv2.imread(str(demo_root / "materials" / item["mask_path"]), cv2.IMREAD_UNCHANGED)
            assert mask.shape == (256, 256) and set(np.unique(mask)) == {0, 255}
            areas.append((mask > 0).mean())
    assert min(areas) < 0.005 and max(areas) > 0.05  # scales spread from tiny to large


def test_deterministic_and_idempotent(demo_root, tmp_path):
    other = tmp_path / "again"
    assert main(["--root", str(other), "--small", "--seed", "3"]) == 0
    expected = tree_digest(demo_root, exclude=())
    assert tree_digest(other, exclude=()) == expected
    (other / "materials" / "fabric" / "train" / "good" / "stale.png").write_bytes(b"x")  # left over from an older build
    assert main(["--root", str(other), "--small", "--seed", "3"]) == 0  # rebuild in place
    assert tree_digest(other, exclude=()) == expected


def test_seed_changes_defects(demo_root, tmp_path):
    other = tmp_path / "seed4"
    assert main(["--root", str(other), "--small", "--seed", "4"]) == 0
    a, b = tree_digest(demo_root, exclude=()), tree_digest(other, exclude=())
    assert a.keys() == b.keys()
    assert a["textile/textile/train/good/000.jpg"] == b["textile/textile/train/good/000.jpg"]  # copied as is
    hole = "materials/fabric/ground_truth/hole/000_mask.png"
    assert a[hole] != b[hole]


def test_refuses_foreign_folder(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("keep me")
    run = subprocess.run(
        [sys.executable, str(REPO / "data" / "demo.py"), "--root", str(root), "--small"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and "not empty" in run.stderr
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]
