"""scripts/devbench.py: the per-source table against kNN, on hand-made run results."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "devbench.py"


@pytest.fixture(scope="module")
def devbench():
    spec = importlib.util.spec_from_file_location("devbench_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(a_img, b_img, b_pix, seconds):
    metric = {"image_auroc": a_img, "pixel_auroc": 0.9, "pixel_aupro": 0.8}
    return {"per_class": {"a": metric, "b": {"image_auroc": b_img, "pixel_auroc": b_pix, "pixel_aupro": None}},
            "s_per_img": seconds}


def test_means_over_seeds_then_sources_and_the_difference_to_knn(devbench):
    rows = {("knn", 4): [_row(0.8, 0.6, None, 0.1), _row(0.6, 0.6, None, 0.3)],
            ("fdsl", 4): [_row(0.9, 0.7, None, 0.2)]}
    table, summary = devbench.aggregate(rows, ["knn", "fdsl"], [4], ["a", "b"])
    knn, fdsl = summary[("knn", 4)], summary[("fdsl", 4)]
    assert knn["mean"]["image_auroc"] == pytest.approx((0.7 + 0.6) / 2)  # seeds first (a: 0.7), then sources
    assert knn["mean"]["pixel_auroc"] == pytest.approx(0.9)  # only the masked source has pixel metrics
    assert knn["s_per_img"] == pytest.approx(0.2)
    assert fdsl["mean"]["image_auroc"] == pytest.approx(0.8)
    line = next(row for row in table.splitlines() if row.startswith("| fdsl |"))
    assert "+15.0 / +0.0 / +0.0" in line  # 80.0 - 65.0 image AUROC points
    assert "90.0 / 90.0 / 80.0" in line and "70.0 / - / -" in line


def test_fdsl_runs_one_job_per_fold_group_with_its_own_head(devbench, tmp_path):
    args = devbench.build_parser().parse_args(["--out", str(tmp_path), "--aggregate-only"])
    out = devbench.run_variant("fdsl", "fdsl:", args, tmp_path, tmp_path / "heads", 4, 0,
                               ["fabric", "textile_real", "brick"])
    assert out == {"per_class": {}, "s_per_img": None}  # nothing cached: no run, no numbers
    cmd = devbench.method_command("fdsl", "--fd-weight 1", tmp_path, 4, 0, tmp_path / "o", "efficientnet_lite0",
                                  ["fabric", "textile_real"], tmp_path / "heads" / "textile" / "last.pth")
    assert cmd[cmd.index("--checkpoint") + 1].endswith("heads/textile/last.pth")
    assert cmd[cmd.index("--class-name") + 1:cmd.index("--class-name") + 3] == ["fabric", "textile_real"]
    assert cmd[-2:] == ["--fd-weight", "1"]
    assert devbench.GROUP["textile_real"] == devbench.GROUP["fabric"]  # never trained on its own textile images
