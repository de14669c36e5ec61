"""Benchmark the few-shot methods side by side: accuracy per k, seconds per image, peak memory, bank size.

Each (method, k, seed) runs as its own subprocess of the method's CLI (one failure does not stop the others);
all methods draw the same support images (common.few_shot.sample_support is deterministic per (seed, class)).
A backbone-only pass over the same test images is the throughput reference.

    python scripts/benchmark.py --dataset-root demo_data/surfaces --methods knn --shots 1,4 --seeds 0 --out runs/bench
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from tabulate import tabulate
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]

from common.utils import UserError, atomic_write_json, atomic_write_text, check_writable_dir, cli_entry  # noqa: E402
from engine import registry  # noqa: E402

METHODS = tuple(registry.METHODS)
IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_aupro")
# (header, key in the aggregated row, scale, decimals)
TABLE_COLUMNS = (
    ("I-AUROC", "image_auroc", 100, 1), ("I-AP", "image_ap", 100, 1), ("I-F1max", "image_f1_max", 100, 1),
    ("P-AUROC", "pixel_auroc", 100, 1), ("P-AP", "pixel_ap", 100, 1), ("AUPRO", "pixel_aupro", 100, 1),
    ("setup s/class", "setup_seconds_per_class", 1, 1), ("s/img", "seconds_per_image", 1, 4),
    ("img/s", "images_per_second", 1, 1), ("x backbone", "ratio_to_backbone", 1, 3),
    ("backbone share", "backbone_share", 1, 2),
    ("peak RSS MB", "peak_rss_mb", 1, 0), ("bank MB", "bank_mb", 1, 2),
)  # fmt: skip
AGG_KEYS = tuple(key for _, key, _, _ in TABLE_COLUMNS)
TIME_BIN = "/usr/bin/time"


def _csv(text: str, cast=str) -> list:
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise UserError(f"bad list '{text}': {exc}") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python scripts/benchmark.py", description=__doc__.splitlines()[0])
    p.add_argument("--dataset-root", required=True, help="MVTec-layout dataset with meta.json")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--shots", default="1,2,4", help="comma-separated k values")
    p.add_argument("--seeds", default="0", help="comma-separated support-draw seeds")
    p.add_argument("--backbone", default="efficientnet_lite0")
    for method in (m for m in registry.METHODS.values() if m.needs_checkpoint):
        p.add_argument(f"--{method.name}-checkpoint", default=None, help=f"{method.name} checkpoint (required with it)")
    p.add_argument("--image-size", type=int, default=None, help="input size (default: each method's own)")
    p.add_argument("--class-name", default=None, help="one class (default: all)")
    p.add_argument("--device", default="cpu", help="passed to every method (default cpu)")
    p.add_argument("--out", default="runs/benchmark", help="output folder (default runs/benchmark)")
    p.add_argument(
        "--aggregate-only",
        action="store_true",
        help="do not run anything: rebuild the report from the run folders of an earlier call in --out",
    )
    p.add_argument("--long-run", type=int, default=0, metavar="N",
                   help="after the runs, N predict calls per method in one process, resident memory sampled "
                        "(issue 7: must stay flat); 0 = skip")  # fmt: skip
    for method in METHODS:
        p.add_argument(f"--{method}-args", default="", metavar="ARGS",
                       help=f"extra flags appended to every {method} run, one shell-quoted string")  # fmt: skip
    return p


def checkpoint_of(method: str, args) -> str | None:
    """The `--<method>-checkpoint` of a method that needs one (None otherwise)."""
    return getattr(args, f"{method}_checkpoint", None) if registry.METHODS[method].needs_checkpoint else None


def method_command(method: str, args, k: int, seed: int, save_dir: Path) -> list[str]:
    """The CLI invocation of one run: `fsad eval --method METHOD ...` (python -m engine.cli, no install needed)."""
    entry = registry.METHODS[method]
    cmd = [sys.executable, "-m", "engine.cli", "eval", "--method", method, "--dataset-root", args.dataset_root,
           "--k-shot", str(k), "--seed", str(seed), "--save-dir", str(save_dir), "--backbone", args.backbone,
           "--device", args.device, "--quiet", *entry.bench_eval]  # fmt: skip
    if args.image_size:
        cmd += ["--image-size", str(args.image_size)]
    if entry.needs_checkpoint:
        cmd += ["--checkpoint", str(checkpoint_of(method, args))]
    if args.class_name:
        cmd += ["--class-name", args.class_name]
    return cmd + shlex.split(getattr(args, f"{method}_args", "") or "")


class _PeakRSS:
    """Poll /proc/<pid>/status VmHWM of a process (fallback when /usr/bin/time is missing)."""

    def __init__(self, pid: int):
        self.pid, self.kb, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.kb = max(self.kb, int(line.split()[1]))
            except (OSError, ValueError):
                pass
            self._stop.wait(0.05)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.kb


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def bank_megabytes(value) -> float | None:
    """results.json `bank_bytes` -> MiB: an int (kNN), or FDSL's dict of stored banks (`*_bank_bytes`, summed)."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = sum(v for k, v in value.items() if k.endswith("_bank_bytes") and v is not None)
    return value / 2**20


def run_one(method: str, k: int, seed: int, args, runs_dir: Path) -> dict:
    """Run one (method, k, seed) subprocess; return its row (status ok/failed, metrics, time, peak RSS)."""
    save_dir = runs_dir / f"{method}_k{k}_seed{seed}"
    save_dir.mkdir(parents=True, exist_ok=True)
    results_path = save_dir / "results.json"
    if results_path.exists() and not args.aggregate_only:
        results_path.unlink()  # never read a stale result of an earlier benchmark
    cmd = method_command(method, args, k, seed, save_dir)
    row = {"method": method, "k_shot": k, "seed": seed, "command": shlex.join(cmd), "save_dir": str(save_dir)}
    checkpoint = checkpoint_of(method, args)
    if checkpoint is not None and not Path(checkpoint).is_file():  # fail fast: no torch start-up to learn it
        return {**row, "status": "failed", "wall_seconds": 0.0, "peak_rss_mb": None,
                "error": f"error: checkpoint {checkpoint} does not exist"}  # fmt: skip
    rss_file = save_dir / "peak_rss_kb.txt"
    use_time = os.access(TIME_BIN, os.X_OK)
    if args.aggregate_only:  # re-read a finished run (e.g. after a report error) instead of running it again
        return _collect(row, save_dir, 0 if results_path.is_file() else 1, None, use_time, 0.0)
    full = [TIME_BIN, "-f", "%M", "-o", str(rss_file), *cmd] if use_time else cmd
    start = time.perf_counter()
    with open(save_dir / "stdout.txt", "w") as out, open(save_dir / "stderr.txt", "w") as err:
        env = {**os.environ, "FSAD_TIMING": "1"}  # the runs time their backbone forwards (common.timing)
        proc = subprocess.Popen(full, cwd=REPO, stdout=out, stderr=err, env=env)
        poller = None if use_time else _PeakRSS(proc.pid)
        code = proc.wait()
        peak_kb = poller.stop() if poller else None
    return _collect(row, save_dir, code, peak_kb, use_time, time.perf_counter() - start)


def _collect(row: dict, save_dir: Path, code: int, peak_kb: int | None, use_time: bool, wall: float) -> dict:
    """The row of a finished run from its folder: exit code, peak RSS, results.json."""
    rss_file, results_path = save_dir / "peak_rss_kb.txt", save_dir / "results.json"
    row["wall_seconds"] = wall
    if use_time:
        try:  # GNU time writes "Command exited with non-zero status N" before %M on failure
            peak_kb = int(rss_file.read_text().split()[-1])
        except (OSError, ValueError, IndexError):
            peak_kb = None
    row["peak_rss_mb"] = peak_kb / 1024 if peak_kb else None
    if code != 0 or not results_path.is_file():
        err_file = save_dir / "stderr.txt"
        stderr = err_file.read_text(errors="replace") if err_file.is_file() else "no results.json"
        stderr = "\n".join(line for line in stderr.splitlines() if not line.startswith("Command exited with"))
        row.update(status="failed", error=f"exit {code}: {_last_line(stderr)}")
        return row
    r = json.loads(results_path.read_text())
    timing = r["timing"]
    # The test loop alone (support decode and set-up excluded): what compares across a bank (kNN, FDSL) and a
    # training run (PCSNet). results.json from before the timing breakdown: the contract's seconds_per_image.
    spi = timing.get("test_seconds_per_image") or timing["seconds_per_image"]
    trained = r.get("pcsnet") or {}
    if not timing.get("test_seconds_per_image") and trained.get("test_seconds_per_image"):
        spi = trained["test_seconds_per_image"]
    if timing.get("setup_seconds") is not None:
        row["setup_seconds_per_class"] = timing["setup_seconds"] / max(len(r["per_class"]), 1)
    row["backbone_share"] = timing.get("backbone_share")
    row.update(
        status="ok", backbone=r["backbone"], image_size=r["image_size"], n_images=r["timing"]["n_images"],
        seconds_per_image=spi, images_per_second=1.0 / spi if spi > 0 else None,
        bank_mb=bank_megabytes(r.get("bank_bytes")),
        **{key: r["mean"].get(key) for key in IMAGE_METRICS + PIXEL_METRICS},
    )  # fmt: skip
    return row


def backbone_reference(dataset_root: str, backbone_name: str, image_size: int | None, class_name: str | None,
                       device: str) -> dict:  # fmt: skip
    """Throughput of the backbone forward alone over the test images (decoded once, batch 16, inference mode)."""
    import torch

    from common.backbones import build_backbone
    from common.utils import parse_device
    from data.dataset import AnomalyDataset

    dev = parse_device(device)
    backbone = build_backbone(backbone_name, None, None, dev).eval()
    size = image_size or backbone.default_image_size
    ds = AnomalyDataset(dataset_root, "test", [class_name] if class_name else None, size, backbone.mean, backbone.std)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    batches = list(images.split(16))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        backbone(batches[0].to(dev))  # warm-up
        sync()
        start = time.perf_counter()
        for batch in batches:
            backbone(batch.to(dev))
        sync()
        seconds = time.perf_counter() - start
    return {"backbone": backbone_name, "image_size": size, "n_images": len(images), "seconds": seconds,
            "seconds_per_image": seconds / len(images), "images_per_second": len(images) / seconds}  # fmt: skip


def _rss_mb() -> float:
    """Resident memory of this process (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise OSError("no VmRSS in /proc/self/status")


def long_run(method: str, n_calls: int, args) -> dict:
    """`n_calls` predict calls with one `api.build_detector` object; resident memory sampled ten times.

    References: the first class's first 4 normal train images; queries: that class's test images, decoded once
    and cycled, so what is measured is the predict path itself. The threshold is given (no leave-one-out).
    `growth_mb` = memory after the last call - memory after a warm-up of 20 calls.
    """
    import api
    from data.dataset import read_image
    from data.meta import load_meta

    meta = load_meta(args.dataset_root)
    name = args.class_name or sorted(meta["test"])[0]
    root = Path(args.dataset_root)
    refs = [str(root / it["img_path"]) for it in meta["train"][name] if int(it["anomaly"]) == 0][:4]
    queries = [read_image(root / it["img_path"]) for it in meta["test"][name]]
    options = {"backbone": args.backbone}
    if args.image_size:
        options["image_size"] = args.image_size
    if registry.METHODS[method].needs_checkpoint:
        options["checkpoint"] = checkpoint_of(method, args)
    options.update(registry.METHODS[method].bench_predict)
    predictor = api.build_detector(method, refs, device=args.device, threshold=1.0, **options)
    for i in range(20):
        predictor.predict(queries[i % len(queries)])
    samples, start = [(0, _rss_mb())], time.perf_counter()
    step = max(1, n_calls // 10)
    for i in range(1, n_calls + 1):
        predictor.predict(queries[i % len(queries)])
        if i % step == 0 or i == n_calls:
            samples.append((i, _rss_mb()))
    seconds = time.perf_counter() - start
    return {"method": method, "calls": n_calls, "class": name, "rss_mb": samples,
            "growth_mb": samples[-1][1] - samples[0][1], "seconds_per_call": seconds / n_calls}  # fmt: skip


def _mean_std(values: list) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(rows: list[dict], methods: list[str], shots: list[int]) -> list[dict]:
    """Mean and std over seeds per (method, k) of the successful runs; failures are counted and quoted."""
    out = []
    for method in methods:
        for k in shots:
            group = [r for r in rows if r["method"] == method and r["k_shot"] == k]
            ok = [r for r in group if r["status"] == "ok"]
            agg = {"method": method, "k_shot": k, "n_seeds": len(group), "n_ok": len(ok),
                   "seeds": [r["seed"] for r in ok],
                   "errors": [f"seed {r['seed']}: {r['error']}" for r in group if r["status"] != "ok"]}  # fmt: skip
            for key in AGG_KEYS:
                mean, std = _mean_std([r.get(key) for r in ok])
                agg[key] = {"mean": mean, "std": std}
            out.append(agg)
    return out


def _cell(stat: dict, scale: float, decimals: int, n: int) -> str:
    if stat["mean"] is None:
        return "-"
    text = f"{scale * stat['mean']:.{decimals}f}"
    return text + (f" ± {scale * stat['std']:.{decimals}f}" if n > 1 and stat["std"] is not None else "")


def format_table(aggregated: list[dict]) -> str:
    rows = []
    for a in aggregated:
        if a["n_ok"] == 0:
            error = a["errors"][0] if a["errors"] else "no run"
            rows.append(
                [a["method"], a["k_shot"], f"0/{a['n_seeds']}", f"FAILED ({error})"] + [""] * (len(TABLE_COLUMNS) - 1)
            )
            continue
        cells = [_cell(a[key], scale, dec, a["n_ok"]) for _, key, scale, dec in TABLE_COLUMNS]
        rows.append([a["method"], a["k_shot"], f"{a['n_ok']}/{a['n_seeds']}", *cells])
    headers = ["method", "k", "seeds ok", *[h for h, _, _, _ in TABLE_COLUMNS]]
    return tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True)


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}  # fmt: skip


def _validate(args) -> tuple[list[str], list[int], list[int]]:
    methods = _csv(args.methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UserError(f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    shots, seeds = _csv(args.shots, int), _csv(args.seeds, int)
    if not shots or any(k < 1 for k in shots):
        raise UserError(f"--shots needs positive integers, got '{args.shots}'")
    if not seeds:
        raise UserError(f"--seeds needs integers, got '{args.seeds}'")
    root = Path(args.dataset_root)
    if not root.is_dir():
        raise UserError(f"dataset root {root} does not exist")
    if not (root / "meta.json").is_file():
        raise UserError(f"no meta.json in {root}; run `python data/mvtec.py --root {root}` first")
    for method in methods:
        if registry.METHODS[method].needs_checkpoint and not checkpoint_of(method, args):
            raise UserError(f"method {method} needs --{method}-checkpoint FILE")
    if args.image_size is not None and args.image_size < 1:
        raise UserError(f"--image-size must be positive, got {args.image_size}")
    return methods, shots, seeds


@cli_entry
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    methods, shots, seeds = _validate(args)
    args.dataset_root = str(Path(args.dataset_root).resolve())
    for method in methods:
        if checkpoint_of(method, args):
            setattr(args, f"{method}_checkpoint", str(Path(checkpoint_of(method, args)).resolve()))
    out = check_writable_dir(args.out).resolve()
    runs_dir = out / "runs"
    if not os.access(TIME_BIN, os.X_OK) and not Path("/proc/self/status").exists():
        print("warning: neither /usr/bin/time nor /proc: peak RSS not measured", file=sys.stderr)

    jobs = [(m, k, s) for m in methods for k in shots for s in seeds]
    rows = []
    bar = tqdm(jobs, desc="benchmark", unit="run")
    for method, k, seed in bar:
        bar.set_postfix_str(f"{method} k={k} seed={seed}")
        row = run_one(method, k, seed, args, runs_dir)
        if row["status"] != "ok":
            tqdm.write(f"failed: {method} k={k} seed={seed}: {row['error']}", file=sys.stderr)
        rows.append(row)
    bar.close()

    # the backbone-only reference, once per (backbone, image size) the successful runs used
    wanted = {(r["backbone"], r["image_size"]) for r in rows if r["status"] == "ok"}
    if not wanted:
        wanted = {(args.backbone, args.image_size)}
    references = []
    for name, size in sorted(wanted, key=lambda x: (x[0], x[1] or 0)):
        try:
            references.append(backbone_reference(args.dataset_root, name, size, args.class_name, args.device))
        except Exception as exc:  # noqa: BLE001 - reported, the table is still written
            references.append({"backbone": name, "image_size": size, "error": f"{type(exc).__name__}: {exc}"})
    ref_ips = {(r["backbone"], r["image_size"]): r.get("images_per_second") for r in references}
    for row in rows:
        ips = ref_ips.get((row.get("backbone"), row.get("image_size")))
        row["ratio_to_backbone"] = row["images_per_second"] / ips if row["status"] == "ok" and ips else None

    long_runs = []
    for method in methods if args.long_run > 0 else []:
        try:
            long_runs.append(long_run(method, args.long_run, args))
        except Exception as exc:  # noqa: BLE001 - reported, the table is still written
            long_runs.append({"method": method, "calls": args.long_run, "error": f"{type(exc).__name__}: {exc}"})

    aggregated = aggregate(rows, methods, shots)
    table = format_table(aggregated)
    command = shlex.join([sys.executable, "scripts/benchmark.py", *argv])
    info = machine_info()
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    report = {"date": date, "machine": info, "command": command, "dataset_root": args.dataset_root,
              "methods": methods, "shots": shots, "seeds": seeds, "backbone_reference": references,
              "aggregated": aggregated, "runs": rows, "long_run": long_runs}  # fmt: skip
    atomic_write_json(out / "benchmark.json", report)
    ref_lines = [
        f"- {r['backbone']} @ {r['image_size']} px: " + (
            f"{r['images_per_second']:.1f} images/s ({r['n_images']} test images, batch 16, forward only)"
            if "error" not in r else f"failed: {r['error']}")
        for r in references
    ]  # fmt: skip
    md = [
        "# Benchmark", "",
        f"- date: {date}",
        f"- machine: {info['nproc']} CPUs, {info['cpu']}, torch {info['torch']} ({info['torch_threads']} threads), "
        f"python {info['python']}",
        f"- command: `{command}`",
        f"- dataset: {args.dataset_root}", "",
        "Backbone-only reference (the throughput if everything but feature extraction were free):", *ref_lines, "",
        "Mean ± std over seeds. s/img and img/s: the test loop (decoding, backbone, the method, map upsampling and "
        "smoothing; results.json `timing.test_seconds_per_image`); setup s/class: support decoding plus bank building "
        "(kNN, FDSL) or training (PCSNet); x backbone = img/s / backbone-only img/s; backbone share = the test "
        "loop's fraction of time in the backbone forward; peak RSS of the whole method process.", "",
        table, "",
    ]  # fmt: skip
    long_lines = [
        f"- {r['method']}: {r['calls']} predict calls, resident memory {r['rss_mb'][0][1]:.0f} -> "
        f"{r['rss_mb'][-1][1]:.0f} MiB (growth {r['growth_mb']:+.1f} MiB), {r['seconds_per_call']:.3f} s/call"
        if "error" not in r else f"- {r['method']}: failed: {r['error']}"
        for r in long_runs
    ]  # fmt: skip
    if long_lines:
        md += ["Long run (one predictor object, memory after a 20-call warm-up -> after the last call):",
               *long_lines, ""]  # fmt: skip
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        md += ["Failed runs:", *[f"- {r['method']} k={r['k_shot']} seed={r['seed']}: {r['error']}" for r in failed], ""]
    atomic_write_text(out / "benchmark.md", "\n".join(md))
    print("\n".join(ref_lines))
    print(table)
    if long_lines:
        print("\n".join(long_lines))
    print(f"wrote {out / 'benchmark.md'} and {out / 'benchmark.json'}  ({len(failed)} of {len(rows)} runs failed)")
    return 1 if len(failed) == len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
