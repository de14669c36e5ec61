"""FDSL checkpoints: the head's state dict plus the resolved training config and the backbone's level widths."""

from __future__ import annotations

from pathlib import Path

import torch

from common.backbones import CNN_NAMES, TINY_VIT, Backbone
from common.utils import UserError, atomic_torch_save
from fdsl.model import FDSLHead

FORMAT = "fdsl-checkpoint-v1"


def resolve_pretrained(backbone: str, pretrained: str | None) -> str | None:
    """The weights to load: open_clip models default to the `openai` tag; CNNs and the tiny test ViT to None."""
    if pretrained is None and backbone not in CNN_NAMES and backbone != TINY_VIT:
        return "openai"
    return pretrained


def save_checkpoint(path: str | Path, head: FDSLHead, backbone: Backbone, config: dict, epoch: int) -> Path:
    """Write {format, head, config, backbone, channels, strides, use_nam, epoch} atomically."""
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
    return atomic_torch_save(state, path)


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by `save_checkpoint`; UserError if missing, unreadable or not FDSL's."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/corrupt files; all mean "unreadable"
        raise UserError(f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from exc
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
