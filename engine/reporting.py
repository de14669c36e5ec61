"""The report observers: SAVE_DIR/report.html beside results.json (every eval run) and OUT/report.html (every
predict run), rendered by the `report` package from the records the engine hands its observers.

Evaluation: `EvalReport` renders each class's section while its maps are in memory (only the HTML is kept, so the
sections travel cheaply across torchrun ranks) and `write` assembles the page after results.json. A class restored
by `--resume` has no section (the page keeps its metrics and support). `report_images` None (`--no-report`) writes
nothing and removes a report.html an earlier run left in the folder, so a report never describes other results.
Both are written atomically, and inside a `cli_entry` command the output guard puts report.html back as it was
when the run fails (a failed run leaves no report).
"""

from __future__ import annotations

from pathlib import Path

import cv2

from engine.records import ClassRecords, PredictRecords

REPORT_MAP_SIDE = 96  # maps kept per image for the predict report's thumbnails (a 1000-image run keeps 37 MB)


class EvalReport:
    """Observer of the class loop: one rendered report section per class (`report_images` examples per group)."""

    def __init__(self, dataset_root: str | Path, report_images: int) -> None:
        self.root, self.report_images = Path(dataset_root), int(report_images)
        self.sections: dict[str, str] = {}

    def __call__(self, record: ClassRecords) -> None:
        from report import render_class_section

        readable = record._replace(image_paths=[str(self.root / p) for p in record.image_paths])
        self.sections[record.class_name] = render_class_section(readable, self.report_images)

    def write(self, save_dir: str | Path, results: dict, sections: dict[str, str] | None = None) -> Path:
        """SAVE_DIR/report.html for `results` (call after results.json); `sections`: every rank's, merged."""
        from report import RenderedClass, write_report

        sections = self.sections if sections is None else sections
        rendered = [RenderedClass(c, sections[c]) for c in results.get("per_class", {}) if c in sections]
        return write_report(save_dir, results, rendered, max_images=self.report_images)


def remove_stale(folder: str | Path) -> None:
    """`--no-report`: a report.html left by an earlier run would describe other results."""
    (Path(folder) / "report.html").unlink(missing_ok=True)


def report_map(anomaly_map) -> object:
    """The small copy of one image's map that the predict report keeps (float32, at most REPORT_MAP_SIDE px)."""
    return cv2.resize(anomaly_map, (REPORT_MAP_SIDE, REPORT_MAP_SIDE), interpolation=cv2.INTER_AREA)


class PredictReport:
    """Observer of the predict run: OUT/report.html (the `report_images` highest-scoring images; None = all)."""

    def __init__(self, out: str | Path, report_images: int | None, color_range: tuple[float, float] | None = None,
                 settings: dict | None = None) -> None:  # fmt: skip
        self.out, self.report_images = Path(out), report_images
        self.color_range, self.settings = color_range, settings
        self.path: Path | None = None

    def __call__(self, record: PredictRecords) -> None:
        from report import write_predict_report

        settings = self.settings or {"method": record.threshold_info.get("method"),
                                     **(record.threshold_info.get("options") or {})}  # fmt: skip
        self.path = write_predict_report(self.out, record, max_images=self.report_images,
                                         color_range=self.color_range, settings=settings)  # fmt: skip
