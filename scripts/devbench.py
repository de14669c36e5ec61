"""Development benchmark: every method against the kNN baseline on sources and defects nobody tuned on.

    python scripts/devbench.py --out runs/devbench [--shots 1,2,4,8] [--seeds 0,1,2] [--quick]
        [--variants knn,fdsl,fdsl_fd,pcsnet,pcsnet_pfa] [--variant NAME=METHOD:ARGS ...] [--data devbench_data]

1. Builds the data once (`python -m data.devbench`, cached under --data): one class per source, test defects from
   `data.test_defects` (code no method trains on), the real textile defects, and leave-one-source-out folds.
2. Trains one FDSL head per fold (`fdsl.train` on ROOT/folds/<group>: every source but the tested one), cached
   under OUT/heads/<group>/last.pth; the head that tests a source never saw it.
3. Runs every variant for every (k, seed) as its own subprocess on the same support draws (the draw depends on
   the seed and the class only), caching each run's results.json (delete a run folder to redo it).
4. Prints, per k, each variant's image AUROC / pixel AUROC / AUPRO per source and the mean, the difference to
   kNN, and seconds per image (test loop); writes OUT/devbench.md and OUT/devbench.json.

A variant is METHOD:ARGS with METHOD in knn | fdsl | pcsnet; ARGS go to that method's command (e.g.
`fdsl_fd=fdsl:--fd-weight 1`). PCSNet trains on the support of the class it tests (its pseudo anomalies come
from NSA cut-paste, not from the test generators), so it needs no fold.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from data.devbench import ALL_FOLD, GROUP, QUICK_SOURCES, SOURCES

REPO = Path(__file__).resolve().parents[1]

BACKBONE = "efficientnet_lite0"
DEFAULT_VARIANTS = {  # name -> METHOD:ARGS
    "knn": "knn:",
    "knn_s2": "knn:--smooth-sigma 2",  # kNN with FDSL's CNN smoothing (sigma 2 instead of PatchCore's 4)
    # kNN on the levels both methods' kNN terms use (lite0 1-3, level 1 area-averaged onto the stride-8 grid)
    "knn_l123": "knn:--layers 1,2,3 --grid-stride 8",
    # the command's defaults (CNN: joint FD, support-standardised FD and ASL maps, 0.8 FD + 0.2 ASL, 0.25 kNN map,
    # map score)
    "fdsl": "fdsl:",
    "fdsl_asl": "fdsl:--fd-weight 0 --knn-weight 0",  # the learned ASL (+ NAM) map alone, standardised as the default
    # FDSL's training-free part: the standardised FD map with the default's kNN term, no head
    "fdsl_fd": "fdsl:--fd-weight 1",
    "fdsl_fdonly": "fdsl:--fd-weight 1 --knn-weight 0",  # the FD map alone
    "fdsl_noknn": "fdsl:--knn-weight 0",  # FD + ASL without the kNN term (session 5's default, which had sigma 4)
    # the paper's FD and fusion on a CNN: per-level matching, raw maps, the ASL map alone, transductive score
    "fdsl_paper": "fdsl:--fd-match level --map-norm none --fd-weight 0 --image-score paper --smooth-sigma 0",
    "pcsnet": "pcsnet:",
    # PCSNet's training-free part: CAS (a probability in [0, 1]) next to 1000 x (the PFA map, normalised to ~1 on the
    # support, + 0.5 x the kNN term) changes no ranking of consequence
    "pcsnet_free": "pcsnet:--fuse-pfa 1000 --knn-weight 500",
    "pcsnet_pfa": "pcsnet:--fuse-pfa 1000 --knn-weight 0",  # the PFA map alone
    "pcsnet_noknn": "pcsnet:--knn-weight 0",  # the session-5 default: CAS + PFA, no kNN term
}
METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")
HEAD_EPOCHS = 3
HEAD_ARGS = "--fd-match joint"  # the heads learn on the deviations the CNN default tests with (fdsl/config.py)


def _csv(text: str, cast=str) -> list:
    return [cast(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/devbench", help="output folder (runs are cached here)")
    p.add_argument("--data", default="devbench_data", help="dataset folder (built when missing)")
    p.add_argument("--shots", default="1,2,4,8", help="comma-separated k")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated support-draw seeds")
    p.add_argument("--sources", default="all", help=f"'all' or a subset of {', '.join(SOURCES)}")
    p.add_argument("--quick", action="store_true", help=f"k=4, seed 0, sources {', '.join(QUICK_SOURCES)}")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated variant names")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=METHOD:ARGS",
                   help="define (or redefine) a variant, e.g. 'knn_l2=knn:--backbone efficientnet_lite2'")
    p.add_argument("--backbone", default=BACKBONE, help="backbone of every method (default efficientnet_lite0)")
    p.add_argument("--head-epochs", type=int, default=HEAD_EPOCHS, help="FDSL head training epochs per fold")
    p.add_argument("--head-args", default=HEAD_ARGS,
                   help=f"fdsl.train arguments of the fold heads (default {HEAD_ARGS!r})")  # fmt: skip
    p.add_argument("--heads", default=None, help="folder of fold heads <group>/last.pth (default OUT/heads)")
    p.add_argument("--threads", type=int, default=2, help="OMP threads of every subprocess")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild the tables from cached runs")
    return p


def _run(cmd: list[str], log: Path, threads: int) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        return subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def ensure_data(data: Path, threads: int) -> None:
    """Build every source once (a subset of classes is selected per run, not per build)."""
    if (data / "test" / "meta.json").is_file():
        return
    print("building", data, flush=True)
    log = data.parent / f"{data.name}.build.log"
    if _run([sys.executable, "-m", "data.devbench", "--root", str(data)], log, threads):
        sys.exit(f"error: building {data} failed (see {log})")


def ensure_heads(args, data: Path, heads: Path, groups: list[str]) -> None:
    for group in groups:
        ckpt = heads / group / "last.pth"
        if ckpt.is_file():
            continue
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "fdsl.train", "--dataset-root", str(data / "folds" / group),
               "--save-dir", str(heads / group), "--backbone", args.backbone, "--epochs", str(args.head_epochs),
               "--progress", "0", *shlex.split(args.head_args)]  # fmt: skip
        code = _run(cmd, heads / f"{group}.train.log", args.threads)
        print(f"head {group}: exit {code} in {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            sys.exit(f"error: training the {group} head failed (see {heads / f'{group}.train.log'})")


def method_command(method: str, extra: str, data: Path, k: int, seed: int, save: Path, backbone: str,
                   classes: list[str], checkpoint: Path | None) -> list[str]:
    py = sys.executable
    if method == "knn":
        cmd = [py, "-m", "baseline.knn", "--dataset-root", str(data), "--k-shot", str(k), "--seed", str(seed),
               "--save-dir", str(save), "--backbone", backbone, "--class-name", ",".join(classes), "--quiet"]
    elif method == "fdsl":
        cmd = [py, "-m", "fdsl.test", "--dataset-root", str(data), "--checkpoint", str(checkpoint),
               "--k-shot", str(k), "--seed", str(seed), "--save-dir", str(save), "--progress", "0",
               "--class-name", *classes]
    elif method == "pcsnet":
        cmd = [py, str(REPO / "main.py"), "--data-root", str(data), "--k-shot", str(k), "--seed", str(seed),
               "--save-dir", str(save), "--backbone", backbone, "--quiet"]
        if len(classes) == 1:
            cmd += ["--class-name", classes[0]]
    else:
        raise SystemExit(f"error: unknown method {method!r} (knn, fdsl, pcsnet)")
    return cmd + shlex.split(extra)


def run_variant(name: str, spec: str, args, data: Path, heads: Path, k: int, seed: int, sources: list[str]) -> dict:
    """Per-class metrics and s/img of one variant at (k, seed), from cached or new runs."""
    method, _, extra = spec.partition(":")
    base = Path(args.out) / "runs" / name / f"k{k}_s{seed}"
    if method == "fdsl":  # one run per fold group, each with the head that never saw it
        jobs = {}
        for source in sources:
            jobs.setdefault(GROUP[source], []).append(source)
        jobs = {g: (cls, heads / g / "last.pth", base / g) for g, cls in jobs.items()}
    elif method == "pcsnet" and sorted(sources) != sorted(SOURCES):
        jobs = {s: ([s], None, base / s) for s in sources}
    else:
        jobs = {"all": (sources, None, base)}
    per_class, seconds, images = {}, 0.0, 0
    for cls, ckpt, save in jobs.values():
        result = save / "results.json"
        if not result.is_file() and not args.aggregate_only:
            start = time.perf_counter()
            cmd = method_command(method, extra, data / "test", k, seed, save, args.backbone, cls, ckpt)
            code = _run(cmd, save.parent / f"{save.name}.log", args.threads)
            print(f"  {name} k={k} seed={seed} {','.join(cls)}: exit {code}, {time.perf_counter() - start:.0f} s",
                  flush=True)
        if not result.is_file():
            continue
        res = json.loads(result.read_text())
        per_class.update({c: v for c, v in res["per_class"].items() if c in cls})
        timing = res.get("timing", {})
        n = timing.get("n_images", 0)
        seconds += timing.get("test_seconds_per_image", timing.get("seconds_per_image", 0.0)) * n
        images += n
    return {"per_class": per_class, "s_per_img": seconds / images if images else None}


def aggregate(rows: dict, variants: list[str], shots: list[int], sources: list[str]) -> tuple[str, dict]:
    """Markdown tables per k (mean over seeds, per source + mean over sources) and the numbers behind them."""
    lines, summary = [], {}
    for k in shots:
        lines += [f"\n### k = {k}\n", "| variant | " + " | ".join(sources) + " | mean | vs kNN | s/img |",
                  "|---" * (len(sources) + 4) + "|"]
        for name in variants:
            seeds = rows.get((name, k), [])
            if not seeds:
                continue
            cells, means = [], {m: [] for m in METRICS}
            for source in sources:
                vals = {m: [r["per_class"][source][m] for r in seeds
                            if source in r["per_class"] and r["per_class"][source][m] is not None] for m in METRICS}
                for m in METRICS:
                    if vals[m]:
                        means[m].append(float(np.mean(vals[m])))
                cells.append(" / ".join(f"{100 * np.mean(vals[m]):.1f}" if vals[m] else "-" for m in METRICS))
            mean = {m: float(np.mean(v)) if v else None for m, v in means.items()}
            sec = [r["s_per_img"] for r in seeds if r["s_per_img"]]
            summary[(name, k)] = {"mean": mean, "s_per_img": float(np.mean(sec)) if sec else None,
                                  "per_source": cells, "n_seeds": len(seeds)}
            ref = summary.get(("knn", k), {}).get("mean")
            delta = "-" if not ref or name == "knn" else " / ".join(
                f"{100 * (mean[m] - ref[m]):+.1f}" if mean[m] is not None and ref[m] is not None else "-"
                for m in METRICS)
            mean_cell = " / ".join(f"{100 * v:.1f}" if v is not None else "-" for v in mean.values())
            s_cell = f"{summary[(name, k)]['s_per_img']:.3f}" if sec else "-"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | **{mean_cell}** | {delta} | {s_cell} |")
    header = ("Cells: image AUROC / pixel AUROC / AUPRO in %, mean over seeds; `mean` is over sources (pixel metrics "
              "over the masked sources); `vs kNN` is the difference of the means.")
    return header + "\n" + "\n".join(lines), summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    shots, seeds = _csv(args.shots, int), _csv(args.seeds, int)
    sources = list(SOURCES) if args.sources == "all" else _csv(args.sources)
    if args.quick:
        shots, seeds, sources = [4], [0], list(QUICK_SOURCES)
    specs = dict(DEFAULT_VARIANTS)
    for item in args.variant:
        name, _, spec = item.partition("=")
        if ":" not in spec:
            sys.exit(f"error: --variant {item!r}: expected NAME=METHOD:ARGS")
        specs[name] = spec
    variants = _csv(args.variants)
    unknown = [v for v in variants if v not in specs]
    if unknown:
        sys.exit(f"error: unknown variant(s) {', '.join(unknown)}; define them with --variant NAME=METHOD:ARGS")
    out, data = Path(args.out), Path(args.data)
    heads = Path(args.heads) if args.heads else out / "heads"
    out.mkdir(parents=True, exist_ok=True)
    ensure_data(data, args.threads)
    if any(specs[v].startswith("fdsl") for v in variants) and not args.aggregate_only:
        ensure_heads(args, data, heads, sorted({GROUP[s] for s in sources}))
    rows: dict = {}
    start = time.perf_counter()
    for k in shots:
        for seed in seeds:
            for name in variants:
                rows.setdefault((name, k), []).append(run_variant(name, specs[name], args, data, heads, k, seed,
                                                                  sources))
    table, summary = aggregate(rows, variants, shots, sources)
    print(table)
    (out / "devbench.md").write_text(table + "\n")
    dump = {"variants": {v: specs[v] for v in variants}, "shots": shots, "seeds": seeds, "sources": sources,
            "backbone": args.backbone, "seconds": time.perf_counter() - start,
            "summary": {f"{n}@k{k}": v for (n, k), v in summary.items()}}
    (out / "devbench.json").write_text(json.dumps(dump, indent=1) + "\n")
    print(f"wrote {out / 'devbench.md'} and {out / 'devbench.json'} ({dump['seconds']:.0f} s); heads in {heads}"
          f" ({ALL_FOLD!r} fold = the shipped head's corpus)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
