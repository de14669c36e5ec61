"""One-command GPU check of both papers' modes (issue 14): `bash scripts/gpu_check.sh [options]`.

Stages, on one class of a small tree built here (or of MVTEC_ROOT when set):
  fdsl    FDSL paper mode: fdsl.train with configs/fdsl/paper_train.yaml (1 epoch), then fdsl.test with
          configs/fdsl/paper_test.yaml, `mul` LFE (13 / 2 / 0.5), k = 1.
  pcsnet  PCSNet paper mode: python main.py --config configs/pcsnet/paper.yaml, k = 8, a few epochs.
Each stage prints seconds per test image, training seconds, peak GPU memory and the precision / TF32 it ran with.
Real weights when they are on this machine, random weights otherwise or with --random-weights (said loudly).

Without a CUDA device it exits 1 with one line. `--smoke` runs the same stages on the CPU with tiny sizes (ViT-L at
42 px, WRN at 64 px, 1 epoch, k = 2: a test of this script); `--dry-run` prints the commands and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLIP_NAME, CLIP_TAG = "ViT-L-14-336", "openai"
WRN_FILE = "wide_resnet50_2-95faca4d.pth"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bash scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--random-weights", action="store_true", help="use random weights even when real ones are present")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: the same stages, as a test of this script")
    p.add_argument("--dry-run", action="store_true", help="print the stages' commands and exit")
    p.add_argument("--stages", default="fdsl,pcsnet", help="comma-separated subset of fdsl,pcsnet (default both)")
    p.add_argument("--device", default="0", help="CUDA index (default 0)")
    p.add_argument("--out", default="gpu_check_out", help="work folder (tree, checkpoints, results)")
    p.add_argument("--class-name", default=None, help="class of MVTEC_ROOT to use (default: bottle, else the first)")
    p.add_argument("--pcsnet-epochs", type=int, default=3, help="PCSNet epochs (default 3)")
    args = p.parse_args(argv)
    args.stages = [s for s in args.stages.split(",") if s]
    if not args.stages or set(args.stages) - {"fdsl", "pcsnet"}:
        p.error("--stages takes fdsl, pcsnet or fdsl,pcsnet")
    return args


def real_weights_present() -> dict[str, bool]:
    """Which real weights are on disk (no network): the CLIP cache and torchvision's WRN file."""
    import torch

    from common.backbones import _find_cached_clip_weights

    return {
        "clip": _find_cached_clip_weights(CLIP_NAME, CLIP_TAG) is not None,
        "wrn": (Path(torch.hub.get_dir()) / "checkpoints" / WRN_FILE).is_file(),
    }


def build_tree(out: Path, smoke: bool) -> tuple[Path, str]:
    """MVTEC_ROOT (one of its classes) or a small MVTec-layout tree written under OUT/tree."""
    from tests.fixtures import make_mvtec_dataset

    root = out / "tree"
    if not (root / "meta.json").is_file():
        n = 2 if smoke else 8  # PCSNet's paper k = 8 needs 8 good train images
        make_mvtec_dataset(root, classes=("part",), n_train=n, n_test_good=2 if smoke else 4,
                           defects={"crack": 2 if smoke else 4}, size=64 if smoke else 256, seed=0)  # fmt: skip
    return root, "part"


def stage_commands(args: argparse.Namespace, root: Path, class_name: str, weights: dict) -> dict[str, list]:
    """Per stage, a list of (label, python argv) steps; module runs are `-m name`, scripts a path."""
    out, device = Path(args.out), "cpu" if args.smoke else args.device
    clip = "random" if not weights["clip"] else CLIP_TAG
    wrn = ["--pretrained", "random"] if not weights["wrn"] else []
    tiny_fdsl = ["--image-size", "42", "--train-k-shot", "1"] if args.smoke else []
    fdsl = [
        ("train", ["-m", "fdsl.train", "--config", str(REPO / "configs/fdsl/paper_train.yaml"),
                   "--dataset-root", str(root), "--save-dir", str(out / "fdsl_exp"), "--epochs", "1",
                   "--device", device, "--pretrained", clip, "--progress", "0", *tiny_fdsl]),
        ("test", ["-m", "fdsl.test", "--config", str(REPO / "configs/fdsl/paper_test.yaml"),
                  "--dataset-root", str(root), "--checkpoint", str(out / "fdsl_exp/epoch_1.pth"), "--k-shot", "1",
                  "--seed", "0", "--save-dir", str(out / "fdsl_results"), "--class-name", class_name,
                  "--win-mode", "mul", "--win-weight", "0.5", "--device", device, "--pretrained", clip,
                  "--progress", "0", *(["--win-size", "2", "--win-stride", "1", "--eval-size", "28",
                                        "--image-size", "42"] if args.smoke else [])]),
    ]  # fmt: skip
    pcsnet_size = ["--image-size", "64", "--grid-size", "8", "--cas-width", "32", "--set", "cas_in_channels=32"]
    pcsnet = [
        ("train+test", [str(REPO / "main.py"), "--config", str(REPO / "configs/pcsnet/paper.yaml"),
                        "--data-root", str(root), "--class-name", class_name, "--k-shot", "2" if args.smoke else "8",
                        "--seed", "0", "--save-dir", str(out / "pcsnet_results"), "--device", device,
                        "--epochs", "1" if args.smoke else str(args.pcsnet_epochs), "--quiet", *wrn,
                        *(pcsnet_size if args.smoke else ["--precision", "fp16"])]),
    ]  # fmt: skip
    return {name: steps for name, steps in (("fdsl", fdsl), ("pcsnet", pcsnet)) if name in args.stages}


def run_step(argv: list[str], stats: Path) -> int:
    """Run one python step in a child process that records its wall time and peak GPU memory into `stats`."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "_step", str(stats), "--", *argv]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


def _step(stats: str, argv: list[str]) -> int:
    """Child side of `run_step`: run a module (`-m name ...`) or a script in this process, then write the stats."""
    import torch

    start, code = time.perf_counter(), 0
    if torch.cuda.is_available():  # TF32 wherever fp32 runs (FDSL's paper configs set it too; PCSNet has no switch)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    sys.argv = argv[1:] if argv[0] == "-m" else argv
    try:
        if argv[0] == "-m":
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    tf32 = bool(torch.cuda.is_available() and torch.backends.cuda.matmul.allow_tf32)
    Path(stats).write_text(
        json.dumps({"seconds": time.perf_counter() - start, "peak_gpu_bytes": peak, "code": code, "tf32": tf32})
    )
    return code


def _gib(value) -> str:
    return "n/a (CPU)" if value is None else f"{value / 2**30:.2f} GiB"


def report(name: str, out: Path, stats: dict[str, dict]) -> None:
    """One summary line per stage from the steps' stats and the stage's results.json."""
    results = json.loads((out / f"{name}_results/results.json").read_text())
    timing = results.get("timing", {})
    per_image = timing.get("test_seconds_per_image") or timing.get("seconds_per_image")
    if name == "fdsl":
        train_s = stats["train"]["seconds"]
        precision, tf32 = results.get("precision"), results.get("tf32")
        train_precision = results.get("train_precision")
    else:
        extra = results.get("pcsnet", {})
        train_s = sum((extra.get("train_seconds") or {}).values()) or None
        precision = extra.get("config", {}).get("precision", "not recorded")
        tf32, train_precision = any(s.get("tf32") for s in stats.values()), None
    peak = max((s["peak_gpu_bytes"] or 0) for s in stats.values()) if any(
        s["peak_gpu_bytes"] is not None for s in stats.values()) else None  # fmt: skip
    train_txt = "n/a" if train_s is None else f"{train_s:.1f} s"
    if name == "fdsl" and train_s is not None:
        train_txt += " (the training step's wall time, start-up and model build included)"
    print(f"[{name}] seconds per test image {per_image:.3f}; training {train_txt}; peak GPU memory {_gib(peak)}; "
          f"test precision {precision}, TF32 {tf32}" + (f"; training precision {train_precision}"
                                                         if train_precision else ""), flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_step"]:
        return _step(argv[1], argv[3:])
    args = parse_args(argv)
    import torch

    if not (args.smoke or args.dry_run) and not torch.cuda.is_available():
        print("error: no CUDA device found (torch.cuda.is_available() is False): scripts/gpu_check.sh needs a GPU; "
              "--smoke runs the same stages on the CPU with tiny sizes", file=sys.stderr)  # fmt: skip
        return 1
    out = Path(args.out).resolve()
    args.out = str(out)
    weights = {"clip": False, "wrn": False} if args.random_weights else real_weights_present()
    for kind, present in weights.items():
        if not present:
            why = "--random-weights" if args.random_weights else "real weights not found on this machine"
            print(f"WARNING: {kind.upper()} backbone runs with RANDOM weights ({why}): the metrics mean nothing; "
                  "only the speed, memory and precision lines count", flush=True)  # fmt: skip
    if os.environ.get("MVTEC_ROOT"):
        root = Path(os.environ["MVTEC_ROOT"])
        meta = json.loads((root / "meta.json").read_text())
        names = list(meta["test"])
        class_name = args.class_name or ("bottle" if "bottle" in names else names[0])
    else:
        root, class_name = (out / "tree", "part") if args.dry_run else build_tree(out, args.smoke)
    stages = stage_commands(args, root, class_name, weights)
    for name, steps in stages.items():
        stats = {}
        for label, step in steps:
            print(f"== {name} {label}: python {shlex.join(step)}", flush=True)
            if args.dry_run:
                continue
            stats_file = out / f".{name}_{label.replace('+', '_')}_stats.json"
            out.mkdir(parents=True, exist_ok=True)
            code = run_step(step, stats_file)
            if code != 0:
                print(f"error: stage {name} ({label}) failed with exit code {code} (its output is above)",
                      file=sys.stderr)  # fmt: skip
                return 1
            stats[label] = json.loads(stats_file.read_text())
        if not args.dry_run:
            report(name, out, stats)
    print("gpu check: dry run, nothing executed" if args.dry_run else "gpu check: all stages passed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
