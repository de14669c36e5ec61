"""The predict run shared by every method's CLI (engine layer): OUT/predictions.csv, threshold.json, panels/*.png.

A method's predict command is a few lines (see baseline/predict.py):

    parser = add_predict_arguments(argparse.ArgumentParser(...)); parser.add_argument("--backbone", ...)
    args = parser.parse_args(argv)
    return run_cli(args, "fdsl", build_fdsl_detector, {"backbone": args.backbone, ...})   # inside @cli_entry

Each image is decoded once (kept for its panel), scored in batches under `torch.inference_mode()`; unreadable files
become rows with decision "unreadable". OUT/threshold.json and OUT/predictions.csv are written atomically at the end,
so an older predictions.csv in OUT is replaced only by a complete one. OUT/report.html (the report observer,
`engine.reporting.PredictReport`) is written with them unless `--no-report`, which removes an older one instead.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from common.predict import DEFAULT_CLASS_NAME, DEFAULT_MARGIN, DEFAULT_RULE, DEFAULT_Z, THRESHOLD_RULES, collect_images
from common.utils import (
    UserError,
    atomic_write_json,
    atomic_write_text,
    check_output_outside,
    check_writable_dir,
    parse_device,
)
from common.visualization import save_panel
from engine.predictor import Predictor, read_references, resize_map, try_read
from engine.records import PredictObserver, PredictRecords
from engine.reporting import PredictReport, remove_stale, report_map

PANEL_MAX_SIDE = 2048  # larger images are shown downscaled in their panel (3 panels of a 6000 px photo = 18000 px)
CSV_COLUMNS = ("image", "width", "height", "score", "decision", "panel", "error")


@dataclass
class Prediction:
    image: str
    width: int | None = None
    height: int | None = None
    score: float | None = None
    decision: str = "unreadable"  # "anomalous" | "normal" | "unreadable"
    panel: str = ""  # relative to OUT
    error: str = ""


def _panel_names(paths: Sequence[Path]) -> list[str]:
    """`<stem>.png` per image, made unique with `_2`, `_3`... (a.png and a.jpg, or equal names in two folders)."""
    names, seen = [], set()
    for path in paths:
        name, n = f"{path.stem}.png", 1
        while name.lower() in seen:
            n += 1
            name = f"{path.stem}_{n}.png"
        seen.add(name.lower())
        names.append(name)
    return names


def _write_panel(path: Path, image: np.ndarray, anomaly_map: np.ndarray, predictor: Predictor, title: str) -> None:
    """image | heat-map overlay | outline of map > pixel threshold, on the run-wide colour scale."""
    scale = PANEL_MAX_SIDE / max(image.shape[:2])
    if scale < 1:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    vmin, vmax = predictor.color_range
    heat = resize_map(anomaly_map, image.shape[:2])
    save_panel(path, image, heat, threshold=predictor.pixel_threshold, title=title, vmin=vmin, vmax=vmax)


def run_predictions(
    predictor: Predictor,
    paths: Sequence[Path],
    out: Path,
    panels: bool = True,
    progress: bool = True,
    maps_out: list | None = None,
) -> list[Prediction]:
    """Score every image (each decoded once, in batches); write its panel; unreadable files are rows, not errors.

    `maps_out`, when given, receives one entry per row, in row order: the image's map downscaled for the
    observers (`engine.reporting.report_map`, float32 at most 96 px a side), None for an unreadable file.
    """
    rows, names = [], _panel_names(paths)
    with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress) as bar:
        for start in range(0, len(paths), predictor.batch_size):
            chunk = list(zip(paths[start : start + predictor.batch_size], names[start : start + predictor.batch_size]))
            decoded = [(path, name, *try_read(path)) for path, name in chunk]
            readable = [image for _, _, image, _ in decoded if image is not None]
            scores, maps = predictor.predict_batch(readable) if readable else (np.zeros(0), np.zeros((0, 1, 1)))
            j = 0
            for path, name, image, error in decoded:
                if image is None:
                    rows.append(Prediction(str(path), error=error or "unreadable"))
                    if maps_out is not None:
                        maps_out.append(None)
                    continue
                score, decision = float(scores[j]), "anomalous" if predictor.decide(scores[j]) else "normal"
                if maps_out is not None:
                    maps_out.append(report_map(maps[j]))
                row = Prediction(str(path), image.shape[1], image.shape[0], score, decision)
                if panels:
                    row.panel = f"panels/{name}"
                    title = f"{path.name}  score {score:.4g}  threshold {predictor.threshold:.4g}  {decision}"
                    _write_panel(out / row.panel, image, maps[j], predictor, title)
                rows.append(row)
                j += 1
            bar.update(len(chunk))
    return rows


def format_predictions_csv(rows: Sequence[Prediction]) -> str:
    """predictions.csv text: one row per input image, in input order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        score = "" if r.score is None else f"{r.score:.6g}"
        writer.writerow([r.image, r.width or "", r.height or "", score, r.decision, r.panel, r.error])
    return buffer.getvalue()


def format_summary(
    rows: Sequence[Prediction], predictor: Predictor, seconds: tuple[float, float], bad_refs: Sequence
) -> str:
    """The printed table: counts, threshold, references, runtime (set-up incl. LOO, predict), unreadable files."""
    count = {d: sum(r.decision == d for r in rows) for d in ("anomalous", "normal", "unreadable")}
    if predictor.rule == "user":
        rule = "given"
    elif predictor.rule == "max":
        rule = f"LOO max * (1 + {predictor.margin})"
    else:
        rule = f"LOO mean + {predictor.z} std"
    table = [("images", len(rows)), *count.items(),
             ("threshold", f"{predictor.threshold:.4g} ({rule})"),
             ("references", f"{predictor.k_shot} used" + (f", {len(bad_refs)} unreadable" if bad_refs else "")),
             ("seconds", f"{sum(seconds):.1f} = {seconds[0]:.1f} model + LOO, {seconds[1]:.1f} predict "
                         f"({seconds[1] / max(len(rows), 1):.3f} s/image)")]  # fmt: skip
    lines = [tabulate(table, tablefmt="simple_outline")]
    lines += [f"unreadable reference {name}: {reason}" for name, reason in bad_refs]
    lines += [f"unreadable {r.image}: {r.error}" for r in rows if r.decision == "unreadable"]
    return "\n".join(lines)


# the argparse destinations of `add_predict_arguments` (everything else a predict CLI parses is a method option)
PREDICT_FLAGS = ("reference", "images", "out", "threshold", "threshold_rule", "margin", "z", "pixel_threshold",
                 "class_name", "batch_size", "device", "no_panels", "vis", "quiet", "progress", "report_images",
                 "no_report")  # fmt: skip


def add_predict_arguments(parser: Any) -> Any:
    """The flags every method's predict CLI shares (method flags such as --backbone are added by the method)."""
    parser.add_argument("--reference", nargs="+", required=True, help="good images: a folder and/or files")
    parser.add_argument("--images", nargs="+", required=True, help="images to inspect: a folder and/or files")
    parser.add_argument("--out", required=True, help="output folder (may exist; its files are replaced)")
    parser.add_argument("--threshold", type=float, default=None, help="image-score threshold (default: LOO rule)")
    parser.add_argument(
        "--threshold-rule",
        choices=THRESHOLD_RULES,
        default=DEFAULT_RULE,
        help="max = max LOO score * (1 + margin); meanstd = mean + z * std of the LOO scores",
    )
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="margin of the max rule")
    parser.add_argument("--z", type=float, default=DEFAULT_Z, help="z of the meanstd rule")
    parser.add_argument("--pixel-threshold", type=float, default=None, help="outline threshold on the map")
    parser.add_argument("--class-name", default=DEFAULT_CLASS_NAME, help="name passed to the detector's setup")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu, a CUDA index (0) or cuda:N")
    parser.add_argument("--no-panels", action="store_true", help="skip the PNG panels (= --vis 0)")
    parser.add_argument("--vis", type=int, choices=(0, 1), nargs="?", const=1, default=None,
                        help="write the PNG panels, as every command spells it (default 1)")  # fmt: skip
    parser.add_argument("--report-images", type=int, default=None,
                        help="OUT/report.html shows the N highest-scoring images (default: every image)")  # fmt: skip
    parser.add_argument("--no-report", action="store_true",
                        help="do not write OUT/report.html (and remove one an earlier run left there)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (= --progress 0)")
    parser.add_argument("--progress", type=int, choices=(0, 1), nargs="?", const=1, default=None,
                        help="progress bar, as every command spells it (default 1)")  # fmt: skip
    return parser


def unify_switches(args: Any) -> None:
    """`--vis 0|1` and `--progress 0|1` (the spelling of the eval commands) onto `--no-panels` / `--quiet`."""
    if getattr(args, "vis", None) is not None:
        args.no_panels = not args.vis
    if getattr(args, "progress", None) is not None:
        args.quiet = not args.progress


def run_cli(
    args: Any, method: str, build_fn: Callable[..., Any], options: dict, observers: Sequence[PredictObserver] = ()
) -> int:
    """The whole predict command, given parsed `add_predict_arguments` flags and the method's builder/options.

    Each observer is called once with the run's `PredictRecords`, after scoring and before the outputs are written;
    the report observer (OUT/report.html) is one of them unless `--no-report`.
    """
    start = time.perf_counter()
    unify_switches(args)
    if args.batch_size < 1 or args.margin < 0 or args.z < 0:
        raise UserError("--batch-size must be >= 1 and --margin, --z >= 0")
    no_report = bool(getattr(args, "no_report", False))
    report_images = getattr(args, "report_images", None)
    if report_images is not None and report_images < 0:
        raise UserError(f"--report-images must be 0 or more (got {report_images})")
    device = parse_device(args.device)
    for flag, sources in (("--reference", args.reference), ("--images", args.images)):
        for source in sources:  # panels written into an input folder would be read as inputs next time
            if Path(source).is_dir():
                check_output_outside(args.out, source, "--out", f"the {flag} folder")
    paths = collect_images(args.images, "--images")  # fail fast, before the model loads or OUT is created
    references, names, bad_refs = read_references(args.reference)
    out = check_writable_dir(args.out)
    detector = build_fn(references, device, **options)
    predictor = Predictor(
        detector, references, args.class_name, threshold=args.threshold, pixel_threshold=args.pixel_threshold,
        rule=args.threshold_rule, margin=args.margin, z=args.z, device=device, batch_size=args.batch_size,
    )  # fmt: skip
    setup_done = time.perf_counter()
    report = None if no_report else PredictReport(out, report_images, color_range=predictor.color_range)
    observers = [*observers, report] if report is not None else list(observers)
    maps: list = [] if observers else None
    rows = run_predictions(predictor, paths, out, panels=not args.no_panels, progress=not args.quiet, maps_out=maps)
    seconds = (setup_done - start, time.perf_counter() - setup_done)
    if all(r.decision == "unreadable" for r in rows):  # before any output is written: a failed run writes nothing
        first = rows[0]
        reason = first.error if first.image in first.error else f"{first.image}: {first.error}"
        raise UserError(f"none of the {len(rows)} images could be read (first: {reason})")
    info = {
        "method": method,
        **predictor.threshold_info(),
        "references": names,
        "unreadable_references": [list(pair) for pair in bad_refs],
        "options": {
            key: value if isinstance(value, (str, int, float, bool, list, type(None))) else str(value)
            for key, value in options.items()
        },  # JSON-safe (a Path or device becomes its text)
    }
    if observers:
        record = PredictRecords(
            [r.image for r in rows], np.array([np.nan if r.score is None else r.score for r in rows], np.float64),
            maps, [r.decision for r in rows], predictor.threshold, info,
        )  # fmt: skip
        for observer in observers:
            observer(record)
    if no_report:
        remove_stale(out)
    atomic_write_json(out / "threshold.json", info)
    atomic_write_text(out / "predictions.csv", format_predictions_csv(rows))  # replaces an old one only now
    print(format_summary(rows, predictor, seconds, bad_refs))
    print(f"predictions: {out / 'predictions.csv'}" + ("" if args.no_panels else f"  panels: {out / 'panels'}")
          + (f"  report: {report.path}" if report is not None and report.path else ""))  # fmt: skip
    return 0
