"""common.config (dataclass -> flags / YAML / checks) and common.utils.OutputGuard (nothing written on failure)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from common import config
from common.utils import UserError, atomic_write_text, check_writable_dir, cli_entry

opt = config.option


@dataclass
class Toy:
    dataset_root: str = opt("", "dataset", required=True, aliases=("--data-root",))
    metric: str = opt("l2", "distance", choices=("l2", "cosine"))
    vis: int = opt(0, "panels", choices=(0, 1))
    progress: int = opt(1, "bars", choices=(0, 1), off_flag="--quiet")
    sizes: list[int] | None = opt(None, "sizes", nargs="+")


def parse(argv: list[str], yaml_text: str | None = None, tmp: Path | None = None) -> Toy:
    parser = config.build_parser(Toy, "toy", "a toy", default_config="")
    if yaml_text is not None:
        (tmp / "c.yaml").write_text(yaml_text)
        argv = [*argv, "--config", str(tmp / "c.yaml")]
    return config.resolve_config(Toy, parser, argv)


def test_flags_aliases_switches_and_defaults_come_from_the_dataclass(tmp_path):
    cfg = parse(["--data-root", "d"])
    assert cfg == Toy("d", "l2", 0, 1, None)  # every default is the field's
    assert parse(["--dataset-root", "d", "--vis"]).vis == 1  # a bare switch means 1
    assert parse(["--dataset-root", "d", "--vis", "0", "--quiet"]).progress == 0  # --quiet = --progress 0
    assert parse(["--dataset-root", "d", "--sizes", "1", "2"]).sizes == [1, 2]
    # flags override YAML, YAML overrides the dataclass
    cfg = parse(["--dataset-root", "d", "--metric", "l2"], "metric: cosine\nvis: 1\n", tmp_path)
    assert (cfg.metric, cfg.vis) == ("l2", 1)
    helptext = config.build_parser(Toy, "toy", "a toy", default_config="").format_help()
    assert "(default: l2)" in helptext and "(required)" in helptext and "--data-root" in helptext


def test_bad_values_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="missing required option --dataset-root"):
        parse([])
    with pytest.raises(UserError, match="--metric must be one of l2, cosine"):
        parse(["--dataset-root", "d"], "metric: hamming\n", tmp_path)  # YAML values are checked like flags
    with pytest.raises(UserError, match="unknown option"):
        parse(["--dataset-root", "d"], "colour: red\n", tmp_path)
    with pytest.raises(SystemExit):  # argparse: a flag value outside the choices
        parse(["--dataset-root", "d", "--metric", "hamming"])


def _tree(folder: Path) -> dict[str, bytes | None]:
    if not folder.exists():
        return {"<absent>": None}
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def _failing_command(out: Path):
    @cli_entry
    def main(argv=None) -> int:
        check_writable_dir(out)
        atomic_write_text(out / "results.json", "new\n")  # replaces an earlier run's file
        atomic_write_text(out / "sub" / "deep" / "x.txt", "x\n")
        (out / "notes.txt").unlink(missing_ok=True)
        raise UserError("image q.png is truncated")

    return main


def test_a_failed_command_leaves_an_existing_output_folder_exactly_as_it_was(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "keep").mkdir(parents=True)
    (out / "results.json").write_text("old\n")
    (out / "notes.txt").write_text("notes\n")
    (out / "keep" / "a.json").write_text("{}\n")
    before = _tree(out)
    assert _failing_command(out)() == 2
    assert capsys.readouterr().err == "error: image q.png is truncated\n"
    assert _tree(out) == before  # new files and folders gone, the replaced and the deleted file back
    assert not [p for p in out.iterdir() if p.name.startswith(".fsad-rollback-")]


def test_a_failed_command_removes_the_output_folders_it_created(tmp_path):
    out = tmp_path / "runs" / "new" / "out"
    assert _failing_command(out)() == 2
    assert not (tmp_path / "runs").exists()  # mkdir(parents=True) created runs/ and runs/new/: all removed


def test_a_successful_command_keeps_its_outputs_and_drops_the_backups(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old\n")

    @cli_entry
    def main(argv=None) -> int:
        check_writable_dir(out)
        atomic_write_text(out / "results.json", "new\n")
        return 0

    assert main() == 0
    assert sorted(os.listdir(out)) == ["old.txt", "results.json"]


def test_resume_records_round_trip_and_refuse_other_options(tmp_path):
    from engine.loop import ClassResult, ResumeRecords

    key = {"method": "knn", "k_shot": 2, "options": {"metric": "l2", "coreset": 1.0}}
    result = ClassResult({"image_auroc": 0.75}, ["a/train/good/000.png"], 4, 1.5, setup_seconds=0.5)
    ResumeRecords(tmp_path, key).write("a", result, {"bank_bytes": 10})
    done = ResumeRecords(tmp_path, key).load(["a", "b"])  # b was never recorded
    assert list(done) == ["a"] and done["a"]["report"] == {"bank_bytes": 10}
    assert ResumeRecords.to_result(done["a"]) == result
    other = {**key, "options": {"metric": "cosine", "coreset": 1.0}}
    with pytest.raises(UserError, match=r"recorded with other options \(metric\)"):
        ResumeRecords(tmp_path, other).load(["a"])
