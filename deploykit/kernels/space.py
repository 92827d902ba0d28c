"""Kernel space: the single-op graphs CNNs are made of, their parameters, costs and ONNX builders.

Each kind is a `KindSpec` registered with `@register_kind(name)`; the registry is the extension point.
Graphs hold what a runtime would fuse (Conv -> BN -> act) unfused, so ONNX Runtime fuses them as in a
real network and the measured latency is the fused kernel's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any, ClassVar, Mapping, Sequence, Union

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Value = Union[int, str]
Domain = Union[range, tuple]
Params = dict[str, Value]

MIN_OPSET = 14  # HardSwish needs opset 14
ACTS = ("none", "relu", "relu6", "hardswish", "silu", "sigmoid")
CHANNELS = range(1, 8193)
SPATIAL = range(1, 1025)
# Channel counts that recur in published CNNs beyond plain multiples of 8 (ShuffleNetV2 58/116/232/464 etc.)
POPULAR_CHANNELS = (16, 24, 32, 40, 48, 58, 64, 72, 80, 96, 112, 116, 120, 128, 144, 160, 184, 192, 200,
                    232, 240, 256, 320, 384, 464, 480, 512, 576, 640, 672, 768, 960, 1024, 1280, 1536, 2048)
POPULAR_P = 0.3  # share of channel draws that snap to a popular value rather than any multiple of 8


def snap8(c: float) -> int:
    """Nearest multiple of 8 (at least 8): what width multipliers round channels to."""
    return max(8, int(round(c / 8)) * 8)


def pick(rng: np.random.Generator, weighted: Mapping[Any, float]) -> Any:
    """Draw one key of `weighted` with probability proportional to its weight."""
    keys, w = list(weighted), np.fromiter(weighted.values(), float)
    return keys[int(rng.choice(len(keys), p=w / w.sum()))]


@dataclass(frozen=True)
class Site:
    """A place in a CNN: feature-map side `h` and the channel range networks use at that resolution."""
    h: int
    c_lo: int
    c_hi: int

    def contains(self, c: int) -> bool:
        return self.c_lo <= c <= self.c_hi

    def clip(self, c: float, rng: np.random.Generator) -> int:
        """Snap a target channel count into this site's range (multiple of 8 or a popular value)."""
        lo, hi = max(8, self.c_lo), self.c_hi
        c = min(max(c, lo), hi)
        popular = [p for p in POPULAR_CHANNELS if lo <= p <= hi]
        if popular and rng.random() < POPULAR_P:
            return min(popular, key=lambda p: abs(math.log(p / c)))
        return min(max(snap8(c), -(-lo // 8) * 8), hi // 8 * 8)

    def channels(self, rng: np.random.Generator) -> int:
        """Log-uniform channel count for this site (never below 8; RGB stems are chosen explicitly)."""
        lo = max(8, self.c_lo)
        return self.clip(math.exp(rng.uniform(math.log(lo), math.log(self.c_hi))), rng)


class _Graph:
    """Accumulates nodes and seeded initialisers of one kernel graph."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, value: Any, dtype: type = np.float32) -> str:
        name = f"c{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(self, *shape: int) -> str:
        fan_in = max(1, math.prod(shape[1:]))  # He init keeps activations in a normal numeric range
        return self.const(self.rng.standard_normal(shape, dtype=np.float32) * math.sqrt(2 / fan_in))

    def op(self, op_type: str, *inputs: str, n_out: int = 1, **attrs: Any) -> str:
        """Append a node; returns its (first) output. Further outputs become graph outputs too."""
        outs = [f"t{len(self.nodes)}"] + [f"t{len(self.nodes)}_{i}" for i in range(1, n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, **attrs))
        return outs[0]

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        stats = (r.uniform(0.5, 1.5, c), r.normal(0, 0.1, c), r.normal(0, 0.1, c), r.uniform(0.5, 1.5, c))
        return self.op("BatchNormalization", x, *(self.const(s) for s in stats), epsilon=1e-5)

    def act(self, x: str, act: str) -> str:
        if act == "none":
            return x
        if act == "relu6":
            return self.op("Clip", x, self.const(0.0), self.const(6.0))
        if act == "silu":
            return self.op("Mul", x, self.op("Sigmoid", x))
        return self.op({"relu": "Relu", "hardswish": "HardSwish", "sigmoid": "Sigmoid"}[act], x)


class KindSpec:
    """One kernel kind: parameter domains, prior sampler, perturbation, cost model and ONNX builder."""
    name: ClassVar[str] = ""
    domains: ClassVar[dict[str, Domain]] = {}
    defaults: ClassVar[Params] = {}
    channel_params: ClassVar[tuple[str, ...]] = ()  # scaled by perturb()
    sampled: ClassVar[bool] = True  # False: measured on purpose (calibration networks), never sampled
    derived: ClassVar[tuple[str, ...]] = ()  # set by repair(), never perturbed directly

    def fill(self, p: Params) -> Params:
        """Apply defaults; a missing width defaults to the height (square maps)."""
        p = {**self.defaults, **p}
        if "w" in self.domains and "w" not in p and "h" in p:
            p["w"] = p["h"]
        return p

    def validate(self, p: Params) -> None:
        """Cross-parameter constraints; raise ValueError."""

    def sample(self, rng: np.random.Generator, site: Site) -> Params | None:
        """Prior draw at `site`; None when this kind does not occur there (the caller redraws)."""
        raise NotImplementedError

    def repair(self, p: Params) -> Params:
        """Restore couplings (e.g. dwconv cout == cin) after a generic perturbation."""
        return p

    def perturb(self, p: Params, rng: np.random.Generator, resolutions: Sequence[int]) -> Params:
        """Change one or two parameters a little: channels x0.75..1.33, neighbouring resolution, other choice."""
        q = dict(p)
        names = [n for n in self.domains if n != "w" and n not in self.derived]
        for name in rng.choice(names, size=min(len(names), 1 + int(rng.random() < 0.4)), replace=False):
            name, dom, v = str(name), self.domains[name], q[name]
            if name in self.channel_params:
                q[name] = snap8(v * math.exp(rng.uniform(math.log(0.75), math.log(4 / 3))))
            elif name == "h":
                near = [r for r in resolutions if r < v][-1:] + [r for r in resolutions if r > v][:1]
                q["h"] = int(near[rng.integers(len(near))]) if near else v
                if p.get("w") == p["h"]:
                    q["w"] = q["h"]  # square maps stay square
            elif isinstance(dom, range):
                q[name] = v * 2 if rng.random() < 0.5 else max(dom.start, v // 2)
            elif len(dom) > 1:
                q[name] = dom[int(rng.choice([i for i, x in enumerate(dom) if x != v]))]
        return self.repair(q)

    def input_shapes(self, p: Params) -> dict[str, list[int]]:
        return {"x": [1, p["c"], p["h"], p["w"]]}

    def output_shape(self, p: Params) -> list[int]:
        return [1, p["c"], p["h"], p["w"]]

    def macs(self, p: Params) -> int:
        """Multiply-accumulates; memory-bound ops report the elements they touch."""
        return math.prod(self.output_shape(p))

    def weights(self, p: Params) -> int:
        return 0

    def build(self, g: _Graph, p: Params) -> str:
        raise NotImplementedError

    def build_model(self, p: Params, opset: int) -> onnx.ModelProto | None:
        """A whole model for kinds not built node by node (calibration networks); None: use build()."""
        return None

    def features(self, p: Params) -> dict[str, float]:
        f: dict[str, float] = {}
        for name, dom in self.domains.items():
            if isinstance(dom, tuple) and isinstance(dom[0], str):
                f.update({f"{name}={c}": float(p[name] == c) for c in dom})  # one-hot, stable key set per kind
            else:
                f[name] = float(p[name])
        for name in self.channel_params:  # ONNX Runtime's blocked (NCHWc) kernels need channels in blocks of 8 or 16
            f.update({f"{name}%8": float(p[name] % 8 == 0), f"{name}%16": float(p[name] % 16 == 0)})
        out = self.output_shape(p)
        f.update(macs=float(self.macs(p)), w_bytes=4.0 * self.weights(p), out_bytes=4.0 * math.prod(out),
                 in_bytes=4.0 * sum(math.prod(s) for s in self.input_shapes(p).values()),
                 oh=float(out[2]) if len(out) == 4 else 1.0, ow=float(out[3]) if len(out) == 4 else 1.0)
        return f


_REGISTRY: dict[str, KindSpec] = {}
KERNEL_KINDS: tuple[str, ...] = ()


def register_kind(name: str):
    """Class decorator adding a KindSpec to the registry under `name`."""
    def deco(cls: type[KindSpec]) -> type[KindSpec]:
        global KERNEL_KINDS
        if name in _REGISTRY:
            raise ValueError(f"kernel kind {name!r} already registered")
        cls.name = name
        _REGISTRY[name] = cls()
        KERNEL_KINDS = tuple(_REGISTRY)
        return cls
    return deco


def kind_spec(kind: str) -> KindSpec:
    if kind not in _REGISTRY:
        raise ValueError(f"unknown kernel kind {kind!r}; valid: {', '.join(_REGISTRY)}")
    return _REGISTRY[kind]


def _describe(dom: Domain) -> str:
    return f"{dom.start}..{dom.stop - 1}" if isinstance(dom, range) else "/".join(map(str, dom))


def _normalise(kind: str, params: Mapping[str, Any]) -> tuple[tuple[str, Value], ...]:
    spec = kind_spec(kind)
    unknown = sorted(set(params) - set(spec.domains))
    if unknown:
        raise ValueError(f"{kind}: unknown params {unknown}; valid: {sorted(spec.domains)}")
    p, out = spec.fill(dict(params)), {}
    missing = sorted(set(spec.domains) - set(p))
    if missing:
        raise ValueError(f"{kind}: missing params {missing}; required: {sorted(spec.domains)}")
    for name, dom in spec.domains.items():
        v = p[name]
        if isinstance(v, Integral) and not isinstance(v, bool):
            v = int(v)  # numpy ints -> JSON-friendly ints
        elif isinstance(v, str):
            v = str(v)
        if type(v) not in (int, str) or v not in dom:
            raise ValueError(f"{kind}: {name}={p[name]!r} not in {_describe(dom)}")
        out[name] = v
    spec.validate(out)
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class Kernel:
    """One configured kernel; construction normalises and validates, so every instance is buildable."""
    kind: str
    params: tuple[tuple[str, Value], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", _normalise(self.kind, dict(self.params)))

    @classmethod
    def make(cls, kind: str, **params: Value) -> Kernel:
        return cls(kind, tuple(params.items()))

    @classmethod
    def from_dict(cls, d: Mapping[str, Value]) -> Kernel:
        d = dict(d)
        return cls.make(str(d.pop("kind")), **d)

    @classmethod
    def from_key(cls, key: str) -> Kernel:
        kind, _, body = key.partition(":")
        pairs = (kv.split("=", 1) for kv in body.split(",") if kv)
        return cls.make(kind, **{k: int(v) if v.isdigit() else v for k, v in pairs})

    def to_dict(self) -> dict[str, Value]:
        return {"kind": self.kind, **dict(self.params)}

    @property
    def key(self) -> str:
        return f"{self.kind}:" + ",".join(f"{k}={v}" for k, v in self.params)

    @property
    def spec(self) -> KindSpec:
        return kind_spec(self.kind)

    def get(self, name: str) -> Value:
        return dict(self.params)[name]

    @property
    def macs(self) -> int:
        return self.spec.macs(dict(self.params))

    def features(self) -> dict[str, float]:
        return self.spec.features(dict(self.params))

    def input_shapes(self) -> dict[str, list[int]]:
        return self.spec.input_shapes(dict(self.params))

    def output_shape(self) -> list[int]:
        return self.spec.output_shape(dict(self.params))

    def build_onnx(self, opset: int = 17, seed: int = 0) -> onnx.ModelProto:
        if opset < MIN_OPSET:
            raise ValueError(f"opset {opset} < {MIN_OPSET}")
        whole = self.spec.build_model(dict(self.params), opset)
        if whole is not None:
            return whole
        g = _Graph(seed)
        out = self.spec.build(g, dict(self.params))
        if not g.nodes or g.nodes[-1].output[0] != out:
            raise RuntimeError(f"{self.kind}: builder must end with the node producing its output")
        g.nodes[-1].output[0] = "y"  # fixed output name for the profiler
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in self.input_shapes().items()]
        outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, self.output_shape()) for o in g.nodes[-1].output]
        opsets = [helper.make_opsetid("", opset)]
        model = helper.make_model(helper.make_graph(g.nodes, self.key, inputs, outputs, g.inits),
                                  opset_imports=opsets, producer_name="deploykit",
                                  ir_version=helper.find_min_ir_version_for(opsets))
        onnx.checker.check_model(model, full_check=True)
        return model


def _stride(rng: np.random.Generator, h: int, p2: float) -> int:
    """Stride 2 with probability p2 on even maps, rarely on odd ones."""
    return 2 if h >= 7 and rng.random() < (p2 if h % 2 == 0 else p2 / 10) else 1


_ACT_PRIOR = {"none": 0.3, "relu": 0.3, "relu6": 0.15, "hardswish": 0.1, "silu": 0.1, "sigmoid": 0.05}
# cout/cin of pointwise convs: equal, MobileNet expansion 3-6x and projection back, ResNet bottleneck 4x/0.25x
_PW_RATIOS = {1: .2, 2: .1, 3: .05, 4: .15, 6: .15, 1 / 2: .1, 1 / 3: .05, 1 / 4: .1, 1 / 6: .1}
# cout/cin of spatial convs: same width, doubled when downsampling, occasionally halved
_SPATIAL_RATIOS = {1: .6, 2: .3, 1 / 2: .1}


class _ConvBase(KindSpec):
    domains = {"cin": CHANNELS, "cout": CHANNELS, "h": SPATIAL, "w": SPATIAL, "k": (1, 3, 5, 7),
               "s": (1, 2), "d": (1, 2), "g": CHANNELS, "act": ACTS}
    defaults = {"s": 1, "d": 1, "act": "none"}
    channel_params = ("cin", "cout")

    def validate(self, p: Params) -> None:
        if p["cin"] % p["g"] or p["cout"] % p["g"]:
            raise ValueError(f"{self.name}: cin={p['cin']} and cout={p['cout']} must be divisible by g={p['g']}")

    def input_shapes(self, p: Params) -> dict[str, list[int]]:
        return {"x": [1, p["cin"], p["h"], p["w"]]}

    def output_shape(self, p: Params) -> list[int]:
        return [1, p["cout"], (p["h"] - 1) // p["s"] + 1, (p["w"] - 1) // p["s"] + 1]  # "same" padding, odd k

    def macs(self, p: Params) -> int:
        _, c, oh, ow = self.output_shape(p)
        return c * oh * ow * self.weights(p) // p["cout"]

    def weights(self, p: Params) -> int:
        return p["cout"] * p["cin"] // p["g"] * p["k"] ** 2

    def build(self, g: _Graph, p: Params) -> str:
        k, s, d, pad = p["k"], p["s"], p["d"], p["d"] * (p["k"] - 1) // 2
        y = g.op("Conv", "x", g.weight(p["cout"], p["cin"] // p["g"], k, k), kernel_shape=[k, k],
                 strides=[s, s], pads=[pad] * 4, dilations=[d, d], group=p["g"])
        return g.act(g.bn(y, p["cout"]), p["act"])

    def features(self, p: Params) -> dict[str, float]:
        f = super().features(p)
        cg, og = p["cin"] // p["g"], p["cout"] // p["g"]  # per-group widths decide the inner loop of grouped convs
        f.update({"cin/g": float(cg), "cout/g": float(og), "cin/g%8": float(cg % 8 == 0), "cout/g%8": float(og % 8 == 0)})
        return f

    def _d(self, rng: np.random.Generator, k: int, s: int) -> int:
        return 2 if k == 3 and s == 1 and rng.random() < 0.05 else 1  # dilated 3x3 (DeepLab-style heads)


@register_kind("conv")
class ConvSpec(_ConvBase):
    defaults = {**_ConvBase.defaults, "g": 1}
    derived = ("g",)

    def validate(self, p: Params) -> None:
        if p["g"] != 1:
            raise ValueError(f"conv: g must be 1 (use gconv/dwconv), got {p['g']}")

    def sample(self, rng: np.random.Generator, site: Site) -> Params | None:
        stem = site.c_lo <= 3 and rng.random() < 0.3  # RGB input stem
        k = pick(rng, {3: .7, 7: .3}) if stem else pick(rng, {1: .5, 3: .38, 5: .07, 7: .05})
        s = 2 if stem else _stride(rng, site.h, 0.1 if k == 1 else 0.3)
        cin = 3 if stem else site.channels(rng)
        free = stem or rng.random() < 0.1
        ratio = pick(rng, _PW_RATIOS if k == 1 else _SPATIAL_RATIOS)
        cout = site.channels(rng) if free else site.clip(cin * ratio, rng)
        return dict(cin=cin, cout=cout, h=site.h, w=site.h, k=k, s=s, d=self._d(rng, k, s), g=1,
                    act=pick(rng, _ACT_PRIOR))


@register_kind("dwconv")
class DwConvSpec(_ConvBase):
    domains = {**_ConvBase.domains, "k": (3, 5, 7)}
    derived = ("cout", "g")

    def fill(self, p: Params) -> Params:
        return super().fill({"cout": p["cin"], "g": p["cin"], **p} if "cin" in p else p)

    def validate(self, p: Params) -> None:
        if not p["g"] == p["cin"] == p["cout"]:
            raise ValueError(f"dwconv: needs g == cin == cout, got g={p['g']} cin={p['cin']} cout={p['cout']}")

    def repair(self, p: Params) -> Params:
        return {**p, "cout": p["cin"], "g": p["cin"]}

    def sample(self, rng: np.random.Generator, site: Site) -> Params | None:
        c, k = site.channels(rng), pick(rng, {3: .6, 5: .3, 7: .1})
        s = _stride(rng, site.h, 0.25)
        return dict(cin=c, cout=c, g=c, h=site.h, w=site.h, k=k, s=s, d=self._d(rng, k, s), act=pick(rng, _ACT_PRIOR))


@register_kind("gconv")
class GConvSpec(_ConvBase):
    def validate(self, p: Params) -> None:
        super().validate(p)
        if not 1 < p["g"] < p["cin"]:
            raise ValueError(f"gconv: needs 1 < g < cin, got g={p['g']} cin={p['cin']}")

    def repair(self, p: Params) -> Params:
        g = p["g"]
        return {**p, "cin": max(g, round(p["cin"] / g) * g), "cout": max(g, round(p["cout"] / g) * g)}

    def sample(self, rng: np.random.Generator, site: Site) -> Params | None:
        k, cin = pick(rng, {1: .4, 3: .6}), site.channels(rng)
        s = _stride(rng, site.h, 0.2)
        # ShuffleNetV1-style few groups, or ResNeXt/RegNet-style fixed group width
        few = rng.random() < 0.5
        g = pick(rng, {2: .3, 3: .2, 4: .3, 8: .2}) if few else cin // pick(rng, {8: 1, 16: 1, 32: 1, 64: 1})
        if g < 2:
            return None
        cout = site.clip(cin * pick(rng, _SPATIAL_RATIOS if k > 1 else {1: .5, 4: .25, 1 / 4: .25}), rng) // g * g
        cin = cin // g * g
        if not (site.contains(cin) and site.contains(cout) and 1 < g < cin):
            return None
        return dict(cin=cin, cout=cout, g=g, h=site.h, w=site.h, k=k, s=s, d=self._d(rng, k, s),
                    act=pick(rng, _ACT_PRIOR))


class _MapSpec(KindSpec):
    """Kinds on one [1,c,h,w] map, drawn at a site."""
    domains = {"c": CHANNELS, "h": SPATIAL, "w": SPATIAL}
    channel_params = ("c",)

    def sample(self, rng: np.random.Generator, site: Site) -> Params | None:
        return dict(c=site.channels(rng), h=site.h, w=site.h)


@register_kind("add")
class AddSpec(_MapSpec):
    def input_shapes(self, p: Params) -> dict[str, list[int]]:
        return {"a": [1, p["c"], p["h"], p["w"]], "b": [1, p["c"], p["h"], p["w"]]}

    def build(self, g: _Graph, p: Params) -> str:
        return g.op("Add", "a", "b")


@register_kind("mul")
class MulSpec(AddSpec):
    domains = {**_MapSpec.domains, "bcast": ("none", "channel")}
    defaults = {"bcast": "none"}

    def input_shapes(self, p: Params) -> dict[str, list[int]]:
        b = [1, p["c"], 1, 1] if p["bcast"] == "channel" else [1, p["c"], p["h"], p["w"]]
        return {"a": [1, p["c"], p["h"], p["w"]], "b": b}

    def sample(self, rng: np.random.Generator, site: Site) -> Params | None:
        return {**super().sample(rng, site), "bcast": pick(rng, {"none": .4, "channel": .6})}

    def build(self, g: _Graph, p: Params) -> str:
        return g.op("Mul", "a", "b")


@register_kind("concat")
class ConcatSpec(_MapSpec):
    domains = {**_MapSpec.domains, "n": (2, 3, 4)}  # n inputs of c channels each

    def input_shapes(self, p: Params) -> dict[str, list[int]]:
        return {f"x{i}": [1, p["c"], p["h"], p["w"]] for i in range(p["n"])}

    def output_shape(self, p: Params) -> list[int]:
        return [1, p["n"] * p["c"], p["h"], p["w"]]

    def sample(self, rng: np.random.Generator, site: Site) -> Params | None:
        return {**super().sample(rng, site), "n": pick(rng, {2: .6, 3: .2, 4: .2})}

    def build(self, g: _Graph, p: Params) -> str:
        return g.op("Concat", *(f"x{i}" for i in range(p["n"])), axis=1)


@register_kind("shuffle")
class ShuffleSpec(_MapSpec):
    domains = {**_MapSpec.domains, "g": (2, 3, 4, 8)}

    def validate(self, p: Params) -> None:
        if p["c"] % p["g"]:
            raise ValueError(f"shuffle: c={p['c']} must be divisible by g={p['g']}")

    def repair(self, p: Params) -> Params:
        return {**p, "c": max(p["g"], round(p["c"] / p["g"]) * p["g"])}

    def sample(self, rng: np.random.Generator, site: Site) -> Params | None:
        p = {**super().sample(rng, site), "g": pick(rng, {2: .7, 3: .1, 4: .1, 8: .1})}
        return p if p["c"] % p["g"] == 0 else None

    def build(self, g: _Graph, p: Params) -> str:
        c, gr, h, w = p["c"], p["g"], p["h"], p["w"]
        y = g.op("Reshape", "x", g.const([1, gr, c // gr, h, w], np.int64))
        y = g.op("Transpose", y, perm=[0, 2, 1, 3, 4])
        return g.op("Reshape", y, g.const([1, c, h, w], np.int64))


class _PoolSpec(_MapSpec):
    domains = {**_MapSpec.domains, "k": (2, 3), "s": (1, 2)}
    op_type: ClassVar[str] = ""
    k_prior: ClassVar[dict[int, float]] = {}
    p2: ClassVar[float] = 0.5

    def validate(self, p: Params) -> None:
        if min(p["h"], p["w"]) < p["k"]:
            raise ValueError(f"{self.name}: map {p['h']}x{p['w']} smaller than k={p['k']}")

    def output_shape(self, p: Params) -> list[int]:
        k, s, pad = p["k"], p["s"], (p["k"] - 1) // 2
        return [1, p["c"], (p["h"] + 2 * pad - k) // s + 1, (p["w"] + 2 * pad - k) // s + 1]

    def macs(self, p: Params) -> int:
        return math.prod(self.output_shape(p)) * p["k"] ** 2

    def sample(self, rng: np.random.Generator, site: Site) -> Params | None:
        return {**super().sample(rng, site), "k": pick(rng, self.k_prior), "s": _stride(rng, site.h, self.p2)}

    def build(self, g: _Graph, p: Params) -> str:
        k, s, pad = p["k"], p["s"], (p["k"] - 1) // 2
        return g.op(self.op_type, "x", kernel_shape=[k, k], strides=[s, s], pads=[pad] * 4)


@register_kind("maxpool")
class MaxPoolSpec(_PoolSpec):
    op_type, k_prior, p2 = "MaxPool", {3: .7, 2: .3}, 0.8


@register_kind("avgpool")
class AvgPoolSpec(_PoolSpec):
    op_type, k_prior, p2 = "AveragePool", {2: .5, 3: .5}, 0.5


@register_kind("gap")
class GapSpec(_MapSpec):
    def output_shape(self, p: Params) -> list[int]:
        return [1, p["c"], 1, 1]

    def macs(self, p: Params) -> int:
        return p["c"] * p["h"] * p["w"]

    def build(self, g: _Graph, p: Params) -> str:
        return g.op("GlobalAveragePool", "x")


@register_kind("se")
class SeSpec(_MapSpec):
    domains = {**_MapSpec.domains, "r": (4, 8, 16), "gate": ("hardsigmoid", "sigmoid")}

    def validate(self, p: Params) -> None:
        if p["c"] < p["r"]:
            raise ValueError(f"se: c={p['c']} smaller than reduction r={p['r']}")

    def macs(self, p: Params) -> int:
        return 2 * p["c"] * p["h"] * p["w"] + 2 * p["c"] * (p["c"] // p["r"])  # pool + scale, two 1x1 convs

    def weights(self, p: Params) -> int:
        mid = p["c"] // p["r"]
        return 2 * p["c"] * mid + mid + p["c"]

    def sample(self, rng: np.random.Generator, site: Site) -> Params | None:
        p = {**super().sample(rng, site), "r": pick(rng, {4: .5, 8: .2, 16: .3})}
        return {**p, "gate": pick(rng, {"hardsigmoid": .4, "sigmoid": .6})} if p["c"] >= p["r"] else None

    def build(self, g: _Graph, p: Params) -> str:
        c, mid = p["c"], p["c"] // p["r"]
        y = g.op("GlobalAveragePool", "x")
        y = g.op("Relu", g.op("Conv", y, g.weight(mid, c, 1, 1), g.const(np.zeros(mid)), kernel_shape=[1, 1]))
        y = g.op("Conv", y, g.weight(c, mid, 1, 1), g.const(np.full(c, 0.5)), kernel_shape=[1, 1])
        y = g.op("HardSigmoid", y, alpha=1 / 6, beta=0.5) if p["gate"] == "hardsigmoid" else g.op("Sigmoid", y)
        return g.op("Mul", "x", y)


@register_kind("linear")
class LinearSpec(KindSpec):
    domains = {"cin": range(1, 65537), "cout": range(1, 65537)}
    channel_params = ("cin", "cout")

    def input_shapes(self, p: Params) -> dict[str, list[int]]:
        return {"x": [1, p["cin"], 1, 1]}  # classifier head after global pooling

    def output_shape(self, p: Params) -> list[int]:
        return [1, p["cout"]]

    def macs(self, p: Params) -> int:
        return p["cin"] * p["cout"]

    def weights(self, p: Params) -> int:
        return p["cin"] * p["cout"] + p["cout"]

    def sample(self, rng: np.random.Generator, site: Site) -> Params | None:
        cin = Site(1, 64, 4096).channels(rng)
        hidden = snap8(math.exp(rng.uniform(math.log(16), math.log(1000))))  # MLP heads between GAP and classes
        cout = pick(rng, {1000: .35, 10: .15, 100: .1, 0: .4}) or hidden
        return dict(cin=cin, cout=cout)

    def build(self, g: _Graph, p: Params) -> str:
        x = g.op("Flatten", "x", axis=1)
        return g.op("Gemm", x, g.weight(p["cout"], p["cin"]), g.const(np.zeros(p["cout"])), transB=1)


@register_kind("resize")
class ResizeSpec(_MapSpec):
    domains = {**_MapSpec.domains, "mode": ("nearest", "linear")}

    def output_shape(self, p: Params) -> list[int]:
        return [1, p["c"], 2 * p["h"], 2 * p["w"]]

    def macs(self, p: Params) -> int:
        return math.prod(self.output_shape(p)) * (4 if p["mode"] == "linear" else 1)  # bilinear reads 4 taps

    def sample(self, rng: np.random.Generator, site: Site) -> Params | None:
        if site.h > 112:  # decoders upsample towards, not beyond, the input resolution
            return None
        return {**super().sample(rng, site), "mode": pick(rng, {"nearest": .6, "linear": .4})}

    def build(self, g: _Graph, p: Params) -> str:
        # attributes as torch.onnx exports F.interpolate(scale_factor=2)
        ctm = {"nearest": "asymmetric", "linear": "pytorch_half_pixel"}[p["mode"]]
        return g.op("Resize", "x", "", g.const([1.0, 1.0, 2.0, 2.0]), mode=p["mode"],
                    coordinate_transformation_mode=ctm, nearest_mode="floor")


@register_kind("split")
class SplitSpec(_MapSpec):
    """Channel split into n equal parts (ShuffleNetV2's channel split); the output shape is one part's."""
    domains = {**_MapSpec.domains, "n": (2, 3, 4)}

    def validate(self, p: Params) -> None:
        if p["c"] % p["n"]:
            raise ValueError(f"split: c={p['c']} must be divisible by n={p['n']}")

    def repair(self, p: Params) -> Params:
        return {**p, "c": max(p["n"], round(p["c"] / p["n"]) * p["n"])}

    def output_shape(self, p: Params) -> list[int]:
        return [1, p["c"] // p["n"], p["h"], p["w"]]

    def macs(self, p: Params) -> int:
        return p["c"] * p["h"] * p["w"]

    def sample(self, rng: np.random.Generator, site: Site) -> Params | None:
        p = {**super().sample(rng, site), "n": pick(rng, {2: .8, 3: .1, 4: .1})}
        return p if p["c"] % p["n"] == 0 else None

    def build(self, g: _Graph, p: Params) -> str:
        return g.op("Split", "x", g.const([p["c"] // p["n"]] * p["n"], np.int64), axis=1, n_out=p["n"])


@register_kind("act")
class ActSpec(_MapSpec):
    """A standalone element-wise op no conv absorbs: activation after a concat or add, pre-activation BatchNorm."""
    domains = {**_MapSpec.domains, "op": ("relu", "relu6", "hardswish", "silu", "sigmoid", "bn")}

    def sample(self, rng: np.random.Generator, site: Site) -> Params | None:
        return {**super().sample(rng, site), "op": pick(rng, {"relu": .35, "bn": .25, "hardswish": .1, "relu6": .1,
                                                               "silu": .1, "sigmoid": .1})}

    def build(self, g: _Graph, p: Params) -> str:
        return g.bn("x", p["c"]) if p["op"] == "bn" else g.act("x", p["op"])


NET_GENERATIONS = (1, 2)  # versions of deploykit.netfamilies.random_network a table may refer to


@register_kind("net")
class NetSpec(KindSpec):
    """A seeded random CNN measured end to end: calibrates how kernel latencies add up inside a network.

    `gen` pins the generator version, so a table keeps meaning the same networks across upgrades.
    """
    domains = {"gen": NET_GENERATIONS, "seed": range(0, 2**31), "res": range(16, 1025)}
    defaults = {"gen": NET_GENERATIONS[-1]}
    sampled = False

    def input_shapes(self, p: Params) -> dict[str, list[int]]:
        return {"input": [1, 3, p["res"], p["res"]]}

    def output_shape(self, p: Params) -> list[int]:
        return [1, 1000]

    def macs(self, p: Params) -> int:
        return 0  # known only once built; calibration networks are not regressed on

    def build_model(self, p: Params, opset: int) -> onnx.ModelProto:
        import tempfile
        from pathlib import Path

        from deploykit.netfamilies import random_network
        from deploykit.zoo import export_onnx

        with tempfile.TemporaryDirectory(prefix="deploykit-net-") as tmp:
            path = export_onnx(random_network(p["seed"], p["res"], gen=p["gen"]), (1, 3, p["res"], p["res"]), Path(tmp) / "net.onnx",
                               opset=opset)
            return onnx.load(str(path))
