"""FLOPs per test image of the backbone and of each method's own work: the ceiling of the benchmark's x backbone.

A method's throughput ratio to the backbone-only pass cannot exceed backbone / (backbone + method) FLOPs unless its
extra work runs faster per FLOP than the backbone. This prints that ceiling per k for the kNN baseline (exact
nearest-neighbour search of every patch over the k * h * w bank), FDSL without LFE (the FD search per level plus
ASL/NAM) and, for CNN backbones, PCSNet's test forward (descriptor, prototype search, CAS). Counted with
torch.utils.flop_counter on one forward (random weights: FLOPs do not depend on them).

    python scripts/flop_budget.py --backbone efficientnet_lite0 --shots 1,4,8
    python scripts/flop_budget.py --backbone ViT-L-14-336 --image-size 518 --shots 1,2,4   # the FDSL paper's
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from common.utils import UserError, cli_entry, parse_int_list  # noqa: E402


def count_flops(fn) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def budget(backbone_name: str, image_size: int | None, shots: list[int]) -> dict:
    """FLOPs of one image: backbone, kNN search and FDSL FD search + head per k, and the ratio ceilings."""
    import torch

    from common.backbones import align_features, build_backbone, resolve_image_size
    from fdsl.model import FDSLHead

    if backbone_name in ("efficientnet_lite0", "wide_resnet50_2", "vit-tiny-test"):
        backbone = build_backbone(backbone_name)
    else:  # any open_clip architecture with random weights (no download: FLOPs do not depend on the weights)
        import open_clip

        from common.backbones import FDSL_CLIP_LAYERS, ClipViTBackbone

        if backbone_name not in open_clip.list_models():
            raise UserError(f"unknown backbone '{backbone_name}'")
        visual = open_clip.create_model(backbone_name, pretrained=None).visual
        blocks = len(visual.transformer.resblocks)
        layers = [b for b in FDSL_CLIP_LAYERS if b <= blocks] or [blocks]
        backbone = ClipViTBackbone(backbone_name, visual, layers, 518).freeze()
    size = resolve_image_size(backbone, image_size)
    x = torch.randn(1, 3, size, size)
    out = {}
    f_backbone = count_flops(lambda: out.setdefault("features", backbone(x).features))
    levels = align_features(out["features"])
    tokens = levels[0].shape[-1] * levels[0].shape[-2]
    widths = [lv.shape[1] for lv in levels]
    head = FDSLHead(widths).eval()
    f_head = count_flops(lambda: head.score_maps([torch.rand_like(lv) for lv in levels], True))
    pcsnet = _pcsnet_flops(backbone_name, size) if backbone.kind == "cnn" else None
    rows = []
    for k in shots:
        bank = k * tokens
        f_knn = 2 * tokens * bank * sum(widths)  # one matmul over the concatenated levels (the kNN baseline)
        f_fd = sum(2 * tokens * bank * c for c in widths)  # FDSL: one cosine search per level, same total
        rows.append({"k": k, "knn_search": f_knn, "fdsl_fd": f_fd, "fdsl_head": f_head,
                     "knn_ceiling": f_backbone / (f_backbone + f_knn),
                     "fdsl_ceiling": f_backbone / (f_backbone + f_fd + f_head)})  # fmt: skip
    return {"backbone": backbone_name, "image_size": size, "tokens": tokens, "widths": widths,
            "backbone_flops": f_backbone, "rows": rows, "pcsnet": pcsnet}  # fmt: skip


def _pcsnet_flops(backbone_name: str, size: int) -> dict:
    """PCSNet's test forward at the default config: its backbone levels (1-3), then descriptor, PFA search, CAS.
    Independent of k (the prototypes are one per grid position)."""
    import torch

    from common.backbones import build_backbone
    from pcsnet.config import load_config
    from pcsnet.model import PCSNet

    cfg = load_config(overrides={"backbone": backbone_name, "image_size": size})
    backbone = build_backbone(backbone_name, layers=cfg.layers)
    x = torch.randn(1, 3, size, size)
    out = {}
    f_backbone = count_flops(lambda: out.setdefault("levels", backbone(x).features))
    model = PCSNet([info.channels for info in backbone.feature_info], cfg).eval()
    f_model = count_flops(lambda: model(out["levels"], out_size=size))
    return {"cas_width": cfg.cas_width, "backbone": f_backbone, "model": f_model,
            "ceiling": f_backbone / (f_backbone + f_model)}  # fmt: skip


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/flop_budget.py", description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--shots", default="1,2,4,8")
    args = p.parse_args(argv)
    shots = parse_int_list(args.shots, "--shots")
    if not shots or min(shots) < 1:
        raise UserError("--shots must list positive integers")
    r = budget(args.backbone, args.image_size, shots)
    g = 1e9
    print(f"{r['backbone']} @ {r['image_size']} px: backbone {r['backbone_flops'] / g:.2f} GFLOP/image, "
          f"{r['tokens']} tokens, level widths {r['widths']}")  # fmt: skip
    print("| k | kNN search GFLOP | kNN ceiling | FDSL FD + head GFLOP | FDSL ceiling |")
    print("|---|---|---|---|---|")
    for row in r["rows"]:
        print(f"| {row['k']} | {row['knn_search'] / g:.2f} | {row['knn_ceiling']:.2f} | "
              f"{(row['fdsl_fd'] + row['fdsl_head']) / g:.2f} | {row['fdsl_ceiling']:.2f} |")  # fmt: skip
    if r["pcsnet"]:
        pc = r["pcsnet"]
        print(f"PCSNet test (CAS width {pc['cas_width']}, any k): backbone levels 1-3 {pc['backbone'] / g:.2f} GFLOP, "
              f"descriptor + PFA search + CAS {pc['model'] / g:.2f} GFLOP, ceiling {pc['ceiling']:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
