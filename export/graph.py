"""One `nn.Module` around a set-up predict detector, and its ONNX export.

The module does not reimplement any method: its forward is `engine.predictor.Predictor._forward`, the very
function `predict` runs on every batch (the method's `detector.predict`, then `common.contract.post_process` with the
detector's own spec: `upsample_map` to its eval size, `gaussian_smooth` and, for methods without their own score, the
map maximum). While the graph is captured, `common.utils.capturing_graph()`
switches the two non-torch fast paths of that code to their torch twins: faiss search -> the chunked matmul of
`common.memory_bank` (exact distances, as faiss's path recomputes them), OpenCV's gaussian -> the separable fixed
conv of `common.anomaly_map`. Reference features / prototypes, trained heads and the backbone are captured as
constants of the graph.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from common.utils import UserError
from engine.predictor import Predictor

EXPORTERS = ("torchscript", "dynamo")
# Measured (docs/notes/export.md, 256 px, 4 references, 1 thread): the dynamo exporter's graph ran faster in
# onnxruntime (kNN 58 vs 104 ms/image, FDSL 101 vs 113) and is smaller (unused backbone layers are dropped); the
# TorchScript exporter cannot export PCSNet's CAS (adaptive_avg_pool2d with a non-divisible grid). Dynamo it is;
# "torchscript" stays callable here for comparisons.
DEFAULT_EXPORTER = "dynamo"
OPSET = 18  # the dynamo exporter's minimum; onnxruntime >= 1.14 runs it
INPUT_NAME, OUTPUT_NAMES = "image", ("anomaly_map", "pred_score")


class ExportedDetector(nn.Module):
    """`image (1, 3, S, S)` normalised -> `anomaly_map (1, S, S)`, `pred_score (1,)`, exactly as `predict` scores.

    Args:
        predictor: a set-up `engine.predictor.Predictor` (LOO threshold done, final setup on all
            references).
    """

    def __init__(self, predictor: Predictor) -> None:
        super().__init__()
        self.predictor = predictor
        # Register the detector's modules (backbone, head / model) so the exporters see their weights as
        # parameters; frozen, as at inference. The detectors are not all nn.Modules (FDSL's and PCSNet's are not).
        owner = predictor.detector
        found = (
            [owner] if isinstance(owner, nn.Module) else [m for m in vars(owner).values() if isinstance(m, nn.Module)]
        )
        self.parts = nn.ModuleList(found)
        # eval on the wrapper itself: the TorchScript exporter restores the top module's mode recursively afterwards,
        # and a fresh (training) wrapper would leave FDSL's and PCSNet's BatchNorms in training mode for predict.
        self.eval().requires_grad_(False)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pred_score, anomaly_map = self.predictor._forward(image)  # the predict path itself (see the module doc)
        return anomaly_map, pred_score


def export_onnx(predictor: Predictor, path: str | Path, exporter: str = DEFAULT_EXPORTER) -> float:
    """Write the ONNX graph of `predictor` to `path` (no atomicity here: the caller writes a temporary file).

    Returns:
        seconds the export took.

    Raises:
        UserError: unknown exporter, or the exporter failed on this configuration (one line naming it).
    """
    if exporter not in EXPORTERS:
        raise UserError(f"--exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")
    module = ExportedDetector(predictor)
    size = predictor.image_size
    example = torch.zeros(1, 3, size, size, device=predictor.device)
    start = time.perf_counter()
    try:
        # tracer notes on shape checks that are constant at a fixed input size, and the dynamo exporter's progress
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                opset_version=OPSET, dynamo=exporter == "dynamo", external_data=False, verbose=False,
            )  # fmt: skip
    except UserError:
        raise
    except Exception as exc:  # the exporters raise many types; the message names the unsupported piece
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(
            f"ONNX export ({exporter}) failed for this configuration: {type(exc).__name__}: {first}"
        ) from exc
    return time.perf_counter() - start
