"""main.py paper mode: no-argument usage and its errors (real processes), --select best-of-evals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.meta import scan_mvtec_layout, write_meta
from pcsnet.selection import best_metrics
from tests.fixtures import make_mvtec_tree

REPO = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MVTEC_ROOT"}
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **extra}


def test_no_arguments_without_data_is_one_line_exit_2(tmp_path):
    """`python main.py` alone, where ./data/mvtec does not exist and MVTEC_ROOT is unset."""
    proc = subprocess.run([sys.executable, str(REPO / "main.py")], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "data/mvtec" in lines[0]
    assert "MVTEC_ROOT" in lines[0] and "paper protocol" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_no_arguments_reads_mvtec_root_and_names_the_missing_wrn_weights(tmp_path):
    root = make_mvtec_tree(tmp_path / "mvtec", classes=("a",), n_train=2, size=32)
    write_meta(root, scan_mvtec_layout(root, verbose=False))
    work = tmp_path / "work"
    work.mkdir()
    env = _env(MVTEC_ROOT=str(root), TORCH_HOME=str(tmp_path / "empty_torch_home"))
    proc = subprocess.run([sys.executable, str(REPO / "main.py")], cwd=work, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "wide_resnet50_2-95faca4d.pth" in lines[0]
    assert "--pretrained" in lines[0] and str(root) in proc.stdout and "k 2" in proc.stdout
    assert list(work.iterdir()) == []  # checked before the output folder is made


def test_contract_flags_still_required_outside_paper_mode(tmp_path, capsys):
    import main

    code = main.main(["--data-root", str(tmp_path), "--save-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--k-shot is required" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = make_mvtec_tree(tmp_path_factory.mktemp("data") / "tree", classes=("a",), n_train=3, size=64)
    write_meta(root, scan_mvtec_layout(root, verbose=False))
    return root


def _run(tree: Path, out: Path, *extra: str) -> dict:
    import main

    args = ["--data-root", str(tree), "--k-shot", "2", "--save-dir", str(out), "--image-size", "64",
            "--epochs", "3", "--cas-width", "4", "--aug-pool", "1", "--no-checkpoints", "--device", "cpu", "--quiet",
            *extra]  # fmt: skip
    assert main.main(args) == 0
    return json.loads((out / "results.json").read_text())


def test_best_of_evals_is_reported_beside_and_does_not_change_the_last_epoch(tree, tmp_path):
    last = _run(tree, tmp_path / "last")
    sel = _run(tree, tmp_path / "sel", "--select", "best-of-evals", "--set", "eval_every=1")
    assert "best_of_evals" not in last
    block = sel["best_of_evals"]
    assert block["transductive"] is True and "transductive" in block["note"]
    assert block["epochs"] == {"a": [0, 1, 2]}
    passes = block["passes"]["a"]
    # the pass after the last epoch scores the final model: the same numbers as the last-epoch (top-level) keys
    assert passes[-1]["metrics"] == sel["per_class"]["a"]
    # the intermediate test passes do not disturb training (RNG restored): last-epoch numbers as without them
    assert sel["per_class"] == last["per_class"]
    assert block["per_class"]["a"] == best_metrics(passes)
    for key, best in block["per_class"]["a"].items():
        values = [p["metrics"][key] for p in passes if p["metrics"][key] is not None]
        assert best == (max(values) if values else None)
        assert best is None or best >= sel["per_class"]["a"][key]
    assert "TRANSDUCTIVE" in (tmp_path / "sel" / "log.txt").read_text()
