"""Predict on new images from a few good ones: LOO threshold logic, the CLI's outputs, unreadable files, the API."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import api
from baseline.predict import main
from common.predict import Predictor, collect_images, threshold_from_scores
from common.utils import UserError
from tests.fixtures import make_mvtec_tree, one_thread  # noqa: F401  (autouse fixture)

# ------------------------------------------------------------------ threshold rules and LOO on a fake detector


def test_threshold_rules_exact():
    assert threshold_from_scores([1.0, 2.0, 4.0], "max", margin=0.1) == pytest.approx(4.4)
    assert threshold_from_scores([-2.0, -1.0], "max", margin=0.1) == pytest.approx(-0.9)  # margin widens, always
    assert threshold_from_scores([1.0, 2.0, 3.0], "meanstd", z=3.0) == pytest.approx(2.0 + 3.0 * np.sqrt(2 / 3))
    assert threshold_from_scores([1.0, 1.2], "meanstd", z=0.5) == pytest.approx(1.2)  # < 3 scores: not below max
    with pytest.raises(ValueError):
        threshold_from_scores([], "max")
    with pytest.raises(UserError):
        threshold_from_scores([1.0], "median")


class FakeDetector:
    """Images are constant grey levels 10 * id. score = 10 * query id + sum of the support ids (map = that value)."""

    mean, std, image_size, smooth_sigma = (0.0,) * 3, (1.0,) * 3, 8, 0.0

    def __init__(self, own_score: bool = False):
        self.setups: list[torch.Tensor] = []
        self.own_score = own_score

    @staticmethod
    def ids(images: torch.Tensor) -> torch.Tensor:
        return torch.round(images.flatten(1).mean(1) * 255 / 10)

    def setup(self, class_name, support_images):
        self.setups.append(support_images.clone())
        self.support_sum = float(self.ids(support_images).sum())

    def predict(self, images):
        values = 10 * self.ids(images) + self.support_sum
        maps = values[:, None, None].expand(-1, 4, 4).clone()
        return (values / 100 if self.own_score else None), maps


def _grey(value: int, size: tuple[int, int] = (6, 5)) -> np.ndarray:
    return np.full((*size, 3), value, np.uint8)


def test_leave_one_out_scores_and_setup_order():
    fake = FakeDetector()
    predictor = Predictor(fake, [_grey(10), _grey(20, (9, 7)), _grey(30)], margin=0.1)
    # reference i scored with the detector set up on the others: 10*1 + (2+3), 10*2 + (1+3), 10*3 + (1+2)
    assert predictor.loo.scores.tolist() == [15.0, 24.0, 33.0]
    assert predictor.threshold == pytest.approx(33.0 * 1.1) and predictor.pixel_threshold == predictor.threshold
    assert [fake.ids(s).tolist() for s in fake.setups] == [[2, 3], [1, 3], [1, 2], [1, 2, 3]]  # last: all of them
    score, anomaly_map = predictor.predict(_grey(40, (11, 13)))
    assert score == 10 * 4 + 6 and anomaly_map.shape == (11, 13)
    assert predictor.decide(score) and not predictor.decide(36.0)
    info = predictor.threshold_info()
    assert info["rule"] == "max" and info["loo_scores"] == [15.0, 24.0, 33.0] and info["pseudo_reference"] is None


def test_single_reference_uses_its_mirror_image():
    fake = FakeDetector()
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :4] = 20  # left half only: the mirror image differs
    predictor = Predictor(fake, [image])
    assert predictor.loo.pseudo == "hflip" and len(predictor.loo.scores) == 2 and len(fake.setups) == 3
    support = fake.setups[-1][0]
    assert torch.equal(fake.setups[0][0], support.flip(-1))  # the reference is scored against its mirror image
    assert torch.equal(fake.setups[1][0], support)  # and the mirror image against the reference


def test_user_threshold_skips_the_leave_one_out():
    fake = FakeDetector()
    predictor = Predictor(fake, [_grey(10), _grey(20)], threshold=30.0)
    assert len(fake.setups) == 1 and predictor.threshold == predictor.pixel_threshold == 30.0
    info = predictor.threshold_info()
    assert info["rule"] == "user" and info["loo_scores"] == [] and info["value"] == 30.0
    # colour scale: blue at the references' own maps' floor (10 * 1 + 3), the threshold mid-scale
    assert predictor.color_range == pytest.approx((13.0, 47.0))


def test_own_pred_score_gets_its_own_pixel_threshold():
    predictor = Predictor(FakeDetector(own_score=True), [_grey(10), _grey(20)], margin=0.0)
    # the detector's own scores, (10 * 1 + 2) / 100 and (10 * 2 + 1) / 100, set the image threshold
    assert predictor.loo.scores == pytest.approx([0.12, 0.21]) and predictor.threshold == pytest.approx(0.21)
    assert predictor.pixel_threshold == pytest.approx(21.0)  # the same rule on the LOO map maxima


# ------------------------------------------------------------------ the CLI on synthetic parts


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """4 grey references (64 px); queries: 6 good + 6 defects, some 96x80, some RGB, a 0-byte and a corrupt file."""
    base = tmp_path_factory.mktemp("predict")
    tree = make_mvtec_tree(
        base / "tree", classes=("part",), n_train=4, n_test_good=6, defects={"crack": 6}, size=64, grayscale=True
    )
    refs, queries = tree / "part" / "train" / "good", base / "queries"
    queries.mkdir()
    labels = {}
    for kind in ("good", "crack"):
        for i, src in enumerate(sorted((tree / "part" / "test" / kind).iterdir())):
            image = Image.open(src).resize((96, 80) if i % 2 else (64, 64))
            image = image.convert("RGB") if i % 3 == 0 else image  # same content, 3 channels
            name = f"{kind}_{i}" + (".jpg" if i == 5 else ".png")
            image.save(queries / name, quality=98)
            labels[name] = kind != "good"
    (queries / "empty.png").write_bytes(b"")
    (queries / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (queries / "notes.txt").write_text("not an image")
    out = base / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("stale\n")
    return refs, queries, out, labels


@pytest.fixture(scope="module")
def cli_run(parts):
    refs, queries, out, labels = parts
    code = main(
        ["--reference", str(refs), "--images", str(queries), "--out", str(out), "--image-size", "64", "--quiet"]
    )
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    return code, rows, json.loads((out / "threshold.json").read_text()), labels, out


def test_cli_decisions_match_labels(cli_run):
    code, rows, info, labels, _ = cli_run
    assert code == 0
    decided = {Path(r["image"]).name: r["decision"] == "anomalous" for r in rows if r["decision"] != "unreadable"}
    assert set(decided) == set(labels)
    agree = sum(decided[name] == label for name, label in labels.items())
    assert agree >= len(labels) - 2, decided
    # the threshold comes from the references only: normal images are not all flagged (anomalib's adaptive failure)
    assert sum(decided[name] for name, label in labels.items() if not label) <= 1


def test_cli_outputs_sizes_and_threshold_json(cli_run):
    _, rows, info, _, out = cli_run
    assert list(rows[0]) == ["image", "width", "height", "score", "decision", "panel", "error"]
    assert info["rule"] == "max" and len(info["loo_scores"]) == 4 and info["k_shot"] == 4
    assert info["value"] == pytest.approx(max(info["loo_scores"]) * 1.1)
    for row in rows:
        if row["decision"] == "unreadable":
            continue
        width, height = int(row["width"]), int(row["height"])
        assert (width, height) in ((64, 64), (96, 80))
        panel = Image.open(out / row["panel"])
        assert panel.size[0] == 3 * width and panel.size[1] > height  # image | overlay | outline (+ title)


def test_unreadable_files_are_listed_and_skipped(cli_run, capsys):
    _, rows, _, labels, _ = cli_run
    bad = {Path(r["image"]).name: r["error"] for r in rows if r["decision"] == "unreadable"}
    assert set(bad) == {"empty.png", "broken.jpg"}  # notes.txt: not an image suffix, never listed
    assert "0 bytes" in bad["empty.png"] and bad["broken.jpg"]
    assert len(rows) == len(labels) + 2


def test_cli_bad_input_exit_2_one_line(tmp_path, parts):
    refs, queries, _, _ = parts
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "baseline.predict",
            "--reference",
            str(refs),
            "--images",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error:") and proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr


def test_no_readable_reference_is_a_user_error(tmp_path, parts, capsys):
    _, queries, _, _ = parts
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "a.png").write_bytes(b"")
    code = main(["--reference", str(tmp_path / "refs"), "--images", str(queries), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "none of the 1 reference images could be read" in err and err.count("\n") == 1


def test_collect_images_folder_is_sorted_non_recursive(tmp_path):
    for name in ("b.PNG", "a.tif", "c.bmp", "d.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.png").write_bytes(b"x")
    assert [p.name for p in collect_images(tmp_path)] == ["a.tif", "b.PNG", "c.bmp"]
    assert [p.name for p in collect_images([tmp_path / "d.txt", tmp_path / "a.tif"])] == ["d.txt", "a.tif"]


# ------------------------------------------------------------------ the Python API


def test_api_predict_returns_map_at_image_size(parts):
    refs, queries, _, labels = parts
    references = [np.asarray(Image.open(path)) for path in sorted(refs.iterdir())]  # grey (64, 64) arrays
    references[0] = np.asarray(Image.fromarray(references[0]).resize((72, 88)))  # references of different sizes
    detector = api.build_detector("knn", references, image_size=64)
    assert detector.k_shot == 4 and len(detector.loo.scores) == 4
    score, anomaly_map = detector.predict(queries / "crack_1.png")  # 96 x 80
    assert isinstance(score, float) and anomaly_map.shape == (80, 96) and anomaly_map.dtype == np.float32
    assert detector.decide(score) == (score > detector.threshold)
    grey = np.asarray(Image.open(queries / "good_0.png").convert("L"))
    score2, map2 = detector.predict(grey)
    assert map2.shape == grey.shape and np.isfinite(score2)


def test_api_registry_errors(monkeypatch):
    assert api.BUILDERS["fdsl"] == ("fdsl.predict", "build_fdsl_detector")
    assert api.BUILDERS["pcsnet"] == ("pcsnet.predict", "build_pcsnet_detector")
    with pytest.raises(UserError, match="unknown method"):
        api.load_builder("nope")
    monkeypatch.setitem(api.BUILDERS, "fdsl", ("fdsl.no_such_module", "build_fdsl_detector"))
    with pytest.raises(UserError, match="no predict support yet"):
        api.load_builder("fdsl")
    monkeypatch.setitem(api.BUILDERS, "pcsnet", ("common.utils", "build_pcsnet_detector"))
    with pytest.raises(UserError, match="build_pcsnet_detector not found"):
        api.load_builder("pcsnet")
