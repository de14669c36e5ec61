"""Self-contained HTML reports: report.html beside every results.json (evaluations) and in every predict OUT.

Pure: numpy, matplotlib (Agg), PIL and common helpers; no method and no data/ import, so any run can call it.
    write_report(save_dir, results, class_records, max_images=6)      # evaluation
    write_predict_report(out_dir, predict_records)                      # predict
    python -m report RUN_DIR [RUN_DIR ...] --index OUT.html             # an index page over several runs
"""

from report.predict_report import write_predict_report
from report.records import ClassRecords, PredictRecords
from report.run_report import DEFAULT_MAX_IMAGES, RenderedClass, render_class_section, write_report

__all__ = ["ClassRecords", "DEFAULT_MAX_IMAGES", "PredictRecords", "RenderedClass", "render_class_section",
           "write_predict_report", "write_report"]  # fmt: skip
