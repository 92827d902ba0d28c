"""Entry points for `deploykit export --model tests.export_models:NAME` in the CLI tests."""
import torch
from torch import nn

from tests.families import FAMILIES, randomize_batchnorm


def resnet_basic():
    torch.manual_seed(0)
    return randomize_batchnorm(FAMILIES["resnet_basic"]())


def mobilenet_v2():
    torch.manual_seed(0)
    return randomize_batchnorm(FAMILIES["mobilenet_v2"]())


class CumMax(nn.Module):
    """torch.cummax has no ONNX conversion in either exporter."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.cummax(self.conv(x), dim=1)[0].mean((2, 3))


def unexportable():
    return CumMax()


class BranchOnInput(nn.Module):
    """Python control flow on the input's values: tracing bakes in the branch the example input took (zeros: the
    else branch), so the exported graph computes something else on real inputs. Verification must catch it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        if bool(x.abs().sum() > 0):
            y = y * 3.0 + 1.0
        return self.head(y)


def trace_hazard():
    torch.manual_seed(0)
    return BranchOnInput()


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.a, self.b = nn.Linear(8, 10), nn.Linear(8, 2)

    def forward(self, x):
        z = self.body(x)
        return self.a(z), self.b(z)


def two_heads():
    torch.manual_seed(0)
    return TwoHeads()
