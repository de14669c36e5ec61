"""A dataset view with only some defect types: OUT/meta.json lists the chosen test items, OUT/<class> links to the data.

    python scripts/meta_subset.py --root demo_data/textile --out runs/textile_local --species good,local

The source folder is only read (its meta.json and images stay as they are); the view is what `--dataset-root` takes,
e.g. the small-defect runs of the README (FDSL section, `--win-resolution zoomed`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.utils import UserError, atomic_write_json, cli_entry  # noqa: E402


def build_view(root: Path, out: Path, species: set[str]) -> dict[str, int]:
    """Write OUT/meta.json (train split whole, test items of `species` only) and link OUT/<class> -> ROOT/<class>.

    Returns the number of test items kept per class.
    """
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise UserError(f"{meta_path} not found: build the dataset first (python -m data.demo, data/mvtec.py, ...)")
    if out.resolve() == root.resolve():
        raise UserError("--out must differ from --root (the source dataset is never rewritten)")
    meta = json.loads(meta_path.read_text())
    kept = {c: [it for it in items if it.get("specie_name") in species] for c, items in meta["test"].items()}
    if not any(kept.values()):
        found = sorted({it.get("specie_name") for items in meta["test"].values() for it in items})
        raise UserError(f"no test item of {sorted(species)} in {meta_path} (its defect types: {', '.join(found)})")
    out.mkdir(parents=True, exist_ok=True)
    for cls in meta["test"]:
        link = out / cls
        if not link.exists():
            os.symlink(os.path.relpath((root / cls).resolve(), out.resolve()), link)
    atomic_write_json(out / "meta.json", {"train": meta["train"], "test": kept})
    return {c: len(v) for c, v in kept.items()}


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="dataset with meta.json")
    p.add_argument("--out", required=True, help="the view's folder")
    p.add_argument("--species", required=True, help="comma-separated defect types to keep (good = the normals)")
    args = p.parse_args(argv)
    counts = build_view(Path(args.root), Path(args.out), {s.strip() for s in args.species.split(",") if s.strip()})
    print(f"wrote {Path(args.out) / 'meta.json'}: test items per class {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
