"""Networks to try `deploykit compress` on, as `MODULE:FUNCTION` entry points (no arguments, 10 classes, 1x3x32x32).

    deploykit compress --model deploykit.examples:resnet_digits --checkpoint W.pt ...
"""
from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: a 3x3 stem, stages of basic blocks (stride 2 between stages), global pool, linear."""

    def __init__(self, widths=(32, 64, 128), blocks=(2, 2, 2), num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if i > 0 and j == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


def resnet_digits() -> nn.Module:
    """ResNet-style network for the built-in digits at 32x32: widths 32/64/128, two blocks per stage (~0.7 M params)."""
    return ResNet((32, 64, 128), (2, 2, 2), 10)


def resnet_digits_wide() -> nn.Module:
    """Wider variant (64/128/256) for INT8 speedups, where small convolutions are overhead-bound."""
    return ResNet((64, 128, 256), (2, 2, 2), 10)
