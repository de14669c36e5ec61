"""Write meta.json for MPDD, which uses the MVTec layout.

Usage: `python data/mpdd.py --root DIR` from the repo root, or `cd data && python mpdd.py` (default root:
the folder `mpdd` next to this script).
"""

import sys
from pathlib import Path

from common.utils import cli_entry
from data.mvtec import build_parser, run_mvtec_layout


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """CLI entry point: `python data/mpdd.py --root DIR`."""
    args = build_parser("MPDD", Path(__file__).resolve().parent / "mpdd").parse_args(argv)
    return run_mvtec_layout(args.root)


if __name__ == "__main__":
    sys.exit(main())
