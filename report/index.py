"""The index page over several runs (the demo's runs/demo/index.html): the methods' mean metrics side by side,
each run linking to its report.html.

    python -m report RUN_DIR [RUN_DIR ...] --index OUT.html     # RUN_DIR holds results.json (or give the file)

A folder holding a predict run's threshold.json (and no results.json) is listed under "Predict runs".
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from common.utils import UserError, cli_entry
from report.page import esc, fmt_metric, table, write_page
from report.run_report import METRIC_COLUMNS


def _results_path(source: str) -> Path:
    path = Path(source)
    if path.is_dir() and not (path / "results.json").is_file() and (path / "threshold.json").is_file():
        return path / "threshold.json"  # a predict run
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"no results.json at {path} (give run folders or results.json files)")
    return path


def _link(report: Path, out: Path, name: str) -> str:
    link = os.path.relpath(report, out.parent).replace(os.sep, "/")
    missing = f'{name} <span class="muted">(no report)</span>'
    return f'<a href="{esc(link)}">{name}</a>' if report.is_file() else missing


def _predict_row(path: Path, out: Path) -> list[str]:
    try:
        info = json.loads(path.read_text())
        value, rule = info["value"], info["rule"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a predict threshold.json ({exc})") from exc
    return [_link(path.parent / "report.html", out, esc(path.parent.name)), esc(info.get("method")),
            esc(len(info.get("references") or [])), f"{value:.4g}", esc(rule)]  # fmt: skip


def run_label(results: dict, path: Path) -> str:
    """The run's name: results' `label`, else its folder, else (the drivers' seed<S> folders) method_dataset."""
    label = results.get("label") or path.parent.name
    if label.startswith("seed"):
        label = f"{results.get('method')}_{Path(str(results.get('dataset_root', ''))).name}"
    return label


def write_index(out: str | Path, sources: list[str]) -> Path:
    """Write the index page `out` linking every run's report.html (relative links: the tree can move)."""
    out = Path(out)
    rows, predict_rows = [], []
    for source in sources:
        path = _results_path(source)
        if path.name == "threshold.json":
            predict_rows.append(_predict_row(path, out))
            continue
        try:
            results = json.loads(path.read_text())
            mean, timing = results["mean"], results.get("timing", {})
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{path} is not a results.json ({exc})") from exc
        cell = _link(path.parent / "report.html", out, esc(run_label(results, path)))
        spi = timing.get("test_seconds_per_image") or timing.get("seconds_per_image")
        dataset = Path(str(results.get("dataset_root", ""))).name
        rows.append((dataset, str(results.get("method")), [
            cell, esc(results.get("method")), esc(dataset), esc(results.get("k_shot")), esc(results.get("seed")),
            *[fmt_metric(mean.get(k)) for _, k in METRIC_COLUMNS], "-" if spi is None else f"{spi:.3f}",
        ]))  # fmt: skip
    rows.sort(key=lambda r: (r[0], r[1]))  # one dataset's methods next to each other
    headers = ["run", "method", "dataset", "k", "seed", *[c for c, _ in METRIC_COLUMNS], "test s/img"]
    body = (
        "<h2>Methods side by side (means over classes, %)</h2>"
        + table(headers, [r[2] for r in rows], left=3)
        + '<p class="muted">Each run name opens its report: per-class curves, score histograms and the worst '
        "cases as image / ground truth / heat map / overlay.</p>"
    )
    if predict_rows:
        body += "<h2>Predict runs</h2>" + table(["run", "method", "references", "threshold", "rule"], predict_rows, 2)
    return write_page(out, "fsad runs", body)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders holding results.json (or results.json files)")
    parser.add_argument("--index", required=True, help="the index page to write, e.g. runs/demo/index.html")
    args = parser.parse_args(argv)
    path = write_index(args.index, args.runs)
    print(path)
    return 0
