"""Pure pieces of the few-shot evaluation: input checks before any model work, and the timing breakdown.

The class loop itself (`evaluate`, `evaluate_sharded`, `EvalConfig`, `ClassResult`) lives in `engine.loop`, above
`data/`; the names are still importable from here (resolved on first use) so older call sites keep working. The
detector contract is `common.contract`. This module imports neither `data/` nor any method.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from common.contract import Detector, DetectorOutput, minmax_fusion  # noqa: F401  (re-exported)
from common.few_shot import sample_support
from common.utils import UserError

_MOVED = {"EvalConfig", "ClassResult", "evaluate", "evaluate_sharded"}  # now in engine.loop


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        return getattr(importlib.import_module("engine.loop"), name)
    raise AttributeError(f"module 'common.evaluation' has no attribute {name!r}")


def timing_breakdown(per_class: dict) -> dict:
    """results.json `timing` keys beyond the contract's: where the seconds went (None where a class lacks them).

    `test_seconds_per_image` excludes the set-up, so it compares across methods whose set-up differs (a bank vs a
    training run); `backbone_share` is the test loop's fraction of time in the backbone forward, measured only
    when the run timed its backbone (common.timing, FSAD_TIMING=1: what the benchmark sets).
    """
    results = list(per_class.values())
    n_images = sum(r.n_images for r in results)
    out = {"setup_seconds": None, "test_seconds": None, "test_seconds_per_image": None, "backbone_seconds": None,
           "backbone_share": None, "data_seconds": None}  # fmt: skip
    if not results or any(r.setup_seconds is None for r in results):
        return out
    setup = sum(r.setup_seconds for r in results)
    test = sum(r.seconds - r.setup_seconds for r in results)
    out.update(setup_seconds=setup, test_seconds=test, test_seconds_per_image=test / max(n_images, 1),
               data_seconds=sum(r.data_seconds or 0.0 for r in results))  # fmt: skip
    if all(r.backbone_seconds is not None for r in results):
        backbone = sum(r.backbone_seconds for r in results)
        out.update(backbone_seconds=backbone, backbone_share=backbone / test if test > 0 else None)
    return out


def check_eval_inputs(
    meta: dict, root: str | Path, class_names: list[str] | None, k_shot: int, seed: int, draw: int = 0
) -> list[str]:
    """Check the classes and every class's support draw before any model work; return the classes to evaluate.

    Raises:
        UserError: an unknown class, a k-shot below 1 or above a class's normal training images, naming the flag and
            ROOT/meta.json.
    """
    path = Path(root) / "meta.json"
    if k_shot < 1:
        raise UserError(f"--k-shot must be at least 1 (got {k_shot})")
    known = list(meta["test"])
    if class_names:
        unknown = [name for name in class_names if name not in known]
        if unknown:
            raise UserError(
                f"unknown class(es) {', '.join(unknown)} (--class-name): {path} has {', '.join(known) or 'none'}"
            )
    wanted = [name for name in known if not class_names or name in class_names]
    if not wanted:
        raise UserError(f"{path} lists no test classes; regenerate it (python data/mvtec.py --root {root})")
    for name in wanted:
        pool = [item for item in meta["train"].get(name, []) if item["anomaly"] == 0]
        if not pool:
            raise UserError(
                f"class '{name}' has no normal training images in {path}, so no support can be drawn; add "
                f"{name}/train/good images or choose other classes with --class-name"
            )
        if k_shot > len(pool):
            raise UserError(
                f"--k-shot {k_shot} is larger than the {len(pool)} normal training images of class '{name}' in {path}; "
                f"use --k-shot {len(pool)} or fewer"
            )
        sample_support(meta, name, k_shot, seed, draw=draw)
    return wanted


# The report flags every eval CLI shares (the report itself is written by the engine's `engine.reporting`
# observer; this module imports neither engine nor report).
DEFAULT_REPORT_IMAGES = 6


def add_report_arguments(parser: Any) -> Any:
    """--report-images N and --no-report for an argparse CLI (fdsl.test has them as TestConfig fields)."""
    parser.add_argument("--report-images", type=int, default=DEFAULT_REPORT_IMAGES,
                        help="SAVE_DIR/report.html: example images per group and class (worst normals, worst "
                             f"anomalies; default {DEFAULT_REPORT_IMAGES}; 0 = curves and tables only)")  # fmt: skip
    parser.add_argument("--no-report", action="store_true",
                        help="do not write SAVE_DIR/report.html (and remove one an earlier run left there)")
    return parser


def report_images_option(report_images: int, no_report: bool) -> int | None:
    """The runner's `report_images` from the flags: None with --no-report.

    Raises:
        UserError: a negative --report-images.
    """
    if report_images < 0:
        raise UserError(f"--report-images must be 0 or more (got {report_images})")
    return None if no_report else int(report_images)
