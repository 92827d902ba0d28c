"""Turn an ONNX model into the kernels a runtime executes, in the vocabulary of the latency tables.

Two sources of truth are combined. Patterns over the original graph name each kernel in the table's
terms (Conv -> BatchNormalization -> SiLU is one `conv` kernel with act=silu; GAP -> 1x1 conv -> act ->
1x1 conv -> gate -> Mul is one `se`). The runtime's own optimised graph (ONNX Runtime, all
optimisations) then says what it really fused: a residual Add absorbed into the conv before it is
marked `fused`, and a pattern the runtime folded away entirely is dropped. Nodes that only alias
memory (Reshape, Flatten, Squeeze...) or compute shapes are free; any other node no pattern covers is
reported as unsupported, never silently counted as 0 ms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .errors import DeployKitError
from .kernels import Kernel
from .onnx_io import InputSpec

# Float ops ONNX Runtime executes as a view of their input (no copy, no kernel time worth counting).
ALIAS_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout"})


@dataclass
class ModelKernel:
    """One kernel of a model: the original nodes it covers and the table kernel standing for them."""
    name: str
    op_type: str  # the covered original op types, "Conv+Relu"
    nodes: list[str]
    kernel: Kernel | None
    fused: bool = False  # the runtime folded it into the producer of one of its inputs (residual add)
    note: str = ""  # why kernel is None (unsupported), or how it was approximated

    def to_dict(self) -> dict:
        return {"name": self.name, "op_type": self.op_type, "kind": self.kernel.kind if self.kernel else None,
                "key": self.kernel.key if self.kernel else None, "fused": self.fused, "nodes": self.nodes,
                **({"note": self.note} if self.note else {})}


@dataclass
class Decomposition:
    kernels: list[ModelKernel]
    free_nodes: list[str] = field(default_factory=list)  # aliases, shape arithmetic, constants
    folded_nodes: list[str] = field(default_factory=list)  # patterns the runtime removed entirely
    runtime_fusion: bool = False  # whether the runtime's optimised graph was consulted

    @property
    def unsupported(self) -> list[ModelKernel]:
        return [k for k in self.kernels if k.kernel is None]


class _Graph:
    """The original graph with static shapes, producers, consumers and constant values."""

    def __init__(self, model: onnx.ModelProto, inputs: list[InputSpec]):
        model = _with_input_shapes(model, inputs)
        try:
            model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception as e:  # onnx raises InferenceError/ValidationError by version
            raise DeployKitError(f"cannot infer the model's tensor shapes ({str(e).splitlines()[0][:200]}): "
                                 "export it with static shapes or pass --shape") from None
        g = model.graph
        self.nodes = list(g.node)
        for i, n in enumerate(self.nodes):
            if not n.name:
                n.name = f"{n.op_type}_{i}"
        self.shape: dict[str, list[int]] = {}
        self.dtype: dict[str, int] = {}
        for vi in list(g.value_info) + list(g.input) + list(g.output):
            tt = vi.type.tensor_type
            self.dtype[vi.name] = tt.elem_type
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
            if tt.HasField("shape") and all(d > 0 for d in dims):
                self.shape[vi.name] = dims
        unknown = [o for n in self.nodes for o in n.output if o and o not in self.shape]
        if unknown:
            self._run_for_shapes(model, inputs, unknown)
        self.const: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        for init in g.initializer:
            self.shape.setdefault(init.name, list(init.dims))
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for t in n.input:
                if t:
                    self.consumers.setdefault(t, []).append(n)
        self.outputs = {o.name for o in g.output}
        self._fold_constants()

    def _run_for_shapes(self, model: onnx.ModelProto, inputs: list[InputSpec], names: list[str]) -> None:
        """Shapes static inference left open (data-dependent Slice ends...): run the model once and look."""
        from deploykit.profilers.ort_cpu import make_session

        from .onnx_io import random_feeds

        m = onnx.ModelProto()
        m.CopyFrom(model)
        have = {o.name for o in m.graph.output}
        m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in names if t not in have)
        sess = make_session(m, 1, level="none")
        outs = sess.run(names, random_feeds(inputs))
        for t, v in zip(names, outs):
            self.shape[t] = list(v.shape)
            self.dtype[t] = onnx.helper.np_dtype_to_tensor_dtype(v.dtype)

    def _fold_constants(self) -> None:
        """Constant nodes and nodes computed only from constants: the runtime folds them at load time."""
        self.folded: set[str] = set()
        for n in self.nodes:
            if n.op_type == "Constant":
                attr = next((a for a in n.attribute if a.name == "value"), None)
                if attr is not None:
                    self.const[n.output[0]] = numpy_helper.to_array(attr.t)
                self.folded.add(n.name)
            elif n.input and all((not t) or t in self.const or self._is_folded_output(t) for t in n.input):
                self.folded.add(n.name)

    def _is_folded_output(self, t: str) -> bool:
        p = self.producer.get(t)
        return p is not None and p.name in self.folded

    def only_consumer(self, t: str) -> onnx.NodeProto | None:
        c = self.consumers.get(t, [])
        return c[0] if len(c) == 1 and t not in self.outputs else None

    def attr(self, n: onnx.NodeProto, name: str, default=None):
        for a in n.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def is_shape_typed(self, n: onnx.NodeProto) -> bool:
        return any(self.dtype.get(o) in (TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL) for o in n.output if o)


def _with_input_shapes(model: onnx.ModelProto, inputs: list[InputSpec]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    by_name = {s.name: s for s in inputs}
    for inp in m.graph.input:
        if inp.name in by_name:
            dims = inp.type.tensor_type.shape.dim
            for d, v in zip(dims, by_name[inp.name].shape):
                d.Clear()
                d.dim_value = int(v)
    del m.graph.value_info[:]  # re-inferred with the static input shapes
    return m


def _act_after(G: _Graph, t: str) -> tuple[str, list[onnx.NodeProto], str]:
    """The activation applied to tensor t (as exporters write them) -> (act, its nodes, output tensor)."""
    cons = G.consumers.get(t, [])
    if t in G.outputs or not cons:
        return "none", [], t
    if len(cons) == 1:
        n = cons[0]
        if n.op_type == "Relu":
            return "relu", [n], n.output[0]
        if n.op_type == "HardSwish":
            return "hardswish", [n], n.output[0]
        if n.op_type == "Sigmoid":
            return "sigmoid", [n], n.output[0]
        if n.op_type == "Clip" and _clip_bounds(G, n) == (0.0, 6.0):
            return "relu6", [n], n.output[0]
    if len(cons) == 2:
        gate = next((c for c in cons if c.op_type in ("Sigmoid", "HardSigmoid")), None)
        mul = next((c for c in cons if c.op_type == "Mul"), None)
        if gate is not None and mul is not None and gate.output[0] in mul.input and t in mul.input \
                and G.only_consumer(gate.output[0]) is mul:
            return ("silu" if gate.op_type == "Sigmoid" else "hardswish"), [gate, mul], mul.output[0]
    return "none", [], t


def _clip_bounds(G: _Graph, n: onnx.NodeProto) -> tuple[float, float] | None:
    lo, hi = G.attr(n, "min"), G.attr(n, "max")
    if len(n.input) > 1 and n.input[1] in G.const:
        lo = float(G.const[n.input[1]])
    if len(n.input) > 2 and n.input[2] in G.const:
        hi = float(G.const[n.input[2]])
    return None if lo is None or hi is None else (float(lo), float(hi))


def _conv_params(G: _Graph, conv: onnx.NodeProto) -> dict | None:
    x, w = conv.input[0], conv.input[1]
    if x not in G.shape or w not in G.shape or conv.output[0] not in G.shape:
        return None
    _, cin, h, wd = G.shape[x]
    cout, _, kh, kw = G.shape[w]
    strides = G.attr(conv, "strides", [1, 1])
    dil = G.attr(conv, "dilations", [1, 1])
    return dict(cin=cin, cout=cout, h=h, w=wd, kh=kh, kw=kw, s=max(strides), d=max(dil), g=G.attr(conv, "group", 1))


def _nearest(value: float, choices) -> int:
    return min(choices, key=lambda c: abs(math.log(c / value)))


def _conv_kernel(p: dict, act: str) -> tuple[Kernel | None, str]:
    """The table kernel for a conv; approximations are named in the note."""
    note = []
    k = max(p["kh"], p["kw"])
    if p["kh"] != p["kw"]:
        note.append(f"{p['kh']}x{p['kw']} kernel counted as {k}x{k}")
    s = 2 if p["s"] >= 2 else 1
    if p["s"] > 2:
        note.append(f"stride {p['s']} counted as 2")
    d = 2 if p["d"] >= 2 else 1
    cin, cout, g = p["cin"], p["cout"], p["g"]
    if p["h"] == p["w"] == 1 and k == 1 and g == 1:  # a 1x1 conv on a pooled vector is a fully connected layer
        return Kernel.make("linear", cin=cin, cout=cout), "1x1 conv on a 1x1 map counted as linear"
    try:
        if g == 1:
            if k not in (1, 3, 5, 7):
                k = _nearest(k, (1, 3, 5, 7))
                note.append(f"kernel counted as {k}x{k}")
            kern = Kernel.make("conv", cin=cin, cout=cout, h=p["h"], w=p["w"], k=k, s=s, d=d, g=1, act=act)
        elif g == cin == cout:
            if k not in (3, 5, 7):
                k = _nearest(k, (3, 5, 7))
                note.append(f"depthwise kernel counted as {k}x{k}")
            kern = Kernel.make("dwconv", cin=cin, h=p["h"], w=p["w"], k=k, s=s, d=d, act=act)
        elif g == cin:  # depthwise with a channel multiplier: grouped conv with cin/g == 1 input per group
            kern = Kernel.make("gconv", cin=cin * 2, cout=cout * 2, g=g, h=p["h"], w=p["w"], k=min(k, 7), s=s, d=d, act=act)
            note.append("depthwise conv with channel multiplier approximated by a grouped conv")
        else:
            kern = Kernel.make("gconv", cin=cin, cout=cout, g=g, h=p["h"], w=p["w"], k=_nearest(k, (1, 3, 5, 7)), s=s, d=d,
                               act=act)
    except ValueError as e:
        return None, f"conv outside the kernel space ({e})"
    return kern, "; ".join(note)


class _Matcher:
    def __init__(self, G: _Graph):
        self.G = G
        self.claimed: set[str] = set()
        self.kernels: list[ModelKernel] = []
        self.free: list[str] = []

    def add(self, nodes: list[onnx.NodeProto], kernel: Kernel | None, note: str = "") -> None:
        self.claimed.update(n.name for n in nodes)
        self.kernels.append(ModelKernel(name=nodes[0].name, op_type="+".join(n.op_type for n in nodes),
                                        nodes=[n.name for n in nodes], kernel=kernel, note=note))

    def run(self) -> None:
        G = self.G
        for n in G.nodes:
            if n.name in self.claimed:
                continue
            if n.name in G.folded or G.is_shape_typed(n):
                self.free.append(n.name)
                self.claimed.add(n.name)
                continue
            handler = getattr(self, f"_{n.op_type}", None)
            if handler is None or not handler(n):
                self._unsupported(n)

    def _unsupported(self, n: onnx.NodeProto) -> None:
        if n.op_type in ALIAS_OPS and not self._starts_shuffle(n):
            self.free.append(n.name)
            self.claimed.add(n.name)
            return
        self.add([n], None, f"no kernel kind covers {n.op_type}")

    # --- patterns, keyed by the op that starts them -------------------------------------------
    def _Conv(self, n: onnx.NodeProto) -> bool:
        G = self.G
        p = _conv_params(G, n)
        if p is None:
            return False
        nodes, t = [n], n.output[0]
        bn = G.only_consumer(t)
        if bn is not None and bn.op_type == "BatchNormalization":
            nodes.append(bn)
            t = bn.output[0]
        act, act_nodes, _ = _act_after(G, t)
        kernel, note = _conv_kernel(p, act)
        self.add(nodes + act_nodes, kernel, note)
        return True

    def _GlobalAveragePool(self, n: onnx.NodeProto) -> bool:
        if self._se(n):
            return True
        x = n.input[0]
        if x not in self.G.shape:
            return False
        _, c, h, w = self.G.shape[x]
        self.add([n], Kernel.make("gap", c=c, h=h, w=w))
        return True

    def _ReduceMean(self, n: onnx.NodeProto) -> bool:
        axes = self.G.attr(n, "axes")
        if axes is None and len(n.input) > 1 and n.input[1] in self.G.const:
            axes = [int(a) for a in self.G.const[n.input[1]].ravel()]
        if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            return False
        return self._GlobalAveragePool(n)

    def _se(self, gap: onnx.NodeProto) -> bool:
        """GAP -> Conv1x1 -> act -> Conv1x1 -> Sigmoid|HardSigmoid -> Mul(x, gate)."""
        G = self.G
        x = gap.input[0]
        c1 = G.only_consumer(gap.output[0])
        if x not in G.shape or c1 is None or c1.op_type != "Conv":
            return False
        _, mid_acts, t = _act_after(G, c1.output[0])
        c2 = G.only_consumer(t)
        if c2 is None or c2.op_type != "Conv":
            return False
        gate = G.only_consumer(c2.output[0])
        if gate is None or gate.op_type not in ("Sigmoid", "HardSigmoid"):
            return False
        mul = G.only_consumer(gate.output[0])
        if mul is None or mul.op_type != "Mul" or x not in mul.input:
            return False
        _, c, h, w = G.shape[x]
        mid = G.shape[c1.input[1]][0] if c1.input[1] in G.shape else max(1, c // 4)
        r = _nearest(c / max(mid, 1), (4, 8, 16))
        try:
            kern = Kernel.make("se", c=c, h=h, w=w, r=r, gate="sigmoid" if gate.op_type == "Sigmoid" else "hardsigmoid")
        except ValueError as e:
            return self.add([gap, c1, *mid_acts, c2, gate, mul], None, f"SE outside the kernel space ({e})") or True
        note = "" if c // r == mid else f"reduction {c}/{mid} counted as r={r}"
        self.add([gap, c1, *mid_acts, c2, gate, mul], kern, note)
        return True

    def _Gemm(self, n: onnx.NodeProto) -> bool:
        G = self.G
        w = n.input[1]
        if w not in G.shape or len(G.shape[w]) != 2:
            return False
        cout, cin = G.shape[w] if G.attr(n, "transB", 0) else G.shape[w][::-1]
        self.add([n], Kernel.make("linear", cin=cin, cout=cout))
        return True

    def _MatMul(self, n: onnx.NodeProto) -> bool:
        G = self.G
        a, w = n.input[0], n.input[1]
        if w not in G.const or a not in G.shape or len(G.shape[w]) != 2 or math.prod(G.shape[a][:-1]) != 1:
            return False
        nodes = [n]
        add = G.only_consumer(n.output[0])
        if add is not None and add.op_type == "Add" and any(t in G.const for t in add.input):
            nodes.append(add)  # the bias
        cin, cout = G.shape[w]
        self.add(nodes, Kernel.make("linear", cin=cin, cout=cout))
        return True

    def _binary(self, n: onnx.NodeProto, kind: str) -> bool:
        G = self.G
        shapes = [G.shape.get(t) for t in n.input]
        out = G.shape.get(n.output[0])
        if out is None or len(out) != 4 or any(s is None for s in shapes):
            return False
        _, c, h, w = out
        nodes = [n]
        full = [s for s in shapes if s == out]
        if len(full) == 2:
            bcast = "none"
        else:
            bcast, kind = "channel", "mul"  # per-channel (or scalar) scale or bias: same memory traffic
        if kind == "add":
            act, act_nodes, _ = _act_after(G, n.output[0])
            if act == "relu":
                nodes += act_nodes  # ReLU after a residual add is fused into it
            kern = Kernel.make("add", c=c, h=h, w=w)
        else:
            kern = Kernel.make("mul", c=c, h=h, w=w, bcast=bcast)
        self.add(nodes, kern, "" if kind == n.op_type.lower() else f"broadcast {n.op_type} counted as a channel-broadcast mul")
        return True

    def _Add(self, n: onnx.NodeProto) -> bool:
        return self._binary(n, "add")

    def _Sum(self, n: onnx.NodeProto) -> bool:
        return len(n.input) == 2 and self._binary(n, "add")

    def _Mul(self, n: onnx.NodeProto) -> bool:
        return self._binary(n, "mul")

    def _Concat(self, n: onnx.NodeProto) -> bool:
        G = self.G
        out = G.shape.get(n.output[0])
        if out is None or len(out) != 4 or G.attr(n, "axis") % 4 != 1:
            return False
        parts = len([t for t in n.input if t])
        k = min(max(parts, 2), 4)
        c = max(1, round(out[1] / k))
        note = "" if parts == k and all(G.shape.get(t, [0, 0])[1] == c for t in n.input) else \
            f"{parts} inputs, {out[1]} channels counted as {k} x {c}"
        self.add([n], Kernel.make("concat", c=c, h=out[2], w=out[3], n=k), note)
        return True

    def _Split(self, n: onnx.NodeProto) -> bool:
        G = self.G
        x = n.input[0]
        outs = [o for o in n.output if o]
        if x not in G.shape or len(G.shape[x]) != 4 or G.attr(n, "axis", 0) % 4 != 1 or len(outs) not in (2, 3, 4):
            return False
        _, c, h, w = G.shape[x]
        if c % len(outs):
            return False
        self.add([n], Kernel.make("split", c=c, h=h, w=w, n=len(outs)))
        return True

    def _elementwise(self, n: onnx.NodeProto, op: str, nodes: list[onnx.NodeProto] | None = None) -> bool:
        shape = self.G.shape.get(n.input[0])
        if shape is None or len(shape) not in (2, 4) or shape[0] != 1:
            return False
        _, c, h, w = shape if len(shape) == 4 else (*shape, 1, 1)  # [1, features] after a linear layer
        self.add(nodes or [n], Kernel.make("act", c=c, h=h, w=w, op=op))
        return True

    def _BatchNormalization(self, n: onnx.NodeProto) -> bool:  # one not following a conv (pre-activation)
        return self._elementwise(n, "bn")

    def _Relu(self, n: onnx.NodeProto) -> bool:
        return self._elementwise(n, "relu")

    def _HardSwish(self, n: onnx.NodeProto) -> bool:
        return self._elementwise(n, "hardswish")

    def _Clip(self, n: onnx.NodeProto) -> bool:
        return _clip_bounds(self.G, n) == (0.0, 6.0) and self._elementwise(n, "relu6")

    def _Sigmoid(self, n: onnx.NodeProto) -> bool:
        x = n.input[0]
        act, nodes, _ = _act_after(self.G, x) if self.G.producer.get(x) is not None else ("none", [], x)
        if act == "silu" and n in nodes:
            return self._elementwise(n, "silu", nodes)
        return self._elementwise(n, "sigmoid")

    _HardSigmoid = _Sigmoid

    def _Slice(self, n: onnx.NodeProto) -> bool:
        """Channel slices of one tensor (how exporters write torch.chunk with traced shapes): one split kernel."""
        G = self.G
        x = n.input[0]
        xs, ys = G.shape.get(x), G.shape.get(n.output[0])
        if xs is None or ys is None or len(xs) != 4 or len(ys) != 4 or xs[2:] != ys[2:] or xs[0] != ys[0]:
            return False
        parts = [c for c in G.consumers.get(x, []) if c.op_type == "Slice" and c.name not in self.claimed
                 and G.shape.get(c.output[0], [0, 0])[2:] == xs[2:]]
        _, c, h, w = xs
        k = min(max(len(parts), round(c / max(ys[1], 1)), 2), 4)
        if c % k:
            k = 2 if c % 2 == 0 else k
        note = "" if len(parts) == k and all(G.shape[p.output[0]][1] * k == c for p in parts) else \
            f"{len(parts)} channel slice(s) of {c} counted as a split in {k}"
        try:
            kern = Kernel.make("split", c=c, h=h, w=w, n=k)
        except ValueError as e:
            kern, note = None, f"channel slice outside the kernel space ({e})"
        self.add(parts, kern, note)
        return True

    def _starts_shuffle(self, n: onnx.NodeProto) -> tuple | None:
        """Reshape [1,g,c/g,h,w] -> Transpose(0,2,1,3,4) -> Reshape [1,c,h,w]."""
        G = self.G
        if n.op_type != "Reshape":
            return None
        mid = G.shape.get(n.output[0])
        tr = G.only_consumer(n.output[0])
        if mid is None or len(mid) != 5 or tr is None or tr.op_type != "Transpose" or list(G.attr(tr, "perm", [])) != [0, 2, 1, 3, 4]:
            return None
        back = G.only_consumer(tr.output[0])
        if back is None or back.op_type not in ("Reshape", "Flatten") or len(G.shape.get(back.output[0], [])) != 4:
            return None
        return (tr, back, mid)

    def _Reshape(self, n: onnx.NodeProto) -> bool:
        found = self._starts_shuffle(n)
        if found is None:
            self.free.append(n.name)
            self.claimed.add(n.name)
            return True
        tr, back, (_, g, cg, h, w) = found
        c = g * cg
        gk = g if g in (2, 3, 4, 8) else next((x for x in (2, 4, 8, 3) if c % x == 0), None)
        kern = Kernel.make("shuffle", c=c, h=h, w=w, g=gk) if gk else None
        self.add([n, tr, back], kern, "" if gk == g else f"{g} groups counted as {gk}" if gk else f"shuffle of {c} channels")
        return True

    def _pool(self, n: onnx.NodeProto, kind: str) -> bool:
        G = self.G
        x = n.input[0]
        if x not in G.shape or n.output[0] not in G.shape:
            return False
        _, c, h, w = G.shape[x]
        oh, ow = G.shape[n.output[0]][2:]
        ks = G.attr(n, "kernel_shape")
        s = max(G.attr(n, "strides", [1, 1]))
        if oh == ow == 1 and list(ks) == [h, w] and kind == "avgpool":
            self.add([n], Kernel.make("gap", c=c, h=h, w=w), "full-map average pool counted as global average pool")
            return True
        k = max(ks)
        if k not in (2, 3) or s not in (1, 2) or min(h, w) < k:
            self.add([n], None, f"{n.op_type} with kernel {k} stride {s}: the kernel space has kernel 2/3, stride 1/2")
            return True
        self.add([n], Kernel.make(kind, c=c, h=h, w=w, k=k, s=s))
        return True

    def _MaxPool(self, n: onnx.NodeProto) -> bool:
        return self._pool(n, "maxpool")

    def _AveragePool(self, n: onnx.NodeProto) -> bool:
        return self._pool(n, "avgpool")

    def _Resize(self, n: onnx.NodeProto) -> bool:
        G = self.G
        x, y = n.input[0], n.output[0]
        if x not in G.shape or y not in G.shape:
            return False
        _, c, h, w = G.shape[x]
        if G.shape[y][2:] != [2 * h, 2 * w]:
            self.add([n], None, "Resize by a factor other than 2")
            return True
        mode = G.attr(n, "mode", b"nearest")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        self.add([n], Kernel.make("resize", c=c, h=h, w=w, mode="nearest" if mode == "nearest" else "linear"))
        return True

    _Upsample = _Resize


def _apply_runtime_fusion(model: onnx.ModelProto, dec: Decomposition, threads: int) -> None:
    """Mark kernels the runtime fused into their producer, drop those it removed (ONNX Runtime, level all)."""
    import os
    import tempfile

    from deploykit.profilers.ort_cpu import make_session

    from .graphmap import map_source_nodes

    with tempfile.TemporaryDirectory(prefix="deploykit-fuse-") as tmp:
        path = os.path.join(tmp, "optimised.onnx")
        make_session(model, threads, optimized_path=path, level="all")
        opt = onnx.load(path, load_external_data=False)
    sources = map_source_nodes(model, [(n.name, list(n.input), list(n.output)) for n in opt.graph.node])
    owner = {src: name for name, srcs in sources.items() for src in srcs}  # original node -> node that runs it
    op_of = {n.name: n.op_type for n in opt.graph.node}
    kept = []
    for k in dec.kernels:
        runners = {owner.get(n) for n in k.nodes} - {None}
        if not runners:
            dec.folded_nodes.extend(k.nodes)  # the runtime folded this pattern away
            continue
        if k.kernel is not None and k.kernel.kind == "add":
            k.fused = any("Conv" in op_of.get(r, "") for r in runners)  # folded into the conv producing an operand
        kept.append(k)
    dec.kernels = kept
    dec.runtime_fusion = True


def decompose(model: onnx.ModelProto, inputs: list[InputSpec], *, runtime_fusion: bool = True, threads: int = 1) -> Decomposition:
    """The kernels of `model` at the given input shapes. `runtime_fusion` consults ONNX Runtime's optimiser."""
    named = onnx.ModelProto()
    named.CopyFrom(model)
    for i, n in enumerate(named.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_{i}"  # graphmap and our patterns must agree on names
    G = _Graph(named, inputs)
    m = _Matcher(G)
    m.run()
    dec = Decomposition(kernels=m.kernels, free_nodes=m.free)
    if runtime_fusion:
        _apply_runtime_fusion(named, dec, threads)
    return dec
