"""scripts/gpu_check.sh on this CPU-only machine: one error line without CUDA, the stages' commands, a CPU smoke."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(*args, timeout=60):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("MVTEC_ROOT", None)
    return subprocess.run(["bash", str(REPO / "scripts/gpu_check.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)  # fmt: skip


def test_without_cuda_it_fails_with_one_line(tmp_path):
    proc = _run("--out", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: no CUDA device")
    assert not (tmp_path / "o").exists()  # nothing was written


def test_dry_run_lists_both_paper_stages(tmp_path):
    proc = _run("--dry-run", "--random-weights", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("RANDOM weights") == 2  # CLIP and WRN, said loudly
    lines = [line for line in proc.stdout.splitlines() if line.startswith("== ")]
    assert len(lines) == 3
    assert "-m fdsl.train" in lines[0] and "configs/fdsl/paper_train.yaml" in lines[0] and "--device 0" in lines[0]
    assert "configs/fdsl/paper_test.yaml" in lines[1] and "--win-mode mul" in lines[1] and "--k-shot 1" in lines[1]
    assert "main.py --config" in lines[2] and "configs/pcsnet/paper.yaml" in lines[2] and "--k-shot 8" in lines[2]
    assert "--pretrained random" in lines[0] and "--pretrained random" in lines[2]


def test_cpu_smoke_runs_both_stages_and_reports_them(tmp_path):
    # both stages since the merge (PCSNet's --pretrained random WRN came with the paper-pcsnet branch)
    proc = _run("--smoke", "--out", str(tmp_path / "o"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stage in ("fdsl", "pcsnet"):
        summary = {line for line in proc.stdout.splitlines() if line.startswith(f"[{stage}]")}
        assert len(summary) == 1, summary  # the summary is printed once per stage (repeated at the end)
        line = summary.pop()
        assert "seconds per test image" in line and "peak GPU memory n/a (CPU)" in line
        assert "test precision fp32, TF32 False" in line
        assert (tmp_path / f"o/{stage}_results/results.json").is_file()


def test_stage_summary_line_from_results_and_step_stats(tmp_path, capsys):
    from scripts import gpu_check

    (tmp_path / "pcsnet_results").mkdir()
    results = {"timing": {"test_seconds_per_image": 0.25, "seconds_per_image": 9.0},
               "pcsnet": {"train_seconds": {"a": 1.5, "b": 2.5}, "config": {"precision": "fp16"}}}  # fmt: skip
    (tmp_path / "pcsnet_results/results.json").write_text(json.dumps(results))
    stats = {"s1": {"seconds": 9.0, "peak_gpu_bytes": 3 * 2**30, "tf32": True},
             "s2": {"seconds": 1.0, "peak_gpu_bytes": 2**30, "tf32": True}}  # fmt: skip
    gpu_check.report("pcsnet", tmp_path, stats)
    line = capsys.readouterr().out.strip()
    assert line == ("[pcsnet] seconds per test image 0.250; training 4.0 s; peak GPU memory 3.00 GiB; "
                    "test precision fp16, TF32 True")  # fmt: skip
