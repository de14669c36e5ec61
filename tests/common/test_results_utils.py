import json
import os

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from common.anomaly_map import gaussian_smooth, image_score_max, image_score_topk, upsample_map
from common.results import METRIC_KEYS, build_results, format_table, write_results
from common.utils import UserError, atomic_torch_save, atomic_write_text, cli_entry, parse_device


def _results():
    per_class = {
        "a": {k: 0.5 for k in METRIC_KEYS},
        "b": {**{k: 1.0 for k in METRIC_KEYS}, "pixel_auroc": None, "pixel_aupro": float("nan")},
    }
    return build_results("knn", "/data", 2, 0, "efficientnet_lite0", 256, per_class,
                         {"a": ["a/train/good/1.png"], "b": []}, n_images=10, seconds_total=5.0)


def test_results_schema_and_means():
    r = _results()
    assert set(r) >= {"method", "dataset_root", "k_shot", "seed", "backbone", "image_size", "win_mode",
                      "per_class", "mean", "support", "timing"}
    assert r["mean"]["image_auroc"] == pytest.approx(0.75)
    assert r["mean"]["pixel_auroc"] == pytest.approx(0.5)  # b has none
    assert r["per_class"]["b"]["pixel_aupro"] is None  # NaN becomes null
    assert r["timing"]["seconds_per_image"] == pytest.approx(0.5)


def test_write_results_and_table(tmp_path):
    write_results(tmp_path, _results())
    loaded = json.loads((tmp_path / "results.json").read_text())
    assert loaded["per_class"]["a"]["image_auroc"] == 0.5
    table = (tmp_path / "log.txt").read_text()
    assert "| mean" in table and "50.0" in table and "auroc_px" in table
    assert format_table(loaded).count("\n") == 4  # header, rule, 2 classes, mean: 5 lines


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.txt"
    atomic_write_text(target, "old")

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"x": Boom()}, tmp_path / "x.txt")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["x.txt"]


def test_cli_entry_turns_user_errors_into_exit_2(capsys):
    @cli_entry
    def main():
        raise UserError("bad thing in file.png")

    assert main() == 2
    assert capsys.readouterr().err.strip() == "error: bad thing in file.png"


def test_parse_device():
    assert parse_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UserError):
            parse_device("0")
    with pytest.raises(UserError):
        parse_device("tpu")


def test_gaussian_matches_scipy_and_scores():
    from common.anomaly_map import _gaussian_smooth_torch

    # the CPU path (OpenCV) and the device path (conv2d) both equal scipy, also where the radius exceeds the map
    for shape in ((3, 33, 40), (2, 9, 70)):
        maps = torch.rand(*shape)
        ref = np.stack([gaussian_filter(m, 4) for m in maps.numpy()])
        assert np.abs(gaussian_smooth(maps).numpy() - ref).max() < 1e-5
        assert np.abs(_gaussian_smooth_torch(maps, 4.0).numpy() - ref).max() < 1e-5
    assert gaussian_smooth(torch.zeros(0, 8, 8)).shape == (0, 8, 8)
    m = torch.zeros(2, 10, 10)
    m[0, 3, 3] = 5
    assert image_score_max(m).tolist() == [5, 0]
    assert image_score_topk(m, fraction=0.02).tolist() == [2.5, 0]
    assert upsample_map(torch.rand(2, 1, 4, 4), 16).shape == (2, 16, 16)


def test_atomic_write_gives_normal_permissions(tmp_path):
    path = atomic_write_text(tmp_path / "r.json", "{}")
    assert path.stat().st_mode & 0o044 == 0o044 & ~os.umask(os.umask(0))  # group/other readable under umask 022


def test_parse_int_list_and_image_size():
    from common.backbones import TINY_VIT, build_backbone, resolve_image_size
    from common.utils import parse_int_list

    assert parse_int_list("2,3", "--layers") == [2, 3] and parse_int_list(None, "--layers") is None
    with pytest.raises(UserError, match="--layers"):
        parse_int_list("2,a", "--layers")
    vit = build_backbone(TINY_VIT)  # patch 8, native 64 px
    assert resolve_image_size(vit, None) == 64 and resolve_image_size(vit, 96) == 96
    for bad in (60, 4):
        with pytest.raises(UserError, match="multiple"):
            resolve_image_size(vit, bad)


def test_resolve_workers_default_and_errors(monkeypatch):
    import os

    from common.utils import resolve_workers

    assert resolve_workers(3) == 3 and resolve_workers(0) == 0
    assert resolve_workers(None, "cpu") == 0  # the model uses every core: no decoding process beside it
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert resolve_workers(None, torch.device("cuda", 0)) == 1  # the CPU is free while the GPU computes
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert resolve_workers(None, "cuda") == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert resolve_workers(None, "cuda") == 0
    with pytest.raises(UserError, match="--num-workers"):
        resolve_workers(-1)
