"""report.html of evaluations and predict runs: content, one image per panel, hooks in the CLIs, the index."""

import base64
import csv
import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from report import PredictRecords, write_predict_report, write_report
from report.images import THUMB
from report.index import main as index_main
from tests.fixtures import make_mvtec_dataset
from tests.report.helpers import make_class, page_images, results_for


def _decode(uri: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def test_report_has_one_image_per_panel(tmp_path):
    records = make_class(tmp_path / "data")  # 8 normals (scores 0.00-0.07) then 8 anomalies (0.08-0.15)
    path = write_report(tmp_path / "run", results_for([records], tmp_path / "data"), [records], max_images=3)
    images = page_images(path)
    alts = [i["alt"] for i in images]
    # 3 worst normals + 3 worst anomalies + 1 + 1 correct = 8 examples x 4 panels, 1 plot, 1 support image
    for panel in ("image ", "ground truth ", "heat map ", "overlay "):
        assert sum(a.startswith(panel) for a in alts) == 8, panel
    assert sum(a.startswith("ROC") for a in alts) == 1 and sum(a.startswith("support") for a in alts) == 1
    assert len(images) == 34
    # the false alarms are the highest-scoring normals 007, 006, 005; the misses the lowest anomalies 008, 009, 010
    shown = [a.split()[-1] for a in alts if a.startswith("image ")]
    assert shown == ["007.png", "006.png", "005.png", "008.png", "009.png", "010.png", "015.png", "000.png"]
    for image in images:  # every image is inline (opens from disk) and decodes
        assert image["src"].startswith("data:image/")
        decoded = _decode(image["src"])
        if image["alt"].startswith(("image ", "heat map ")):
            assert decoded.size == (THUMB, THUMB)
    text = path.read_text()
    assert "F1-max threshold" not in text or "oracle" in text
    assert not list((tmp_path / "run").glob(".*tmp"))  # atomic write: no temporary left


def test_heat_map_uses_inferno_on_the_class_scale(tmp_path):
    records = make_class(tmp_path / "data", n_normal=1, n_anomalous=1)
    path = write_report(tmp_path / "run", results_for([records], tmp_path / "data"), [records], max_images=1)
    heat = next(i for i in page_images(path) if i["alt"].startswith("heat map 001"))
    pixels = np.asarray(_decode(heat["src"]).convert("RGB"), dtype=np.int32)
    inside, outside = pixels[THUMB // 4, THUMB // 4], pixels[-2, -2]  # the mask (4:12 of 32) vs the background
    assert inside.sum() > outside.sum() + 200  # inferno: bright yellow on the defect, near black elsewhere
    assert outside.max() < 90


def test_class_without_masks_has_image_curves_only(tmp_path):
    records = make_class(tmp_path / "data", masks=False)
    path = write_report(tmp_path / "run", results_for([records], tmp_path / "data"), [records], max_images=1)
    assert "no masks: image level only" in path.read_text()
    assert sum(i["alt"].endswith("(no mask)") for i in page_images(path)) == 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_mvtec_dataset(tmp_path_factory.mktemp("rep") / "ds", classes=("a", "b"), n_train=3, n_test_good=3,
                              defects={"crack": 3}, size=48)  # fmt: skip


def _knn(dataset, out, *extra):
    from baseline.knn import main

    return main(["--dataset-root", str(dataset), "--k-shot", "1", "--save-dir", str(out), "--image-size", "64",
                 "--quiet", *extra])  # fmt: skip


def test_knn_run_writes_report_beside_results(dataset, tmp_path):
    assert _knn(dataset, tmp_path, "--report-images", "2") == 0
    results = json.loads((tmp_path / "results.json").read_text())
    text = (tmp_path / "report.html").read_text()
    for name, metrics in results["per_class"].items():
        assert f'id="c-{name}"' in text
        assert f"{100 * metrics['image_auroc']:.1f}" in text
    alts = [i["alt"] for i in page_images(tmp_path / "report.html")]
    # per class: 2 worst normals + 2 worst anomalies + 1 + 1 correct (3 of each) = 6 examples x 4 panels
    assert sum(a.startswith("overlay ") for a in alts) == 12
    assert sum(a.startswith("support ") for a in alts) == 2  # k = 1 per class, shown as thumbnails


def test_no_report_removes_a_stale_one_and_zero_images_keeps_curves(dataset, tmp_path):
    (tmp_path / "report.html").write_text("stale")
    assert _knn(dataset, tmp_path, "--no-report", "--class-name", "a") == 0
    assert (tmp_path / "results.json").is_file() and not (tmp_path / "report.html").exists()
    assert _knn(dataset, tmp_path, "--report-images", "0", "--class-name", "a") == 0
    alts = [i["alt"] for i in page_images(tmp_path / "report.html")]
    assert sum(a.startswith("ROC") for a in alts) == 1 and not any(a.startswith("overlay") for a in alts)


def test_failed_run_writes_no_report(dataset, tmp_path, monkeypatch):
    from baseline import knn

    calls = []

    def failing_predict(self, images):
        calls.append(1)
        if len(calls) > 1:  # the second class's first batch
            raise RuntimeError("boom")
        return original(self, images)

    original = knn.KNNDetector.predict
    monkeypatch.setattr(knn.KNNDetector, "predict", failing_predict)
    with pytest.raises(RuntimeError, match="boom"):
        _knn(dataset, tmp_path, "--batch-size", "16")
    assert not (tmp_path / "report.html").exists() and not (tmp_path / "results.json").exists()
    assert not list(tmp_path.glob(".*"))


def test_negative_report_images_is_one_line_exit_2(dataset, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "baseline.knn", "--dataset-root", str(dataset), "--k-shot", "1",
                           "--save-dir", str(tmp_path / "o"), "--report-images", "-1"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --report-images must be 0 or more (got -1)"
    assert not (tmp_path / "o").exists()


def test_predict_report_every_image_sorted_by_score(dataset, tmp_path):
    from baseline.predict import main

    queries = [str(p) for p in sorted((dataset / "a" / "test").rglob("*.png"))]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    assert main(["--reference", str(dataset / "a" / "train" / "good"), "--images", *queries,
                 str(tmp_path / "in" / "broken.png"), "--out", str(out), "--image-size", "64", "--quiet"]) == 0
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    text = (out / "report.html").read_text()
    shown = re.findall(r"score <b>([-0-9.e+]+)</b>", text)
    assert shown[-1] == "-" and "in/broken.png &middot; score <b>-</b>" in text  # the unreadable file comes last
    shown = [float(s) for s in shown[:-1]]
    readable = [float(r["score"]) for r in rows if r["score"]]
    assert len(shown) == len(readable) == 6
    assert shown == pytest.approx(sorted(readable, reverse=True), rel=1e-3)  # most anomalous first
    decisions = re.findall(r'<span class="(?:bad|ok)">(anomalous|normal)</span>', text)
    by_score = sorted((float(r["score"]), r["decision"]) for r in rows if r["score"])[::-1]
    assert decisions == [d for _, d in by_score]
    info = json.loads((out / "threshold.json").read_text())
    assert f"threshold {info['value']:.4g}: the largest of the 3 leave-one-out reference scores x (1 + 0.1)" in text
    alts = [i["alt"] for i in page_images(out / "report.html")]
    assert sum(a.startswith("heat map ") for a in alts) == 6 and sum(a.startswith("reference ") for a in alts) == 3


def test_predict_report_cap_and_unreadable(tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(image)
    maps = [np.full((8, 8), v, np.float32) for v in (0.1, 0.5, 0.3)] + [None]
    records = PredictRecords([str(image)] * 3 + [str(tmp_path / "gone.png")], np.array([0.1, 0.5, 0.3, np.nan]),
                             maps, ["normal", "anomalous", "normal", "unreadable"], 0.4, {"rule": "user"})  # fmt: skip
    text = write_predict_report(tmp_path / "out", records, max_images=2).read_text()
    assert re.findall(r"score <b>([0-9.]+)</b>", text) == ["0.5", "0.3"]
    assert "2 of 4 shown" in text and "given on the command line" in text


def test_index_links_every_report(dataset, tmp_path, capsys):
    assert _knn(dataset, tmp_path / "knn_a", "--class-name", "a", "--report-images", "1") == 0
    assert _knn(dataset, tmp_path / "knn_b", "--class-name", "b", "--no-report") == 0
    index = tmp_path / "index" / "index.html"
    capsys.readouterr()
    assert index_main([str(tmp_path / "knn_a"), str(tmp_path / "knn_b" / "results.json"), "--index", str(index)]) == 0
    text = index.read_text()
    links = re.findall(r'<a href="([^"]+)">', text)
    assert links == ["../knn_a/report.html"] and (index.parent / links[0]).is_file()
    assert "knn_b <span" in text and "(no report)" in text
    mean = json.loads((tmp_path / "knn_a" / "results.json").read_text())["mean"]
    assert f"{100 * mean['pixel_auroc']:.1f}" in text
    assert capsys.readouterr().out.strip() == str(index)


def test_index_bad_input_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "report", str(tmp_path / "nope"), "--index", str(tmp_path / "i.html")],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: no results.json")
    assert not (tmp_path / "i.html").exists()


def test_anomaly_without_mask_is_left_out_of_the_pixel_curves(tmp_path):
    records = make_class(tmp_path / "data", n_normal=4, n_anomalous=4)  # 32 x 32 maps, 64-pixel masks
    masks = records.gt_masks.copy()
    masks[-1] = 0  # the last anomaly's mask is unknown
    partial = records._replace(gt_masks=masks)
    text = write_report(tmp_path / "run", results_for([partial], tmp_path / "data"), [partial], max_images=4)
    text = text.read_text()
    assert f"a sample of {7 * 32 * 32} pixels" in text  # 8 images, one left out
    assert sum(i["alt"] == "ground truth 007.png (no mask)" for i in page_images(tmp_path / "run" / "report.html"))


def test_class_without_records_keeps_its_metrics_and_support(tmp_path):
    """A class restored by main.py --resume has no maps: its section says so, the others are complete."""
    done, fresh = make_class(tmp_path / "data", "done"), make_class(tmp_path / "data", "fresh")
    text = write_report(tmp_path / "run", results_for([done, fresh], tmp_path / "data"), [fresh], max_images=1)
    sections = text.read_text().split('<section id="c-')[1:]
    assert sections[0].startswith("done") and "no examples recorded" in sections[0] and "support" in sections[0]
    assert sections[1].startswith("fresh") and "no examples recorded" not in sections[1] and "ROC" in sections[1]


def test_output_guard_restores_an_earlier_report_when_a_run_fails(dataset, tmp_path, monkeypatch):
    # a run that fails on bad input midway (second class) leaves the folder as the earlier run left it
    from baseline import knn
    from common.utils import UserError

    assert _knn(dataset, tmp_path, "--report-images", "1") == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert "report.html" in before and "results.json" in before
    seen = []

    def failing_setup(self, class_name, support):
        seen.append(class_name)
        if len(seen) > 1:
            raise UserError("bad second class")
        return original(self, class_name, support)

    original = knn.KNNDetector.setup
    monkeypatch.setattr(knn.KNNDetector, "setup", failing_setup)
    assert _knn(dataset, tmp_path, "--no-report") == 2  # --no-report would remove the report, but the run fails
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_predict_no_report_removes_a_stale_one(dataset, tmp_path):
    from baseline.predict import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").write_text("stale")
    args = ["--reference", str(dataset / "a" / "train" / "good"), "--images", str(dataset / "a" / "test" / "good"),
            "--out", str(out), "--image-size", "64", "--quiet", "--no-panels"]  # fmt: skip
    assert main([*args, "--no-report"]) == 0
    assert (out / "predictions.csv").is_file() and not (out / "report.html").exists()
    assert main([*args, "--report-images", "1"]) == 0
    assert "1 of 3 shown" in (out / "report.html").read_text()


def test_fsad_has_export_and_report_subcommands(dataset, tmp_path, capsys):
    from engine.cli import SUBCOMMANDS, load_target, main

    assert SUBCOMMANDS["export"][0] == "export.cli:main" and SUBCOMMANDS["report"][0] == "report.index:main"
    assert all(callable(load_target(target)) for target, _ in SUBCOMMANDS.values())
    assert _knn(dataset, tmp_path / "run", "--class-name", "a", "--report-images", "0") == 0
    assert main(["report", str(tmp_path / "run"), "--index", str(tmp_path / "index.html")]) == 0
    assert 'href="run/report.html"' in (tmp_path / "index.html").read_text()
