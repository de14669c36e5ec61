"""results.json (schema in docs/design/CONTRACT.md) and the per-class log.txt table."""

from __future__ import annotations

import math
from pathlib import Path

from tabulate import tabulate

from common.utils import atomic_write_json, atomic_write_text

METRIC_KEYS = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_aupro",
)
# Column headers of the original VAND/FDSL table, in its order, mapped to our keys.
TABLE_COLUMNS = (
    ("auroc_px", "pixel_auroc"),
    ("f1_px", "pixel_f1_max"),
    ("ap_px", "pixel_ap"),
    ("aupro", "pixel_aupro"),
    ("auroc_sp", "image_auroc"),
    ("f1_sp", "image_f1_max"),
    ("ap_sp", "image_ap"),
)


def _clean(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def mean_metrics(per_class: dict[str, dict]) -> dict[str, float | None]:
    """Mean over classes of each metric; None where no class has a value."""
    out: dict[str, float | None] = {}
    for key in METRIC_KEYS:
        values = [v[key] for v in per_class.values() if v.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def build_results(
    method: str,
    dataset_root: str,
    k_shot: int,
    seed: int,
    backbone: str,
    image_size: int,
    per_class: dict[str, dict],
    support: dict[str, list[str]],
    n_images: int,
    seconds_total: float,
    win_mode: str | None = None,
    extra: dict | None = None,
    timing: dict | None = None,
) -> dict:
    """Assemble the results.json dict; `extra` adds method-specific keys (never overrides contract keys), `timing`
    adds keys to the `timing` block (e.g. `common.evaluation.timing_breakdown`)."""
    per_class = {c: {k: _clean(m.get(k)) for k in METRIC_KEYS} for c, m in per_class.items()}
    results = {
        "method": method,
        "dataset_root": str(dataset_root),
        "k_shot": int(k_shot),
        "seed": int(seed),
        "backbone": backbone,
        "image_size": int(image_size),
        "win_mode": win_mode,
        "per_class": per_class,
        "mean": mean_metrics(per_class),
        "support": {c: list(p) for c, p in support.items()},
        "timing": {
            "n_images": int(n_images),
            "seconds_total": float(seconds_total),
            "seconds_per_image": float(seconds_total) / max(int(n_images), 1),
        },
    }
    for key, value in (timing or {}).items():
        results["timing"].setdefault(key, value)
    for key, value in (extra or {}).items():
        results.setdefault(key, value)
    return results


def format_table(results: dict) -> str:
    """The per-class table (pipe format, values x100 with one decimal, a final mean row)."""

    def fmt(value):
        return "-" if value is None else f"{100.0 * value:.1f}"

    rows = [[name] + [fmt(m[key]) for _, key in TABLE_COLUMNS] for name, m in results["per_class"].items()]
    rows.append(["mean"] + [fmt(results["mean"][key]) for _, key in TABLE_COLUMNS])
    headers = ["objects"] + [h for h, _ in TABLE_COLUMNS]
    return tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True)


def write_results(save_dir: str | Path, results: dict, log_lines: list[str] | None = None) -> Path:
    """Write save_dir/results.json and save_dir/log.txt (header lines, then the table), atomically."""
    save_dir = Path(save_dir)
    header = [
        f"method: {results['method']}  backbone: {results['backbone']}  image_size: {results['image_size']}  "
        f"k_shot: {results['k_shot']}  seed: {results['seed']}  win_mode: {results['win_mode']}",
        f"dataset_root: {results['dataset_root']}",
        f"seconds per image: {results['timing']['seconds_per_image']:.4f} over {results['timing']['n_images']} images",
    ]
    text = "\n".join(header + list(log_lines or []) + ["", format_table(results), ""])
    atomic_write_json(save_dir / "results.json", results)
    atomic_write_text(save_dir / "log.txt", text)
    return save_dir / "results.json"
