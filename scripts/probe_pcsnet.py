"""Dump PCSNet's raw maps on the dev benchmark (CAS logits, PFA distance map, on test and clean support images).

    python scripts/probe_pcsnet.py --out runs/probe --shots 4 --seeds 0,1,2

Writes OUT/<source>_k<k>_s<seed>_pcs2.npz: `cas` (N, 64, 64) CAS logits (area-downsampled from the input size),
`pfa` (N, G, G) the raw PFA map (not divided by the support scale), `sup_cas` / `sup_pfa` the same on the clean
support, `pfa_scale`; `bank` the PFA map against every adapted support patch instead of the per-position prototypes,
`raw` the 1-NN map of the unadapted descriptor input (a kNN on PCSNet's levels), and `loo_bank` / `loo_raw` the
same two for each support image against the other k - 1. Research tool for fusion rules; scripts/devbench.py
confirms with the real command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.backbones import build_backbone
from common.few_shot import sample_support
from common.utils import set_seed
from data.dataset import AnomalyDataset, load_images
from data.devbench import SOURCES
from pcsnet.config import PCSNetConfig
from pcsnet.trainer import PCSNetDetector, extract_levels


def raw_descriptor(levels, grid):
    """The backbone levels as PCSNet's descriptor sees them before adaptation: 3x3 avg-pool, resize, concat."""
    out = [F.interpolate(F.avg_pool2d(f, 3, 1, 1), size=(grid, grid), mode="bilinear", align_corners=False)
           for f in levels]  # fmt: skip
    return torch.cat(out, 1)


def bank_map(query, bank, k):
    """(B, D, G, G) query, (M, D) bank -> (B, G, G) mean of the k nearest euclidean distances."""
    b, d, g, _ = query.shape
    q = query.permute(0, 2, 3, 1).reshape(-1, d)
    dist = torch.cdist(q, bank).topk(k, dim=1, largest=False).values.mean(1)
    return dist.reshape(b, g, g)


@torch.no_grad()
def maps(det, images, support):
    levels = extract_levels(det.backbone, images, chunk=8)
    out = det.model(levels, out_size=images.shape[-1])
    cas = F.adaptive_avg_pool2d(out["logits"], 64)[:, 0].numpy()
    pfa = (det.model.pfa_map(out["knn"]) * det.model.pfa_scale).numpy()
    sup_levels = extract_levels(det.backbone, support, chunk=8)
    sup_feat = det.model.descriptor(sup_levels)
    grid, k = det.model.grid, det.model.nn_loss
    flat = lambda f: f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # noqa: E731
    bank = bank_map(out["features"], flat(sup_feat), k).numpy()
    raw = bank_map(raw_descriptor(levels, grid), flat(raw_descriptor(sup_levels, grid)), 1).numpy()
    return cas, pfa, bank, raw


@torch.no_grad()
def loo_maps(det, support):
    """Leave-one-out over the support: adapted-bank and raw-bank maps of each image against the others."""
    if len(support) < 2:
        return None, None
    levels = extract_levels(det.backbone, support, chunk=8)
    feat, raw = det.model.descriptor(levels), raw_descriptor(levels, det.model.grid)
    flat = lambda f: f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # noqa: E731
    banks, raws = [], []
    for i in range(len(support)):
        rest = [j for j in range(len(support)) if j != i]
        banks.append(bank_map(feat[i : i + 1], flat(feat[rest]), det.model.nn_loss))
        raws.append(bank_map(raw[i : i + 1], flat(raw[rest]), 1))
    return torch.cat(banks).numpy(), torch.cat(raws).numpy()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/probe")
    p.add_argument("--data", default="devbench_data/test")
    p.add_argument("--shots", default="4")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sources", default=",".join(SOURCES))
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE config overrides (YAML values)")
    p.add_argument("--tag", default="pcs2")
    args = p.parse_args()
    import yaml

    overrides = {kv.split("=", 1)[0]: yaml.safe_load(kv.split("=", 1)[1]) for kv in args.set}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads((Path(args.data) / "meta.json").read_text())
    cfg = PCSNetConfig(**overrides)
    device = torch.device("cpu")
    backbone = build_backbone(cfg.backbone, pretrained=cfg.pretrained, layers=cfg.layers, device=device)
    for k in [int(s) for s in args.shots.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for source in args.sources.split(","):
                path = out / f"{source}_k{k}_s{seed}_{args.tag}.npz"
                if path.is_file():
                    continue
                set_seed(seed)
                det = PCSNetDetector(backbone, cfg, seed, None, progress=False)
                ds = AnomalyDataset(args.data, "test", [source], cfg.image_size, backbone.mean, backbone.std, meta=meta)
                test = torch.stack([ds[i]["image"] for i in range(len(ds))])
                support = load_images(args.data, sample_support(meta, source, k, seed), cfg.image_size,
                                      backbone.mean, backbone.std)  # fmt: skip
                det.setup(source, support)
                det.model.eval()
                cas, pfa, bank, raw = maps(det, test, support)
                scas, spfa, _, _ = maps(det, support, support)
                loo_bank, loo_raw = loo_maps(det, support)
                extra = {} if loo_bank is None else {"loo_bank": loo_bank, "loo_raw": loo_raw}
                np.savez_compressed(path, cas=cas, pfa=pfa, bank=bank, raw=raw, sup_cas=scas, sup_pfa=spfa,
                                    pfa_scale=float(det.model.pfa_scale), **extra)  # fmt: skip
                print(path, f"train {det.train_seconds[source]:.0f} s", flush=True)


if __name__ == "__main__":
    main()
