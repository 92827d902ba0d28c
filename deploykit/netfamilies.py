"""Hand-written CNN families (the held-out evaluation set) and a seeded random-network generator.

Both are built only from the layer patterns the latency predictor's kernel vocabulary covers:
conv (k in 1/3/5/7, stride 1/2; plain, depthwise or grouped) + BatchNorm + optional activation,
squeeze-and-excitation, residual add (+ReLU), channel concat of 2-4 maps, channel shuffle and split,
max/avg pooling (k 2/3) and a pooled linear head. Export with `zoo.export_onnx`, which folds BatchNorm.

    build_family("mobilenet_v3", width=0.75)       # an eval-mode nn.Module
    eval_specs()                                    # the fixed held-out set: family x width x resolution
    random_network(seed=7, resolution=160)          # same seed -> same architecture and weights
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import DeployKitError, InternalError
from .zoo import make_divisible

ACTS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "silu": nn.SiLU,
                                    "sigmoid": nn.Sigmoid}
GATES: dict[str, type[nn.Module]] = {"hardsigmoid": nn.Hardsigmoid, "sigmoid": nn.Sigmoid}
MIN_RESOLUTION = 32  # total stride is at most 32: every feature map keeps at least one pixel


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks: each one is a pattern of the kernel vocabulary.


class ConvBNAct(nn.Sequential):
    """Conv (padding k//2, no bias) -> BatchNorm -> optional activation."""

    def __init__(self, cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act: str | None = "relu"):
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(ACTS[act]())
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """Pool -> 1x1 conv (bias) -> act -> 1x1 conv (bias) -> gate -> x * gate."""

    def __init__(self, c: int, mid: int, act: str = "relu", gate: str = "hardsigmoid"):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(c, mid, 1)
        self.act = ACTS[act]()
        self.expand = nn.Conv2d(mid, c, 1)
        self.gate = GATES[gate]()

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class Residual(nn.Module):
    """act(body(x) + shortcut(x)); the shortcut is the identity when None."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None, act: str | None = "relu"):
        super().__init__()
        self.body = body
        self.shortcut = shortcut
        self.act = ACTS[act]() if act else None

    def forward(self, x):
        y = self.body(x) + (x if self.shortcut is None else self.shortcut(x))
        return y if self.act is None else self.act(y)


def _shortcut(cin: int, cout: int, s: int) -> nn.Module | None:
    return None if s == 1 and cin == cout else ConvBNAct(cin, cout, 1, s, act=None)


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 and EfficientNet MBConv: [1x1 expand] -> depthwise k -> [SE] -> 1x1 project (+x)."""

    def __init__(self, cin: int, hidden: int, cout: int, k: int = 3, s: int = 1, act: str = "relu6", se_mid: int = 0,
                 se_act: str = "relu", se_gate: str = "hardsigmoid"):
        super().__init__()
        layers: list[nn.Module] = [] if hidden == cin else [ConvBNAct(cin, hidden, 1, act=act)]
        layers.append(ConvBNAct(hidden, hidden, k, s, groups=hidden, act=act))
        if se_mid:
            layers.append(SqueezeExcite(hidden, se_mid, se_act, se_gate))
        layers.append(ConvBNAct(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


def basic_block(cin: int, cout: int, s: int = 1, k: int = 3, act: str = "relu") -> Residual:
    """ResNet-18/34 block: two k x k convs, the first strided; ReLU after the add whatever `act` is."""
    body = nn.Sequential(ConvBNAct(cin, cout, k, s, act=act), ConvBNAct(cout, cout, k, act=None))
    return Residual(body, _shortcut(cin, cout, s), "relu")


def bottleneck_block(cin: int, mid: int, cout: int, s: int = 1, groups: int = 1, se_mid: int = 0, act: str = "relu",
                     se_gate: str = "sigmoid") -> Residual:
    """ResNet-50 (groups 1) / RegNet / ResNeXt (grouped) bottleneck; the 3x3 carries the stride (v1.5), ReLU after
    the add."""
    layers: list[nn.Module] = [ConvBNAct(cin, mid, 1, act=act), ConvBNAct(mid, mid, 3, s, groups=groups, act=act)]
    if se_mid:
        layers.append(SqueezeExcite(mid, se_mid, "relu", se_gate))
    layers.append(ConvBNAct(mid, cout, 1, act=None))
    return Residual(nn.Sequential(*layers), _shortcut(cin, cout, s), "relu")


class Fire(nn.Module):
    """SqueezeNet fire module: 1x1 squeeze, then 1x1 and 3x3 expands concatenated (+x when `bypass`)."""

    def __init__(self, cin: int, squeeze: int, e1: int, e3: int, act: str = "relu", bypass: bool = False):
        super().__init__()
        self.squeeze = ConvBNAct(cin, squeeze, 1, act=act)
        self.expand1 = ConvBNAct(squeeze, e1, 1, act=act)
        self.expand3 = ConvBNAct(squeeze, e3, 3, act=act)
        self.bypass = bypass and cin == e1 + e3

    def forward(self, x):
        s = self.squeeze(x)
        y = torch.cat([self.expand1(s), self.expand3(s)], 1)
        return x + y if self.bypass else y


class ChannelShuffle(nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleV2Unit(nn.Module):
    """ShuffleNetV2 unit: split in two (stride 1, cin == cout) or two branches (otherwise), concat, shuffle 2."""

    def __init__(self, cin: int, cout: int, s: int = 1):
        super().__init__()
        self.half = half = cout // 2
        self.split = s == 1 and cin == cout
        self.branch1 = None if self.split else nn.Sequential(ConvBNAct(cin, cin, 3, s, groups=cin, act=None),
                                                             ConvBNAct(cin, half, 1))
        b_in = half if self.split else cin
        self.branch2 = nn.Sequential(ConvBNAct(b_in, half, 1), ConvBNAct(half, half, 3, s, groups=half, act=None),
                                     ConvBNAct(half, half, 1))
        self.shuffle = ChannelShuffle(2)

    def forward(self, x):
        if self.split:
            # a static split size exports as one Split; x.chunk(2, 1) exports as Shape/Gather/Div/Slice arithmetic
            a, b = x.split(self.half, dim=1)
            y = torch.cat([a, self.branch2(b)], 1)
        else:
            y = torch.cat([self.branch1(x), self.branch2(x)], 1)
        return self.shuffle(y)


class ShuffleV1Unit(nn.Module):
    """ShuffleNetV1 unit: grouped 1x1 -> shuffle g -> depthwise 3x3 -> grouped 1x1, then ReLU(x + y) or, when
    `concat`, cat([x or avgpool(x), ReLU(y)]) (the stride-2 form; the branch then makes cout - cin channels). The
    paper's ReLU after the concat moves onto the branch: a standalone activation is not in the kernel vocabulary."""

    def __init__(self, cin: int, mid: int, cout: int, s: int, groups: int, concat: bool):
        super().__init__()
        out_b = cout - cin if concat else cout
        g1 = groups if cin % groups == 0 and mid % groups == 0 and groups < cin else 1
        g3 = groups if out_b % groups == 0 and mid % groups == 0 and groups < mid else 1
        self.conv1 = ConvBNAct(cin, mid, 1, groups=g1, act="relu")
        self.shuffle = ChannelShuffle(g1) if g1 > 1 else nn.Identity()
        self.dw = ConvBNAct(mid, mid, 3, s, groups=mid, act=None)
        self.conv3 = ConvBNAct(mid, out_b, 1, groups=g3, act="relu" if concat else None)
        self.concat = concat
        self.pool = nn.AvgPool2d(3, 2, 1) if concat and s == 2 else nn.Identity()
        self.relu = None if concat else nn.ReLU()

    def forward(self, x):
        y = self.conv3(self.dw(self.shuffle(self.conv1(x))))
        return torch.cat([self.pool(x), y], 1) if self.concat else self.relu(x + y)


class DenseLayer(nn.Module):
    """DenseNet layer, post-activation: [1x1 bottleneck] -> 3x3 growth; returns cat([x, new])."""

    def __init__(self, cin: int, growth: int, bottleneck: int = 0, act: str = "relu"):
        super().__init__()
        layers = [ConvBNAct(cin, bottleneck, 1, act=act), ConvBNAct(bottleneck, growth, 3, act=act)] if bottleneck \
            else [ConvBNAct(cin, growth, 3, act=act)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


class Inception(nn.Module):
    """GoogLeNet module: up to four branches (1x1 | 1x1 -> 3x3 | 1x1 -> k5 | pool -> 1x1 proj) concatenated.

    A zero width drops a branch; a zero reduce width makes the 3x3 / k5 branch a single conv."""

    def __init__(self, cin: int, b1: int, b3r: int, b3: int, b5r: int, b5: int, pp: int, k5: int = 5,
                 pool: str = "max", act: str = "relu"):
        super().__init__()

        def reduced(r: int, c: int, k: int) -> nn.Module:
            return nn.Sequential(ConvBNAct(cin, r, 1, act=act), ConvBNAct(r, c, k, act=act)) if r else ConvBNAct(cin, c, k, act=act)

        branches: list[nn.Module] = []
        if b1:
            branches.append(ConvBNAct(cin, b1, 1, act=act))
        if b3:
            branches.append(reduced(b3r, b3, 3))
        if b5:
            branches.append(reduced(b5r, b5, k5))
        if pp:
            branches.append(nn.Sequential(nn.MaxPool2d(3, 1, 1) if pool == "max" else nn.AvgPool2d(3, 1, 1),
                                          ConvBNAct(cin, pp, 1, act=act)))
        if not 2 <= len(branches) <= 4:
            raise ValueError(f"an inception module needs 2 to 4 branches, got {len(branches)}")
        self.branches = nn.ModuleList(branches)
        self.cout = b1 + b3 + b5 + pp

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], 1)


def head(cin: int, num_classes: int, kind: str = "linear", hidden: int = 0, act: str = "hardswish") -> list[nn.Module]:
    """Pool -> flatten -> linear; "conv": pool -> 1x1 conv + hardswish -> linear (MobileNetV3 paper);
    "mlp": pool -> linear -> act -> linear (MobileNetV3 in torchvision)."""
    if kind == "linear":
        return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    if kind == "conv":
        return [nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, hidden, 1), nn.Hardswish(), nn.Flatten(), nn.Linear(hidden, num_classes)]
    if kind == "mlp":
        return [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, hidden), ACTS[act](), nn.Linear(hidden, num_classes)]
    raise ValueError(f"unknown head kind {kind!r}")


def _net(stem: Sequence[nn.Module], stages: Sequence[Sequence[nn.Module]], head_layers: Sequence[nn.Module]) -> nn.Sequential:
    parts: list[tuple[str, nn.Module]] = [("stem", nn.Sequential(*stem))]
    parts += [(f"stage{i + 1}", nn.Sequential(*blocks)) for i, blocks in enumerate(stages)]
    parts.append(("head", nn.Sequential(*head_layers)))
    return nn.Sequential(OrderedDict(parts))


def _init_weights(model: nn.Module) -> nn.Module:
    """He (fan-out) convs and small linears as in torchvision, keeping activations in range; BatchNorm statistics
    and biases drawn near identity / zero rather than exactly, so no two folded tensors are equal (the exporter
    would deduplicate equal initialisers into Identity nodes)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.8, 1.2)
            nn.init.normal_(m.bias, 0, 0.05)
            nn.init.normal_(m.running_mean, 0, 0.05)
            nn.init.uniform_(m.running_var, 0.8, 1.2)
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            nn.init.normal_(m.bias, 0, 0.01)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Families, faithful to the papers' layouts; `width` scales every channel count (multiples of 8).

FAMILIES: dict[str, Callable[..., nn.Module]] = {}


def register_family(name: str):
    def deco(fn):
        FAMILIES[name] = fn
        return fn
    return deco


def list_families() -> list[str]:
    return list(FAMILIES)


def build_family(name: str, width: float = 1.0, num_classes: int = 1000) -> nn.Module:
    """An eval-mode network of family `name`, deterministic weights."""
    if name not in FAMILIES:
        raise DeployKitError(f"unknown network family {name!r}: choose one of {', '.join(FAMILIES)}")
    if not width > 0:
        raise DeployKitError(f"width must be positive, got {width}")
    torch.manual_seed(0)
    return _init_weights(FAMILIES[name](width=width, num_classes=num_classes)).eval()


@register_family("resnet_basic")
def resnet_basic(width: float = 1.0, num_classes: int = 1000) -> nn.Module:
    """ResNet-34: basic blocks (3, 4, 6, 3), 7x7 stem + max pool."""
    widths = [make_divisible(c * width) for c in (64, 128, 256, 512)]
    stem = [ConvBNAct(3, widths[0], 7, 2), nn.MaxPool2d(3, 2, 1)]
    stages, cin = [], widths[0]
    for i, (c, n) in enumerate(zip(widths, (3, 4, 6, 3))):
        stages.append([basic_block(cin if j == 0 else c, c, 2 if i > 0 and j == 0 else 1) for j in range(n)])
        cin = c
    return _net(stem, stages, head(cin, num_classes))


@register_family("resnet_bottleneck")
def resnet_bottleneck(width: float = 1.0, num_classes: int = 1000) -> nn.Module:
    """ResNet-50 (v1.5): bottlenecks (3, 4, 6, 3), expansion 4."""
    mids = [make_divisible(c * width) for c in (64, 128, 256, 512)]
    stem = [ConvBNAct(3, mids[0], 7, 2), nn.MaxPool2d(3, 2, 1)]
    stages, cin = [], mids[0]
    for i, (m, n) in enumerate(zip(mids, (3, 4, 6, 3))):
        blocks = []
        for j in range(n):
            blocks.append(bottleneck_block(cin, m, 4 * m, 2 if i > 0 and j == 0 else 1))
            cin = 4 * m
        stages.append(blocks)
    return _net(stem, stages, head(cin, num_classes))


@register_family("mobilenet_v2")
def mobilenet_v2(width: float = 1.0, num_classes: int = 1000) -> nn.Module:
    # (expansion, channels, repeats, stride) as in the MobileNetV2 paper
    cfg = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    cin = make_divisible(32 * width)
    stem = [ConvBNAct(3, cin, 3, 2, act="relu6")]
    stages = []
    for t, c, n, s in cfg:
        cout, blocks = make_divisible(c * width), []
        for i in range(n):
            blocks.append(InvertedResidual(cin, cin * t, cout, 3, s if i == 0 else 1, act="relu6"))
            cin = cout
        stages.append(blocks)
    last = make_divisible(1280 * max(1.0, width))
    stages[-1].append(ConvBNAct(cin, last, 1, act="relu6"))
    return _net(stem, stages, head(last, num_classes))


@register_family("mobilenet_v3")
def mobilenet_v3(width: float = 1.0, num_classes: int = 1000) -> nn.Module:
    """MobileNetV3-Large: SE with hard-sigmoid gates, hardswish in the deep half, 1280-wide MLP head."""
    # (kernel, expanded, out, SE, activation, stride) as in the paper's Table 1
    cfg = [(3, 16, 16, False, "relu", 1), (3, 64, 24, False, "relu", 2), (3, 72, 24, False, "relu", 1),
           (5, 72, 40, True, "relu", 2), (5, 120, 40, True, "relu", 1), (5, 120, 40, True, "relu", 1),
           (3, 240, 80, False, "hardswish", 2), (3, 200, 80, False, "hardswish", 1), (3, 184, 80, False, "hardswish", 1),
           (3, 184, 80, False, "hardswish", 1), (3, 480, 112, True, "hardswish", 1), (3, 672, 112, True, "hardswish", 1),
           (5, 672, 160, True, "hardswish", 2), (5, 960, 160, True, "hardswish", 1), (5, 960, 160, True, "hardswish", 1)]
    cin = make_divisible(16 * width)
    stem = [ConvBNAct(3, cin, 3, 2, act="hardswish")]
    stages: list[list[nn.Module]] = []
    for k, e, c, se, act, s in cfg:
        hidden, cout = make_divisible(e * width), make_divisible(c * width)
        if s == 2 or not stages:
            stages.append([])
        se_mid = make_divisible(hidden / 4) if se else 0
        stages[-1].append(InvertedResidual(cin, hidden, cout, k, s, act, se_mid, "relu", "hardsigmoid"))
        cin = cout
    last = make_divisible(960 * width)
    stages[-1].append(ConvBNAct(cin, last, 1, act="hardswish"))
    return _net(stem, stages, head(last, num_classes, "mlp", make_divisible(1280 * width), "hardswish"))


@register_family("shufflenet_v2")
def shufflenet_v2(width: float = 1.0, num_classes: int = 1000) -> nn.Module:
    """ShuffleNetV2: units (4, 8, 4), the paper's channel table at 0.5/1/1.5/2x, interpolated elsewhere."""
    table = {0.5: (48, 96, 192, 1024), 1.0: (116, 232, 464, 1024), 1.5: (176, 352, 704, 1024), 2.0: (244, 488, 976, 2048)}
    if width in table:
        *widths, last = table[width]
    else:
        widths, last = [make_divisible(c * width) for c in (116, 232, 464)], 1024 if width <= 1.5 else 2048
    cin = 24
    stem = [ConvBNAct(3, cin, 3, 2), nn.MaxPool2d(3, 2, 1)]
    stages = []
    for c, n in zip(widths, (4, 8, 4)):
        stages.append([ShuffleV2Unit(cin if i == 0 else c, c, 2 if i == 0 else 1) for i in range(n)])
        cin = c
    stages[-1].append(ConvBNAct(cin, last, 1))
    return _net(stem, stages, head(last, num_classes))


@register_family("efficientnet")
def efficientnet(width: float = 1.0, num_classes: int = 1000) -> nn.Module:
    """EfficientNet-B0: MBConv with SiLU and SE (sigmoid gate, squeeze to a quarter of the block input)."""
    # (expansion, kernel, stride, channels, repeats)
    cfg = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3), (6, 5, 2, 192, 4),
           (6, 3, 1, 320, 1)]
    cin = make_divisible(32 * width)
    stem = [ConvBNAct(3, cin, 3, 2, act="silu")]
    stages = []
    for t, k, s, c, n in cfg:
        cout, blocks = make_divisible(c * width), []
        for i in range(n):
            se_mid = max(1, int(cin * 0.25))
            blocks.append(InvertedResidual(cin, cin * t, cout, k, s if i == 0 else 1, "silu", se_mid, "silu", "sigmoid"))
            cin = cout
        stages.append(blocks)
    last = make_divisible(1280 * width)
    stages[-1].append(ConvBNAct(cin, last, 1, act="silu"))
    return _net(stem, stages, head(last, num_classes))


def _regnet(width: float, num_classes: int, depths: Sequence[int], widths: Sequence[int], group_width: int,
            se: bool) -> nn.Module:
    cin = make_divisible(32 * width)
    stem = [ConvBNAct(3, cin, 3, 2)]
    stages = []
    for d, w0 in zip(depths, widths):
        w = max(group_width, round(w0 * width / group_width) * group_width)
        blocks = []
        for i in range(d):
            se_mid = round(0.25 * cin) if se else 0
            blocks.append(bottleneck_block(cin, w, w, 2 if i == 0 else 1, groups=w // group_width, se_mid=se_mid))
            cin = w
        stages.append(blocks)
    return _net(stem, stages, head(cin, num_classes))


@register_family("regnet")
def regnet(width: float = 1.0, num_classes: int = 1000) -> nn.Module:
    """RegNetY-400MF: group width 8, bottleneck ratio 1, SE (ReLU, sigmoid) at a quarter of the block input."""
    return _regnet(width, num_classes, (1, 3, 6, 6), (48, 104, 208, 440), 8, se=True)


@register_family("regnet_x")
def regnet_x(width: float = 1.0, num_classes: int = 1000) -> nn.Module:
    """RegNetX-400MF: group width 16, bottleneck ratio 1, no SE."""
    return _regnet(width, num_classes, (1, 2, 7, 12), (32, 64, 160, 384), 16, se=False)


@register_family("densenet")
def densenet(width: float = 1.0, num_classes: int = 1000) -> nn.Module:
    """A small DenseNet-BC: growth 32, dense blocks (4, 8, 12, 8), bottleneck 4 x growth, transitions halve the
    channels (1x1 conv + 2x2 avg pool). Post-activation (conv-BN-ReLU) layers."""
    growth = make_divisible(32 * width)
    cin = 2 * growth
    stem = [ConvBNAct(3, cin, 7, 2), nn.MaxPool2d(3, 2, 1)]
    stages = []
    for i, n in enumerate((4, 8, 12, 8)):
        blocks: list[nn.Module] = []
        if i > 0:
            cout = make_divisible(cin / 2)
            blocks.append(nn.Sequential(ConvBNAct(cin, cout, 1), nn.AvgPool2d(2, 2)))
            cin = cout
        for _ in range(n):
            blocks.append(DenseLayer(cin, growth, 4 * growth))
            cin += growth
        stages.append(blocks)
    return _net(stem, stages, head(cin, num_classes))


@register_family("inception")
def inception(width: float = 1.0, num_classes: int = 1000) -> nn.Module:
    """GoogLeNet (Inception v1) with BN: true 5x5 branches, max pools between stages."""
    # (1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) per module, as in the paper's Table 1; "M": max pool
    cfg: list[Any] = [(64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), "M",
                      (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64),
                      (112, 144, 288, 32, 64, 64), (256, 160, 320, 32, 128, 128), "M",
                      (256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128)]
    c64, c192 = make_divisible(64 * width), make_divisible(192 * width)
    stem = [ConvBNAct(3, c64, 7, 2), nn.MaxPool2d(3, 2, 1), ConvBNAct(c64, c64, 1), ConvBNAct(c64, c192, 3),
            nn.MaxPool2d(3, 2, 1)]
    stages: list[list[nn.Module]] = [[]]
    cin = c192
    for item in cfg:
        if item == "M":
            stages.append([nn.MaxPool2d(3, 2, 1)])
            continue
        m = Inception(cin, *(make_divisible(c * width) for c in item))
        stages[-1].append(m)
        cin = m.cout
    return _net(stem, stages, head(cin, num_classes))


@register_family("squeezenet")
def squeezenet(width: float = 1.0, num_classes: int = 1000) -> nn.Module:
    """SqueezeNet 1.1 with BN: fire modules (squeeze, expand 1x1 = expand 3x3), max pools, a linear head."""
    ch = [make_divisible(c * width) for c in (64, 16, 32, 48, 64)]
    stem = [ConvBNAct(3, ch[0], 3, 2), nn.MaxPool2d(3, 2, 1)]
    stages: list[list[nn.Module]] = []
    cin = ch[0]
    for i, (sq, n) in enumerate(((ch[1], 2), (ch[2], 2), (ch[3], 2), (ch[4], 2))):
        blocks: list[nn.Module] = [nn.MaxPool2d(3, 2, 1)] if i in (1, 2) else []
        for _ in range(n):
            blocks.append(Fire(cin, sq, 4 * sq, 4 * sq))
            cin = 8 * sq
        stages.append(blocks)
    return _net(stem, stages, head(cin, num_classes))


@register_family("vgg")
def vgg(width: float = 1.0, num_classes: int = 1000) -> nn.Module:
    """A small VGG: the VGG-11 layout at half the paper's channels, 2x2 max pools, pooled MLP head."""
    cfg = [(32,), (64,), (128, 128), (256, 256), (256, 256)]
    stages, cin = [], 3
    for convs in cfg:
        blocks: list[nn.Module] = []
        for c in convs:
            blocks.append(ConvBNAct(cin, make_divisible(c * width), 3))
            cin = make_divisible(c * width)
        blocks.append(nn.MaxPool2d(2, 2))
        stages.append(blocks)
    return _net([], stages, head(cin, num_classes, "mlp", make_divisible(512 * width), "relu"))


# ----------------------------------------------------------------------------------------------------------------------
# The held-out evaluation set.


@dataclass(frozen=True)
class EvalSpec:
    family: str
    width: float
    resolution: int

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise DeployKitError(f"unknown network family {self.family!r}: choose one of {', '.join(FAMILIES)}")
        if not self.width > 0 or self.resolution < MIN_RESOLUTION:
            raise DeployKitError(f"{self.family}: width must be positive and resolution at least {MIN_RESOLUTION}, "
                                 f"got {self.width} and {self.resolution}")

    @property
    def name(self) -> str:
        return f"{self.family}_w{self.width:g}_r{self.resolution}"

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.resolution, self.resolution)

    def build(self, num_classes: int = 1000) -> nn.Module:
        return build_family(self.family, self.width, num_classes)


# family -> (widths, resolutions); every pair is one network. Chosen so each runs in about 1-120 ms on one
# ONNX Runtime CPU thread (heavy families get the small widths and resolutions, light ones the large).
_EVAL_GRID: dict[str, tuple[tuple[float, ...], tuple[int, ...]]] = {
    "resnet_basic": ((0.5, 1.0), (128, 160, 224)),
    "resnet_bottleneck": ((0.5, 1.0), (128, 224)),
    "mobilenet_v2": ((0.75, 1.5), (128, 192, 224)),
    "mobilenet_v3": ((0.75, 1.25), (128, 224)),
    "shufflenet_v2": ((0.5, 1.0, 1.5), (192, 224)),
    "efficientnet": ((0.75, 1.0), (128, 192, 224)),
    "regnet": ((0.75, 1.5), (160, 224)),
    "regnet_x": ((1.0, 1.25), (128, 224)),
    "densenet": ((0.5, 1.0), (128, 224)),
    "inception": ((0.5, 1.0), (160, 224)),
    "squeezenet": ((1.0, 1.5), (128, 192, 224)),
    "vgg": ((0.5, 1.0), (96, 160, 224)),
}


def eval_specs() -> list[EvalSpec]:
    """The fixed held-out evaluation set, in a stable order."""
    return [EvalSpec(f, w, r) for f, (widths, resolutions) in _EVAL_GRID.items() for w in widths for r in resolutions]


# ----------------------------------------------------------------------------------------------------------------------
# Random networks for calibrating the predictor: the same vocabulary in random mixtures.

BLOCK_TYPES = ("inverted_residual", "basic", "bottleneck", "grouped_bottleneck", "fire", "shuffle", "dense", "inception",
               "plain")
# Multiply-accumulates at 224x224, drawn log-uniformly per seed: about 1-80 ms on one ONNX Runtime CPU thread
# (random mixtures ran at 25-35 ms per GMAC on one core of an AMD EPYC: 31 M -> 1.0 ms, 2.05 G -> 50 ms).
RANDOM_MACS_224 = (30e6, 2.5e9)
RANDOM_GENERATIONS = (1, 2)  # versions of the generator (a table's net entries name theirs)
_UNALIGNED_OK = ("inverted_residual", "basic", "dense", "inception", "fire")  # stage types free of group constraints
_MULT_RANGE = (0.125, 4.0)
_MAX_ATTEMPTS = 8


def _pool(spec: str, s: int = 2) -> nn.Module:
    """"max3", "avg2", ...: kernel 2 or 3, padding (k - 1) // 2."""
    k = int(spec[-1])
    return (nn.MaxPool2d if spec.startswith("max") else nn.AvgPool2d)(k, s, (k - 1) // 2)


def _draw_arch(seed: int, attempt: int, mult: float, gen: int = 1) -> dict[str, Any]:
    """Every random choice of network (`seed`, `attempt`), channels scaled by `mult`. The draws never depend on
    `mult`, so the same seed at another multiplier is the same network, only wider or narrower.

    Generation 1 rounds every width to a multiple of 8. Generation 2 rounds the widths of stem, head and
    stages without grouped convolutions to a per-stage multiple of 8, 4 or 2: real networks have
    unaligned widths (ShuffleNetV2 x1.0: 58, 116, 232), which the runtime's blocked layouts treat apart.
    """
    rng = np.random.default_rng([seed, attempt])
    quantum = 8

    def choice(options: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
        p = None if weights is None else np.asarray(weights, float) / sum(weights)
        return options[int(rng.choice(len(options), p=p))]

    def uniform(a: float, b: float) -> float:
        return float(rng.uniform(a, b))

    def ch(base: float, q: int | None = None) -> int:
        q = q or quantum
        return max(q, round(base * mult / q) * q)

    def draw_quantum() -> int:
        return choice((8, 4, 2), (2, 1, 1)) if gen >= 2 else 8

    def act() -> str:
        return choice(("relu", "relu6", "hardswish", "silu", "sigmoid"), (6, 2, 2, 2, 0.3))

    n_stages = int(rng.integers(3, 7))
    stem_b = math.exp(uniform(math.log(8), math.log(32)))
    quantum = draw_quantum()
    stem = {"k": choice((3, 5, 7), (3, 1, 1)), "out": ch(stem_b), "act": act(),
            "extra": choice((None, "conv", "separable"), (2, 1, 1)),
            "pool": choice((None, "max3", "max2", "avg3", "avg2"), (4, 2, 1, 1, 1))}
    downsamples = choice((4, 5), (1, 3)) - 1 - (stem["pool"] is not None)
    strided = {int(i) for i in rng.choice(n_stages, size=min(n_stages, downsamples), replace=False)}

    stages: list[dict[str, Any]] = []
    cin_b, cin = stem_b, stem["out"]  # channels before (base) and after the multiplier
    for i in range(n_stages):
        s = 2 if i in strided else 1
        cout_b = out_b = min(1024.0, cin_b * (uniform(1.4, 2.5) if s == 2 else uniform(0.75, 1.5)))
        t = choice(BLOCK_TYPES)
        st: dict[str, Any] = {"type": t, "stride": s}
        quantum = draw_quantum() if t in _UNALIGNED_OK else 8
        if t == "inverted_residual":
            st.update(depth=int(rng.integers(1, 5)), out=ch(cout_b), expand=choice((1, 2, 3, 4, 6), (1, 1, 2, 2, 3)),
                      k=choice((3, 5, 7), (3, 2, 1)), act=choice(("relu", "relu6", "hardswish", "silu")), se=None)
            if rng.random() < 0.4:
                st["se"] = {"act": choice(("relu", "silu", "hardswish")), "gate": choice(("hardsigmoid", "sigmoid"))}
        elif t == "basic":
            st.update(depth=int(rng.integers(1, 4)), out=ch(cout_b), k=choice((3, 5), (4, 1)), act=act())
        elif t == "bottleneck":
            out_b = 2 * cout_b
            st.update(depth=int(rng.integers(1, 4)), out=ch(out_b, 32), act=act())
            st["mid"] = st["out"] // 4
        elif t == "grouped_bottleneck":
            gw = choice((8, 16, 24, 32))
            st.update(depth=int(rng.integers(1, 5)), out=ch(cout_b), group_width=gw,
                      mid=ch(cout_b * choice((1.0, 0.5), (3, 1)), gw), se=bool(rng.random() < 0.4), act=act())
        elif t == "fire":
            out = max(32, ch(cout_b, 16))
            e1 = max(8, round(out * (1 - choice((0.5, 0.75))) / 8) * 8)
            st.update(depth=int(rng.integers(1, 4)), out=out, squeeze=ch(cout_b * choice((1 / 8, 1 / 6, 1 / 4))), e1=e1,
                      e3=out - e1, bypass=bool(rng.random() < 0.5), act=act(), pool=choice(("max3", "max2", "avg3")))
        elif t == "shuffle":
            if rng.random() < 0.5:
                st.update(variant="v2", depth=int(rng.integers(2, 6)), out=ch(cout_b, 16))
            else:
                g = choice((2, 3, 4, 8))
                q = 8 * g // math.gcd(8, g)
                # the first unit concatenates x (avg-pooled when strided) with a branch of out - cin channels
                st.update(variant="v1", depth=int(rng.integers(1, 5)), groups=g, mid=ch(cout_b / 4, q),
                          out=max(ch(cout_b, q), (cin // q + 1) * q))
        elif t == "dense":
            growth_b, depth = choice((12, 16, 24, 32)), int(rng.integers(2, 9))
            trans_b = cin_b * choice((0.5, 0.75, 1.0)) if s == 2 else 0.0
            st.update(depth=depth, growth=ch(growth_b), bottleneck=choice((0, 4 * ch(growth_b))), act=act(),
                      transition=ch(trans_b) if s == 2 else 0)
            st["out"] = (st["transition"] or cin) + depth * st["growth"]
            out_b = (trans_b or cin_b) + depth * growth_b
        elif t == "inception":
            present = sorted(int(j) for j in rng.choice(4, size=choice((2, 3, 4), (1, 2, 3)), replace=False))
            shares = {j: uniform(0.5, 2.0) for j in present}
            width_b = {j: cout_b * w / sum(shares.values()) for j, w in shares.items()}
            width = {j: ch(w) for j, w in width_b.items()}
            reduce = {j: ch(width_b[j] * choice((0.5, 0.75))) if rng.random() < 0.8 else 0 for j in (1, 2) if j in present}
            st.update(depth=int(rng.integers(1, 4)), b1=width.get(0, 0), b3r=reduce.get(1, 0), b3=width.get(1, 0),
                      b5r=reduce.get(2, 0), b5=width.get(2, 0), pp=width.get(3, 0), k5=choice((5, 7), (3, 1)),
                      pool_branch=choice(("max", "avg"), (3, 1)), act=act(), pool=choice(("max3", "max2")))
            st["out"] = sum(width.values())
        else:  # plain
            st.update(depth=int(rng.integers(1, 5)), out=ch(cout_b), k=choice((1, 3, 5, 7), (1, 5, 2, 1)),
                      variant=choice(("conv", "separable", "grouped"), (3, 2, 1)), groups=choice((2, 4, 8)), act=act(),
                      downsample=choice(("conv", "max2", "max3", "avg2", "avg3"), (4, 1, 1, 1, 1)))
            if st["variant"] != "grouped":
                del st["groups"]
        stages.append(st)
        cin_b, cin = out_b, st["out"]

    quantum = draw_quantum()
    last = ch(cin_b * choice((1.5, 2.0, 4.0, 6.0))) if rng.random() < 0.5 else 0
    hd = {"last_conv": min(last, ch(1280)), "last_act": act(), "kind": choice(("linear", "conv", "mlp"), (3, 1, 1)),
          "hidden": ch(choice((512, 1024, 1280))), "act": choice(("relu", "hardswish"))}
    return {"seed": seed, "attempt": attempt, "width_mult": mult, "stem": stem, "stages": stages, "head": hd}


def _random_stage(st: dict[str, Any], cin: int) -> tuple[list[nn.Module], int]:
    t, s, out = st["type"], st["stride"], st["out"]
    blocks: list[nn.Module] = []
    strides = [s] + [1] * (st["depth"] - 1)
    if t == "inverted_residual":
        se = st["se"] or {}
        for si in strides:
            hidden = make_divisible(cin * st["expand"])
            blocks.append(InvertedResidual(cin, hidden, out, st["k"], si, st["act"], make_divisible(hidden / 4) if se else 0,
                                           se.get("act", "relu"), se.get("gate", "sigmoid")))
            cin = out
    elif t == "basic":
        for si in strides:
            blocks.append(basic_block(cin, out, si, st["k"], st["act"]))
            cin = out
    elif t in ("bottleneck", "grouped_bottleneck"):
        groups = st["mid"] // st["group_width"] if t == "grouped_bottleneck" else 1
        for si in strides:
            se_mid = max(1, round(0.25 * cin)) if st.get("se") else 0
            blocks.append(bottleneck_block(cin, st["mid"], out, si, groups, se_mid, st["act"]))
            cin = out
    elif t == "fire":
        if s == 2:
            blocks.append(_pool(st["pool"]))
        for _ in strides:
            blocks.append(Fire(cin, st["squeeze"], st["e1"], st["e3"], st["act"], st["bypass"]))
            cin = out
    elif t == "shuffle":
        for i, si in enumerate(strides):
            if st["variant"] == "v2":
                blocks.append(ShuffleV2Unit(cin, out, si))
            else:
                blocks.append(ShuffleV1Unit(cin, st["mid"], out, si, st["groups"], concat=i == 0))
            cin = out
    elif t == "dense":
        if st["transition"]:
            blocks.append(nn.Sequential(ConvBNAct(cin, st["transition"], 1, act=st["act"]), nn.AvgPool2d(2, 2)))
            cin = st["transition"]
        for _ in strides:
            blocks.append(DenseLayer(cin, st["growth"], st["bottleneck"], st["act"]))
            cin += st["growth"]
    elif t == "inception":
        if s == 2:
            blocks.append(_pool(st["pool"]))
        for _ in strides:
            m = Inception(cin, st["b1"], st["b3r"], st["b3"], st["b5r"], st["b5"], st["pp"], st["k5"], st["pool_branch"],
                          st["act"])
            blocks.append(m)
            cin = m.cout
    elif t == "plain":
        if s == 2 and st["downsample"] != "conv":
            blocks.append(_pool(st["downsample"]))
            strides[0] = 1
        for si in strides:
            if st["variant"] == "separable":
                blocks.append(nn.Sequential(ConvBNAct(cin, cin, st["k"], si, groups=cin, act=st["act"]),
                                            ConvBNAct(cin, out, 1, act=st["act"])))
            else:
                # the largest group count up to the drawn one that divides both widths (gen 2 widths may be unaligned)
                groups = max(g for g in range(1, min(st["groups"], cin // 2) + 1) if cin % g == 0 and out % g == 0) \
                    if st["variant"] == "grouped" else 1
                blocks.append(ConvBNAct(cin, out, st["k"], si, groups, st["act"]))
            cin = out
    else:
        raise ValueError(f"unknown block type {t!r}")
    if cin != out:
        raise InternalError(f"stage {t} ends with {cin} channels, its description says {out}")
    return blocks, cin


def _build_random(arch: dict[str, Any], num_classes: int) -> nn.Sequential:
    st = arch["stem"]
    c = st["out"]
    stem: list[nn.Module] = [ConvBNAct(3, c, st["k"], 2, act=st["act"])]
    if st["extra"] == "conv":
        stem.append(ConvBNAct(c, c, 3, act=st["act"]))
    elif st["extra"] == "separable":
        stem += [ConvBNAct(c, c, 3, groups=c, act=st["act"]), ConvBNAct(c, c, 1, act=None)]
    if st["pool"]:
        stem.append(_pool(st["pool"]))
    stages = []
    for stage in arch["stages"]:
        blocks, c = _random_stage(stage, c)
        stages.append(blocks)
    hd = arch["head"]
    head_layers: list[nn.Module] = []
    if hd["last_conv"]:
        head_layers.append(ConvBNAct(c, hd["last_conv"], 1, act=hd["last_act"]))
        c = hd["last_conv"]
    head_layers += head(c, num_classes, hd["kind"], hd["hidden"], hd["act"])
    return _net(stem, stages, head_layers)


def count_macs(model: nn.Module, resolution: int) -> int:
    """Multiply-accumulates of the convs and linears of `model` at 1x3xRxR (a meta-device forward when the
    model lives on the meta device, so no arithmetic is done)."""
    total = 0

    def hook(m, _inputs, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, 3, resolution, resolution, device=device))
    finally:
        for h in handles:
            h.remove()
    return total


def _arch_macs(arch: dict[str, Any], resolution: int) -> int:
    with torch.device("meta"):
        model = _build_random(arch, 1000).eval()
    return count_macs(model, resolution)


def _check_random_args(seed: int, resolution: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DeployKitError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < MIN_RESOLUTION:
        raise DeployKitError(f"resolution must be an integer >= {MIN_RESOLUTION}, got {resolution!r}")


def random_network_arch(seed: int, resolution: int, gen: int = RANDOM_GENERATIONS[-1]) -> dict[str, Any]:
    """The JSON-able description of random network `seed`: stem, 3-6 stages (block type, stride, depth, channels,
    kernel, activation, ...) and head. The architecture depends on the seed (and generator version `gen`) only:
    its width multiplier is fitted so the network does a seed-drawn number of MACs at 224x224 (RANDOM_MACS_224);
    `resolution` is recorded, with the MACs at it."""
    _check_random_args(seed, resolution)
    if gen not in RANDOM_GENERATIONS:
        raise DeployKitError(f"unknown random-network generation {gen!r}; valid: {', '.join(map(str, RANDOM_GENERATIONS))}")
    seed = int(seed)
    lo, hi = RANDOM_MACS_224
    target = math.exp(np.random.default_rng([seed, 1_000_003]).uniform(math.log(lo), math.log(hi)))
    for attempt in range(_MAX_ATTEMPTS):
        mult = 1.0
        for _ in range(3):  # channels round to multiples of 8 and the stem and head scale linearly: iterate
            mult = float(np.clip(mult * math.sqrt(target / _arch_macs(_draw_arch(seed, attempt, mult, gen), 224)),
                               *_MULT_RANGE))
        arch = _draw_arch(seed, attempt, round(mult, 4), gen)
        macs_224 = _arch_macs(arch, 224)
        if 0.7 * lo <= macs_224 <= 1.3 * hi:
            break  # else a multiplier at its bound could not reach the budget: draw another architecture
    arch.update(gen=int(gen), resolution=int(resolution), target_macs_224=int(target), macs_224=macs_224,
                macs=_arch_macs(arch, int(resolution)))
    return arch


def random_network(seed: int, resolution: int, num_classes: int = 1000, gen: int = RANDOM_GENERATIONS[-1]) -> nn.Module:
    """Random network `seed` (see `random_network_arch`), eval mode; same seed, same architecture and weights."""
    return network_from_arch(random_network_arch(seed, resolution, gen), num_classes)


def network_from_arch(arch: dict[str, Any], num_classes: int = 1000) -> nn.Module:
    """Rebuild a network from its `random_network_arch` description (e.g. read back from JSON), weights seeded
    by its seed, eval mode."""
    try:
        torch.manual_seed(int(arch["seed"]))
        model = _build_random(arch, num_classes)
    except (KeyError, TypeError, ValueError) as e:
        raise DeployKitError(f"not a random_network_arch description ({type(e).__name__}: {e}): "
                             "use the dict random_network_arch returns") from e
    return _init_weights(model).eval()
