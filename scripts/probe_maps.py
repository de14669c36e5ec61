"""Dump the raw maps of kNN and FDSL's parts on the dev benchmark, for offline analysis of fusion rules.

    python scripts/probe_maps.py --out runs/probe --shots 4 --seeds 0,1,2 [--heads runs/db_full/heads]

Per (source, k, seed) it writes OUT/<source>_k<k>_s<seed>.npz with, for the test images and for every support image
scored leave-one-out against the other k - 1 (k > 1):
- `knn` (N, h, w): the kNN baseline's distance map;
- `fd` (N, L, G, G): FDSL's per-level training-free maps 1 - max cos;
- `asl` (N, L, G, G): the per-level ASL(+NAM) P(anomalous) of the leave-one-source-out head;
- `labels` (N,), `masks` (N, 64, 64) (test only; max-pooled to 64 px).
Research tool: the numbers it leads to are confirmed by `scripts/devbench.py`, which runs the real commands.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from baseline.knn import KNNDetector
from common.backbones import build_backbone
from common.few_shot import sample_support
from data.dataset import AnomalyDataset, load_images
from data.devbench import GROUP, SOURCES
from fdsl.checkpoint import load_checkpoint
from fdsl.config import TestConfig
from fdsl.model import discrepancies
from fdsl.test import build_detector


def fdsl_maps(det, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    fds, devs = [], []
    for dev, max_cos in discrepancies(det.encode(images), det.bank, det.opts.fd_match, det.opts.signed):
        devs.append(dev)
        fds.append(1.0 - max_cos)
    asl = det.head.score_maps(devs, det.opts.use_nam)
    return torch.stack(asl, 1).numpy(), torch.stack(fds, 1).numpy()


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/probe")
    p.add_argument("--data", default="devbench_data/test")
    p.add_argument("--heads", default="runs/db_full/heads")
    p.add_argument("--shots", default="4")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sources", default=",".join(SOURCES))
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--feature-pool", type=int, default=None, help="FDSL pooling (asl maps then mean nothing)")
    p.add_argument("--tag", default="")
    p.add_argument("--fd-match", default="level", choices=("level", "joint"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((Path(args.data) / "meta.json").read_text())
    device = torch.device("cpu")
    knn = KNNDetector(build_backbone(args.backbone, None, None, device))
    for source in args.sources.split(","):
        ckpt = Path(args.heads) / GROUP[source] / "last.pth"
        state = load_checkpoint(ckpt)
        # knn_weight 0: the probe dumps the kNN map itself (KNNDetector), the detector's own term is not needed
        cfg = TestConfig(dataset_root=args.data, checkpoint=str(ckpt), k_shot=1, seed=0, save_dir="x", knn_weight=0.0)
        det, _, _ = build_detector(cfg, state, device, meta)
        det.opts.fd_match = args.fd_match
        if args.feature_pool:
            det.opts.feature_pool = args.feature_pool
        size = det.image_size
        ds = AnomalyDataset(args.data, "test", [source], size, det.mean, det.std, meta=meta)
        items = [ds[i] for i in range(len(ds))]
        test = torch.stack([it["image"] for it in items])
        labels = np.array([it["gt_label"] for it in items])
        masks = torch.stack([it["gt_mask"] for it in items])
        masks = F.adaptive_max_pool2d(masks, 64)[:, 0].numpy().astype(bool)
        for k in [int(s) for s in args.shots.split(",")]:
            for seed in [int(s) for s in args.seeds.split(",")]:
                path = out / f"{source}_k{k}_s{seed}{args.tag}.npz"
                if path.is_file():
                    continue
                paths = sample_support(meta, source, k, seed)
                support = load_images(args.data, paths, size, det.mean, det.std)
                knn.setup(source, support)
                det.setup(source, support)
                res = {"labels": labels, "masks": masks, "knn": knn.predict(test).anomaly_map.numpy()}
                res["asl"], res["fd"] = fdsl_maps(det, test)
                if k > 1:
                    loo = {"knn": [], "asl": [], "fd": []}
                    for i in range(k):
                        rest = torch.cat([support[:i], support[i + 1 :]])
                        knn.setup(source, rest)
                        det.setup(source, rest)
                        loo["knn"].append(knn.predict(support[i : i + 1]).anomaly_map.numpy())
                        a, f = fdsl_maps(det, support[i : i + 1])
                        loo["asl"].append(a)
                        loo["fd"].append(f)
                    res.update({f"loo_{n}": np.concatenate(v) for n, v in loo.items()})
                np.savez_compressed(path, **{n: v.astype(np.float32) if v.dtype.kind == "f" else v
                                             for n, v in res.items()})  # fmt: skip
                print(path, flush=True)


if __name__ == "__main__":
    main()
