"""`python -m export`: one ONNX graph per set-up detector, plus the preprocessing a consumer must apply.

    python -m export --method knn|fdsl|pcsnet --reference DIR --out OUT [--checkpoint F] [--backbone NAME]
           [--image-size N] [--device D] [--threshold T]

Writes OUT/model.onnx (input `image` float32 (1, 3, S, S) already normalised; outputs `anomaly_map` (1, E, E) at
the detector's eval size E (S unless it declares another) and `pred_score` (1,)) and OUT/preprocess.json
(image_size, mean, std, resize, color and the threshold). The detector is built and set up exactly as
`python -m <method>.predict` builds it (`api.build_detector`), including the leave-one-out threshold over the
references. See docs/notes/export.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from common.utils import UserError, atomic_write_json, check_writable_dir, cli_entry

METHODS = ("knn", "fdsl", "pcsnet")
# flag -> methods it applies to (the common ones: --backbone, --pretrained, --image-size apply to all three)
METHOD_FLAGS = {
    "checkpoint": ("fdsl",), "win_mode": ("fdsl",), "image_score": ("fdsl",), "fd_weight": ("fdsl",),
    "metric": ("knn",),
    "config": ("pcsnet",), "epochs": ("pcsnet",), "cas_width": ("pcsnet",), "aug_pool": ("pcsnet",),
    "seed": ("pcsnet",),
}  # fmt: skip
# Parity gate of the freshly written graph against the PyTorch path (mirrored reference 0), relative to the outputs'
# scale; tests/test_export.py asserts the tighter 1e-4 / 1e-5 on held-out images. Beyond this nothing is written.
VERIFY_RTOL = 1e-3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--reference", nargs="+", required=True, help="good images: a folder and/or files")
    p.add_argument("--out", required=True, help="output folder (model.onnx, preprocess.json)")
    p.add_argument("--checkpoint", default=None, help="FDSL head (default: the shipped efficientnet_lite0 demo head)")
    p.add_argument("--backbone", default=None, help="default: the method's (FDSL: the checkpoint's)")
    p.add_argument("--pretrained", default=None, help="CLIP tag or weights file")
    p.add_argument("--image-size", type=int, default=None, help="input side S (default: the method's)")
    p.add_argument("--device", default="cpu", help="where the detector is set up and traced (cpu, 0, cuda:N)")
    p.add_argument("--threshold", type=float, default=None, help="image-score threshold (default: the LOO rule)")
    p.add_argument("--class-name", default="object", help="name passed to the detector's setup")
    # method options, as the predict CLIs spell them
    p.add_argument("--metric", choices=("l2", "cosine"), default=None, help="knn: patch distance (default l2)")
    p.add_argument("--win-mode", default=None, help="fdsl: only nan (LFE windows cannot be exported)")
    p.add_argument("--image-score", choices=("max", "map"), default=None, help="fdsl: as fdsl.predict (default max)")
    p.add_argument("--fd-weight", type=float, default=None, help="fdsl: a in (1 - a) * ASL + a * FD (default 0)")
    p.add_argument("--config", metavar="YAML", default=None, help="pcsnet: config file")
    p.add_argument("--epochs", type=int, default=None, help="pcsnet: training epochs (default 50)")
    p.add_argument("--cas-width", type=int, default=None, help="pcsnet: CAS channels")
    p.add_argument("--aug-pool", type=int, default=None, help="pcsnet: pseudo anomalies per reference")
    p.add_argument("--seed", type=int, default=None, help="pcsnet: seed (default 0)")
    return p


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The builder options of `args.method` (None = the builder's default).

    Raises:
        UserError: a flag of another method, or a configuration the export does not support.
    """
    options = {"backbone": args.backbone, "pretrained": args.pretrained, "image_size": args.image_size}
    for name, methods in METHOD_FLAGS.items():
        value = getattr(args, name)
        if value is None:
            continue
        if args.method not in methods:
            raise UserError(f"--{name.replace('_', '-')} applies to {' / '.join(methods)} only, not {args.method}")
        options[name] = value
    if args.method == "fdsl" and options.get("win_mode", "nan") != "nan":
        raise UserError(
            f"ONNX export does not support FDSL's LFE windows (--win-mode {options['win_mode']}): the window crops, "
            "their banks and the stitching are not exported; export with --win-mode nan"
        )
    if args.image_size is not None and args.image_size < 1:
        raise UserError(f"--image-size must be positive (got {args.image_size})")
    return {k: v for k, v in options.items() if v is not None}


def preprocess_spec(predictor: Any, method: str, options: dict[str, Any]) -> dict[str, Any]:
    """What preprocess.json records: the consumer's preprocessing and the decision threshold."""
    detector = predictor.detector
    info = predictor.threshold_info()
    return {
        "image_size": predictor.image_size,
        "mean": [float(v) for v in detector.mean], "std": [float(v) for v in detector.std],
        "resize": "bicubic",  # data.dataset.preprocess_image: PIL Image.BICUBIC squash to (S, S), then / 255
        "color": "rgb",  # grayscale images are replicated to 3 channels (data.dataset.read_image)
        "threshold": predictor.threshold, "pixel_threshold": predictor.pixel_threshold,
        "threshold_rule": info["rule"], "loo_scores": info["loo_scores"],
        "score_is_map_max": predictor.score_is_map_max, "method": method,
        "options": {k: str(v) if isinstance(v, os.PathLike) else v for k, v in options.items()},
        "input": "image float32 (1, 3, S, S), normalised: (pixel / 255 - mean) / std, channels RGB",
        "outputs": "anomaly_map float32 (1, E, E) upsampled to the eval size E and smoothed; pred_score float32 (1,)",
        "eval_size": predictor.post.size,
    }  # fmt: skip


def verify(predictor: Any, model_path: Path, image: np.ndarray) -> tuple[float, float, float]:
    """(max |map difference|, |score difference|, the outputs' scale max(|map|, |score|)) of the graph in
    onnxruntime against the PyTorch path."""
    import onnxruntime as ort

    batch = predictor.preprocess([image])
    score, anomaly_map = predictor._forward(batch)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    onnx_map, onnx_score = session.run(None, {"image": batch.cpu().numpy()})
    scale = max(float(anomaly_map.abs().max()), abs(score[0].item()))
    return float(np.abs(onnx_map - anomaly_map.numpy()).max()), float(abs(onnx_score[0] - score[0].item())), scale


def export_predictor(predictor: Any, out: str | os.PathLike, method: str, options: dict[str, Any],
                     exporter: str | None = None, check_image: np.ndarray | None = None) -> dict[str, Any]:  # fmt: skip
    """Export a set-up `engine.predictor.Predictor` to OUT/model.onnx + OUT/preprocess.json (both atomic).

    Args:
        predictor: from `api.build_detector` (or `engine.predictor.Predictor`).
        out: output folder (created).
        method, options: recorded in preprocess.json.
        exporter: `torchscript` or `dynamo` (default `export.graph.DEFAULT_EXPORTER`).
        check_image: RGB uint8 image for the parity gate (None = skip it).

    Returns:
        preprocess.json's content plus `export_seconds`, `model_bytes` and (gate) `verify_map`, `verify_score`.
    """
    from export.graph import DEFAULT_EXPORTER, export_onnx

    exporter = exporter or DEFAULT_EXPORTER
    out = check_writable_dir(out)
    fd, tmp = tempfile.mkstemp(prefix=".model.", suffix=".onnx.tmp", dir=out)
    os.close(fd)
    try:
        seconds = export_onnx(predictor, tmp, exporter)
        report = {"export_seconds": seconds, "model_bytes": os.path.getsize(tmp)}
        if check_image is not None:
            map_diff, score_diff, scale = verify(predictor, Path(tmp), check_image)
            scale = max(scale, 1e-6)
            if not (map_diff <= VERIFY_RTOL * scale and score_diff <= VERIFY_RTOL * scale):
                raise UserError(f"the exported graph disagrees with the PyTorch path (max map difference "
                                f"{map_diff:.3g}, score difference {score_diff:.3g}): nothing written")  # fmt: skip
            report |= {"verify_map": map_diff, "verify_score": score_diff}
        os.replace(tmp, out / "model.onnx")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    # after the export: tracing `_forward` settles `score_is_map_max` even when no LOO ran
    spec = preprocess_spec(predictor, method, options) | {"exporter": exporter}
    atomic_write_json(out / "preprocess.json", spec)
    return spec | report


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = method_options(args)  # every flag check before a model loads
    from api import build_detector
    from engine.predictor import read_references

    references, _, bad = read_references(args.reference)
    check_writable_dir(args.out)
    for name, reason in bad:
        print(f"skipped unreadable reference {name}: {reason}")
    predictor = build_detector(
        args.method, references, device=args.device, threshold=args.threshold, class_name=args.class_name,
        **options,
    )  # fmt: skip
    mirrored = np.ascontiguousarray(references[0][:, ::-1])  # not a bank entry as such: a non-trivial map
    result = export_predictor(predictor, args.out, args.method, options, check_image=mirrored)
    out = Path(args.out)
    print(f"wrote {out / 'model.onnx'} ({result['model_bytes'] / 2**20:.1f} MB, {result['exporter']}, "
          f"{result['export_seconds']:.1f} s) and {out / 'preprocess.json'}")  # fmt: skip
    print(f"onnxruntime vs PyTorch on the mirrored first reference: max map difference {result['verify_map']:.2e}, "
          f"score difference {result['verify_score']:.2e}")  # fmt: skip
    print(f"threshold {result['threshold']:.6g} ({result['threshold_rule']}); input {result['image_size']} px, "
          f"resize {result['resize']}, mean {result['mean']}, std {result['std']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
