"""The eval CLI runner shared by every method: input checks, device, workers, output folder, the sharded class loop,
`--resume` records, results.json and log.txt. A method's eval command builds its detector; the rest is here.

    request = EvalRequest("knn", dataset_root, k_shot, seed, save_dir, ...)
    results = run_eval(request, build=lambda device, meta: KNNDetector(...), backbone="efficientnet_lite0")

Order of work: every check that needs no model (meta.json, classes, support draws, flags, the output folder) runs
before `build`, so bad input fails in a second and writes nothing. Under torchrun the classes are shared out over
the ranks and rank 0 writes the merged results.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common import distributed
from common.evaluation import check_eval_inputs, timing_breakdown
from common.results import build_results, format_table, write_results
from common.utils import UserError, check_output_outside, check_writable_dir, parse_device, resolve_workers
from data.meta import load_meta
from engine.loop import ClassResult, EvalConfig, ResumeRecords, evaluate_sharded
from engine.records import ClassObserver
from engine.reporting import EvalReport, remove_stale

VOLATILE_OPTIONS = ("device", "num_workers", "progress", "save_dir", "resume", "save_images", "vis", "quiet",
                    "report_images", "no_report")  # fmt: skip


@dataclass(frozen=True)
class EvalRequest:
    """The run-level options every eval command has (method options go to the detector builder)."""

    method: str
    dataset_root: str
    k_shot: int
    seed: int
    save_dir: str
    class_names: list[str] | None = None
    batch_size: int = 8
    num_workers: int | None = None
    device: str | None = None
    progress: bool = True
    vis_dir: str | None = None
    support_draw: int = 0
    resume: bool = False
    report_images: int | None = None  # SAVE_DIR/report.html with N examples per group; None: none (stale one removed)


def check_request(request: EvalRequest) -> tuple[dict, list[str]]:
    """Every check of the run-level options before any model work; returns meta.json's content and the classes.

    Raises:
        UserError: a bad --batch-size / --num-workers / --k-shot / class, an unreadable meta.json, or an output
            folder inside the dataset or not writable.
    """
    if request.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1 (got {request.batch_size})")
    resolve_workers(request.num_workers)  # a negative count fails here
    meta = load_meta(request.dataset_root)
    names = check_eval_inputs(meta, request.dataset_root, request.class_names, request.k_shot, request.seed,
                              request.support_draw)  # fmt: skip
    check_output_outside(request.save_dir, request.dataset_root, "--save-dir")
    check_writable_dir(request.save_dir)
    return meta, names


def run_key(request: EvalRequest, options: dict) -> dict:
    """What a recorded class result depends on: method, data, k, seed, draw and the method's resolved options."""
    kept = {k: v for k, v in options.items() if k not in VOLATILE_OPTIONS}
    return {"method": request.method, "dataset_root": str(Path(request.dataset_root).resolve()),
            "k_shot": request.k_shot, "seed": request.seed, "support_draw": request.support_draw, "options": kept}


def run_eval(
    request: EvalRequest,
    build: Callable[[torch.device, dict], Any],
    backbone: str | Callable[[Any], str],
    extra: dict | Callable[[Any, dict[str, dict], dict[str, ClassResult]], dict] | None = None,
    options: dict | None = None,
    win_mode: str | None = None,
    notes: Callable[[dict], list[str]] | None = None,
    observers: Sequence[ClassObserver] = (),
    merge_last_report: bool = True,
    eval_fields: dict | None = None,
) -> dict:
    """Check, build, evaluate every class, write results.json / log.txt (rank 0). Returns the results dict.

    Args:
        request: the run-level options.
        build: `(device, meta) -> detector` following `common.contract`; called after every input check.
        backbone: the backbone name for results.json, or a function of the built detector giving it.
        extra: results.json keys of the method, or `(detector, reports, per_class) -> keys` where `reports` maps
            every class (all ranks, resumed ones included) to the detector's `report()` right after that class and
            `per_class` to its `ClassResult` (metrics, seconds, images).
        merge_last_report: add the last class's report to the keys (kNN, FDSL: bank sizes of the last class).
        options: the method's resolved options: the `--resume` records are keyed on them (volatile ones left out).
        win_mode: results.json `win_mode` (FDSL's LFE mode; None for other methods).
        notes: `results -> lines` added under the table in log.txt.
        observers: called once per class with its `ClassRecords` (with `request.report_images` set, the report
            observer is added: SAVE_DIR/report.html is written after results.json).
        eval_fields: further `EvalConfig` fields of the method (PCSNet's paper mode: `resize_size`, `resample`).
    """
    meta, names = check_request(request)
    device = distributed.init(parse_device(request.device))
    records = ResumeRecords(request.save_dir, run_key(request, options or {})) if request.resume else None
    # rank 0 reads the records and hands them to the others, so every rank agrees on what is left to run
    done = distributed.gather_objects(records.load(names) if records and distributed.is_main() else {})[0]
    detector = build(device, meta)
    reports: dict[str, dict] = {}
    report = EvalReport(request.dataset_root, request.report_images) if request.report_images is not None else None
    observers = [*observers, report] if report is not None else list(observers)

    def class_done(name: str, result: ClassResult) -> None:
        result.extra = reports[name] = _report(detector)
        if records is not None:
            records.write(name, result, result.extra)

    cfg = EvalConfig(
        dataset_root=request.dataset_root, k_shot=request.k_shot, seed=request.seed,
        class_names=[n for n in names if n not in done], batch_size=request.batch_size,
        num_workers=resolve_workers(request.num_workers, device), device=device, vis_dir=request.vis_dir,
        support_draw=request.support_draw, class_done=class_done, observers=observers, **(eval_fields or {}),
    )  # fmt: skip
    if done and distributed.is_main():
        print(f"--resume: {len(done)} class(es) already recorded in {records.folder}: {', '.join(done)}")
    fresh, seconds, sections = {}, 0.0, {}
    if cfg.class_names:
        fresh, seconds, parts = evaluate_sharded(detector, cfg, request.progress and distributed.is_main(),
                                                 payload=lambda: (reports, report.sections if report else {}))
        for part, rendered in parts:
            reports.update(part)
            sections.update(rendered)
    for name, record in done.items():
        fresh[name] = ResumeRecords.to_result(record)
        reports[name] = record.get("report", {})
        seconds += record["seconds"]
    per_class = {name: fresh[name] for name in names}
    name = backbone if isinstance(backbone, str) else backbone(detector)
    extra = dict(extra(detector, reports, per_class) if callable(extra) else extra or {})
    if merge_last_report:
        extra.update(reports[names[-1]])
    results = build_results(
        request.method, request.dataset_root, request.k_shot, request.seed, name, int(detector.image_size),
        {c: r.metrics for c, r in per_class.items()}, {c: r.support for c, r in per_class.items()},
        sum(r.n_images for r in per_class.values()), seconds, win_mode=win_mode,
        extra=extra, timing=timing_breakdown(per_class),
    )  # fmt: skip
    if distributed.is_main():
        write_results(request.save_dir, results, notes(results) if notes else None)
        if report is not None:  # after results.json, which the page describes
            report.write(request.save_dir, results, sections)
        else:
            remove_stale(request.save_dir)
    distributed.cleanup()
    return results


def _report(detector: Any) -> dict:
    report = detector.report() if hasattr(detector, "report") else {}
    if not isinstance(report, dict):
        raise TypeError(f"{type(detector).__name__}.report() must return a dict, got {type(report).__name__}")
    return report


def print_summary(results: dict, save_dir: str | Path) -> None:
    """The per-class table and where results.json went (rank 0 only)."""
    if not distributed.is_main():
        return
    print(format_table(results))
    report = Path(save_dir) / "report.html"
    print(f"results: {save_dir}/results.json  ({results['timing']['seconds_per_image']:.3f} s/image)"
          + (f"  report: {report}" if report.is_file() else ""))  # fmt: skip


def request_from(args: Any, method: str, **overrides: Any) -> EvalRequest:
    """An EvalRequest from a parsed config/namespace with the usual field names (`dataset_root`, `k_shot`, ...)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalRequest) if hasattr(args, f.name)}
    return EvalRequest(**{**values, "method": method, **overrides})
