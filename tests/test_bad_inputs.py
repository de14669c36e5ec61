"""Broken inputs for every CLI (issue 7 item 4, issue 12 item 6): one clear line on stderr, exit 2, nothing written.

Each case copies a pristine tiny dataset, breaks it (or a flag, or the output folder), runs one CLI and checks:
exit code 2, exactly one stderr line `error: ...` holding the expected words (the file or flag named, what is
wrong), no traceback, the dataset folder byte-for-byte unchanged (meta.json included: a failed data script writes
nothing) and the whole output tree exactly as it was: absent if it was absent, else the same files with the same
bytes (half the cases start from an output folder holding an earlier run's files, which must survive). stderr is
captured at the file-descriptor level with Python warnings shown as a plain process shows them, so a library
warning or a C-level message breaks the one-line rule too. Every CLI runs at least one case as a real subprocess;
the other torch cases run in-process through `main(argv)` (a subprocess pays ~8 s of imports on this machine).
Disk full is simulated in-process: every file opened for writing raises ENOSPC. A read-only folder is
`chmod 555`, or `chattr +i` when running as root (root ignores permission bits).

`scripts/bad_inputs_table.py` runs the same CASES and prints docs/BAD_INPUTS.md.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

from tests.fixtures import make_mvtec_tree, make_visa_tree, one_thread, tree_digest  # noqa: F401  (autouse fixture)

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = "vit-tiny-test"
ABSENT_CLIP = "ViT-B-32"  # a real open_clip model whose weights are not on this machine
FAST_SECONDS = 20.0  # a missing-weights error must come this fast (open_clip alone would retry downloads for minutes)
CLASS = "a"


# ------------------------------------------------------------------------------------------------ workspace


@dataclass
class Work:
    """One case's folders: `data` is the dataset copy (hashed), `root` what --root/--dataset-root gets."""

    base: Path
    data: Path
    ckpt: Path
    root: Path = field(init=False)
    out: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root, self.out = self.data, self.base / "out"

    def fmt(self, text: str) -> str:
        return text.format(root=self.root, data=self.data, out=self.out, ckpt=self.ckpt, base=self.base, cls=CLASS)


def build_pristine(base: Path) -> dict[str, Path]:
    """The tiny datasets every case copies: an MVTec-layout tree (with meta.json) and a VisA-style tree."""
    from data.meta import scan_mvtec_layout, write_meta

    mvtec = make_mvtec_tree(base / "mvtec", classes=(CLASS,), n_train=3, n_test_good=2, defects={"crack": 2}, size=64)
    write_meta(mvtec, scan_mvtec_layout(mvtec, verbose=False))
    raw = make_mvtec_tree(base / "raw", classes=(CLASS,), n_train=3, n_test_good=2, defects={"crack": 2}, size=64)
    visa = make_visa_tree(base / "visa", classes=("pcb1",), n_train=2, n_test_good=1, n_test_bad=2, size=48)
    return {"mvtec": mvtec, "raw": raw, "visa": visa}


def build_checkpoint(base: Path, mvtec: Path) -> Path:
    """A 1-epoch FDSL head on the tiny ViT at 64 px (a few seconds), for fdsl.test and fdsl.predict."""
    from fdsl import train

    out = base / "fdsl_ckpt"
    args = ["--dataset-root", str(mvtec), "--save-dir", str(out), "--backbone", TINY_VIT, "--epochs", "1",
            "--image-size", "64", "--device", "cpu", "--progress", "0", "--train-k-shot", "2"]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        assert train.main(args) == 0
    return out / "last.pth"


# ------------------------------------------------------------------------------------------------ breakers


def _item_file(work: Work, kind: str) -> Path:
    return work.data / CLASS / {"bad": "test/crack/000.png", "good": "test/good/001.png",
                                "mask": "ground_truth/crack/000_mask.png"}[kind]  # fmt: skip


def missing_root(work: Work) -> None:
    work.root = work.base / "no_such_dataset"


def empty_root(work: Work) -> None:
    work.root = work.base / "empty_dataset"
    work.root.mkdir()


def root_is_file(work: Work) -> None:
    work.root = work.base / "archive.zip"
    work.root.write_bytes(b"PK\x03\x04 not a folder")


def meta_missing(work: Work) -> None:
    (work.data / "meta.json").unlink()


def meta_truncated(work: Work) -> None:
    path = work.data / "meta.json"
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def meta_unknown_key(work: Work) -> None:
    path = work.data / "meta.json"
    meta = json.loads(path.read_text())
    meta["test"][CLASS][0]["defect_area"] = 12
    path.write_text(json.dumps(meta, indent=4) + "\n")


def meta_missing_file(work: Work) -> None:
    _item_file(work, "bad").with_name("001.png").unlink()


def image_zero_byte(work: Work) -> None:
    _item_file(work, "bad").write_bytes(b"")


def image_truncated(work: Work) -> None:
    path = _item_file(work, "good")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def mask_wrong_size(work: Work) -> None:
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(_item_file(work, "mask"))


def mask_grey(work: Work) -> None:
    ramp = np.linspace(0, 255, 64 * 64).reshape(64, 64).astype(np.uint8)  # like a JPEG-saved or resampled mask
    Image.fromarray(ramp).save(_item_file(work, "mask"))


def mask_orphan(work: Work) -> None:
    shutil.copy(_item_file(work, "mask"), _item_file(work, "mask").with_name("009_mask.png"))


def visa_csv_missing(work: Work) -> None:
    (work.data / "split_csv" / "1cls.csv").unlink()


def visa_csv_truncated(work: Work) -> None:
    path = work.data / "split_csv" / "1cls.csv"
    text = path.read_text()
    path.write_text(text[: text.index("\n", len(text) // 2) + 12])  # the last row is cut mid-line


def visa_image_missing(work: Work) -> None:
    next((work.data / "pcb1" / "Data" / "Images" / "Anomaly").iterdir()).unlink()


def visa_mask_wrong_size(work: Work) -> None:
    mask = next((work.data / "pcb1" / "Data" / "Masks" / "Anomaly").iterdir())
    Image.fromarray(np.ones((20, 20), np.uint8)).save(mask)


def empty_refs(work: Work) -> None:
    (work.base / "empty_refs").mkdir()


def refs_zero_byte(work: Work) -> None:
    for path in (work.data / CLASS / "train" / "good").iterdir():
        path.write_bytes(b"")


def images_one_truncated(work: Work) -> None:
    folder = work.base / "queries"
    folder.mkdir()
    source = _item_file(work, "good")
    (folder / "q.png").write_bytes(source.read_bytes()[:200])


def ckpt_truncated(work: Work) -> None:
    copy = work.base / "last.pth"
    copy.write_bytes(work.ckpt.read_bytes()[:1000])
    work.ckpt = copy


def ckpt_not_fdsl(work: Work) -> None:
    import torch

    work.ckpt = work.base / "pcsnet.pt"
    torch.save({"model": {}, "config": {}}, work.ckpt)


def out_inside_refs(work: Work) -> None:
    work.out = work.data / CLASS / "train" / "good" / "runs"


# ------------------------------------------------------------------------------------------------ the CLIs


@dataclass(frozen=True)
class Cli:
    """How to call one CLI: `target` is a script path or module; `base` its working flags (values are templates)."""

    target: str
    base: dict
    dataset: str = "mvtec"  # which pristine tree the case copies
    subprocess_default: bool = False  # data scripts: cheap to start, run as the user does


TORCH_FLAGS = {"--device": "cpu"}
CLIS = {
    "data/mvtec.py": Cli("data/mvtec.py", {"--root": "{root}"}, "raw", True),
    "data/mpdd.py": Cli("data/mpdd.py", {"--root": "{root}"}, "raw", True),
    "data/visa.py": Cli("data/visa.py", {"--root": "{root}", "--check-files": True}, "visa", True),
    "data/demo.py": Cli("data/demo.py", {"--root": "{root}", "--small": True}, "mvtec", True),
    "baseline.knn": Cli(
        "baseline.knn",
        {
            "--dataset-root": "{root}",
            "--k-shot": "1",
            "--seed": "0",
            "--save-dir": "{out}",
            "--backbone": TINY_VIT,
            "--image-size": "64",
            "--quiet": True,
            **TORCH_FLAGS,
        },
    ),  # fmt: skip
    "fdsl.train": Cli(
        "fdsl.train",
        {
            "--dataset-root": "{root}",
            "--save-dir": "{out}",
            "--backbone": TINY_VIT,
            "--epochs": "1",
            "--image-size": "64",
            "--train-k-shot": "2",
            "--progress": "0",
            **TORCH_FLAGS,
        },
    ),  # fmt: skip
    "fdsl.test": Cli(
        "fdsl.test",
        {
            "--dataset-root": "{root}",
            "--checkpoint": "{ckpt}",
            "--k-shot": "1",
            "--seed": "0",
            "--save-dir": "{out}",
            "--progress": "0",
            **TORCH_FLAGS,
        },
    ),  # fmt: skip
    "main.py": Cli(
        "main",
        {
            "--data-root": "{root}",
            "--k-shot": "1",
            "--seed": "0",
            "--save-dir": "{out}",
            "--image-size": "64",
            "--epochs": "1",
            "--cas-width": "8",
            "--aug-pool": "1",
            "--quiet": True,
            **TORCH_FLAGS,
        },
    ),  # fmt: skip
    "baseline.predict": Cli(
        "baseline.predict",
        {
            "--reference": "{data}/a/train/good",
            "--images": "{data}/a/test/good",
            "--out": "{out}",
            "--backbone": TINY_VIT,
            "--image-size": "64",
            "--quiet": True,
            **TORCH_FLAGS,
        },
    ),  # fmt: skip
    "fdsl.predict": Cli(
        "fdsl.predict",
        {
            "--reference": "{data}/a/train/good",
            "--images": "{data}/a/test/good",
            "--out": "{out}",
            "--checkpoint": "{ckpt}",
            "--quiet": True,
            **TORCH_FLAGS,
        },
    ),  # fmt: skip
    "pcsnet.predict": Cli(
        "pcsnet.predict",
        {
            "--reference": "{data}/a/train/good",
            "--images": "{data}/a/test/good",
            "--out": "{out}",
            "--image-size": "64",
            "--epochs": "1",
            "--cas-width": "8",
            "--aug-pool": "1",
            "--threshold": "1",
            "--quiet": True,
            **TORCH_FLAGS,
        },
    ),  # fmt: skip
    "trainAndTest.sh": Cli("trainAndTest.sh", {}, subprocess_default=True),
}
CLIS["fsad"] = Cli("engine.cli", {"eval": True, "--method": "knn", **CLIS["baseline.knn"].base})  # fsad eval = knn


@dataclass(frozen=True)
class Case:
    cli: str
    problem: str  # what is broken (the table's first column)
    expect: tuple[str, ...]  # templates that must all appear in the error line (the file or flag, the problem)
    breaker: Callable[[Work], None] | None = None
    flags: dict = field(default_factory=dict)  # flag -> value (None drops the flag) over the CLI's working flags
    env: str = ""  # "" | "read_only_out" | "read_only_data" | "disk_full"
    subprocess: bool | None = None  # None: the CLI's default
    needs_fix: str = ""  # a file this helper may not edit: the case is a strict xfail until the lead applies the fix

    @property
    def id(self) -> str:
        return f"{self.cli}: {self.problem}"


def _dataset_cases(cli: str, k: bool = True, classes: bool = True) -> list[Case]:
    """The dataset-side breakages that apply to every CLI reading meta.json."""
    cases = [
        Case(cli, "dataset folder missing", ("{base}/no_such_dataset",), missing_root),
        Case(cli, "dataset folder empty", ("{root}/meta.json", "not found", "data/mvtec.py"), empty_root),
        Case(cli, "meta.json missing", ("{root}/meta.json", "not found"), meta_missing),
        Case(cli, "meta.json truncated", ("{root}/meta.json", "not valid JSON", "regenerate"), meta_truncated),
        Case(cli, "meta.json item with an unknown key", ("{root}/meta.json", "unknown key(s) defect_area"),
             meta_unknown_key),
        Case(cli, "meta.json lists a missing image", ("{root}/a/test/crack/001.png", "does not exist"),
             meta_missing_file),
        Case(cli, "zero-byte image", ("{root}/a/test/crack/000.png", "empty (0 bytes)"), image_zero_byte),
        Case(cli, "truncated image", ("{root}/a/test/good/001.png", "truncated"), image_truncated),
        Case(cli, "mask of the wrong size", ("{root}/a/ground_truth/crack/000_mask.png", "32x32", "64x64"),
             mask_wrong_size),
        Case(cli, "mask with grey levels (not 0/255)", ("{root}/a/ground_truth/crack/000_mask.png", "not a binary"),
             mask_grey),
    ]  # fmt: skip
    if k:
        cases += [
            Case(cli, "k = 0", ("--k-shot", "at least 1"), flags={"--k-shot": "0"}),
            Case(cli, "k larger than the pool", ("--k-shot 9", "3 normal training images", "{root}/meta.json"),
                 flags={"--k-shot": "9"}),
        ]  # fmt: skip
    if classes:
        cases.append(
            Case(cli, "unknown class", ("nope", "--class-name", "a"), flags={"--class-name": "nope"}),
        )
    return cases


def _output_cases(cli: str) -> list[Case]:
    return [
        Case(cli, "read-only output folder", ("{out}", "not writable"), env="read_only_out"),
        Case(cli, "disk full (ENOSPC on write)", ("{out}/", "No space left on device", "free some disk space"),
             env="disk_full"),
    ]  # fmt: skip


def _backbone_cases(cli: str, clip_flags: dict | None = None) -> list[Case]:
    return [
        Case(cli, "unknown backbone", ("unknown backbone 'resnet9000'",), flags={"--backbone": "resnet9000"}),
        Case(cli, "CLIP weights absent", ("CLIP weights 'openai' for ViT-B-32", "--pretrained"),
             flags=clip_flags or {"--backbone": ABSENT_CLIP}),
    ]  # fmt: skip


CASES: list[Case] = [
    # data scripts: the tree itself, and meta.json as their only output
    Case("data/mvtec.py", "dataset folder missing", ("{base}/no_such_dataset", "does not exist"), missing_root),
    Case("data/mvtec.py", "dataset folder empty", ("no class folders", "{root}"), empty_root),
    Case("data/mvtec.py", "root is a file", ("{root}", "is a file, not a folder"), root_is_file),
    Case("data/mvtec.py", "zero-byte image", ("{root}/a/test/crack/000.png", "empty (0 bytes)"), image_zero_byte),
    Case("data/mvtec.py", "mask of the wrong size", ("{root}/a/ground_truth/crack/000_mask.png", "32x32", "64x64"),
         mask_wrong_size),
    Case("data/mvtec.py", "mask without an image", ("{root}/a/ground_truth/crack/009_mask.png", "no matching image"),
         mask_orphan),
    Case("data/mvtec.py", "read-only dataset folder", ("{root}/meta.json", "cannot write"), env="read_only_data"),
    Case("data/mvtec.py", "disk full (ENOSPC on write)", ("{root}/meta.json", "No space left on device"),
         env="disk_full"),
    Case("data/mpdd.py", "dataset folder missing", ("{base}/no_such_dataset", "does not exist"), missing_root),
    Case("data/mpdd.py", "zero-byte image", ("{root}/a/test/crack/000.png", "empty (0 bytes)"), image_zero_byte),
    Case("data/visa.py", "split csv missing", ("{root}/split_csv/1cls.csv", "not found"), visa_csv_missing),
    Case("data/visa.py", "split csv truncated", ("{root}/split_csv/1cls.csv", "line"), visa_csv_truncated),
    Case("data/visa.py", "csv lists a missing image",
         ("{root}/pcb1/Data/Images/Anomaly", "listed in {root}/split_csv/1cls.csv", "does not exist"),
         visa_image_missing),
    Case("data/visa.py", "mask of the wrong size", ("{root}/pcb1/Data/Masks/Anomaly", "20x20", "48x48"),
         visa_mask_wrong_size),
    Case("data/demo.py", "root is a non-demo dataset", ("{root}", "not made by data/demo.py"), None),
    Case("data/demo.py", "root is a file", ("{root}", "not a folder"), root_is_file),
    Case("data/demo.py", "image size out of range", ("--size 8", "64..1024"), flags={"--size": "8"}),
    # evaluation and training CLIs
    *_dataset_cases("baseline.knn"),
    *_backbone_cases("baseline.knn"),
    *_output_cases("baseline.knn"),
    Case("baseline.knn", "output inside the dataset", ("--save-dir {root}/runs", "inside the dataset folder"),
         flags={"--save-dir": "{root}/runs"}),
    Case("baseline.knn", "meta.json missing (subprocess)", ("{root}/meta.json", "not found"), meta_missing,
         subprocess=True),
    Case("baseline.knn", "grid stride zero", ("--grid-stride must be positive",), flags={"--grid-stride": "0"}),
    *_dataset_cases("fdsl.train", k=False, classes=False),
    Case("fdsl.train", "k = 0 (--train-k-shot)", ("--train-k-shot", "at least 1"), flags={"--train-k-shot": "0"}),
    *_backbone_cases("fdsl.train"),
    *_output_cases("fdsl.train"),
    Case("fdsl.train", "output inside the dataset", ("--save-dir {root}/runs", "inside the dataset folder"),
         flags={"--save-dir": "{root}/runs"}),
    *_dataset_cases("fdsl.test"),
    Case("fdsl.test", "unknown backbone", ("unknown backbone 'resnet9000'",), flags={"--backbone": "resnet9000"}),
    Case("fdsl.test", "CLIP weights absent", ("CLIP weights 'openai' for ViT-B-32", "--pretrained"),
         flags={"--backbone": ABSENT_CLIP, "--pretrained": "openai"}),
    Case("fdsl.test", "checkpoint from another backbone", ("{ckpt}", "vit-tiny-test", "efficientnet_lite0"),
         flags={"--backbone": "efficientnet_lite0", "--image-size": "64"}),
    Case("fdsl.test", "checkpoint missing", ("{base}/none.pth", "does not exist"),
         flags={"--checkpoint": "{base}/none.pth"}),
    Case("fdsl.test", "checkpoint truncated", ("{ckpt}", "cannot read checkpoint"), ckpt_truncated),
    Case("fdsl.test", "checkpoint of another method", ("{ckpt}", "not an FDSL checkpoint"), ckpt_not_fdsl),
    *_output_cases("fdsl.test"),
    Case("fdsl.test", "truncated image read by a DataLoader worker", ("{root}/a/test/good/001.png", "truncated"),
         image_truncated, flags={"--num-workers": "1"}),
    Case("fdsl.test", "output inside the dataset", ("--save-dir {root}/runs", "inside the dataset folder"),
         flags={"--save-dir": "{root}/runs"}),
    Case("fdsl.test", "kNN term without standardised maps", ("--knn-weight 0.5", "--map-norm support"),
         flags={"--knn-weight": "0.5"}),
    Case("fdsl.test", "kNN term's finer level on a ViT", ("--knn-layers finer", "efficientnet_lite"),
         flags={"--knn-weight": "0.5", "--map-norm": "support", "--knn-layers": "finer"}),
    *_dataset_cases("main.py"),
    *_backbone_cases("main.py", {"--backbone": ABSENT_CLIP, "--pretrained": "openai"}),
    *_output_cases("main.py"),
    Case("main.py", "output inside the dataset", ("--save-dir {root}/runs", "inside the dataset folder"),
         flags={"--save-dir": "{root}/runs"}),
    Case("main.py", "negative kNN weight", ("knn_weight must be >= 0",), flags={"--knn-weight": "-1"}),
    # predict: references and query images instead of a dataset
    Case("baseline.predict", "reference folder missing", ("--reference {base}/none", "does not exist"),
         flags={"--reference": "{base}/none"}),
    Case("baseline.predict", "reference folder empty", ("--reference {base}/empty_refs", "no image files"),
         empty_refs, flags={"--reference": "{base}/empty_refs"}),
    Case("baseline.predict", "all references zero-byte (k = 0 usable)", ("none of the 3 reference images",
         "{data}/a/train/good/000.png", "empty (0 bytes)"), refs_zero_byte),
    Case("baseline.predict", "query folder missing", ("--images {base}/none", "does not exist"),
         flags={"--images": "{base}/none"}),
    *_backbone_cases("baseline.predict"),
    *_output_cases("baseline.predict"),
    Case("baseline.predict", "output inside the reference folder", ("--out {data}/a/train/good/runs", "--reference"),
         out_inside_refs),
    Case("fdsl.predict", "checkpoint missing", ("{base}/none.pth", "does not exist"),
         flags={"--checkpoint": "{base}/none.pth"}),
    Case("fdsl.predict", "checkpoint from another backbone", ("{ckpt}", "vit-tiny-test", "efficientnet_lite0"),
         flags={"--backbone": "efficientnet_lite0", "--image-size": "64"}),
    Case("fdsl.predict", "checkpoint truncated", ("{ckpt}", "cannot read checkpoint"), ckpt_truncated),
    Case("fdsl.predict", "CLIP weights absent", ("CLIP weights 'openai' for ViT-B-32", "--pretrained"),
         flags={"--backbone": ABSENT_CLIP, "--pretrained": "openai"}),
    *_output_cases("fdsl.predict"),
    Case("pcsnet.predict", "unknown backbone", ("unknown backbone 'resnet9000'",), flags={"--backbone": "resnet9000"}),
    Case("pcsnet.predict", "the only query image truncated", ("none of the 1 images could be read",
         "{base}/queries/q.png", "truncated"), images_one_truncated, flags={"--images": "{base}/queries"}),
    Case("pcsnet.predict", "read-only output folder", ("{out}", "not writable"), env="read_only_out"),
    Case("trainAndTest.sh", "MVTEC_ROOT missing (subprocess)", ("{base}/no_such_dataset", "does not exist"),
         missing_root),
    # the real process of every torch CLI at least once (stderr at the file-descriptor level, warnings included)
    *[Case(cli, "meta.json missing (subprocess)", ("{root}/meta.json", "not found"), meta_missing, subprocess=True)
      for cli in ("fdsl.train", "fdsl.test", "main.py", "fsad")],
    *[Case(cli, "reference folder missing (subprocess)", ("--reference {base}/none", "does not exist"),
           flags={"--reference": "{base}/none"}, subprocess=True)
      for cli in ("baseline.predict", "fdsl.predict", "pcsnet.predict")],
    Case("fsad", "unknown method", ("unknown method 'nope'", "knn"), flags={"--method": "nope"}),
    Case("fsad", "truncated image", ("{root}/a/test/good/001.png", "truncated"), image_truncated),
]  # fmt: skip


# ------------------------------------------------------------------------------------------------ running


@dataclass
class Outcome:
    code: int
    stderr: str
    seconds: float
    work: Work
    changed: list[str]  # dataset files added, removed or modified by the run
    leftovers: list[str]  # output-tree entries added, removed or modified by the run

    @property
    def line(self) -> str:
        return self.stderr.strip()


class _FullDiskFile:
    """A file opened for writing on a full disk: every write raises ENOSPC (as write(2) does)."""

    def __init__(self, handle) -> None:
        self._handle = handle

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()

    def __getattr__(self, name):
        return getattr(self._handle, name)


@contextlib.contextmanager
def disk_full() -> Iterator[None]:
    """Every file opened for writing (os.fdopen, open, io.open, Path.write_*) fails its writes with ENOSPC."""
    real_fdopen, real_open = os.fdopen, io.open

    def writing(mode: str) -> bool:
        return any(c in mode for c in "wax+")

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        return _FullDiskFile(handle) if writing(mode) else handle

    def open_(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return _FullDiskFile(handle) if writing(mode) else handle

    with mock.patch("os.fdopen", fdopen), mock.patch("io.open", open_), mock.patch("builtins.open", open_):
        yield


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make `folder` read-only: chmod 555, or chattr +i as root; raise pytest.skip where neither is possible."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot make a folder read-only for root here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def argv_for(case: Case, work: Work) -> list[str]:
    values = {**CLIS[case.cli].base, **case.flags}
    argv = []
    for flag, value in values.items():
        if value is None or value is False:
            continue
        argv += [flag] if value is True else [flag, work.fmt(str(value))]
    return argv


def _run_subprocess(case: Case, work: Work) -> tuple[int, str]:
    cli = CLIS[case.cli]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if case.cli == "trainAndTest.sh":
        env.update(MVTEC_ROOT=str(work.root), VISA_ROOT=str(work.data), BACKBONE=TINY_VIT, EPOCHS_MVTEC="1",
                   EPOCHS_VISA="1", PYTHON=sys.executable)  # fmt: skip
        cmd = ["bash", str(REPO / cli.target), "tiny", "cpu", "1", "nan", "4", "2", "0.5", "0", "1"]
    elif cli.target.endswith(".py"):
        cmd = [sys.executable, str(REPO / cli.target), *argv_for(case, work)]
    else:
        cmd = [sys.executable, "-m", cli.target, *argv_for(case, work)]
    done = subprocess.run(cmd, cwd=work.base, env=env, capture_output=True, text=True, timeout=600)
    return done.returncode, done.stderr


@contextlib.contextmanager
def stderr_as_a_process(sink: list[str]) -> Iterator[None]:
    """Capture stderr as a real process would show it: Python writes, C-level writes to fd 2, and warnings under
    the default filters (pytest would otherwise record them silently)."""
    err = io.StringIO()
    with tempfile.TemporaryFile() as c_level:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(c_level.fileno(), 2)
        try:
            with contextlib.redirect_stderr(err), warnings.catch_warnings():
                warnings.simplefilter("default")
                yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            c_level.seek(0)
            sink.append(c_level.read().decode(errors="replace") + err.getvalue())


def _run_in_process(case: Case, work: Work) -> tuple[int, str]:
    target = CLIS[case.cli].target
    module = importlib.import_module(target.removesuffix(".py").replace("/", "."))
    sink: list[str] = []
    with contextlib.redirect_stdout(io.StringIO()), stderr_as_a_process(sink):
        if case.env == "disk_full":
            with disk_full():
                code = module.main(argv_for(case, work))
        else:
            code = module.main(argv_for(case, work))
    return code, sink[0]


def _digest(work: Work) -> dict[str, str]:
    """Every file of the dataset copy (meta.json included) and of a substitute root, with its sha256."""
    digest = tree_digest(work.data, exclude=())
    if work.root != work.data and work.root.exists():
        digest.update({f"<root>/{k}": v for k, v in tree_digest(work.root, exclude=()).items()})
    digest["<root exists>"] = str(work.root.exists())
    return digest


def _out_tree(out: Path) -> dict[str, str] | None:
    """The output tree: every file's sha256 and every folder ("<dir>"); None when the folder does not exist."""
    if not out.exists():
        return None
    tree = {p.relative_to(out).as_posix(): "<dir>" for p in out.rglob("*") if p.is_dir()}
    tree.update(tree_digest(out, exclude=()))
    return tree


def _out_changes(before: dict | None, after: dict | None) -> list[str]:
    if before is None or after is None:
        return [] if before == after else [f"output folder {'created' if before is None else 'removed'}"]
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def prefill_output(case: Case, work: Work) -> bool:
    """Half the cases (a fixed choice per case) start from an output folder holding an earlier run's files."""
    if case.env == "read_only_out" or zlib.crc32(case.id.encode()) % 2:
        return False
    if work.data in (work.out, *work.out.parents):
        return False  # an output folder inside the dataset: prefilling it would change the dataset
    (work.out / "classes").mkdir(parents=True, exist_ok=True)
    (work.out / "results.json").write_text('{"method": "an earlier run"}\n')
    (work.out / "classes" / "a.json").write_text('{"run": {}}\n')
    (work.out / "notes.txt").write_text("kept across failed runs\n")
    return True


def run_case(case: Case, base: Path, pristine: dict[str, Path], ckpt: Path) -> Outcome:
    """Copy the pristine dataset into `base`, break it, run the CLI, and compare the dataset before and after."""
    cli = CLIS[case.cli]
    work = Work(base, base / "data", ckpt)
    shutil.copytree(pristine[cli.dataset], work.data)
    if case.breaker is not None:
        case.breaker(work)
    prefill_output(case, work)
    use_subprocess = cli.subprocess_default if case.subprocess is None else case.subprocess
    use_subprocess = use_subprocess and case.env != "disk_full"  # the ENOSPC simulation patches this process
    guard: contextlib.AbstractContextManager = contextlib.nullcontext()
    if case.env == "read_only_out":
        guard = read_only(work.out)
    elif case.env == "read_only_data":
        guard = read_only(work.data)
    before = _digest(work)
    start = time.perf_counter()
    with guard:  # (a read-only output folder is created by the guard: it is the state to keep)
        out_before = _out_tree(work.out)
        code, stderr = (_run_subprocess if use_subprocess else _run_in_process)(case, work)
        seconds = time.perf_counter() - start
        out_after = _out_tree(work.out)
    after = _digest(work)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return Outcome(code, stderr, seconds, work, changed, _out_changes(out_before, out_after))


# ------------------------------------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_inputs")
    pristine = build_pristine(base)
    import open_clip  # noqa: F401  (imported once here, so the CLIP cases time the error, not the import)

    return pristine, build_checkpoint(base, pristine["mvtec"])


def _param(case: Case):
    marks = [pytest.mark.xfail(strict=True, reason=f"needs fix in {case.needs_fix}")] if case.needs_fix else []
    return pytest.param(case, id=case.id, marks=marks)


@pytest.mark.parametrize("case", [_param(case) for case in CASES])
def test_bad_input_gives_one_clear_line(case: Case, shared, tmp_path: Path) -> None:
    outcome = run_case(case, tmp_path, *shared)
    lines = outcome.line.splitlines()
    assert outcome.code == 2, f"exit {outcome.code}, stderr:\n{outcome.stderr[-3000:]}"
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome.stderr[-3000:]
    for expected in case.expect:
        assert outcome.work.fmt(expected) in lines[0], f"{outcome.work.fmt(expected)!r} not in {lines[0]!r}"
    assert outcome.changed == [], "the dataset folder changed"
    assert outcome.leftovers == [], "the output folder is not as it was before the run"
    if "CLIP" in case.problem:
        assert outcome.seconds < FAST_SECONDS


def test_every_cli_is_covered() -> None:
    assert set(CLIS) == {case.cli for case in CASES}
    assert len(CASES) >= 15 and len({case.id for case in CASES}) == len(CASES)
    real = {c.cli for c in CASES if (CLIS[c.cli].subprocess_default if c.subprocess is None else c.subprocess)}
    assert real == set(CLIS), f"no real-process case for {sorted(set(CLIS) - real)}"
    prefilled = [c for c in CASES if c.env != "read_only_out" and not zlib.crc32(c.id.encode()) % 2]
    assert 0.3 < len(prefilled) / len(CASES) < 0.7  # both starting states are exercised
