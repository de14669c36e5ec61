"""Time PCSNet's training step and test forward for several CAS widths / grids on this machine.

    python scripts/pcsnet_bench.py [--widths 64,128,896] [--grids 32] [--image-size 256] [--steps 5]

Reports wall and process-CPU seconds per training step (batch: 2 clean + 2 pseudo-anomalous images) and per
test image (batch 8), with the CAS parameter count. Random support images: the cost does not depend on content.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common.backbones import build_backbone  # noqa: E402
from pcsnet.config import load_config  # noqa: E402
from pcsnet.model import PCSNet  # noqa: E402
from pcsnet.trainer import PseudoAnomalySource, build_optimizer, extract_levels, train_step  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    """(wall, cpu) seconds per call, after one warm-up call."""
    fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats


def bench(backbone, width: int, grid: int, size: int, steps: int) -> dict:
    cfg = load_config(overrides={"cas_width": width, "grid_size": grid, "image_size": size})
    support = torch.rand(2, 3, size, size) * 2 - 1
    model = PCSNet([i.channels for i in backbone.feature_info], cfg)
    clean = extract_levels(backbone, support)
    model.set_prototypes(clean)
    source = PseudoAnomalySource(backbone, support, "carpet", np.random.default_rng(0), pool=1)
    opt = build_optimizer(model.train(), cfg)
    idx = torch.arange(2)
    step = timed(lambda: train_step(model, clean, *source.sample(idx), cfg, opt), steps)
    model.eval()
    images = torch.rand(8, 3, size, size) * 2 - 1

    def predict():
        with torch.inference_mode():
            model(extract_levels(backbone, images, chunk=8), out_size=size)

    wall, cpu = timed(predict, max(1, steps // 2))
    params = sum(p.numel() for p in model.cas.parameters())
    return {"width": width, "grid": grid, "cas_params_M": params / 1e6, "step_wall": step[0], "step_cpu": step[1],
            "test_wall_per_image": wall / 8, "test_cpu_per_image": cpu / 8}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--widths", default="64,128,896")
    parser.add_argument("--grids", default="32")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    backbone = build_backbone(args.backbone, layers=(1, 2, 3))
    print(f"threads {torch.get_num_threads()}; backbone {args.backbone} at {args.image_size} px")
    for grid in [int(g) for g in args.grids.split(",")]:
        for width in [int(w) for w in args.widths.split(",")]:
            row = bench(backbone, width, grid, args.image_size, args.steps)
            print("  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
