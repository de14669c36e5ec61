"""FDSL paper mode (issue 14) on the real architecture: ViT-L-14-336 with random weights at a reduced image size.

42 px = a 3 x 3 patch grid: the smallest on which LFE windows (2 x 2 cells, stride 1: 4 windows of 28 px, each
encoded on its own with 13 -> 2 resized position embeddings) overlap and need stitching. Batch 1-2, no_grad.
"""

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.backbones import RANDOM_WEIGHTS, TINY_VIT, build_backbone
from common.evaluation import minmax_fusion
from fdsl import config as fdsl_config
from fdsl import test as fdsl_test
from fdsl import train as fdsl_train
from fdsl.config import CONFIG_DIR, TrainConfig, build_parser, resolve_config, resolve_precision
from fdsl.detector import DetectorOptions, FDSLDetector, pooled_indexed_discrepancy, select_windows
from fdsl.model import FDSLHead, feature_discrepancy
from fdsl.windows import WindowGeometry, encode_windows, stitch_windows
from tests.fixtures import make_mvtec_dataset

REPO = Path(__file__).resolve().parents[2]
SIZE, GRID = 42, 3  # 3 x 3 patches of 14 px


@pytest.fixture(scope="module")
def vit_l():
    return build_backbone("ViT-L-14-336", RANDOM_WEIGHTS)


@pytest.fixture(scope="module")
def head(vit_l):
    torch.manual_seed(0)
    head = FDSLHead([info.channels for info in vit_l.feature_info], use_nam=True)
    with torch.no_grad():  # a confident random head: a fresh one maps everything to ~0.5
        for asl in head.asl:
            asl.net[0].running_var.fill_(1e-3)  # |f - n| of unit vectors is small: amplify it
            asl.net[-1].weight.mul_(5)
        for conv in (head.nam.net[0], head.nam.net[2]):  # else the NAM's biases and padding dominate a 3 x 3 grid
            conv.weight.normal_(0, 1)
            conv.bias.zero_()
    return head.eval()


def _images(n, seed):
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def _detector(vit_l, head, **opts):
    geometry = WindowGeometry(GRID, 2, 1, 14)
    det = FDSLDetector(vit_l, head, DetectorOptions(**opts), geometry)
    det.setup("a", _images(1, 0))
    return det


@torch.no_grad()
def test_lfe_modes_on_numbers(vit_l, head):
    """nan = the main map, onlywin = the window map, mul = (1 - w) * main + w * window, for map and image score."""
    queries = _images(2, 1)
    w = 0.3
    det = _detector(vit_l, head, win_mode="mul", win_weight=w, use_nam=False)
    main_map, main_score = det._main_branch(queries)
    win_map, win_score = det._window_branch(queries)
    assert main_map.shape == win_map.shape == (2, GRID, GRID) and main_score.shape == (2,)
    assert (main_map - win_map).abs().max() > 1e-2  # the two branches differ: the checks can fail
    for mode, expected_map, expected_score in [
        ("nan", main_map, main_score),
        ("onlywin", win_map, win_score),
        ("mul", (1 - w) * main_map + w * win_map, (1 - w) * main_score + w * win_score),
    ]:
        det.opts.win_mode = mode
        score, amap = det.predict(queries)
        assert torch.allclose(amap, expected_map, atol=1e-6), mode
        assert torch.allclose(score, expected_score, atol=1e-6), mode


@torch.no_grad()
def test_window_branch_is_nam_on_the_stitched_map(vit_l, head):
    """The LFE branch by hand: window FD on the pooled window bank -> ASL -> stitch (mean over overlaps) -> NAM."""
    det = _detector(vit_l, head, win_mode="onlywin")
    query = _images(1, 2)
    feats, _ = encode_windows(vit_l, query, det.geometry)
    assert [f.shape for f in feats] == [(4, 1024, 2, 2)] * 4  # 4 windows of 2 x 2 tokens, 4 levels (6/12/18/24)
    levels = []
    for level, (feat, bank) in enumerate(zip(feats, det.win_bank)):
        dev, _ = feature_discrepancy(feat, bank)
        stitched = stitch_windows(head.asl[level](dev)[:, 1], det.geometry)
        levels.append(head.refine(stitched))
    expected = torch.stack(levels).mean(0)
    score, amap = det.predict(query)
    assert torch.allclose(amap, expected, atol=1e-6)
    det.opts.win_use_nam = False  # without the NAM on the stitched map the result differs
    assert not torch.allclose(det.predict(query)[1], expected, atol=1e-4)


@torch.no_grad()
def test_image_index_picks_the_most_similar_reference_window_and_pools_them(vit_l, head):
    torch.manual_seed(3)
    q_keys, r_keys = F.normalize(torch.randn(5, 8), dim=1), F.normalize(torch.randn(7, 8), dim=1)
    loop = [max(range(7), key=lambda j: float(q_keys[i] @ r_keys[j])) for i in range(5)]
    assert select_windows(q_keys, r_keys).tolist() == loop
    # pooled matching: every query-window token against all tokens of the windows its image selected
    query = F.normalize(torch.randn(4, 6, 2, 2), dim=1)  # 2 images x 2 windows
    bank = F.normalize(torch.randn(5, 4, 6), dim=2)  # 5 reference windows of 4 tokens
    choice = torch.tensor([3, 1, 0, 0])
    dev, cos = pooled_indexed_discrepancy(query, bank, choice, n_windows=2, signed=False, chunk_size=3)
    for i in range(4):
        image = i // 2
        pool = torch.cat([bank[int(c)] for c in choice[2 * image : 2 * image + 2]])
        ref_dev, ref_cos = feature_discrepancy(query[i : i + 1], pool)
        assert torch.allclose(dev[i], ref_dev[0], atol=1e-6) and torch.allclose(cos[i], ref_cos[0], atol=1e-6)
    # on the real encoder: the detector selects by the crops' pooled CLIP embeddings, then pools
    det = _detector(vit_l, head, win_mode="onlywin", use_img_idx=True)
    query_img = _images(1, 4)
    _, keys = encode_windows(vit_l, query_img, det.geometry)
    expected = [int(torch.argmax(det.win_keys @ k)) for k in keys]
    assert select_windows(keys, det.win_keys).tolist() == expected
    pooled = det.predict(query_img)[1]
    det.opts.img_idx_match = "own"
    assert not torch.allclose(det.predict(query_img)[1], pooled, atol=1e-5)


@torch.no_grad()
def test_map_align_corners_upsamples_as_the_original(vit_l, head):
    det = _detector(vit_l, head, win_mode="nan")
    query = _images(1, 5)
    grid_map = det.predict(query)[1]
    det.opts.map_size, det.opts.map_align_corners = 10, True
    up = det.predict(query)[1]
    assert up.shape == (1, 10, 10)
    assert torch.allclose(up, F.interpolate(grid_map[:, None], size=10, mode="bilinear", align_corners=True)[:, 0])
    # align_corners=True keeps the corner cells' values exactly; the default (False) would not
    assert torch.allclose(up[0, [0, 0, -1, -1], [0, -1, 0, -1]], grid_map[0, [0, 0, -1, -1], [0, -1, 0, -1]])


def test_image_score_paper_is_the_minmax_fusion_by_hand():
    scores = np.array([0.2, 0.4, 0.6])
    maps = np.zeros((3, 2, 2))
    maps[0, 0, 0], maps[1, 1, 1], maps[2, 0, 1] = 1.0, 3.0, 2.0  # map maxima 1, 3, 2 -> min-max 0, 1, 0.5
    assert np.allclose(minmax_fusion(scores, maps), [0.5 * (0.2 + 0), 0.5 * (0.4 + 1), 0.5 * (0.6 + 0.5)])


def test_paper_configs_switch_our_changes_off():
    parser = build_parser(TrainConfig, "t", "", "train.yaml")
    for name in ("paper_train.yaml", "paper_train_visa.yaml"):
        cfg = resolve_config(TrainConfig, parser, ["--config", str(CONFIG_DIR / name), "--dataset-root", "x",
                                                    "--save-dir", "y"])  # fmt: skip
        assert (cfg.protocol, cfg.recalibrate_bn, cfg.precision, cfg.tf32) == ("paper", 0, "auto", 1)
        assert (cfg.epochs, cfg.use_crop) == ((5, 0) if name == "paper_train.yaml" else (11, 1))
        assert (cfg.fd_match, cfg.input_norm) == ("level", "none")
    ours = resolve_config(TrainConfig, parser, ["--dataset-root", "x", "--save-dir", "y"])
    assert (ours.protocol, ours.recalibrate_bn, ours.precision, ours.tf32) == ("ours", 1, "fp32", 0)
    test_parser = build_parser(fdsl_config.TestConfig, "t", "", "test.yaml")
    args = ["--dataset-root", "x", "--checkpoint", "c", "--k-shot", "1", "--seed", "0", "--save-dir", "y"]
    paper_args = ["--config", str(CONFIG_DIR / "paper_test.yaml"), *args]
    paper = resolve_config(fdsl_config.TestConfig, test_parser, paper_args)
    assert (paper.map_align_corners, paper.win_use_nam, paper.img_idx_match, paper.fd_weight) == (1, 1, "pooled", 0)
    assert (paper.image_score, paper.legacy_second_draw, paper.coreset, paper.precision) == ("paper", 0, 1.0, "auto")
    assert (paper.fd_match, paper.map_norm, paper.smooth_sigma) == ("level", "none", 0.0)  # whatever the backbone
    assert paper.knn_weight == 0.0
    assert resolve_config(fdsl_config.TestConfig, test_parser, args).map_align_corners == 0  # ours: unchanged


def test_precision_auto_is_fp16_on_cuda_only():
    assert resolve_precision("auto", "cpu", 1) == ("fp32", False)
    assert resolve_precision("fp32", "cpu", 0) == ("fp32", False)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        assert resolve_precision("auto", "cuda", 1) == ("fp16", True)
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_paper_mode_end_to_end_on_vit_l(tmp_path, capsys):
    """fdsl.train + fdsl.test with the paper configs on ViT-L-14-336 (random weights), one class of 2 test images,
    `mul` LFE: results.json records the paper switches, the 4 levels, the windows and the tested epoch."""
    root = make_mvtec_dataset(tmp_path / "ds", classes=("a",), n_train=1, n_test_good=1, defects={"crack": 1},
                              size=48, seed=0)  # fmt: skip
    common = ["--device", "cpu", "--progress", "0", "--pretrained", RANDOM_WEIGHTS, "--image-size", str(SIZE)]
    assert fdsl_train.main(["--config", str(CONFIG_DIR / "paper_train.yaml"), "--dataset-root", str(root),
                            "--save-dir", str(tmp_path / "exp"), "--epochs", "1", "--train-k-shot", "1",
                            "--batch-size", "2", *common]) == 0  # fmt: skip
    assert "RANDOM weights" in capsys.readouterr().out
    config = json.loads((tmp_path / "exp/config.json").read_text())
    assert config["layers"] == [6, 12, 18, 24] and config["recalibrate_bn"] == 0 and config["precision_used"] == "fp32"
    assert fdsl_test.main(["--config", str(CONFIG_DIR / "paper_test.yaml"), "--dataset-root", str(root),
                           "--checkpoint", str(tmp_path / "exp/epoch_1.pth"), "--k-shot", "1", "--seed", "0",
                           "--save-dir", str(tmp_path / "res"), "--win-mode", "mul", "--win-size", "2",
                           "--win-stride", "1", "--eval-size", "28", *common]) == 0  # fmt: skip
    results = json.loads((tmp_path / "res/results.json").read_text())
    assert results["backbone"] == "ViT-L-14-336" and results["image_size"] == SIZE and results["win_mode"] == "mul"
    assert results["protocol"] == "paper" and results["checkpoint_epoch"] == 1 and results["win_use_nam"] is True
    assert results["map_align_corners"] is True and results["train_recalibrate_bn"] is False
    assert (results["precision"], results["tf32"], results["img_idx_match"]) == ("fp32", False, "pooled")
    assert results["train_options"]["protocol"] == "paper" and results["train_options"]["num_workers"] == 0
    assert results["bank_bytes"]["window_bank_bytes"] == 4 * 4 * 4 * 1024 * 4  # 4 levels x 4 windows x 2x2 tokens
    assert set(results["per_class"]) == {"a"} and 0 <= results["mean"]["pixel_auroc"] <= 1


def test_training_workers_decode_the_same_batches(tmp_path):
    """DataLoader workers (item 9): without random augmentation the trained head equals the main-process one;
    with augmentation, two runs with workers agree (each item's draws come from its own seed)."""
    root = make_mvtec_dataset(tmp_path / "ds", classes=("a",), n_train=2, n_test_good=2, defects={"crack": 2},
                              size=64, seed=1)  # fmt: skip

    def train(name, workers, *extra):
        fdsl_train.main(["--dataset-root", str(root), "--save-dir", str(tmp_path / name), "--backbone", TINY_VIT,
                         "--epochs", "1", "--image-size", "64", "--device", "cpu", "--progress", "0",
                         "--train-k-shot", "1", "--batch-size", "2", "--num-workers", str(workers), "--cache-mb", "0",
                         *extra])  # fmt: skip
        return torch.load(tmp_path / name / "last.pth", weights_only=True)["head"]

    plain = ["--aug-rate", "0", "--use-crop", "0"]
    main, workers = train("w0", 0, *plain), train("w1", 1, *plain)
    assert all(torch.equal(main[k], workers[k]) for k in main)
    aug = ["--aug-rate", "0.5", "--use-crop", "1"]
    first, second = train("a1", 1, *aug), train("a2", 1, *aug)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], workers[k]) for k in first)  # the augmentation did change the batches


FAKE_PYTHON = """#!/usr/bin/env bash
# records the call; for fdsl.train writes the epoch files the drivers look for
echo "$*" >> "$CALLS"
save= epochs=
while [ "$#" -gt 0 ]; do
  case "$1" in --save-dir) save=$2 ;; --epochs) epochs=$2 ;; esac
  shift
done
if [ -n "$epochs" ]; then mkdir -p "$save"; for e in $(seq 1 "$epochs"); do touch "$save/epoch_$e.pth"; done; fi
"""


def _driver_calls(tmp_path, script, backbone, **env_extra):
    fake = tmp_path / "fake_python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "CALLS": str(calls), "BACKBONE": backbone,
           "EPOCHS_MVTEC": "3", "EPOCHS_VISA": "11", **env_extra}  # fmt: skip
    proc = subprocess.run(["bash", str(REPO / script), "n", "cpu", "1", "mul", "13", "2", "0.5", "0", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    return proc, calls.read_text().splitlines() if calls.is_file() else []


def test_drivers_paper_protocol_epochs_configs_and_window_nam(tmp_path):
    """PROTOCOL=paper (the ViT-L-14-336 default): paper_*.yaml, no BN recalibration flag of ours, VisA tested with the
    MVTec run's last epoch (the original's epoch_11 bug fixed), MVTec with epoch 5 of the longer VisA run (as the
    original), NAM on the stitched window map in both drivers, EXTRA_TRAIN_ARGS appended."""
    proc, calls = _driver_calls(tmp_path, "trainAndTest.sh", "ViT-L-14-336", EXTRA_TRAIN_ARGS="--cache-mb 1")
    assert proc.returncode == 0, proc.stderr
    assert "protocol: paper" in proc.stdout
    train_a, train_b, test_c, test_d = calls
    assert "paper_train.yaml" in train_a and "--epochs 3" in train_a and train_a.endswith("--cache-mb 1")
    assert "paper_train_visa.yaml" in train_b and "--epochs 11" in train_b
    assert "paper_test.yaml" in test_c and "exps/visa/ViT-L-14-336/fewshot/n/epoch_3.pth" in test_c
    assert "paper_test.yaml" in test_d and "exps/mvtec/ViT-L-14-336/fewshot/n/epoch_5.pth" in test_d
    proc, calls = _driver_calls(tmp_path, "test_few_shot.sh", "ViT-L-14-336")
    assert proc.returncode == 0, proc.stderr
    assert ["epoch_3.pth" in calls[0], "epoch_5.pth" in calls[1]] == [True, True]
    assert all("--win-use-nam 1" in c and "--use-nam 1" in c for c in calls + [test_c, test_d])
    proc, _ = _driver_calls(tmp_path, "test_few_shot.sh", "ViT-L-14-336", TEST_EPOCH_MVTEC="12")
    assert proc.returncode == 2 and "TEST_EPOCH_MVTEC must be an epoch of the VisA-trained run, 1..11" in proc.stderr


def test_drivers_ours_protocol_keeps_the_last_epochs(tmp_path):
    proc, calls = _driver_calls(tmp_path, "trainAndTest.sh", "efficientnet_lite0", TEST_EPOCH_VISA="2")
    assert proc.returncode == 0, proc.stderr
    assert "protocol: ours" in proc.stdout
    assert "configs/fdsl/train.yaml" in calls[0] and "configs/fdsl/train_visa.yaml" in calls[1]
    assert "configs/fdsl/test.yaml" in calls[2] and "visa/efficientnet_lite0/fewshot/n/epoch_2.pth" in calls[2]
    assert "exps/mvtec/efficientnet_lite0/fewshot/n/epoch_11.pth" in calls[3]
