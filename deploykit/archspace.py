"""MobileNetV2-style macro search spaces: a small declarative spec, architectures as choices, one-hot encodings.

A `SpaceSpec` lists stages (channels, depth, stride) and the choices every searchable slot offers:
per block an op `k{k}e{e}` (depthwise kernel k, expansion e) or `skip`, per stage a width ratio, and
one input resolution. The first stage is MobileNetV2's fixed expand-1 3x3 stage: its blocks are not
searched (they hold no op in `Arch.ops`), its width ratio is. `skip` is offered only to blocks that
are not the first of their stage, because the first block changes the shape.

`encode` concatenates one one-hot group per choice; `groups` gives the slices, so a differentiable
search can put a softmax on each group. `build_network` and `arch_kernels` both walk `block_plan`,
so the torch module and the kernel list describe the same network.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from .errors import DeployKitError
from .kernels import Kernel
from .zoo import InvertedResidual, conv_bn_act, make_divisible

SKIP = "skip"
FIXED_OP = "k3e1"  # the first stage's blocks: MobileNetV2's expand-1 3x3 inverted residual
DW_KERNELS = (3, 5, 7)  # the kernel space's dwconv domain, so every block maps onto a profiled kernel
MAX_SIDE = 1024  # the kernel space's largest feature map


def parse_op(op: str) -> tuple[int, int]:
    """'k5e6' -> (5, 6): depthwise kernel size and expansion."""
    k, _, e = op[1:].partition("e")
    return int(k), int(e)


def _positive_ints(name: str, values: Any) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise DeployKitError(f"space spec: {name} must be a list of integers, got {values!r}") from None
    if not out or any(v <= 0 for v in out) or len(set(out)) != len(out):
        raise DeployKitError(f"space spec: {name} must be distinct positive integers, got {list(out)}")
    return out


@dataclass(frozen=True)
class StageSpec:
    channels: int
    depth: int
    stride: int

    def __post_init__(self) -> None:
        if not (isinstance(self.channels, int) and self.channels > 0 and isinstance(self.depth, int) and self.depth > 0):
            raise DeployKitError(f"space spec: stage {asdict(self)} needs positive integer channels and depth")
        if self.stride not in (1, 2):
            raise DeployKitError(f"space spec: stage {asdict(self)} has stride {self.stride!r}: use 1 or 2")


@dataclass(frozen=True)
class SpaceSpec:
    name: str
    resolutions: tuple[int, ...]
    num_classes: int
    stem_channels: int
    stages: tuple[StageSpec, ...]
    head_channels: int
    kernel_sizes: tuple[int, ...] = (3, 5, 7)
    expansions: tuple[int, ...] = (3, 6)
    width_ratios: tuple[float, ...] = (0.5, 0.75, 1.0)
    allow_skip: bool = True
    channel_divisor: int = 8  # a stage's width rounds to a multiple of this (MobileNet's 8; 1 for tiny networks)

    def __post_init__(self) -> None:
        # Lists and dicts (from JSON) become tuples and StageSpecs, so equal specs compare equal.
        set_ = object.__setattr__
        if not isinstance(self.name, str) or not self.name:
            raise DeployKitError("space spec: name must be a non-empty string")
        set_(self, "resolutions", _positive_ints("resolutions", self.resolutions))
        set_(self, "kernel_sizes", _positive_ints("kernel_sizes", self.kernel_sizes))
        set_(self, "expansions", _positive_ints("expansions", self.expansions))
        try:
            stages = tuple(s if isinstance(s, StageSpec) else StageSpec(**s) if isinstance(s, Mapping) else StageSpec(*s)
                           for s in self.stages)
            ratios = tuple(float(r) for r in self.width_ratios)
        except TypeError:
            raise DeployKitError("space spec: stages must be {channels, depth, stride} objects, width_ratios numbers") from None
        set_(self, "stages", stages)
        set_(self, "width_ratios", ratios)
        for field_name in ("num_classes", "stem_channels", "head_channels", "channel_divisor"):
            v = getattr(self, field_name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise DeployKitError(f"space spec: {field_name} must be a positive integer, got {v!r}")
        if not stages:
            raise DeployKitError("space spec: stages is empty: give at least one {channels, depth, stride}")
        if max(self.resolutions) > MAX_SIDE or min(self.resolutions) < 8:
            raise DeployKitError(f"space spec: resolutions must lie in 8..{MAX_SIDE}, got {list(self.resolutions)}")
        if not set(self.kernel_sizes) <= set(DW_KERNELS):
            raise DeployKitError(f"space spec: kernel_sizes {list(self.kernel_sizes)} must come from {list(DW_KERNELS)}")
        if not ratios or any(not 0 < r <= 4 for r in ratios) or len(set(ratios)) != len(ratios):
            raise DeployKitError(f"space spec: width_ratios must be distinct numbers in (0, 4], got {list(ratios)}")
        if not isinstance(self.allow_skip, bool):
            raise DeployKitError(f"space spec: allow_skip must be true or false, got {self.allow_skip!r}")

    def stage_width(self, stage: StageSpec, ratio: float) -> int:
        """Channels of `stage` at width `ratio`: MobileNet's rounding to a multiple of channel_divisor."""
        return make_divisible(stage.channels * ratio, self.channel_divisor)

    def widest_channels(self) -> list[int]:
        """Per stage the widest channel count any width ratio gives (a supernet's stage width)."""
        return [max(self.stage_width(s, r) for r in self.width_ratios) for s in self.stages]

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(f"k{k}e{e}" for k in self.kernel_sizes for e in self.expansions) + ((SKIP,) if self.allow_skip else ())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = [asdict(s) for s in self.stages]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpaceSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DeployKitError(f"space spec: unknown fields {unknown}: valid fields are {sorted(known)}")
        missing = sorted(f.name for f in fields(cls) if f.name not in d and f.default is MISSING)
        if missing:
            raise DeployKitError(f"space spec: missing fields {missing}")
        return cls(**d)


@dataclass(frozen=True)
class Arch:
    ops: tuple[str, ...]  # one per searchable block (every stage but the first), in network order
    widths: tuple[float, ...]  # one width ratio per stage
    resolution: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "ops", tuple(str(o) for o in self.ops))
        object.__setattr__(self, "widths", tuple(float(w) for w in self.widths))
        object.__setattr__(self, "resolution", int(self.resolution))

    def to_dict(self) -> dict:
        return {"ops": list(self.ops), "widths": list(self.widths), "resolution": self.resolution}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Arch:
        try:
            return cls(ops=tuple(d["ops"]), widths=tuple(d["widths"]), resolution=d["resolution"])
        except (KeyError, TypeError, ValueError):
            raise DeployKitError(f"not an architecture: {d!r}: give {{'ops': [...], 'widths': [...], 'resolution': R}}") from None

    @property
    def key(self) -> str:
        """Canonical text of the architecture, for de-duplication and resuming."""
        return json.dumps(self.to_dict(), sort_keys=True)


# -- choice groups and encodings -------------------------------------------------------------

@dataclass(frozen=True)
class ChoiceGroup:
    name: str
    choices: tuple[Any, ...]


def choice_groups(spec: SpaceSpec) -> list[ChoiceGroup]:
    """The searchable choices in encoding order: block ops, stage widths, the resolution."""
    out = []
    for si, stage in enumerate(spec.stages[1:], start=1):
        for bi in range(stage.depth):
            ops = spec.ops if bi > 0 else tuple(o for o in spec.ops if o != SKIP)
            out.append(ChoiceGroup(f"s{si}.b{bi}.op", ops))
    out += [ChoiceGroup(f"s{si}.width", spec.width_ratios) for si in range(len(spec.stages))]
    out.append(ChoiceGroup("resolution", spec.resolutions))
    return out


def groups(spec: SpaceSpec) -> list[tuple[str, int, int]]:
    """(group name, start, size) slices of the encoding: one softmax per slice."""
    out, start = [], 0
    for g in choice_groups(spec):
        out.append((g.name, start, len(g.choices)))
        start += len(g.choices)
    return out


def encoding_size(spec: SpaceSpec) -> int:
    return sum(len(g.choices) for g in choice_groups(spec))


def check_arch(spec: SpaceSpec, arch: Arch) -> None:
    """Raise DeployKitError when `arch` is not a point of `spec`."""
    cg = choice_groups(spec)
    n_ops = len(cg) - len(spec.stages) - 1
    if len(arch.ops) != n_ops or len(arch.widths) != len(spec.stages):
        raise DeployKitError(f"architecture has {len(arch.ops)} ops and {len(arch.widths)} widths, space {spec.name!r} "
                             f"needs {n_ops} ops and {len(spec.stages)} widths")
    for g, choice in zip(cg, choices(arch)):
        if choice not in g.choices:
            raise DeployKitError(f"architecture chooses {choice!r} for {g.name} in space {spec.name!r}: "
                                 f"choose one of {list(g.choices)}")


def encode(spec: SpaceSpec, arch: Arch) -> np.ndarray:
    """Float32 concatenation of one one-hot vector per choice group."""
    check_arch(spec, arch)
    out = np.zeros(encoding_size(spec), dtype=np.float32)
    for (_, start, _), g, choice in zip(groups(spec), choice_groups(spec), choices(arch)):
        out[start + g.choices.index(choice)] = 1.0
    return out


def decode(spec: SpaceSpec, encoding: np.ndarray) -> Arch:
    """The architecture taking the largest entry of each group (a search's final, discrete answer)."""
    e = np.asarray(encoding).reshape(-1)
    if e.size != encoding_size(spec):
        raise DeployKitError(f"encoding has {e.size} entries, space {spec.name!r} needs {encoding_size(spec)}")
    picked = [g.choices[int(np.argmax(e[start:start + size]))] for (_, start, size), g in zip(groups(spec), choice_groups(spec))]
    return arch_from_choices(spec, picked)


def sample_arch(spec: SpaceSpec, rng: np.random.Generator) -> Arch:
    """Uniform over every group's choices."""
    return arch_from_choices(spec, [g.choices[int(rng.integers(len(g.choices)))] for g in choice_groups(spec)])


def choices(arch: Arch) -> list[Any]:
    """The architecture's choice per group, in `choice_groups` order."""
    return [*arch.ops, *arch.widths, arch.resolution]


def arch_from_choices(spec: SpaceSpec, picked: Sequence[Any]) -> Arch:
    """The inverse of `choices`: one choice per group of `choice_groups(spec)`."""
    n_ops = len(picked) - len(spec.stages) - 1
    return Arch(ops=tuple(picked[:n_ops]), widths=tuple(picked[n_ops:-1]), resolution=picked[-1])


# -- the network an architecture describes ---------------------------------------------------

@dataclass(frozen=True)
class Block:
    stage: int
    index: int  # within its stage
    op: str  # "k{k}e{e}" or "skip"
    cin: int
    cout: int
    stride: int

    @property
    def residual(self) -> bool:
        return self.op != SKIP and self.stride == 1 and self.cin == self.cout


def stage_channels(spec: SpaceSpec, arch: Arch) -> list[int]:
    return [spec.stage_width(s, w) for s, w in zip(spec.stages, arch.widths)]


def block_plan(spec: SpaceSpec, arch: Arch) -> list[Block]:
    """Every block with its op and shapes; build_network and arch_kernels both follow it."""
    check_arch(spec, arch)
    ops = iter(arch.ops)
    blocks, cin = [], spec.stem_channels
    for si, (stage, cout) in enumerate(zip(spec.stages, stage_channels(spec, arch))):
        for bi in range(stage.depth):
            op = FIXED_OP if si == 0 else next(ops)
            blocks.append(Block(si, bi, op, cin, cout, stage.stride if bi == 0 else 1))
            cin = cout
    return blocks


def build_network(spec: SpaceSpec, arch: Arch) -> nn.Module:
    """Eval-mode torch module: stem, inverted residual blocks (skip = identity), 1x1 head, pool, classifier."""
    plan = block_plan(spec, arch)
    blocks = []
    for b in plan:
        if b.op == SKIP:
            blocks.append(nn.Identity())
        else:
            k, e = parse_op(b.op)
            blocks.append(InvertedResidual(b.cin, b.cout, b.stride, e, k))
    last = plan[-1].cout
    return nn.Sequential(
        conv_bn_act(3, spec.stem_channels, 3, 2),
        nn.Sequential(*blocks),
        conv_bn_act(last, spec.head_channels, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(spec.head_channels, spec.num_classes),
    ).eval()


def _out_side(h: int, stride: int) -> int:
    return (h - 1) // stride + 1  # "same" padding with odd kernels, as in PyTorch and the kernel space


def arch_kernels(spec: SpaceSpec, arch: Arch) -> list[Kernel]:
    """The network's kernels in the kernel space's vocabulary, each at the feature-map size it sees."""
    h = arch.resolution
    kernels = [Kernel.make("conv", cin=3, cout=spec.stem_channels, h=h, k=3, s=2, act="relu6")]
    h = _out_side(h, 2)
    plan = block_plan(spec, arch)
    for b in plan:
        if b.op == SKIP:
            continue
        k, e = parse_op(b.op)
        hidden = b.cin * e
        if e != 1:
            kernels.append(Kernel.make("conv", cin=b.cin, cout=hidden, h=h, k=1, act="relu6"))
        kernels.append(Kernel.make("dwconv", cin=hidden, h=h, k=k, s=b.stride, act="relu6"))
        h = _out_side(h, b.stride)
        kernels.append(Kernel.make("conv", cin=hidden, cout=b.cout, h=h, k=1, act="none"))
        if b.residual:
            kernels.append(Kernel.make("add", c=b.cout, h=h))
    last = plan[-1].cout
    kernels += [Kernel.make("conv", cin=last, cout=spec.head_channels, h=h, k=1, act="relu6"),
                Kernel.make("gap", c=spec.head_channels, h=h),
                Kernel.make("linear", cin=spec.head_channels, cout=spec.num_classes)]
    return kernels


def arch_macs(spec: SpaceSpec, arch: Arch) -> int:
    """Multiply-accumulates of the convolutions and the classifier (element-wise ops excluded)."""
    return sum(k.macs for k in arch_kernels(spec, arch) if k.kind in ("conv", "dwconv", "linear"))


# -- built-in spaces -------------------------------------------------------------------------

MBV2_SPACE = SpaceSpec(
    name="mbv2", resolutions=(128, 160, 192, 224), num_classes=1000, stem_channels=32, head_channels=1280,
    stages=tuple(StageSpec(c, d, s) for c, d, s in
                 ((16, 1, 1), (24, 2, 2), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))),
)
# 8x8 digit images upscaled to 32x32: four stages down to 4x4
DIGITS_SPACE = SpaceSpec(
    name="digits", resolutions=(32,), num_classes=10, stem_channels=16, head_channels=256,
    stages=tuple(StageSpec(c, d, s) for c, d, s in ((16, 1, 1), (24, 2, 2), (32, 2, 2), (64, 2, 2))),
)
SPACES: dict[str, SpaceSpec] = {"mbv2": MBV2_SPACE, "digits": DIGITS_SPACE}


def get_space(name_or_path: str) -> SpaceSpec:
    """A built-in space by name, or a JSON file holding a spec."""
    if name_or_path in SPACES:
        return SPACES[name_or_path]
    p = Path(name_or_path)
    if not p.is_file():
        raise DeployKitError(f"unknown space {name_or_path!r}: choose one of {', '.join(SPACES)} or give a JSON spec file")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DeployKitError(f"cannot read space spec {p} ({type(e).__name__}): write it as JSON like SpaceSpec.to_dict()") from None
    if not isinstance(d, dict):
        raise DeployKitError(f"space spec {p} must hold a JSON object like SpaceSpec.to_dict()")
    return SpaceSpec.from_dict(d)

