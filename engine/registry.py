"""The methods by name. Adding a method is one module (a detector following common/contract.py, a builder, an
eval CLI) plus one line in `METHODS`; `api.py`, `fsad`, the benchmark and the contract test find it here.

Entries name functions as "module:function" and are imported on first use, so importing the registry loads no
model code. A builder is `build(references: list[RGB uint8 (H, W, 3)], device, **options) -> detector`; the
predictor calls the detector's `setup` itself (once per leave-one-out subset, then with all references).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.utils import UserError

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Method:
    """One method: where its pieces live and a seconds-long CPU setting for tests and smoke runs."""

    name: str
    build: str  # "module:function" predict builder
    eval: str  # "module:function" eval CLI main(argv) -> exit code (writes results.json)
    predict: str  # "module:function" predict CLI main(argv)
    train: str | None = None  # "module:function" of a separate training CLI (None: the method trains in setup)
    summary: str = ""
    tiny: dict = field(default_factory=dict)  # builder options of a seconds-long CPU run on 64 px images
    tiny_eval: tuple[str, ...] = ()  # the eval CLI's flags for the same setting (beyond root / k / seed / save dir)
    needs_checkpoint: bool = False  # eval and predict take `--checkpoint FILE` (a trained model)
    bench_eval: tuple[str, ...] = ()  # flags the benchmark adds to every eval run of the method
    bench_predict: dict = field(default_factory=dict)  # builder options of the benchmark's long predict run


_DEMO_FDSL = str(REPO / "fdsl" / "weights" / "demo_efficientnet_lite0.pth")
_PCSNET_TINY = {"epochs": 1, "image_size": 64, "cas_width": 8, "aug_pool": 1}

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("knn", "baseline.predict:build_knn_detector", "baseline.knn:main", "baseline.predict:main",
           summary="training-free nearest-neighbour patch distance (PatchCore-style)",
           tiny={"image_size": 64}, tiny_eval=("--image-size", "64", "--quiet")),
    Method("fdsl", "fdsl.predict:build_fdsl_detector", "fdsl.test:main", "fdsl.predict:main", "fdsl.train:main",
           summary="Feature Discrepancy guided Score Learning (trained head, few-shot banks)",
           tiny={"image_size": 64}, tiny_eval=("--checkpoint", _DEMO_FDSL, "--image-size", "64", "--quiet"),
           needs_checkpoint=True, bench_eval=("--win-mode", "nan")),
    Method("pcsnet", "pcsnet.predict:build_pcsnet_detector", "main:main", "pcsnet.predict:main",
           summary="PCSNet: prototypical feature adaption + context-aware segmentation, trained per class",
           tiny=_PCSNET_TINY, tiny_eval=("--epochs", "1", "--image-size", "64", "--cas-width", "8", "--aug-pool", "1",
                                         "--no-checkpoints", "--quiet"),
           bench_predict={"epochs": 2}),  # the predict path is what the long run measures, not the training
)}  # fmt: skip


def get_method(name: str) -> Method:
    """The registry entry; UserError listing the known methods otherwise."""
    if name not in METHODS:
        raise UserError(f"unknown method '{name}': use one of {', '.join(METHODS)}")
    return METHODS[name]


def load(target: str, what: str = "function") -> Callable[..., Any]:
    """Import "module:function" (UserError "WHAT: ... not found" when the module or the function does not exist)."""
    module_name, _, function_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # only "the module itself is missing" means "not available"; a missing dependency inside it propagates
        if exc.name not in (module_name, module_name.split(".")[0]):
            raise
        raise UserError(f"{what}: module {module_name} not found") from exc
    function = getattr(module, function_name, None)
    if function is None:
        raise UserError(f"{what}: {module_name}.{function_name} not found")
    return function


def load_builder(method: str) -> Callable[..., Any]:
    """The predict builder of `method`."""
    return load(get_method(method).build, f"method '{method}' has no predict support yet")
