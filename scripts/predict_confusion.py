"""Confusion matrix of a predict run whose query file names carry their label as a prefix (`good_003.jpg`).

    python scripts/predict_confusion.py runs/textile_fdsl/predictions.csv [--normal good]

Prints, per prefix group, how many images were flagged, and over all images TP / FN / FP / TN with the image
AUROC of each defect group against the normal group (from the scores, threshold-free).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

from common.utils import UserError, cli_entry  # noqa: E402


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{path} does not exist (the predictions.csv of a predict run)")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = {"image", "score", "decision"} - set(rows[0] if rows else {})
    if not rows or missing:
        raise UserError(f"{path} has no rows or lacks the columns {', '.join(sorted(missing)) or 'image/score'}")
    return [r for r in rows if r["decision"] != "unreadable"]


def auroc(negatives: list[float], positives: list[float]) -> float:
    """Probability that a positive outscores a negative (ties count half)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/predict_confusion.py", description=__doc__.splitlines()[0])
    p.add_argument("predictions", help="predictions.csv of a predict run")
    p.add_argument("--normal", default="good", help="file-name prefix of the normal images (default good)")
    args = p.parse_args(argv)
    groups: dict[str, list[tuple[float, bool]]] = defaultdict(list)
    for row in read_rows(Path(args.predictions)):
        prefix = Path(row["image"]).name.split("_", 1)[0]
        groups[prefix].append((float(row["score"]), row["decision"] == "anomalous"))
    if args.normal not in groups:
        raise UserError(f"no image name starts with '{args.normal}_' in {args.predictions}")
    normal = groups[args.normal]
    fp = sum(flag for _, flag in normal)
    tp = sum(flag for name, items in groups.items() if name != args.normal for _, flag in items)
    n_def = sum(len(items) for name, items in groups.items() if name != args.normal)
    print("| group | images | flagged | AUROC vs normal |")
    print("| --- | --- | --- | --- |")
    for name in sorted(groups):
        items = groups[name]
        score = "" if name == args.normal else f"{auroc([s for s, _ in normal], [s for s, _ in items]):.3f}"
        print(f"| {name} | {len(items)} | {sum(f for _, f in items)} | {score} |")
    print(f"\nTP {tp} / FN {n_def - tp} / FP {fp} / TN {len(normal) - fp}  (FPR {fp / len(normal):.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
