"""Wide-ResNet-50-2 as PCSNet's backbone wrapper exports it (random weights, 64 px, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision

from common.backbones import WideResNetBackbone, build_backbone
from common.utils import UserError


def _random_wrn() -> torch.nn.Module:
    torch.manual_seed(3)
    model = torchvision.models.wide_resnet50_2(weights=None).eval()
    with torch.no_grad():  # non-trivial BN statistics, so the conv-BN folding is exercised too
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.bias.uniform_(-0.3, 0.3)
    return model


def _torchvision_preactivations(model: torch.nn.Module, x: torch.Tensor) -> tuple[dict, dict]:
    """Reference from the unmodified torchvision forward: each layer's output, and the input of the last ReLU
    call of its last block (the residual sum), captured by a hook."""
    pre, outs, handles = {}, {}, []
    for level in (1, 2, 3):
        layer = getattr(model, f"layer{level}")

        def grab(_module, inputs, level=level):
            pre[level] = inputs[0].detach().clone()  # the last call wins: relu(out + identity)

        handles.append(layer[-1].relu.register_forward_pre_hook(grab))
        handles.append(layer.register_forward_hook(lambda _m, _i, out, level=level: outs.__setitem__(level, out)))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return pre, outs


def test_leaky_relu_export_matches_the_preactivation_of_torchvision():
    model = _random_wrn()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    pre, outs = _torchvision_preactivations(reference, x)
    leaky = WideResNetBackbone(copy.deepcopy(model), (1, 2, 3), export="leaky_relu").freeze()
    plain = WideResNetBackbone(model, (1, 2, 3), export="relu").freeze()
    with torch.no_grad():
        got_leaky, got_plain = leaky(x).features, plain(x).features
    for i, level in enumerate((1, 2, 3)):
        assert (pre[level] < 0).float().mean() > 0.05  # negative pre-activations exist: the export differs
        torch.testing.assert_close(got_leaky[i], F.leaky_relu(pre[level], 0.01), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_plain[i], outs[level], rtol=1e-4, atol=1e-4)
        assert got_leaky[i].min() < 0 and got_plain[i].min() >= 0


def test_pretrained_random_is_seeded_and_loud(capsys):
    a = build_backbone("wide_resnet50_2", pretrained="random", layers=(1, 2, 3), wrn_export="leaky_relu")
    assert "RANDOM weights" in capsys.readouterr().err
    b = build_backbone("wide_resnet50_2", pretrained="random", layers=(1, 2, 3), wrn_export="leaky_relu")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fa, fb = a(x).features, b(x).features
    assert [f.shape[1:] for f in fa] == [(256, 16, 16), (512, 8, 8), (1024, 4, 4)]
    assert all(torch.equal(u, v) for u, v in zip(fa, fb))


def test_leaky_export_is_refused_for_other_backbones():
    with pytest.raises(UserError, match="wide_resnet50_2"):
        build_backbone("efficientnet_lite0", wrn_export="leaky_relu")
