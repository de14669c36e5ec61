"""FDSL checkpoints: the head's state dict plus the resolved training config and the backbone's level widths.

Training checkpoints also carry a `resume` entry (optimiser state, every rank's RNG states, world size) that
`python -m fdsl.train --resume` continues from. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from common.backbones import CNN_NAMES, TINY_VIT, Backbone
from common.utils import UserError, atomic_torch_save
from fdsl.model import FDSLHead

FORMAT = "fdsl-checkpoint-v1"
WEIGHTS = Path(__file__).resolve().parent / "weights"
# The head that fdsl.test and fdsl.predict use without --checkpoint: trained on the dev benchmark's whole auxiliary
# corpus (devbench_data/folds/all: 10 sources, the training anomaly kinds of common.pseudo_anomaly and NSA, none of
# the test defect families) with efficientnet_lite0 at 256 px; the command that rebuilds it is in the README.
SHIPPED_BACKBONE = "efficientnet_lite0"
SHIPPED_HEAD = WEIGHTS / "devbench_efficientnet_lite0.pth"


def default_checkpoint(checkpoint: str | None, backbone: str | None) -> str:
    """The checkpoint to use: the given one, else the shipped head when the backbone is efficientnet_lite0 (or not
    given). UserError otherwise (a head only fits the backbone it was trained on)."""
    if checkpoint:
        return str(checkpoint)
    if backbone in (None, SHIPPED_BACKBONE) and SHIPPED_HEAD.is_file():
        return str(SHIPPED_HEAD)
    raise UserError(
        f"FDSL needs a checkpoint for --backbone {backbone}: --checkpoint FILE written by python -m fdsl.train (the "
        f"shipped head {SHIPPED_HEAD.name} only fits --backbone {SHIPPED_BACKBONE})"
    )


def strip_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Copy a training checkpoint without its `resume` entry (optimiser and RNG states): what a head ships as."""
    state = load_checkpoint(src)
    state.pop("resume", None)
    return atomic_torch_save(state, dst)


def resolve_pretrained(backbone: str, pretrained: str | None) -> str | None:
    """The weights to load: open_clip models default to the `openai` tag; CNNs and the tiny test ViT to None."""
    if pretrained is None and backbone not in CNN_NAMES and backbone != TINY_VIT:
        return "openai"
    return pretrained


# Options that may change between a run and its resumption: they do not change what is trained.
RESUME_FREE_OPTIONS = (
    "resume", "epochs", "progress", "device", "num_workers", "cache_mb", "save_dir", "precision_used", "tf32_used"
)


def save_checkpoint(
    path: str | Path, head: FDSLHead, backbone: Backbone, config: dict, epoch: int, resume: dict | None = None
) -> Path:
    """Write {format, head, config, backbone, channels, strides, use_nam, epoch[, resume]} atomically."""
    state = {
        "format": FORMAT,
        "head": {k: v.detach().cpu() for k, v in head.state_dict().items()},
        "config": config,
        "backbone": backbone.name,
        "channels": [info.channels for info in backbone.feature_info],
        "strides": [info.stride for info in backbone.feature_info],
        "use_nam": head.use_nam,
        "epoch": int(epoch),
    }
    if resume is not None:
        state["resume"] = resume
    return atomic_torch_save(state, path)


def latest_checkpoint(save_dir: str | Path) -> tuple[Path, dict] | None:
    """The checkpoint with the highest epoch among SAVE_DIR/last.pth and SAVE_DIR/epoch_<E>.pth, loaded.

    Every file there is complete (written under a temporary name, then renamed), so the newest one is a valid
    resumption point. Returns None when the folder has no checkpoint.
    """
    save_dir = Path(save_dir)
    epochs = [int(m.group(1)) for f in save_dir.glob("epoch_*.pth") if (m := re.fullmatch(r"epoch_(\d+)\.pth", f.name))]
    candidates = [save_dir / f"epoch_{max(epochs)}.pth"] if epochs else []
    if (save_dir / "last.pth").is_file():
        candidates.append(save_dir / "last.pth")
    loaded = [(path, load_checkpoint(path)) for path in candidates]
    return max(loaded, key=lambda pair: pair[1]["epoch"], default=None)


def remove_stale_temporaries(save_dir: str | Path) -> list[Path]:
    """Delete temporary files left by a process killed while writing a checkpoint or config.json (our names only)."""
    pattern = re.compile(r"\.(last\.pth|epoch_\d+\.pth|config\.json)\..+\.tmp")
    stale = [f for f in Path(save_dir).glob(".*.tmp") if pattern.fullmatch(f.name)]
    for f in stale:
        f.unlink(missing_ok=True)
    return stale


# Options added after checkpoints were first written: a checkpoint without them ran with these values.
LATER_OPTION_DEFAULTS = {"precision": "fp32", "tf32": 0, "protocol": "ours"}


def check_resume_config(path: str | Path, saved: dict, current: dict) -> None:
    """UserError (one line naming the differing options) if `saved` was trained with options other than `current`."""
    saved = {**LATER_OPTION_DEFAULTS, **saved}

    def norm(key: str, value):
        return str(Path(value).resolve()) if key == "dataset_root" and value else value

    keys = [k for k in sorted(set(saved) | set(current)) if k not in RESUME_FREE_OPTIONS]
    diffs = [
        f"{k} {saved.get(k)!r} vs now {current.get(k)!r}"
        for k in keys
        if norm(k, saved.get(k)) != norm(k, current.get(k))
    ]
    if diffs:
        raise UserError(
            f"--resume: {path} was trained with different options ({'; '.join(diffs)}); "
            "use the same options or another --save-dir"
        )


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by `save_checkpoint`; UserError if missing, unreadable or not FDSL's."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/corrupt files; all mean "unreadable"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "zip archive" in reason or "central directory" in reason:  # torch's miniz text for a cut-off file
            reason = "the file is truncated or corrupt"
        raise UserError(
            f"cannot read checkpoint {path}: {reason}; copy it again or re-run python -m fdsl.train"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"checkpoint {path} is not an FDSL checkpoint (written by python -m fdsl.train)")
    return state


def build_head(state: dict, backbone: Backbone, path: str | Path = "checkpoint") -> FDSLHead:
    """Rebuild the trained head, after checking the backbone produces the levels it was trained on."""
    channels = [info.channels for info in backbone.feature_info]
    if backbone.name != state["backbone"] or channels != state["channels"]:
        raise UserError(
            f"{path} was trained on {state['backbone']} with feature widths {state['channels']}, but the test "
            f"backbone is {backbone.name} with widths {channels}; use the same --backbone and levels"
        )
    head = FDSLHead(state["channels"], use_nam=bool(state["use_nam"]))
    head.load_state_dict(state["head"], strict=True)
    return head.eval()


def main(argv: list[str] | None = None) -> int:
    """`python -m fdsl.checkpoint --strip IN OUT`: write IN without its resume state to OUT (e.g. to ship a head)."""
    import argparse

    from common.utils import cli_entry

    p = argparse.ArgumentParser(prog="python -m fdsl.checkpoint", description=main.__doc__)
    p.add_argument("--strip", nargs=2, metavar=("IN", "OUT"), required=True)

    @cli_entry
    def run(args: list[str] | None) -> int:
        src, dst = p.parse_args(args).strip
        out = strip_checkpoint(src, dst)
        print(f"wrote {out} ({Path(out).stat().st_size / 1e6:.2f} MB)")
        return 0

    return run(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
