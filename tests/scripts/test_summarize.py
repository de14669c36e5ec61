"""scripts/summarize.py: one row per results.json, the test time per image and the set-up apart."""

import json
from pathlib import Path

from tests.fixtures import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "summarize.py"


def _results(path: Path, timing: dict) -> Path:
    mean = dict.fromkeys(("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
                          "pixel_aupro"), 0.5)  # fmt: skip
    mean["pixel_aupro"] = None
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"method": "pcsnet", "dataset_root": "/d/surfaces", "k_shot": 4, "seed": 0,
                                "mean": mean, "timing": timing}))  # fmt: skip
    return path


def test_summary_shows_test_time_and_setup(tmp_path, capsys):
    summarize = load_script(SCRIPT, "summarize_script")
    new = _results(tmp_path / "new" / "results.json", {"n_images": 10, "seconds_per_image": 2.5,
                   "setup_seconds": 24.0, "test_seconds_per_image": 0.05})  # fmt: skip
    old = _results(tmp_path / "old" / "results.json", {"n_images": 10, "seconds_per_image": 0.3})
    assert summarize.main([str(new), str(old)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "test s/img" in out[0] and "setup s" in out[0]
    row_new, row_old = (next(line for line in out if line.startswith(f"| {name}")) for name in ("new", "old"))
    cells_new = [c.strip() for c in row_new.strip("|").split("|")]
    cells_old = [c.strip() for c in row_old.strip("|").split("|")]
    assert cells_new[-2:] == ["0.050", "24.0"] and "50.0" in cells_new and cells_new[-3] == "-"  # AUPRO null
    assert cells_old[-2:] == ["0.300", "-"]  # a file from before the timing breakdown: its only time, no set-up


def test_missing_file_is_one_line_exit_2(tmp_path, capsys):
    summarize = load_script(SCRIPT, "summarize_script")
    assert summarize.main([str(tmp_path / "nope.json")]) == 2
    assert capsys.readouterr().err.startswith("error: no results.json")
