"""Dev benchmark data: test defects are exact and separate from training code; folds leave their source out."""

import ast
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from data import devbench
from data.test_defects import MIN_CHANGE, TEST_FAMILIES, draw_test_defect

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("devbench")
    devbench.build(root, seed=0, small=True, sources=("brick", "washer", "fabric", "textile_real"))
    return root


@pytest.mark.parametrize("family", TEST_FAMILIES)
def test_mask_is_exactly_the_changed_pixels(family):
    rng = np.random.default_rng(3)
    image = devbench.render_washer(np.random.default_rng(0))
    new, mask = draw_test_defect(image, family, rng)
    change = np.abs(new.astype(int) - image.astype(int))
    assert mask.sum() >= 4
    assert np.array_equal(mask, change >= MIN_CHANGE)
    assert np.all(change[~mask] == 0)  # below-threshold changes were reverted, nothing hides outside the mask
    again, mask2 = draw_test_defect(image, family, np.random.default_rng(3))
    assert np.array_equal(again, new) and np.array_equal(mask, mask2)


def test_defects_are_small_to_medium():
    rng = np.random.default_rng(0)
    image = devbench.render_plate(np.random.default_rng(1))
    fractions = [draw_test_defect(image, f, rng)[1].mean() for f in TEST_FAMILIES for _ in range(5)]
    assert max(fractions) < 0.08 and min(fractions) > 0  # localised defects, not texture-wide changes


def test_training_code_never_imports_the_test_generators():
    for folder in ("common", "fdsl", "pcsnet", "baseline"):
        for path in (REPO / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
            assert not any("test_defects" in n or "devbench" in n for n in names), path


def test_folds_leave_the_tested_group_out(built):
    folds = built / "folds"
    assert sorted(p.name for p in folds.iterdir()) == ["all", "brick", "textile", "washer"]
    for group in ("brick", "textile", "washer"):
        meta = json.loads((folds / group / "meta.json").read_text())
        trained_on = set(meta["test"])
        assert not {s for s, g in devbench.GROUP.items() if g == group} & trained_on
        assert trained_on  # something to train on
    assert set(json.loads((folds / "all" / "meta.json").read_text())["test"]) == {"brick", "washer", "fabric"}


def test_test_split_has_every_family_with_masks_and_real_textile(built):
    meta = json.loads((built / "test" / "meta.json").read_text())
    kinds = {i["specie_name"] for i in meta["test"]["brick"] if i["anomaly"]}
    assert kinds == set(TEST_FAMILIES)
    for item in meta["test"]["brick"]:
        if item["anomaly"]:
            mask = cv2.imread(str(built / "test" / item["mask_path"]), cv2.IMREAD_GRAYSCALE)
            assert mask.max() == 255
    real = {i["specie_name"] for i in meta["test"]["textile_real"] if i["anomaly"]}
    assert real == {"local", "global"}
    assert all(i["mask_path"] == "" for i in meta["test"]["textile_real"])


def test_aux_and_test_views_are_different_images(built):
    test = cv2.imread(str(built / "test" / "fabric" / "train" / "good" / "000.png"), cv2.IMREAD_GRAYSCALE)
    aux = cv2.imread(str(built / "aux" / "fabric" / "fabric" / "train" / "good" / "000.png"), cv2.IMREAD_GRAYSCALE)
    assert test.shape == aux.shape and np.abs(test.astype(int) - aux.astype(int)).mean() > 5
