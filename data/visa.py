"""Write meta.json for VisA from its official split file DIR/split_csv/1cls.csv.

The csv has a header row with (at least) the columns object, split, label, image, mask. A row is
anomalous iff label == "anomaly"; an empty mask cell gives mask_path "". specie_name is "" for every item
(as in the original VAND generator). Classes keep the order in which they first appear in the csv.

Usage: `python data/visa.py --root DIR [--check-files]`, or `cd data && python visa.py` (default root: the
folder `visa` next to this script).
"""

import argparse
import csv
import os
import sys
from pathlib import Path

from common.utils import UserError, cli_entry
from data.meta import (
    SPLITS,
    check_dataset_folder,
    check_image_headers,
    format_summary,
    validate_meta,
    write_meta,
)

SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = ("normal", "anomaly")


def read_visa_csv(root: str | os.PathLike, csv_path: str | os.PathLike | None = None) -> dict:
    """Build a meta dict from VisA's split csv.

    Args:
        root: VisA root; image and mask paths in the csv are relative to it.
        csv_path: the split file (default ROOT/split_csv/1cls.csv).

    Returns:
        The meta dict; every class appears in both splits, in csv order.

    Raises:
        UserError: missing root or csv, missing column, unknown split or label, empty image cell.
    """
    root = Path(root)
    check_dataset_folder(root)
    path = Path(csv_path) if csv_path is not None else root / SPLIT_CSV
    if not path.is_file():
        raise UserError(f"{path} not found: VisA's split_csv/1cls.csv (shipped with the dataset) is required")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: tolerate a BOM before the header
            reader = csv.DictReader(handle)
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [name for name in COLUMNS if name not in header]
            if missing:
                raise UserError(f"{path}: missing column(s) {', '.join(missing)} (header: {','.join(header)})")
            reader.fieldnames = header
            return _rows_to_meta(reader, path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read {path}: {exc}") from exc


def _rows_to_meta(reader: csv.DictReader, path: Path) -> dict:
    """Turn csv rows into `{"train": {cls: [item]}, "test": {cls: [item]}}`."""
    meta: dict[str, dict[str, list[dict]]] = {split: {} for split in SPLITS}
    for row in reader:
        where = f"{path} line {reader.line_num}"
        cell = {name: (row.get(name) or "").strip() for name in COLUMNS}
        if not any(cell.values()):
            continue  # blank line
        if cell["split"] not in SPLITS:
            raise UserError(f"{where}: split '{cell['split']}' is not one of {', '.join(SPLITS)}")
        if cell["label"] not in LABELS:
            raise UserError(f"{where}: label '{cell['label']}' is not one of {', '.join(LABELS)}")
        if not cell["object"] or not cell["image"]:
            raise UserError(f"{where}: empty object or image cell")
        for split in SPLITS:
            meta[split].setdefault(cell["object"], [])
        meta[cell["split"]][cell["object"]].append(
            {
                "img_path": cell["image"].replace("\\", "/"),
                "mask_path": cell["mask"].replace("\\", "/"),
                "cls_name": cell["object"],
                "specie_name": "",
                "anomaly": int(cell["label"] == "anomaly"),
            }
        )
    if not meta["test"]:
        raise UserError(f"{path}: no data rows")
    return meta


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """CLI entry point: `python data/visa.py --root DIR [--check-files]`."""
    default_root = Path(__file__).resolve().parent / "visa"
    parser = argparse.ArgumentParser(description="Write DIR/meta.json for VisA from DIR/split_csv/1cls.csv.")
    parser.add_argument(
        "--root", type=Path, default=default_root, metavar="DIR", help=f"VisA folder (default: {default_root})"
    )
    parser.add_argument("--check-files", action="store_true", help="check that every image and mask in the csv exists")
    args = parser.parse_args(argv)
    meta = read_visa_csv(args.root)
    validate_meta(meta, args.root)
    if args.check_files:  # missing or empty files, unreadable headers, masks of the wrong size
        check_image_headers(meta, args.root, listed_in=args.root / SPLIT_CSV)
    print(format_summary(meta))
    print(f"wrote {write_meta(args.root, meta)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
