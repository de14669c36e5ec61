"""scripts/flop_budget.py: FLOP counts that grow with k, ceilings in (0, 1] that fall with k."""

from pathlib import Path

from tests.fixtures import load_script

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "flop_budget.py"


def test_budget_of_the_tiny_vit():
    fb = load_script(SCRIPT, "flop_budget_script")
    r = fb.budget("vit-tiny-test", 64, [1, 2, 4])
    assert r["tokens"] == 64 and r["widths"] == [64, 64, 64, 64] and r["backbone_flops"] > 0
    searches = [row["knn_search"] for row in r["rows"]]
    assert searches[1] == 2 * searches[0] and searches[2] == 4 * searches[0]  # linear in the bank size
    assert searches[0] == 2 * 64 * 64 * 256  # tokens x bank x concatenated width, multiply-adds counted twice
    ceilings = [row["fdsl_ceiling"] for row in r["rows"]]
    assert all(0 < c <= 1 for c in ceilings) and ceilings == sorted(ceilings, reverse=True)
    assert all(row["fdsl_ceiling"] < row["knn_ceiling"] for row in r["rows"])  # FDSL adds its head


def test_cli_prints_the_table(capsys):
    fb = load_script(SCRIPT, "flop_budget_script")
    assert fb.main(["--backbone", "vit-tiny-test", "--image-size", "64", "--shots", "1,4"]) == 0
    out = capsys.readouterr().out
    assert "| 4 |" in out and "GFLOP/image" in out


def test_pcsnet_budget_for_a_cnn_only():
    fb = load_script(SCRIPT, "flop_budget_script")
    assert fb.budget("vit-tiny-test", 64, [1])["pcsnet"] is None
    pc = fb.budget("efficientnet_lite0", 64, [1])["pcsnet"]
    assert pc["backbone"] > 0 and pc["model"] > 0 and 0 < pc["ceiling"] < 1 and pc["cas_width"] == 64
