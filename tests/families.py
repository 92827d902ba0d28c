"""Twelve small architecture families (input 1x3x32x32, 10 classes, random init) used as test fixtures.

`FAMILIES[name]()` builds a fresh network; `randomize_batchnorm(net)` gives every BatchNorm non-trivial statistics
and affine parameters, so that tests on an untrained network still see BN shifts (BN(0) != 0).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

FAMILIES: dict[str, Callable[[], nn.Module]] = {}
INPUT_SHAPE = (1, 3, 32, 32)
NUM_CLASSES = 10


def register(name: str):
    def deco(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        FAMILIES[name] = fn
        return fn
    return deco


def randomize_batchnorm(net: nn.Module, seed: int = 0) -> nn.Module:
    """Random running stats and affine parameters in every BatchNorm (in place); returns `net`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
    return net


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU):
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def classifier(cin: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, NUM_CLASSES))


# ---------------------------------------------------------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(cin, mid, 1)
        self.conv2 = conv_bn(mid, mid, 3, stride)
        self.conv3 = conv_bn(mid, cout, 1, act=None)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = conv_bn(cin, cout, 1, stride, act=None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


@register("resnet_basic")
def resnet_basic() -> nn.Module:
    return nn.Sequential(conv_bn(3, 16), BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 32, 1),
                         BasicBlock(32, 64, 2), classifier(64))


@register("resnet_bottleneck")
def resnet_bottleneck() -> nn.Module:
    return nn.Sequential(conv_bn(3, 16), Bottleneck(16, 8, 32, 1), Bottleneck(32, 8, 32, 1),
                         Bottleneck(32, 16, 64, 2), Bottleneck(64, 16, 64, 1), classifier(64))


# ------------------------------------------------------------------------------------------------------------- MobileNet
class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6), conv_bn(hidden, cout, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


@register("mobilenet_v2")
def mobilenet_v2() -> nn.Module:
    return nn.Sequential(
        conv_bn(3, 16, stride=2, act=nn.ReLU6), InvertedResidual(16, 16, 1, 1), InvertedResidual(16, 24, 2, 4),
        InvertedResidual(24, 24, 1, 4), InvertedResidual(24, 32, 2, 4), InvertedResidual(32, 32, 1, 4),
        conv_bn(32, 128, 1, act=nn.ReLU6), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
        nn.Linear(128, NUM_CLASSES))


class SqueezeExcite(nn.Module):
    """Global pool -> 1x1 reduce -> act -> 1x1 expand -> gate -> multiply the feature map."""

    def __init__(self, channels: int, reduced: int, act: type[nn.Module], gate: type[nn.Module]):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = act()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = gate()

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class Bneck(nn.Module):
    """MobileNetV3 block: expand 1x1, depthwise, optional SE (Hardsigmoid), project 1x1."""

    def __init__(self, cin: int, hidden: int, cout: int, k: int, stride: int, se: bool, act: type[nn.Module]):
        super().__init__()
        self.expand = conv_bn(cin, hidden, 1, act=act)
        self.dw = conv_bn(hidden, hidden, k, stride, groups=hidden, act=act)
        self.se = SqueezeExcite(hidden, max(8, hidden // 4), nn.ReLU, nn.Hardsigmoid) if se else nn.Identity()
        self.project = conv_bn(hidden, cout, 1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.project(self.se(self.dw(self.expand(x))))
        return x + out if self.residual else out


@register("mobilenet_v3")
def mobilenet_v3() -> nn.Module:
    return nn.Sequential(
        conv_bn(3, 16, stride=2, act=nn.Hardswish), Bneck(16, 32, 16, 3, 1, True, nn.ReLU),
        Bneck(16, 48, 24, 3, 2, False, nn.ReLU), Bneck(24, 72, 24, 5, 1, True, nn.Hardswish),
        Bneck(24, 72, 40, 5, 2, True, nn.Hardswish), conv_bn(40, 96, 1, act=nn.Hardswish), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(96, 128), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(128, NUM_CLASSES))


# ------------------------------------------------------------------------------------------------------------ ShuffleNet
def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride = stride
        branch = cout // 2
        if stride > 1:
            self.branch1 = nn.Sequential(conv_bn(cin, cin, 3, stride, groups=cin, act=None), conv_bn(cin, branch, 1))
            b2_in = cin
        else:
            self.branch1 = nn.Identity()
            b2_in = branch
        self.branch2 = nn.Sequential(conv_bn(b2_in, branch, 1), conv_bn(branch, branch, 3, stride, groups=branch, act=None),
                                     conv_bn(branch, branch, 1))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


@register("shufflenet_v2")
def shufflenet_v2() -> nn.Module:
    return nn.Sequential(
        conv_bn(3, 24, stride=2), nn.MaxPool2d(3, 2, 1), ShuffleUnit(24, 48, 2), ShuffleUnit(48, 48, 1),
        ShuffleUnit(48, 48, 1), ShuffleUnit(48, 96, 2), ShuffleUnit(96, 96, 1), conv_bn(96, 128, 1), classifier(128))


# ---------------------------------------------------------------------------------------------------------- EfficientNet
class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int):
        super().__init__()
        hidden = cin * expand
        self.expand = conv_bn(cin, hidden, 1, act=nn.SiLU) if expand != 1 else nn.Identity()
        self.dw = conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU)
        self.se = SqueezeExcite(hidden, max(4, cin // 4), nn.SiLU, nn.Sigmoid)
        self.project = conv_bn(hidden, cout, 1, act=None)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.project(self.se(self.dw(self.expand(x))))
        return out + x if self.residual else out


class EfficientNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16, stride=2, act=nn.SiLU)
        self.blocks = nn.Sequential(MBConv(16, 16, 1, 3, 1), MBConv(16, 24, 4, 3, 2), MBConv(24, 24, 4, 3, 1),
                                    MBConv(24, 40, 4, 5, 2))
        self.head = conv_bn(40, 128, 1, act=nn.SiLU)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(128, NUM_CLASSES)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.dropout(x.mean((2, 3))))  # global pool as a mean over the spatial dims


@register("efficientnet")
def efficientnet() -> nn.Module:
    return EfficientNet()


# -------------------------------------------------------------------------------------------------------------- DenseNet
class DenseLayer(nn.Module):
    """Post-activation dense layer (conv-BN-ReLU), so the concatenated features are exactly zero where masked."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, 4 * growth, 1), conv_bn(4 * growth, growth, 3))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class DenseNet(nn.Module):
    def __init__(self, growth: int = 8):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.block1 = nn.Sequential(*[DenseLayer(16 + i * growth, growth) for i in range(3)])
        self.transition = nn.Sequential(conv_bn(16 + 3 * growth, 20, 1), nn.AvgPool2d(2))
        self.block2 = nn.Sequential(*[DenseLayer(20 + i * growth, growth) for i in range(3)])
        self.head = classifier(20 + 3 * growth)

    def forward(self, x):
        return self.head(self.block2(self.transition(self.block1(self.stem(x)))))


@register("densenet")
def densenet() -> nn.Module:
    return DenseNet()


# ---------------------------------------------------------------------------------------------------------------- RegNet
class XBlock(nn.Module):
    """RegNetX block: 1x1, grouped 3x3 (group width 8), 1x1, with a residual."""

    def __init__(self, cin: int, cout: int, stride: int, group_width: int = 8):
        super().__init__()
        self.a = conv_bn(cin, cout, 1)
        self.b = conv_bn(cout, cout, 3, stride, groups=cout // group_width)
        self.c = conv_bn(cout, cout, 1, act=None)
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU()

    def forward(self, x):
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return self.relu(self.c(self.b(self.a(x))) + shortcut)


@register("regnet")
def regnet() -> nn.Module:
    return nn.Sequential(conv_bn(3, 16, stride=2), XBlock(16, 24, 1), XBlock(24, 24, 1), XBlock(24, 48, 2),
                         XBlock(48, 48, 1), classifier(48))


# ------------------------------------------------------------------------------------------------------------- Inception
class InceptionModule(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int):
        super().__init__()
        self.b1 = conv_bn(cin, c1, 1)
        self.b2 = nn.Sequential(conv_bn(cin, c3r, 1), conv_bn(c3r, c3, 3))
        self.b3 = nn.Sequential(conv_bn(cin, c5r, 1), conv_bn(c5r, c5, 5))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv_bn(cin, cp, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


@register("inception")
def inception() -> nn.Module:
    return nn.Sequential(conv_bn(3, 32, stride=2), InceptionModule(32, 16, 12, 16, 4, 8, 8), nn.MaxPool2d(2),
                         InceptionModule(48, 24, 16, 24, 8, 12, 12), classifier(72))


# ------------------------------------------------------------------------------------------------------------ SqueezeNet
class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Conv2d(cin, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.relu(self.squeeze(x))
        return torch.cat([self.relu(self.expand1x1(x)), self.relu(self.expand3x3(x))], 1)


@register("squeezenet")
def squeezenet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(inplace=True), nn.MaxPool2d(2), Fire(32, 8, 16), Fire(32, 8, 16),
        nn.MaxPool2d(2), Fire(32, 12, 24), nn.Dropout(0.5), nn.Conv2d(48, NUM_CLASSES, 1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())


# ------------------------------------------------------------------------------------------------------------------- VGG
@register("vgg")
def vgg() -> nn.Module:
    """Plain conv stacks and a two-layer classifier on the flattened 64x4x4 map."""
    return nn.Sequential(
        conv_bn(3, 16), conv_bn(16, 16), nn.MaxPool2d(2), conv_bn(16, 32), conv_bn(32, 32), nn.MaxPool2d(2),
        conv_bn(32, 64), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 4 * 4, 64), nn.ReLU(inplace=True),
        nn.Dropout(0.5), nn.Linear(64, NUM_CLASSES))


# ------------------------------------------------------------------------------------------------------ custom (no fx)
class DataDependentGate(nn.Module):
    """Python control flow on tensor values: torch.fx cannot trace this forward()."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0:
            return torch.relu(self.conv(x))
        return x


class CustomUnprunable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.features = conv_bn(16, 24, stride=2)
        self.gate = DataDependentGate(24)
        self.tail = nn.Sequential(conv_bn(24, 32, stride=2), conv_bn(32, 32))
        self.head = classifier(32)

    def forward(self, x):
        return self.head(self.tail(self.gate(self.features(self.stem(x)))))


@register("custom_unprunable")
def custom_unprunable() -> nn.Module:
    return CustomUnprunable()
