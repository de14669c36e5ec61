"""scripts/meta_subset.py: a view of some defect types, the source dataset untouched."""

import json

import pytest

from common.utils import UserError
from scripts.meta_subset import build_view, main


def _dataset(root):
    (root / "c" / "test").mkdir(parents=True)
    (root / "c" / "test" / "x.png").write_bytes(b"img")
    items = [{"img_path": f"c/test/{s}/{i}.png", "mask_path": "", "cls_name": "c", "specie_name": s,
              "anomaly": int(s != "good")} for s in ("good", "local", "global") for i in range(2)]  # fmt: skip
    meta = {"train": {"c": [items[0]]}, "test": {"c": items}}
    (root / "meta.json").write_text(json.dumps(meta))
    return meta


def test_view_keeps_the_chosen_defect_types_and_links_the_images(tmp_path):
    root, out = tmp_path / "data", tmp_path / "view"
    meta = _dataset(root)
    before = (root / "meta.json").read_bytes()
    assert build_view(root, out, {"good", "local"}) == {"c": 4}
    view = json.loads((out / "meta.json").read_text())
    assert view["train"] == meta["train"]
    assert [it["specie_name"] for it in view["test"]["c"]] == ["good", "good", "local", "local"]
    assert (out / "c" / "test" / "x.png").read_bytes() == b"img"  # through the link
    assert (root / "meta.json").read_bytes() == before


def test_unknown_defect_type_and_same_folder_are_one_line_errors(tmp_path, capsys):
    root = tmp_path / "data"
    _dataset(root)
    with pytest.raises(UserError, match="its defect types: global, good, local"):
        build_view(root, tmp_path / "v", {"scratch"})
    assert main(["--root", str(root), "--out", str(root), "--species", "good"]) == 2
    assert "--out must differ" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()  # nothing written on failure
