"""Write meta.json for an MVTec-layout dataset (MVTec AD or any tree with <class>/train|test/...).

Usage: `python data/mvtec.py --root DIR` from the repo root, or `cd data && python mvtec.py` (default root:
the folder `mvtec` next to this script).
"""

import argparse
import sys
from pathlib import Path

from common.utils import cli_entry
from data.meta import scan_mvtec_layout, write_meta

LAYOUT_HELP = (
    "Layout: DIR/<class>/train/good/*, DIR/<class>/test/<good|defect>/*, optional "
    "DIR/<class>/ground_truth/<defect>/<stem>_mask.png (a defect without masks counts for image-level metrics only). "
    "Classes are the sub-folders with a train/ or test/ folder."
)


def build_parser(dataset: str, default_root: Path) -> argparse.ArgumentParser:
    """Argument parser shared by the MVTec-layout generators (mvtec.py, mpdd.py)."""
    parser = argparse.ArgumentParser(
        description=f"Scan a {dataset} (MVTec-layout) tree and write DIR/meta.json.", epilog=LAYOUT_HELP
    )
    parser.add_argument(
        "--root", type=Path, default=default_root, help=f"dataset folder (default: {default_root})", metavar="DIR"
    )
    return parser


def run_mvtec_layout(root: Path) -> int:
    """Scan `root`, print the per-class summary and write ROOT/meta.json (nothing is written on error)."""
    meta = scan_mvtec_layout(root, verbose=True)
    path = write_meta(root, meta)
    print(f"wrote {path}")
    return 0


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """CLI entry point: `python data/mvtec.py --root DIR`."""
    args = build_parser("MVTec AD", Path(__file__).resolve().parent / "mvtec").parse_args(argv)
    return run_mvtec_layout(args.root)


if __name__ == "__main__":
    sys.exit(main())
