"""Print the mean metrics of several results.json files side by side.

    python scripts/summarize.py runs/demo/*/results.json

`test s/img` is the test loop per image; `setup s` is the total set-up (bank building, PCSNet's training).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tabulate import tabulate

COLUMNS = (("I-AUROC", "image_auroc"), ("I-AP", "image_ap"), ("I-F1max", "image_f1_max"),
           ("P-AUROC", "pixel_auroc"), ("P-AP", "pixel_ap"), ("P-F1max", "pixel_f1_max"), ("AUPRO", "pixel_aupro"))


def summarize(paths: list[Path]) -> str:
    rows = []
    for path in paths:
        r = json.loads(path.read_text())
        label = r.get("label") or path.parent.name
        if label.startswith("seed"):  # the FDSL drivers' results/<ds>/few_shot/NAME/s<K>shot/seed<S>/ layout
            label = f"{r['method']}_{Path(r['dataset_root']).name}"
        cells = ["-" if r["mean"][k] is None else f"{100 * r['mean'][k]:.1f}" for _, k in COLUMNS]
        dataset = Path(r["dataset_root"]).name
        timing = r["timing"]
        test_spi = timing.get("test_seconds_per_image") or timing["seconds_per_image"]  # older files: set-up included
        setup = timing.get("setup_seconds")
        rows.append([label, r["method"], dataset, r["k_shot"], r["seed"], *cells, f"{test_spi:.3f}",
                     "-" if setup is None else f"{setup:.1f}"])  # fmt: skip
    headers = ["run", "method", "dataset", "k", "seed", *[c for c, _ in COLUMNS], "test s/img", "setup s"]
    return tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        print(f"error: no results.json at {missing[0]}", file=sys.stderr)
        return 2
    print(summarize(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
