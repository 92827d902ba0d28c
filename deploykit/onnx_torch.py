"""Run an ONNX graph with torch ops: one small nn.Module per ONNX node, executed in graph order.

The torch-cpu and torch-cuda backends time eager PyTorch on exactly the graphs ONNX Runtime runs, and
their per-layer profiles must name the original ONNX nodes, so every submodule keeps `onnx_name` and
`onnx_op_type`. onnx2torch is not an option (it needs torchvision, which has no CPU build here).

Adding an op is one function: `@register_op("OpType")` taking a `NodeContext`, returning an `OnnxOp`.
A converter may `take()` inputs whose values are known at build time (initializers, Constant outputs,
anything computed from them): the op then owns them (as parameters, buffers or plain numbers) and
receives None in their place at run time.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from .errors import DeployKitError

Converter = Callable[["NodeContext"], "OnnxOp"]
_CONVERTERS: dict[str, Converter] = {}

_TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool,
}


def register_op(*op_types: str):
    """Register a converter for one or more ONNX op types (default domain)."""
    def deco(fn: Converter) -> Converter:
        for op in op_types:
            if op in _CONVERTERS:
                raise ValueError(f"ONNX op {op!r} registered twice")
            _CONVERTERS[op] = fn
        return fn
    return deco


def supported_ops() -> list[str]:
    return sorted(_CONVERTERS)


def _unsupported(op: str, node: str, what: str = "") -> DeployKitError:
    detail = f" with {what}" if what else ""
    return DeployKitError(f"torch backends cannot run ONNX op '{op}' (node '{node}'){detail}: use --backend ort-cpu, "
                          f"or add a converter to deploykit/onnx_torch.py")


@dataclass
class NodeContext:
    node: onnx.NodeProto
    name: str  # the ONNX node name, or "<op_type>_<index>" for unnamed nodes (as graphmap names them)
    opset: int
    consts: dict[str, torch.Tensor]  # every tensor whose value is known before the graph runs
    absorbed: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.attrs = {a.name: helper.get_attribute_value(a) for a in self.node.attribute}

    def attr(self, key: str, default: Any = None) -> Any:
        v = self.attrs.get(key, default)
        return v.decode() if isinstance(v, bytes) else v

    def ints(self, key: str, default: Sequence[int] | None = None) -> list[int] | None:
        v = self.attrs.get(key)
        return [int(i) for i in v] if v is not None else (list(default) if default is not None else None)

    def has(self, i: int) -> bool:
        return i < len(self.node.input) and bool(self.node.input[i])

    def take(self, i: int) -> torch.Tensor | None:
        """Input i's value when known at build time; the op then owns it and gets None at run time."""
        if not self.has(i):
            return None
        t = self.consts.get(self.node.input[i])
        if t is not None:
            self.absorbed.add(i)
        return t

    def take_list(self, i: int, cast: type = int) -> list | None:
        t = self.take(i)
        return None if t is None else [cast(v) for v in t.flatten().tolist()]

    def unsupported(self, what: str) -> DeployKitError:
        return _unsupported(self.node.op_type, self.name, what)


class OnnxOp(nn.Module):
    """One ONNX node; `forward` receives the node's inputs in order (None where absent or absorbed)."""
    onnx_name: str = ""
    onnx_op_type: str = ""

    def extra_repr(self) -> str:
        return f"{self.onnx_op_type} {self.onnx_name!r}"


class Fn(OnnxOp):
    """A stateless op: a function of the node's inputs, attributes already bound."""

    def __init__(self, fn: Callable[..., Any]):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


def _param(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t, requires_grad=False)  # inference only: no autograd bookkeeping


def _torch_pads(onnx_pads: Sequence[int]) -> list[int]:
    """ONNX [b1..bn, e1..en] (spatial axes) -> F.pad's (b_n, e_n, ..., b_1, e_1), last axis first."""
    n = len(onnx_pads) // 2
    out: list[int] = []
    for i in reversed(range(n)):
        out += [onnx_pads[i], onnx_pads[i + n]]
    return out


def _same_pads(spatial: Sequence[int], k: Sequence[int], s: Sequence[int], d: Sequence[int], upper: bool) -> list[int]:
    """Explicit ONNX-style pads for auto_pad SAME_UPPER / SAME_LOWER at these spatial sizes."""
    begin, end = [], []
    for n, kk, ss, dd in zip(spatial, k, s, d):
        total = max((math.ceil(n / ss) - 1) * ss + (kk - 1) * dd + 1 - n, 0)
        small, big = total // 2, total - total // 2
        begin.append(small if upper else big)
        end.append(big if upper else small)
    return begin + end


@dataclass
class _Padding:
    """Window-op padding: symmetric pads go to the torch op, the rest through F.pad first."""
    nd: int
    pads: list[int]
    auto_pad: str
    kernel: list[int]
    strides: list[int]
    dilations: list[int]

    @property
    def native(self) -> list[int] | int:
        if self.auto_pad == "NOTSET" and self.pads[: self.nd] == self.pads[self.nd:]:
            return self.pads[: self.nd]
        return 0

    def explicit(self, x: torch.Tensor) -> list[int] | None:
        """F.pad argument, or None when the torch op pads by itself."""
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            return _torch_pads(_same_pads(x.shape[2:], self.kernel, self.strides, self.dilations, self.auto_pad == "SAME_UPPER"))
        if self.auto_pad == "VALID" or self.native != 0 or not any(self.pads):
            return None
        return _torch_pads(self.pads)


def _window(ctx: NodeContext, nd: int, kernel: Sequence[int]) -> _Padding:
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    pads = ctx.ints("pads", [0] * 2 * nd)
    if auto_pad == "VALID":
        pads = [0] * 2 * nd
    return _Padding(nd, pads, auto_pad, list(kernel), ctx.ints("strides", [1] * nd), ctx.ints("dilations", [1] * nd))


# ---------------------------------------------------------------------------------------------- conv


class Conv(OnnxOp):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, padding: _Padding, groups: int,
                 transpose: bool = False, output_padding: Sequence[int] = ()):
        super().__init__()
        nd = weight.dim() - 2
        self.weight, self.bias = _param(weight), _param(bias)
        self.padding, self.groups, self.transpose = padding, groups, transpose
        self.output_padding = list(output_padding) or [0] * nd
        if transpose:
            self.fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
        else:
            self.fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]

    def forward(self, x, *_):
        p = self.padding
        if self.transpose:  # pads crop the full output; asymmetric crops are sliced off afterwards
            native = p.native
            y = self.fn(x, self.weight, self.bias, p.strides, native if native != 0 else 0, self.output_padding,
                        self.groups, p.dilations)
            if native == 0 and any(p.pads):
                nd = p.nd
                y = y[(slice(None), slice(None)) + tuple(slice(p.pads[i], y.shape[2 + i] - p.pads[i + nd]) for i in range(nd))]
            return y
        pad = p.explicit(x)
        if pad is not None:
            x = F.pad(x, pad)
        return self.fn(x, self.weight, self.bias, p.strides, p.native, p.dilations, self.groups)


@register_op("Conv")
def _conv(ctx: NodeContext) -> OnnxOp:
    w, b = ctx.take(1), ctx.take(2)
    if w is None:
        raise ctx.unsupported("a weight computed at run time")
    nd = w.dim() - 2
    if not 1 <= nd <= 3:
        raise ctx.unsupported(f"{nd} spatial dims")
    return Conv(w, b, _window(ctx, nd, ctx.ints("kernel_shape", w.shape[2:])), int(ctx.attr("group", 1)))


@register_op("ConvTranspose")
def _conv_transpose(ctx: NodeContext) -> OnnxOp:
    w, b = ctx.take(1), ctx.take(2)
    if w is None:
        raise ctx.unsupported("a weight computed at run time")
    if ctx.attr("output_shape") is not None or ctx.attr("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise ctx.unsupported("output_shape or auto_pad SAME")
    nd = w.dim() - 2
    padding = _window(ctx, nd, ctx.ints("kernel_shape", w.shape[2:]))
    return Conv(w, b, padding, int(ctx.attr("group", 1)), transpose=True,
                output_padding=ctx.ints("output_padding", [0] * nd))


class BatchNorm(OnnxOp):
    def __init__(self, scale, bias, mean, var, eps: float):
        super().__init__()
        self.weight, self.bias = _param(scale), _param(bias)
        self.register_buffer("running_mean", mean.float())
        self.register_buffer("running_var", var.float())
        self.eps = eps

    def forward(self, x, *_):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


@register_op("BatchNormalization")
def _batchnorm(ctx: NodeContext) -> OnnxOp:
    stats = [ctx.take(i) for i in range(1, 5)]
    if any(s is None for s in stats):
        raise ctx.unsupported("statistics computed at run time")
    return BatchNorm(*stats, eps=float(ctx.attr("epsilon", 1e-5)))


# ---------------------------------------------------------------------------------------------- dense


class Gemm(OnnxOp):
    """alpha * A' @ B' + beta * C; the common transB=1 case with constant weights is F.linear."""

    def __init__(self, b, c, alpha: float, beta: float, trans_a: bool, trans_b: bool):
        super().__init__()
        self.alpha, self.beta, self.trans_a, self.trans_b = alpha, beta, trans_a, trans_b
        self.linear = b is not None and not trans_a and alpha == 1.0 and (c is None or (beta == 1.0 and c.dim() <= 1))
        if self.linear:
            b = b if trans_b else b.t().contiguous()  # F.linear wants (out, in)
        self.weight, self.bias = _param(b), _param(c)

    def forward(self, a, b=None, c=None):
        if self.linear:
            return F.linear(a, self.weight, self.bias)
        b = self.weight if b is None else b
        c = self.bias if c is None else c
        y = (a.t() if self.trans_a else a) @ (b.t() if self.trans_b else b)
        if self.alpha != 1.0:
            y = y * self.alpha
        return y if c is None else y + (c * self.beta if self.beta != 1.0 else c)


@register_op("Gemm")
def _gemm(ctx: NodeContext) -> OnnxOp:
    return Gemm(ctx.take(1), ctx.take(2), float(ctx.attr("alpha", 1.0)), float(ctx.attr("beta", 1.0)),
                bool(ctx.attr("transA", 0)), bool(ctx.attr("transB", 0)))


register_op("MatMul")(lambda ctx: Fn(torch.matmul))


# ---------------------------------------------------------------------------------------------- element-wise

_UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "HardSwish": F.hardswish,
    "Abs": torch.abs, "Neg": torch.neg, "Exp": torch.exp, "Log": torch.log, "Sqrt": torch.sqrt,
    "Reciprocal": torch.reciprocal, "Erf": torch.erf, "Floor": torch.floor, "Ceil": torch.ceil,
    "Sign": torch.sign, "Softsign": F.softsign, "Mish": F.mish, "Not": torch.logical_not,
}


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # ONNX integer division truncates; torch's "/" would promote to float
    return a / b if a.is_floating_point() else torch.div(a, b, rounding_mode="trunc")


_BINARY: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": _div, "Pow": torch.pow,
    "Equal": torch.eq, "Less": torch.lt, "Greater": torch.gt, "LessOrEqual": torch.le, "GreaterOrEqual": torch.ge,
    "And": torch.logical_and, "Or": torch.logical_or,
}

_VARIADIC: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Sum": torch.add, "Max": torch.maximum, "Min": torch.minimum,
}


def _register_table() -> None:
    for op, fn in _UNARY.items():
        register_op(op)(lambda ctx, fn=fn: Fn(fn))
    for op, fn in _BINARY.items():
        register_op(op)(lambda ctx, fn=fn: Fn(fn))
    for op, fn in _VARIADIC.items():
        register_op(op)(lambda ctx, fn=fn: Fn(lambda *xs, fn=fn: _fold(fn, xs)))


def _fold(fn, xs):
    y = xs[0]
    for x in xs[1:]:
        y = fn(y, x)
    return y


_register_table()


@register_op("Identity")
def _identity(ctx: NodeContext) -> OnnxOp:
    return Fn(lambda x: x)


@register_op("Dropout")
def _dropout(ctx: NodeContext) -> OnnxOp:
    if len(ctx.node.output) > 1 and ctx.node.output[1]:  # the mask of an inference-mode dropout keeps everything
        return Fn(lambda x, *_: (x, torch.ones_like(x, dtype=torch.bool)))
    return Fn(lambda x, *_: x)


@register_op("LeakyRelu")
def _leaky_relu(ctx: NodeContext) -> OnnxOp:
    alpha = float(ctx.attr("alpha", 0.01))
    return Fn(lambda x: F.leaky_relu(x, alpha))


@register_op("Elu")
def _elu(ctx: NodeContext) -> OnnxOp:
    alpha = float(ctx.attr("alpha", 1.0))
    return Fn(lambda x: F.elu(x, alpha))


@register_op("Softplus")
def _softplus(ctx: NodeContext) -> OnnxOp:
    return Fn(F.softplus)


@register_op("Gelu")
def _gelu(ctx: NodeContext) -> OnnxOp:
    approximate = ctx.attr("approximate", "none")
    return Fn(lambda x: F.gelu(x, approximate=approximate))


@register_op("PRelu")
def _prelu(ctx: NodeContext) -> OnnxOp:
    return Fn(lambda x, slope: torch.where(x < 0, x * slope, x))


@register_op("HardSigmoid")
def _hard_sigmoid(ctx: NodeContext) -> OnnxOp:
    alpha, beta = float(ctx.attr("alpha", 0.2)), float(ctx.attr("beta", 0.5))
    if math.isclose(alpha, 1 / 6, rel_tol=1e-6) and beta == 0.5:
        return Fn(F.hardsigmoid)  # one fused kernel for the MobileNetV3 form
    return Fn(lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0))


class Clip(OnnxOp):
    def __init__(self, lo: float | None, hi: float | None):
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x, lo=None, hi=None):
        if lo is None and hi is None:
            return torch.clamp(x, self.lo, self.hi) if (self.lo is not None or self.hi is not None) else x
        lo = self.lo if lo is None else lo  # bounds computed at run time arrive as 0-d tensors
        hi = self.hi if hi is None else hi
        if lo is not None:
            x = torch.maximum(x, torch.as_tensor(lo, dtype=x.dtype, device=x.device))
        if hi is not None:
            x = torch.minimum(x, torch.as_tensor(hi, dtype=x.dtype, device=x.device))
        return x


@register_op("Clip")
def _clip(ctx: NodeContext) -> OnnxOp:
    if ctx.opset < 11:
        return Clip(ctx.attr("min"), ctx.attr("max"))
    lo, hi = ctx.take(1), ctx.take(2)
    return Clip(None if lo is None else lo.item(), None if hi is None else hi.item())


@register_op("Cast")
def _cast(ctx: NodeContext) -> OnnxOp:
    to = int(ctx.attr("to"))
    if to not in _TORCH_DTYPES:
        raise ctx.unsupported(f"target type {onnx.TensorProto.DataType.Name(to)}")
    dtype = _TORCH_DTYPES[to]
    return Fn(lambda x: x.to(dtype))


@register_op("Where")
def _where(ctx: NodeContext) -> OnnxOp:
    return Fn(torch.where)


# ---------------------------------------------------------------------------------------------- pooling


class Pool(OnnxOp):
    def __init__(self, kind: str, nd: int, padding: _Padding, ceil_mode: bool, count_include_pad: bool):
        super().__init__()
        self.kind, self.nd, self.padding = kind, nd, padding
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad
        native = padding.native
        # torch pools pad by themselves only symmetrically and by at most half the kernel
        if native != 0 and any(p > k // 2 for p, k in zip(native, padding.kernel)):
            native = 0
        self.native = native
        self.manual = padding.auto_pad == "NOTSET" and native == 0 and any(padding.pads)

    def forward(self, x):
        p = self.padding
        pad = _torch_pads(p.pads) if self.manual else p.explicit(x)
        if self.kind == "max":
            if pad is not None:
                x = F.pad(x, pad, value=-math.inf)
            fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[self.nd - 1]
            return fn(x, p.kernel, p.strides, self.native, p.dilations, self.ceil_mode)
        fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[self.nd - 1]
        if pad is None:
            return fn(x, p.kernel, p.strides, self.native, self.ceil_mode, self.count_include_pad)
        y = fn(F.pad(x, pad), p.kernel, p.strides, 0, self.ceil_mode, True)
        if self.count_include_pad:
            return y
        # average over real elements only: divide by the share of each window that is not padding
        ones = F.pad(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device), pad)
        return y / fn(ones, p.kernel, p.strides, 0, self.ceil_mode, True)


def _pool(kind: str):
    def convert(ctx: NodeContext) -> OnnxOp:
        kernel = ctx.ints("kernel_shape")
        if len(ctx.node.output) > 1 and ctx.node.output[1]:
            raise ctx.unsupported("the Indices output")
        nd = len(kernel)
        padding = _window(ctx, nd, kernel)
        if kind == "avg" and any(d != 1 for d in padding.dilations):
            raise ctx.unsupported("dilations")
        return Pool(kind, nd, padding, bool(ctx.attr("ceil_mode", 0)), bool(ctx.attr("count_include_pad", 0)))
    return convert


register_op("MaxPool")(_pool("max"))
register_op("AveragePool")(_pool("avg"))
register_op("GlobalAveragePool")(lambda ctx: Fn(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)))
register_op("GlobalMaxPool")(lambda ctx: Fn(lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)))


# ---------------------------------------------------------------------------------------------- resize


class Resize(OnnxOp):
    """F.interpolate where its coordinate rule is ONNX's; otherwise an exact gather on each resized axis."""

    def __init__(self, mode: str, ctm: str, nearest_mode: str, scales: list[float] | None, sizes: list[int] | None):
        super().__init__()
        self.mode, self.ctm, self.nearest_mode = mode, ctm, nearest_mode
        self.scales, self.sizes = scales, sizes
        if mode == "nearest":
            if ctm == "asymmetric" and nearest_mode == "floor":
                self.torch_mode, self.align_corners = "nearest", None
            elif ctm in ("half_pixel", "pytorch_half_pixel") and nearest_mode == "round_prefer_ceil":
                self.torch_mode, self.align_corners = "nearest-exact", None
            else:
                self.torch_mode = None
        elif ctm in ("half_pixel", "pytorch_half_pixel"):
            self.torch_mode, self.align_corners = "linear", False
        elif ctm == "align_corners":
            self.torch_mode, self.align_corners = "linear", True
        else:
            self.torch_mode = None

    def forward(self, x, roi=None, scales=None, sizes=None):
        scales = self.scales if scales is None or scales.numel() == 0 else scales.tolist()
        sizes = self.sizes if sizes is None or sizes.numel() == 0 else [int(s) for s in sizes.tolist()]
        if sizes is not None:
            out = list(sizes)
            scales = [o / i for o, i in zip(out, x.shape)]
        else:  # in float32, as ONNX Runtime computes it (0.7 * 10 is 7 there, 6.99... in float64)
            out = [int(np.floor(np.float32(i) * np.float32(s))) for i, s in zip(x.shape, scales)]
        if self.torch_mode is not None and out[:2] == list(x.shape[:2]) and 3 <= x.dim() <= 5:
            mode = self.torch_mode
            if mode == "linear":
                mode = ("linear", "bilinear", "trilinear")[x.dim() - 3]
            if sizes is not None:
                return F.interpolate(x, size=out[2:], mode=mode, align_corners=self.align_corners)
            if all(math.floor(i * s) == o for i, s, o in zip(x.shape[2:], scales[2:], out[2:])):
                return F.interpolate(x, scale_factor=scales[2:], mode=mode, align_corners=self.align_corners)
        for axis, (n_in, n_out, s) in enumerate(zip(x.shape, out, scales)):
            if n_in != n_out or s != 1.0:
                x = self._axis(x, axis, n_in, n_out, s)
        return x

    def _axis(self, x: torch.Tensor, axis: int, n_in: int, n_out: int, scale: float) -> torch.Tensor:
        i = torch.arange(n_out, dtype=torch.float32, device=x.device)
        inv = float(np.float32(1.0) / np.float32(scale))  # float32 inverse scale, as ONNX Runtime: the same ties
        ctm = self.ctm
        if ctm == "half_pixel" or (ctm == "pytorch_half_pixel" and n_out > 1):
            src = (i + 0.5) * inv - 0.5
        elif ctm == "pytorch_half_pixel":
            src = torch.zeros_like(i)
        elif ctm == "align_corners":
            src = i * ((n_in - 1) / (n_out - 1)) if n_out > 1 else torch.zeros_like(i)
        elif ctm == "asymmetric":
            src = i * inv
        else:  # tf_half_pixel_for_nn; the converter refused every other mode
            src = (i + 0.5) * inv
        if self.mode == "nearest":
            rounding = {"floor": torch.floor, "ceil": torch.ceil,
                        "round_prefer_floor": lambda v: torch.ceil(v - 0.5),
                        "round_prefer_ceil": lambda v: torch.floor(v + 0.5)}[self.nearest_mode]
            idx = rounding(src).clamp(0, n_in - 1).long()
            return x.index_select(axis, idx)
        src = src.clamp(0, n_in - 1)
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=n_in - 1)
        shape = [1] * x.dim()
        shape[axis] = n_out
        w = (src - lo).to(x.dtype).reshape(shape)
        return x.index_select(axis, lo) * (1 - w) + x.index_select(axis, hi) * w


_RESIZE_CTMS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn")


@register_op("Resize")
def _resize(ctx: NodeContext) -> OnnxOp:
    mode = ctx.attr("mode", "nearest")
    if mode not in ("nearest", "linear"):
        raise ctx.unsupported(f"mode {mode!r}")
    if ctx.attr("antialias", 0) or ctx.attr("axes") is not None or ctx.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise ctx.unsupported("antialias, axes or keep_aspect_ratio_policy")
    if ctx.opset < 11:  # Resize-10: (X, scales), asymmetric coordinates
        scales = ctx.take_list(1, float)
        if scales is None:
            raise ctx.unsupported("scales computed at run time (opset 10)")
        return Resize(mode, "asymmetric", "floor", scales, None)
    ctx.take(1)  # roi only matters for tf_crop_and_resize, which is refused below
    ctm = ctx.attr("coordinate_transformation_mode", "half_pixel")
    if ctm not in _RESIZE_CTMS:
        raise ctx.unsupported(f"coordinate_transformation_mode {ctm!r}")
    scales, sizes = ctx.take_list(2, float), ctx.take_list(3, int)
    return Resize(mode, ctm, ctx.attr("nearest_mode", "round_prefer_floor"), scales or None, sizes or None)


# ---------------------------------------------------------------------------------------------- shape glue


class Reshape(OnnxOp):
    def __init__(self, shape: list[int] | None, allowzero: bool):
        super().__init__()
        self.shape, self.allowzero = shape, allowzero

    def forward(self, x, shape=None):
        target = self.shape if shape is None else [int(s) for s in shape.tolist()]
        if not self.allowzero:  # 0 copies the input's dim at that position
            target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
        return x.reshape(target)


@register_op("Reshape")
def _reshape(ctx: NodeContext) -> OnnxOp:
    return Reshape(ctx.take_list(1), bool(ctx.attr("allowzero", 0)))


@register_op("Flatten")
def _flatten(ctx: NodeContext) -> OnnxOp:
    axis = int(ctx.attr("axis", 1))

    def flatten(x):
        a = axis + x.dim() if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))
    return Fn(flatten)


@register_op("Transpose")
def _transpose(ctx: NodeContext) -> OnnxOp:
    perm = ctx.ints("perm")
    return Fn(lambda x: x.permute(perm if perm is not None else list(reversed(range(x.dim())))))


@register_op("Concat")
def _concat(ctx: NodeContext) -> OnnxOp:
    axis = int(ctx.attr("axis"))
    return Fn(lambda *xs: torch.cat(xs, axis))


@register_op("Shape")
def _shape(ctx: NodeContext) -> OnnxOp:
    start, end = ctx.attr("start", 0), ctx.attr("end")
    return Fn(lambda x: torch.tensor(x.shape[start:end], dtype=torch.int64, device=x.device))


def _axes(ctx: NodeContext, index: int, since: int) -> list[int] | None:
    """Axes given as an attribute before opset `since`, as input `index` from it on."""
    if ctx.opset < since:
        return ctx.ints("axes")
    axes = ctx.take_list(index)
    if axes is None and ctx.has(index):
        raise ctx.unsupported("axes computed at run time")
    return axes


@register_op("Unsqueeze")
def _unsqueeze(ctx: NodeContext) -> OnnxOp:
    axes = _axes(ctx, 1, 13)
    if not axes:
        raise ctx.unsupported("no axes")

    def unsqueeze(x, *_):
        rank = x.dim() + len(axes)
        for a in sorted(a + rank if a < 0 else a for a in axes):
            x = x.unsqueeze(a)
        return x
    return Fn(unsqueeze)


@register_op("Squeeze")
def _squeeze(ctx: NodeContext) -> OnnxOp:
    axes = _axes(ctx, 1, 13)
    if not axes:
        return Fn(lambda x, *_: x.squeeze())
    return Fn(lambda x, *_: x.squeeze(tuple(axes)))


@register_op("Gather")
def _gather(ctx: NodeContext) -> OnnxOp:
    axis = int(ctx.attr("axis", 0))

    def gather(x, idx):
        a = axis + x.dim() if axis < 0 else axis
        idx = torch.where(idx < 0, idx + x.shape[a], idx)  # ONNX allows negative indices
        flat = x.index_select(a, idx.reshape(-1))
        return flat.reshape(x.shape[:a] + idx.shape + x.shape[a + 1:])
    return Fn(gather)


@register_op("Constant")
def _constant(ctx: NodeContext) -> OnnxOp:
    attrs = ctx.attrs
    if "value" in attrs:
        value = torch.from_numpy(numpy_helper.to_array(attrs["value"]).copy())
    elif "value_float" in attrs or "value_floats" in attrs:
        value = torch.tensor(attrs.get("value_float", attrs.get("value_floats")), dtype=torch.float32)
    elif "value_int" in attrs or "value_ints" in attrs:
        value = torch.tensor(attrs.get("value_int", attrs.get("value_ints")), dtype=torch.int64)
    else:
        raise ctx.unsupported(f"attributes {sorted(attrs)}")
    return Fn(lambda: value)


@register_op("ConstantOfShape")
def _constant_of_shape(ctx: NodeContext) -> OnnxOp:
    v = ctx.attrs.get("value")
    value = torch.from_numpy(numpy_helper.to_array(v).copy()) if v is not None else torch.zeros(1)
    return Fn(lambda shape: torch.full(shape.tolist(), value.item(), dtype=value.dtype, device=shape.device))


@register_op("Expand")
def _expand(ctx: NodeContext) -> OnnxOp:
    def expand(x, shape):  # ONNX Expand broadcasts both ways: a 1 in `shape` keeps x's dim
        return x.expand(torch.broadcast_shapes(x.shape, tuple(int(s) for s in shape.tolist())))
    return Fn(expand)


@register_op("Range")
def _range(ctx: NodeContext) -> OnnxOp:
    return Fn(lambda start, limit, delta: torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype,
                                                       device=start.device))


@register_op("Split")
def _split(ctx: NodeContext) -> OnnxOp:
    axis = int(ctx.attr("axis", 0))
    sizes = ctx.ints("split") if ctx.opset < 13 else ctx.take_list(1)
    n = len(ctx.node.output)

    def split(x, *_):
        if sizes:
            return torch.split(x, sizes, axis)
        d = x.shape[axis]
        c = math.ceil(d / n)  # ONNX: equal chunks, the last one smaller
        return torch.split(x, [c] * (n - 1) + [d - c * (n - 1)], axis)
    return Fn(split)


class Slice(OnnxOp):
    def __init__(self, starts, ends, axes, steps):
        super().__init__()
        self.starts, self.ends, self.axes, self.steps = starts, ends, axes, steps

    def forward(self, x, starts=None, ends=None, axes=None, steps=None):
        def pick(own, given):
            return own if given is None else [int(v) for v in given.tolist()]
        starts, ends = pick(self.starts, starts), pick(self.ends, ends)
        axes = pick(self.axes, axes) or list(range(len(starts)))
        steps = pick(self.steps, steps) or [1] * len(starts)
        index: list[Any] = [slice(None)] * x.dim()
        flips = []
        for s, e, a, st in zip(starts, ends, axes, steps):
            a = a + x.dim() if a < 0 else a
            n = x.shape[a]
            s, e = s + n if s < 0 else s, e + n if e < 0 else e
            if st > 0:
                index[a] = slice(min(max(s, 0), n), min(max(e, 0), n), st)
            else:  # torch has no negative steps: gather the indices instead
                s, e = min(max(s, 0), n - 1), min(max(e, -1), n - 1)
                flips.append((a, torch.arange(s, e, st, device=x.device)))
        y = x[tuple(index)]
        for a, idx in flips:
            y = y.index_select(a, idx)
        return y


@register_op("Slice")
def _slice(ctx: NodeContext) -> OnnxOp:
    if ctx.opset < 10:
        return Slice(ctx.ints("starts"), ctx.ints("ends"), ctx.ints("axes"), None)
    return Slice(*(ctx.take_list(i) for i in range(1, 5)))


class Pad(OnnxOp):
    def __init__(self, mode: str, pads: list[int] | None, value: float | None, axes: list[int] | None):
        super().__init__()
        self.mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}[mode]
        self.pads, self.value, self.axes = pads, value, axes

    def forward(self, x, pads=None, value=None, axes=None):
        pads = self.pads if pads is None else [int(p) for p in pads.tolist()]
        value = self.value if value is None else value.item()
        axes = self.axes if axes is None else [int(a) for a in axes.tolist()]
        rank = x.dim()
        if axes is not None:  # opset 18: pads only for the listed axes
            full = [0] * 2 * rank
            for j, a in enumerate(axes):
                a = a + rank if a < 0 else a
                full[a], full[a + rank] = pads[j], pads[j + len(axes)]
            pads = full
        tp = _torch_pads(pads)
        while len(tp) > 2 and tp[-1] == 0 and tp[-2] == 0:  # F.pad's non-constant modes pad trailing axes only
            tp = tp[:-2]
        if self.mode == "constant":
            return F.pad(x, tp, value=value or 0.0)
        return F.pad(x, tp, mode=self.mode)


@register_op("Pad")
def _pad(ctx: NodeContext) -> OnnxOp:
    mode = ctx.attr("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise ctx.unsupported(f"mode {mode!r}")
    if ctx.opset < 11:
        return Pad(mode, ctx.ints("pads"), float(ctx.attr("value", 0.0)), None)
    value = ctx.take(2)
    return Pad(mode, ctx.take_list(1), None if value is None else value.item(), ctx.take_list(3))


def _reduce(fn: Callable[..., torch.Tensor], since: int):
    def convert(ctx: NodeContext) -> OnnxOp:
        axes = _axes(ctx, 1, since)
        keep = bool(ctx.attr("keepdims", 1))
        if not axes and ctx.attr("noop_with_empty_axes", 0):
            return Fn(lambda x, *_: x)

        def reduce(x, *_):
            return fn(x, dim=tuple(axes) if axes else tuple(range(x.dim())), keepdim=keep)
        return Fn(reduce)
    return convert


register_op("ReduceMean")(_reduce(torch.mean, 18))
register_op("ReduceSum")(_reduce(torch.sum, 13))
register_op("ReduceMax")(_reduce(torch.amax, 18))
register_op("ReduceMin")(_reduce(torch.amin, 18))


@register_op("Softmax")
def _softmax(ctx: NodeContext) -> OnnxOp:
    if ctx.opset >= 13:
        axis = int(ctx.attr("axis", -1))
        return Fn(lambda x: F.softmax(x, dim=axis))
    axis = int(ctx.attr("axis", 1))

    def softmax(x):  # before opset 13: softmax over the input flattened to 2-D at `axis`
        a = axis + x.dim() if axis < 0 else axis
        return F.softmax(x.reshape(math.prod(x.shape[:a]), -1), dim=1).reshape(x.shape)
    return Fn(softmax)


# ---------------------------------------------------------------------------------------------- the graph


def _sanitise(name: str) -> str:
    return re.sub(r"\W", "_", name).strip("_") or "node"


@dataclass(frozen=True)
class _Step:
    key: str  # the submodule's key in `layers`
    inputs: tuple[str, ...]  # tensor names fed to forward; "" for absent or absorbed inputs
    outputs: tuple[str, ...]
    release: tuple[str, ...]  # intermediates last used here, freed so the allocator can reuse them


class OnnxGraphModule(nn.Module):
    """An ONNX graph as an nn.Module: `layers` holds one OnnxOp per executed node, run in graph order.

    Nodes whose inputs are all known at build time (Constant, Identity of an initializer, shape
    arithmetic on constants) are computed once here and listed in `folded`; they are not layers.
    """

    def __init__(self, model: onnx.ModelProto):
        super().__init__()
        g = model.graph
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        consts: dict[str, torch.Tensor] = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in g.initializer}
        self.input_names = [i.name for i in g.input if i.name not in consts]
        self.output_names = [o.name for o in g.output]
        self.layers = nn.ModuleDict()
        self.folded: list[str] = []
        steps: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = []
        for idx, node in enumerate(g.node):
            name = node.name or f"{node.op_type}_{idx}"
            convert = _CONVERTERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if convert is None:
                raise _unsupported(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}", name)
            ctx = NodeContext(node, name, opset, consts)
            op = convert(ctx)
            op.onnx_name, op.onnx_op_type = name, node.op_type
            feeds = tuple("" if i in ctx.absorbed else t for i, t in enumerate(node.input))
            if all(t in consts for t in feeds if t):
                with torch.no_grad():
                    self._assign(consts, node.output, op(*(consts[t] if t else None for t in feeds)))
                self.folded.append(name)
                continue
            key = _sanitise(name)
            if key in self.layers or hasattr(nn.ModuleDict, key):
                key = f"{key}_{idx}"
            self.layers[key] = op
            steps.append((key, feeds, tuple(node.output)))
        self._steps = self._plan(steps)
        # constants still read at run time live in one container, as buffers, so .to()/.half() move them
        needed = {t for _, feeds, _ in steps for t in feeds if t in consts} | {o for o in self.output_names if o in consts}
        self.constants = nn.Module()
        self._const_attrs: list[tuple[str, str]] = []
        for j, t in enumerate(sorted(needed)):
            attr = f"c{j}_{_sanitise(t)}"
            self.constants.register_buffer(attr, consts[t])
            self._const_attrs.append((t, attr))
        self.eval()

    def _plan(self, steps) -> list[_Step]:
        last_use: dict[str, int] = {}
        for i, (_, feeds, _) in enumerate(steps):
            for t in feeds:
                if t:
                    last_use[t] = i
        keep = set(self.output_names) | set(self.input_names)
        release: dict[int, list[str]] = {}
        for t, i in last_use.items():
            if t not in keep:
                release.setdefault(i, []).append(t)
        return [_Step(k, f, o, tuple(release.get(i, ()))) for i, (k, f, o) in enumerate(steps)]

    @staticmethod
    def _assign(env: dict, outputs: Sequence[str], y: Any) -> None:
        if len(outputs) == 1:
            env[outputs[0]] = y
        else:
            for name, value in zip(outputs, y):
                if name:
                    env[name] = value

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.input_names):
            raise TypeError(f"expected {len(self.input_names)} inputs ({', '.join(self.input_names)}), got {len(inputs)}")
        env: dict[str, Any] = dict(zip(self.input_names, inputs))
        for name, attr in self._const_attrs:
            env[name] = getattr(self.constants, attr)
        layers = self.layers
        for step in self._steps:
            y = layers[step.key](*(env[t] if t else None for t in step.inputs))
            self._assign(env, step.outputs, y)
            for t in step.release:
                env.pop(t, None)
        outs = tuple(env[o] for o in self.output_names)
        return outs[0] if len(outs) == 1 else outs

    def node_modules(self) -> list[OnnxOp]:
        """The executed nodes' modules, in execution order."""
        return [self.layers[s.key] for s in self._steps]


def onnx_to_torch(model: onnx.ModelProto) -> OnnxGraphModule:
    """Convert an ONNX model to an eval-mode nn.Module running it with torch ops (DeployKitError if it cannot)."""
    return OnnxGraphModule(model)

