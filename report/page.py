"""HTML scaffolding shared by the run, predict and index pages: one self-contained file, inline CSS, no script."""

from __future__ import annotations

import datetime
import html
import json
from pathlib import Path

from common.utils import atomic_write_text

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ccc}
h3{font-size:1.05em;margin:1em 0 .3em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:10px}.ex{margin:0;border:1px solid #ddd;padding:4px;background:#fafafa}
.ex img{display:inline-block;margin-right:2px}.ex figcaption{font-size:12px;max-width:600px;word-break:break-all}
.plot{max-width:100%}.muted{color:#777}.bad{color:#b40426;font-weight:bold}.ok{color:#2c7a3f;font-weight:bold}
.heads span{display:inline-block;font-size:11px;color:#555;text-align:center}
.row{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}
"""


def esc(value) -> str:
    return html.escape(str(value))


def fmt_metric(value) -> str:
    """A fraction as a percentage with one decimal; '-' for None."""
    return "-" if value is None else f"{100.0 * float(value):.1f}"


def table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """An HTML table; the first `left` columns are left-aligned; cells are given already escaped."""
    head = "".join(f'<th class="l">{h}</th>' if i < left else f"<th>{h}</th>" for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td class="l">{c}</td>' if i < left else f"<td>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def settings_table(items: dict) -> str:
    """Key / value rows: scalars as text, lists and dicts as compact JSON."""
    rows = []
    for key, value in items.items():
        if isinstance(value, float):
            text = f"{value:.4g}"
        elif isinstance(value, (str, int, bool, type(None))):
            text = value
        else:
            text = json.dumps(value, default=str)
        rows.append([esc(key), esc(text)])
    return table(["setting", "value"], rows, left=2)


def write_page(path: Path, title: str, body: str) -> Path:
    """Write a complete page atomically (a killed run leaves no partial report.html)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<link rel="icon" href="data:,"><style>{CSS}</style></head>\n<body>\n<h1>{esc(title)}</h1>'
        f'<p class="muted">generated {stamp} by fsad</p>\n{body}\n</body></html>\n'
    )
    return atomic_write_text(path, text)
