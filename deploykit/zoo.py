"""Built-in example networks, written here because torchvision has no CPU build on our machines.

`build(name, ...)` returns an eval-mode `nn.Module`; `export_onnx` writes it as ONNX.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import DeployKitError

_ZOO: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    def deco(fn):
        _ZOO[name] = fn
        return fn
    return deco


def list_models() -> list[str]:
    return sorted(_ZOO)


def build(name: str, num_classes: int = 1000, width: float = 1.0) -> nn.Module:
    if name not in _ZOO:
        raise DeployKitError(f"unknown built-in model {name!r}: choose one of {', '.join(list_models())}")
    torch.manual_seed(0)
    return _ZOO[name](num_classes=num_classes, width=width).eval()


def make_divisible(value: float, divisor: int = 8) -> int:
    """MobileNet's channel rounding: nearest multiple of `divisor`, never more than 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _ch(c: float, divisor: int = 8) -> int:
    return max(divisor, int(c + divisor / 2) // divisor * divisor)


def conv_bn_act(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU6):
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int, k: int = 3):
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers = [] if expand == 1 else [conv_bn_act(cin, hidden, 1)]
        layers += [conv_bn_act(hidden, hidden, k, stride, groups=hidden), conv_bn_act(hidden, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


@register_model("mobilenet_v2")
def mobilenet_v2(num_classes: int = 1000, width: float = 1.0) -> nn.Module:
    # (expansion, channels, repeats, stride) as in the MobileNetV2 paper
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    cin = _ch(32 * width)
    layers: list[nn.Module] = [conv_bn_act(3, cin, 3, 2)]
    for t, c, n, s in cfg:
        cout = _ch(c * width)
        for i in range(n):
            layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
            cin = cout
    last = _ch(1280 * max(1.0, width))
    layers.append(conv_bn_act(cin, last, 1))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(last, num_classes))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn_act(cin, cout, 3, stride, act=nn.ReLU), conv_bn_act(cout, cout, 3, act=None))
        self.short = nn.Identity() if stride == 1 and cin == cout else conv_bn_act(cin, cout, 1, stride, act=None)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.short(x))


@register_model("resnet18")
def resnet18(num_classes: int = 1000, width: float = 1.0) -> nn.Module:
    widths = [_ch(c * width) for c in (64, 128, 256, 512)]
    layers: list[nn.Module] = [conv_bn_act(3, widths[0], 7, 2, act=nn.ReLU), nn.MaxPool2d(3, 2, 1)]
    cin = widths[0]
    for i, c in enumerate(widths):
        for j in range(2):
            layers.append(BasicBlock(cin, c, 2 if (i > 0 and j == 0) else 1))
            cin = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def export_onnx(model: nn.Module, example_shape: tuple[int, ...], path: str | os.PathLike, opset: int = 17) -> Path:
    """Export with the TorchScript exporter (fast, folds BatchNorm); written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad():
            torch.onnx.export(model.eval(), (torch.randn(*example_shape),), tmp, opset_version=opset,
                              input_names=["input"], output_names=["output"], dynamo=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
