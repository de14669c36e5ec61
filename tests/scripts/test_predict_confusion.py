"""scripts/predict_confusion.py on a hand-made predictions.csv."""

from pathlib import Path

import pytest

from common.utils import UserError
from tests.fixtures import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "predict_confusion.py"


def _module():
    return load_script(SCRIPT, "predict_confusion")


def test_counts_and_auroc(tmp_path, capsys):
    rows = [
        ("good_0.png", 0.1, "normal"), ("good_1.png", 0.6, "anomalous"), ("local_0.png", 0.7, "anomalous"),
        ("local_1.png", 0.2, "normal"), ("global_0.png", 0.9, "anomalous"), ("x_0.png", 0, "unreadable"),
    ]  # fmt: skip
    csv = tmp_path / "predictions.csv"
    csv.write_text("image,score,decision\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    assert _module().main([str(csv)]) == 0
    out = capsys.readouterr().out
    assert "TP 2 / FN 1 / FP 1 / TN 1" in out
    assert "| local | 2 | 1 | 0.750 |" in out and "| global | 1 | 1 | 1.000 |" in out and "| x |" not in out
    assert _module().main([str(csv), "--normal", "ok"]) == 2  # one-line error, exit 2
    assert _module().main([str(tmp_path / "missing.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert _module().auroc([0.0], [1.0]) == 1.0
    with pytest.raises(UserError):
        _module().read_rows(tmp_path / "missing.csv")
