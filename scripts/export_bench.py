"""onnxruntime vs the PyTorch predict path, side by side in one run: images/s and peak resident memory.

    python scripts/export_bench.py [--methods knn,fdsl,pcsnet] [--images 30] [--image-size 256] [--refs 4]
           [--reference DIR --queries DIR] [--work DIR] [--pcsnet-epochs 5]

Per method: `python -m export` writes the graph, then two separate worker processes (so their memory is separate)
score the same query images one at a time, from the image file to (map, score): `onnx` reads preprocess.json,
resizes with PIL and runs the graph; `torch` builds the detector as `predict` does (`api.build_detector`, with a
given threshold so no leave-one-out runs) and calls `Predictor.predict_batch` on each image. Both run on one thread
(OMP_NUM_THREADS=1, onnxruntime intra-op 1). Memory: the peak resident set while scoring (VmHWM reset after set-up,
so PCSNet's training is not counted) and the whole process's peak (ru_maxrss). Without --reference/--queries a
synthetic MVTec-layout set is written (tests.fixtures.make_mvtec_tree, textured gradients with rectangles).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # for tests.fixtures (the synthetic images), which is not an installed package
    sys.path.insert(0, str(ROOT))
# The onnxruntime worker imports only numpy, PIL and onnxruntime (no torch), as a deployment would.


def _hwm_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _reset_hwm() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak RSS restarts from the current RSS


def _images(folder: str) -> list[Path]:
    """The query files, sorted (no project import: the onnxruntime worker must not load torch)."""
    suffixes = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff")
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in suffixes)


def worker_onnx(model_dir: Path, queries: list[Path]) -> dict:
    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    spec = json.loads((model_dir / "preprocess.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    mean, std, size = np.array(spec["mean"], np.float32), np.array(spec["std"], np.float32), spec["image_size"]

    def score(path: Path) -> float:
        rgb = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
        x = ((np.asarray(rgb, np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)[None]
        return float(session.run(None, {"image": np.ascontiguousarray(x)})[1][0])

    score(queries[0])  # warm-up (allocations, kernel selection)
    _reset_hwm()
    start = time.perf_counter()
    scores = [score(p) for p in queries]
    return {"seconds": time.perf_counter() - start, "scores": scores}


def worker_torch(method: str, refs: str, options: dict, queries: list[Path]) -> dict:
    import torch

    import api
    from data.dataset import read_image

    torch.set_num_threads(1)
    predictor = api.build_detector(method, refs, threshold=1.0, **options)  # a given threshold: no LOO trainings
    predictor.predict_batch([read_image(queries[0])])  # warm-up
    _reset_hwm()
    start = time.perf_counter()
    scores = [float(predictor.predict_batch([read_image(p)])[0][0]) for p in queries]
    return {"seconds": time.perf_counter() - start, "scores": scores}


def run_worker(args: argparse.Namespace) -> int:
    queries = _images(args.queries)[: args.images]
    options = json.loads(args.options)
    if args.worker == "onnx":
        result = worker_onnx(Path(args.model_dir), queries)
    else:
        result = worker_torch(args.method, args.reference, options, queries)
    result |= {
        "n": len(queries), "peak_scoring_mb": _hwm_mb(),
        "peak_process_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip
    print(json.dumps(result))
    return 0


def _run(cmd: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:4])} ... failed: {proc.stderr.strip().splitlines()[-1:]}")
    return proc.stdout


def method_options(method: str, args: argparse.Namespace) -> dict:
    options: dict = {"image_size": args.image_size}
    if method == "pcsnet":
        options["epochs"] = args.pcsnet_epochs  # training length does not change the inference cost
    return options


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="knn,fdsl,pcsnet")
    p.add_argument("--images", type=int, default=30, help="query images per method")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--refs", type=int, default=4, help="references of the synthetic set")
    p.add_argument("--reference", default=None, help="folder of good references (default: synthetic)")
    p.add_argument("--queries", default=None, help="folder of query images (default: synthetic)")
    p.add_argument("--work", default=None, help="where the graphs go (default: a temporary folder)")
    p.add_argument("--pcsnet-epochs", type=int, default=5)
    p.add_argument("--worker", choices=("onnx", "torch"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--method", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="export_bench_"))
    if args.reference is None or args.queries is None:
        from tests.fixtures import make_mvtec_tree

        tree = make_mvtec_tree(work / "data", classes=("part",), n_train=args.refs, n_test_good=args.images // 2,
                               defects={"crack": args.images - args.images // 2}, size=args.image_size)  # fmt: skip
        queries = work / "queries"
        queries.mkdir(exist_ok=True)
        for src in sorted((tree / "part" / "test").glob("*/*.png")):
            (queries / f"{src.parent.name}_{src.name}").write_bytes(src.read_bytes())
        args.reference, args.queries = str(tree / "part" / "train" / "good"), str(queries)
    rows = []
    for method in args.methods.split(","):
        options = method_options(method, args)
        out = work / f"onnx_{method}"
        cmd = [sys.executable, "-m", "export", "--method", method, "--reference", args.reference, "--out", str(out),
               "--image-size", str(args.image_size), "--threshold", "1.0"]  # fmt: skip
        if method == "pcsnet":
            cmd += ["--epochs", str(args.pcsnet_epochs)]
        _run(cmd)
        common = [sys.executable, str(Path(__file__).resolve()), "--queries", args.queries, "--images",
                  str(args.images), "--method", method, "--options", json.dumps(options)]  # fmt: skip
        onnx = json.loads(_run([*common, "--worker", "onnx", "--model-dir", str(out)]).splitlines()[-1])
        torch_ = json.loads(_run([*common, "--worker", "torch", "--reference", args.reference]).splitlines()[-1])
        gap = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(onnx["scores"], torch_["scores"]))
        size_mb = (out / "model.onnx").stat().st_size / 2**20
        for name, r in (("onnxruntime", onnx), ("pytorch", torch_)):
            rows.append((method, name, r["n"] / r["seconds"], r["peak_scoring_mb"], r["peak_process_mb"], size_mb, gap))
    print(f"{args.image_size} px, {args.images} images per method, batch 1, one thread; graphs in {work}")
    print("| method | runtime | images/s | peak RSS scoring (MB) | peak RSS process (MB) | model.onnx (MB) "
          "| max rel score gap |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method, name, ips, peak, proc, size_mb, gap in rows:
        print(f"| {method} | {name} | {ips:.1f} | {peak:.0f} | {proc:.0f} | {size_mb:.1f} | {gap:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
