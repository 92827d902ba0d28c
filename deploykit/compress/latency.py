"""Latency of a PyTorch network on a device: predicted with the device's kernel predictor, measured with its backend,
and per channel group a cost curve read off the device's latency table (which channel counts are fast)."""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..kernels.space import Kernel
from ..onnx_io import InputSpec
from ..protocol import MODEL_PROTOCOL, Measurement


def export(model: nn.Module, shape: tuple[int, ...], path: str | os.PathLike, program=None) -> Path:
    """The network as ONNX at `path` (atomic). `program`: the ExportedProgram of a torch.export file, which only the
    dynamo exporter takes."""
    from .. import zoo

    if program is None:
        return zoo.export_onnx(model, shape, path)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.redirect_stdout(io.StringIO()):  # the dynamo exporter prints its progress
        torch.onnx.export(program, (torch.zeros(shape),), str(tmp), dynamo=True, input_names=["input"],
                          output_names=["output"])
    os.replace(tmp, path)
    return path


def to_onnx(model: nn.Module, shape: tuple[int, ...], program=None) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory(prefix="deploykit-compress-") as tmp:
        return onnx.load(str(export(model, shape, Path(tmp) / "model.onnx", program)))


def input_spec(model: onnx.ModelProto, shape: tuple[int, ...]) -> list[InputSpec]:
    return [InputSpec(model.graph.input[0].name, tuple(shape), np.float32)]


def predict_ms(predictor, model: nn.Module | onnx.ModelProto, shape: tuple[int, ...]) -> float:
    proto = model if isinstance(model, onnx.ModelProto) else to_onnx(model, shape)
    return float(predictor.predict_onnx(proto, input_spec(proto, shape), allow_missing=True).latency_ms)


def measure(backend, model: nn.Module | onnx.ModelProto, shape: tuple[int, ...], protocol=MODEL_PROTOCOL) -> Measurement:
    proto = model if isinstance(model, onnx.ModelProto) else to_onnx(model, shape)
    return backend.measure(proto, input_spec(proto, shape), protocol)


def measurement_dict(m: Measurement | None) -> dict | None:
    return None if m is None else {k: v for k, v in m.to_dict().items() if k != "round_medians_ms"}


# -- per-group cost curves from the table -----------------------------------------------------------

@dataclass
class _Layer:
    """A conv/linear whose shape follows the groups' channel counts linearly:
    dims(counts) = dims0 - sum_g slope[g] * (C_g - counts[g]), as the pruning engine slices it."""
    name: str
    dims0: tuple[int, int, int]   # cin, cout, groups at full width
    slopes: dict[int, tuple[float, float, float]]
    hw: tuple[int, int]           # input feature map
    k: int
    s: int
    d: int
    linear: bool

    def kernel(self, counts: dict[int, int], full: dict[int, int]) -> Kernel | None:
        dims = list(self.dims0)
        for g, slope in self.slopes.items():
            for i in range(3):
                dims[i] -= slope[i] * (full[g] - counts.get(g, full[g]))
        cin, cout, groups = (max(1, int(round(v))) for v in dims)
        try:
            if self.linear:
                return Kernel.make("linear", cin=cin, cout=cout)
            common = dict(h=self.hw[0], w=self.hw[1], k=self.k, s=self.s, d=self.d, act="none")
            if groups == 1:
                return Kernel.make("conv", cin=cin, cout=cout, g=1, **common)
            if groups == cin == cout:
                return Kernel.make("dwconv", cin=cin, **common)
            return Kernel.make("gconv", cin=cin, cout=cout, g=groups, **common)
        except (ValueError, KeyError):  # a shape the table's kinds cannot stand for: no cost
            return None


def layer_inputs(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Input feature-map size of every Conv2d / Linear, from one forward pass."""
    sizes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: sizes.__setitem__(
                    name, tuple(inp[0].shape[-2:]) if inp[0].dim() == 4 else (1, 1))))
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return sizes


def _dims(m: nn.Module) -> tuple[int, int, int]:
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features, 1
    return m.in_channels, m.out_channels, m.groups


class TableModel:
    """The summed standalone table latency (ms) of the layers the groups' widths touch, at any channel counts.

    Which layers a group touches, and how, is found by pruning a copy by one step of the group and diffing shapes,
    so it follows the pruning engine exactly (concatenations, depthwise and grouped convolutions alike); a layer
    between two groups (input from one, output from the other) costs what its two widths make it cost together.
    """

    def __init__(self, model: nn.Module, graph, example: torch.Tensor, predictor):
        from .prune import prune, select

        self.predictor = predictor
        sizes = layer_inputs(model, example)
        modules = dict(model.named_modules())
        layers: dict[str, _Layer] = {}
        self.full: dict[int, int] = {}
        for g in graph.groups:
            step = max(int(g.divisor), 1)
            if g.channels - step < max(g.min_channels, 1):
                continue
            keep = select({g.id: -torch.arange(g.channels, dtype=torch.float32)}, {g.id: g.channels - step}, graph)
            probe = prune(model, graph, keep)
            touched = False
            for name, m in probe.named_modules():
                if not isinstance(m, (nn.Conv2d, nn.Linear)) or name not in modules or name not in sizes:
                    continue
                before, after = _dims(modules[name]), _dims(m)
                if before == after:
                    continue
                k = m.kernel_size if isinstance(m, nn.Conv2d) else (1, 1)
                if k[0] != k[1]:
                    continue
                conv = isinstance(m, nn.Conv2d)
                layer = layers.setdefault(name, _Layer(name, before, {}, sizes[name], k[0], m.stride[0] if conv else 1,
                                                       m.dilation[0] if conv else 1, not conv))
                layer.slopes[g.id] = tuple((b - a) / step for b, a in zip(before, after))
                touched = True
            if touched:
                self.full[g.id] = g.channels
        self.layers = list(layers.values())

    use_macs = False  # set where the table is flat over these layers (tiny convs): MACs rank the widths instead

    def cost_ms(self, configs: list[dict[int, int]]) -> np.ndarray:
        """Table latency of the touched layers for each config of channel counts (one batched prediction)."""
        if self.use_macs:
            return self.macs(configs)
        kernels, owner = [], []
        for i, counts in enumerate(configs):
            for layer in self.layers:
                k = layer.kernel(counts, self.full)
                if k is not None:
                    kernels.append(k)
                    owner.append(i)
        out = np.zeros(len(configs))
        if kernels:
            np.add.at(out, np.array(owner), self.predictor.kernel_ms(kernels))
        return out

    def macs(self, configs: list[dict[int, int]]) -> np.ndarray:
        """Multiply-accumulates of the touched layers per config: the fallback where the table is flat over them."""
        out = np.zeros(len(configs))
        for i, counts in enumerate(configs):
            for layer in self.layers:
                k = layer.kernel(counts, self.full)
                if k is not None:
                    out[i] += k.macs
        return out

    def curve(self, g: int) -> np.ndarray:
        """Cost at every count 0..C of group g, the others at full width (rounding to fast counts)."""
        return self.cost_ms([{g: c} for c in range(self.full[g] + 1)])


def fast_count(curve: np.ndarray, target: int, lo: int, hi: int, divisor: int = 1, window: float = 0.08) -> int:
    """Round `target` channels to a count the table shows to be fast, within +-`window` of it (multiples of
    `divisor`): the widest count that costs no more than the target (channels for free), else the widest one below
    it that is cheaper per channel by 3% or more (a step down the table's staircase), else the target itself."""
    target = max(lo, min(hi, target // divisor * divisor))
    span = max(divisor, int(round(window * target)))
    cand = [c for c in range(max(lo, target - span), min(hi, target + span) + 1) if c % divisor == 0]
    up = [c for c in cand if c > target and curve[c] <= curve[target]]
    if up:
        return max(up)
    down = [c for c in cand if c < target and curve[c] < 0.97 * curve[target] * c / target]
    return max(down) if down else target

