"""Self-contained HTML reports: report.html beside every results.json (evaluations) and in every predict OUT.

Pure: numpy, matplotlib (Agg), PIL and common helpers; no method and no data/ import, so any run can call it.
    write_report(save_dir, results, class_records, max_images=6)      # evaluation
    write_predict_report(out_dir, predict_records)                      # predict
    python -m report RUN_DIR [RUN_DIR ...] --index OUT.html             # an index page over several runs

The names below resolve on first use, so importing `report.records` (what `engine.records` re-exports) does not
load matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "ClassRecords": "report.records", "PredictRecords": "report.records",
    "write_predict_report": "report.predict_report",
    "DEFAULT_MAX_IMAGES": "report.run_report", "RenderedClass": "report.run_report",
    "render_class_section": "report.run_report", "write_report": "report.run_report",
}  # fmt: skip

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'report' has no attribute {name!r}")
