"""scripts/benchmark.py end to end on a tiny tree: rows per (method, k), seed statistics, reference, failures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import load_script, make_mvtec_tree

REPO = Path(__file__).resolve().parents[2]
SCRIPT = str(REPO / "scripts" / "benchmark.py")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = make_mvtec_tree(tmp_path_factory.mktemp("bench") / "ds", classes=("a",), n_train=4, n_test_good=3,
                           defects={"crack": 3}, size=64)  # fmt: skip
    subprocess.run([sys.executable, str(REPO / "data" / "mvtec.py"), "--root", str(root)], check=True,
                   capture_output=True)  # fmt: skip
    return root


def _load_module():
    return load_script(SCRIPT, "benchmark_script")


def test_run_one_records_a_crashing_subprocess_with_its_last_error_line(tmp_path, monkeypatch):
    bench = _load_module()
    crash = [sys.executable, "-c", "import sys; print('noise', file=sys.stderr); sys.exit('RuntimeError: boom')"]
    monkeypatch.setattr(bench, "method_command", lambda *a: crash)
    row = bench.run_one("knn", 1, 0, bench.build_parser().parse_args(["--dataset-root", "d"]), tmp_path)
    assert row["status"] == "failed" and row["error"] == "exit 1: RuntimeError: boom"
    assert row["wall_seconds"] > 0 and (row["peak_rss_mb"] is None or row["peak_rss_mb"] > 0)


def _run(*args, cwd=REPO):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=cwd, capture_output=True, text=True)


def test_benchmark_knn_two_shots_two_seeds_and_a_failing_method(tree, tmp_path):
    out = tmp_path / "bench"
    proc = _run("--dataset-root", tree, "--methods", "knn,fdsl", "--shots", "1,2", "--seeds", "0,1",
                "--image-size", 64, "--fdsl-checkpoint", tmp_path / "missing.pth", "--out", out)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "benchmark.json").read_text())

    ref = report["backbone_reference"]
    assert len(ref) == 1 and ref[0]["image_size"] == 64 and ref[0]["images_per_second"] > 0
    assert ref[0]["n_images"] == 6

    knn = [a for a in report["aggregated"] if a["method"] == "knn"]
    assert [a["k_shot"] for a in knn] == [1, 2]
    for a in knn:
        assert a["n_ok"] == 2 and a["seeds"] == [0, 1] and not a["errors"]
        for key in ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_aupro"):
            assert 0 <= a[key]["mean"] <= 1 and a[key]["std"] is not None
        assert a["seconds_per_image"]["mean"] > 0
        assert a["ratio_to_backbone"]["mean"] > 0
        assert 0 < a["backbone_share"]["mean"] < 1 and a["setup_seconds_per_class"]["mean"] > 0
        assert a["peak_rss_mb"]["mean"] > 10  # a torch process is well above 10 MB
        assert a["bank_mb"]["mean"] > 0
    knn_runs = [r for r in report["runs"] if r["method"] == "knn"]
    assert len(knn_runs) == 4 and all(r["status"] == "ok" for r in knn_runs)
    # the support draw depends on (seed, class) only: the same seed gives the same bank size at a given k
    assert len({(r["k_shot"], r["bank_mb"]) for r in knn_runs}) == 2

    fdsl_runs = [r for r in report["runs"] if r["method"] == "fdsl"]
    assert len(fdsl_runs) == 4 and all(r["status"] == "failed" for r in fdsl_runs)
    assert all("missing.pth" in r["error"] for r in fdsl_runs)
    assert all(a["n_ok"] == 0 for a in report["aggregated"] if a["method"] == "fdsl")

    md = (out / "benchmark.md").read_text()
    assert "| knn" in md and "FAILED" in md and "scripts/benchmark.py" in md and "torch" in md
    assert "knn" in proc.stdout and "x backbone" in proc.stdout
    assert (out / "runs" / "knn_k2_seed1" / "results.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset-root", "/nonexistent/ds"], "does not exist"),
        (["--methods", "knn,foo"], "unknown method"),
        (["--methods", "fdsl"], "--fdsl-checkpoint"),
    ],
)
def test_benchmark_bad_input_is_one_line_exit_2(tree, tmp_path, args, message):
    full = ["--dataset-root", tree, "--out", tmp_path / "o", *args]
    proc = _run(*full)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_method_args_are_appended_to_that_method_only():
    bench = _load_module()
    args = bench.build_parser().parse_args(
        ["--dataset-root", "d", "--fdsl-checkpoint", "c.pth", "--fdsl-args", "--image-score max --fd-weight 0.5"]
    )
    fdsl = bench.method_command("fdsl", args, 2, 1, Path("o"))
    knn = bench.method_command("knn", args, 2, 1, Path("o"))
    assert fdsl[-4:] == ["--image-score", "max", "--fd-weight", "0.5"]
    assert "--image-score" not in knn


def test_long_run_samples_memory_over_the_calls(tree):
    bench = _load_module()
    args = bench.build_parser().parse_args(["--dataset-root", str(tree), "--image-size", "64", "--long-run", "30"])
    report = bench.long_run("knn", 30, args)
    calls = [c for c, _ in report["rss_mb"]]
    assert calls == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert all(mb > 50 for _, mb in report["rss_mb"]) and report["seconds_per_call"] > 0
    assert abs(report["growth_mb"]) < 200  # 30 calls of a 64 px kNN must not grow memory by hundreds of MiB


def test_bank_megabytes_reads_both_result_formats():
    bench = _load_module()
    assert bench.bank_megabytes(None) is None
    assert bench.bank_megabytes(2**20) == 1.0
    fdsl = {"main_bank_bytes": 2**20, "window_bank_bytes": 2**21, "window_key_bytes": 10, "window_searched_bytes": 5}
    assert bench.bank_megabytes(fdsl) == 3.0


def test_rows_use_the_test_loop_time_and_report_setup_and_backbone_share(tmp_path):
    bench = _load_module()
    mean = dict.fromkeys(bench.IMAGE_METRICS + bench.PIXEL_METRICS, 0.5)
    timing = {"n_images": 10, "seconds_total": 62.5, "seconds_per_image": 6.25, "setup_seconds": 60.0,
              "test_seconds": 2.5, "test_seconds_per_image": 0.25, "backbone_share": 0.6}  # fmt: skip
    results = {"backbone": "b", "image_size": 64, "mean": mean, "timing": timing, "per_class": {"a": {}, "b": {}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    row = bench._collect({"method": "pcsnet"}, tmp_path, 0, None, False, 1.0)
    assert row["status"] == "ok" and row["seconds_per_image"] == 0.25 and row["images_per_second"] == 4.0
    assert row["setup_seconds_per_class"] == 30.0 and row["backbone_share"] == 0.6


def test_results_without_the_timing_breakdown_still_read(tmp_path):
    bench = _load_module()
    mean = dict.fromkeys(bench.IMAGE_METRICS + bench.PIXEL_METRICS, 0.5)
    results = {"backbone": "b", "image_size": 64, "mean": mean, "timing": {"n_images": 10, "seconds_per_image": 3.0},
               "per_class": {"a": {}}, "pcsnet": {"test_seconds_per_image": 0.25}}  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(results))
    row = bench._collect({"method": "pcsnet"}, tmp_path, 0, None, False, 1.0)
    assert row["seconds_per_image"] == 0.25 and row["backbone_share"] is None
    assert "setup_seconds_per_class" not in row
