"""Structured channel pruning of arbitrary PyTorch CNNs, traced with torch.fx.

How it works: every channel a conv/linear layer creates is an *atom*; the example input is run through the traced
graph while each tensor carries the atom of every index along its one channel-carrying dim. Ops that tie channels
together (residual add, SE multiply, depthwise conv, chunk, a reshape with a fixed-size dim, ...) union atoms, so a
union-find class is one unit that must be kept or removed as a whole. A *group* is the set of layers whose outputs
carry the same classes in the same order, one class per channel; anything else (network input/output, unknown ops,
untraceable modules, channels shuffled or coupled with each other) is frozen and reported in `PruneGraph.skipped`.
Pruning removes classes: every conv/linear/BatchNorm is sliced at the positions whose class is removed, so the result
is a deep copy of the user's own module tree (their forward code unchanged), just narrower.

Choices (documented limits):
- Grouped conv (1 < groups < in_channels): the groups count stays; the coupled group gets `blocks = divisor = groups`
  and `keep` must hold the same number of channels in each of its `blocks` equal contiguous blocks
  (`select(..., graph=graph)` does that). Depthwise conv couples its input and output channels (multiplier > 1:
  pruned consistently, but its output is not a producer of the group).
- Channel shuffle (reshape -> transpose -> reshape) and chunk/split on channels are handled positionally: a fixed-size
  dim couples the channels it strides over (chunk(2) couples channel j with j + C/2). Where that couples two channels
  of the same layer (the ShuffleNetV2 trunk), the group is frozen and reported; branch-internal widths stay prunable.
- split with fixed sizes, channel slicing at fixed indices, a reshape whose channel dim is a constant, reductions over
  channels, norms other than BatchNorm, and unknown modules/ops are frozen and reported.
- Untraceable submodules (data-dependent control flow) and custom modules holding their own parameters become fx
  leaves; their input and output channels are frozen. A model whose top-level forward() cannot be traced raises
  DeployKitError. `prune` runs the pruned copy once on the analysed example and raises DeployKitError if it breaks.
- Channels are dim 1 of every producer's output (`Group.channel_dim` = 1), except a Linear applied over
  [..., features] (channel_dim = -1).
- `Group.mask_exact` is False when an op with f(0) != 0 that is not a producer (e.g. a BatchNorm after a concat of
  several groups) sits between the producers and a consumer: pruning is still correct, but zeroing the producers'
  outputs is then not the same as removing the channels.
"""

from __future__ import annotations

import builtins
import copy
import operator
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..errors import DeployKitError

__all__ = ["Group", "PruneGraph", "analyze", "importance", "select", "prune", "channel_counts"]


@dataclass
class Group:
    """Channels pruned together: the outputs of `producers` carry exactly these channels, in this order."""

    id: int
    channels: int
    producers: list[str]
    weights: list[str]
    divisor: int = 1
    min_channels: int = 1
    blocks: int = 1             # keep the same count in each of `blocks` equal contiguous channel blocks (grouped conv)
    channel_dim: int = 1        # dim of the producers' outputs holding the channels (-1: Linear over [..., features])
    mask_exact: bool = True     # zeroing the producers' outputs equals removing the channels (see module docstring)
    _classes: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _bns: list[str] = field(default_factory=list, repr=False, compare=False)


@dataclass
class PruneGraph:
    groups: list[Group]
    skipped: list[tuple[str, str]]
    _layers: dict[str, tuple[str, torch.Tensor | None, torch.Tensor]] = field(default_factory=dict, repr=False)
    _num_classes: int = field(default=0, repr=False)
    _example: torch.Tensor | None = field(default=None, repr=False)
    _output_shape: Any = field(default=None, repr=False)


# ----------------------------------------------------------------------------------------------------------------------
# op tables

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.GELU, nn.Tanh, nn.LeakyReLU, nn.ELU,
    nn.Mish, nn.Hardtanh, nn.Softplus, nn.CELU, nn.SELU, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout,
)
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
    nn.ReplicationPad2d,
)
_ELEMENTWISE_FUNCS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, operator.neg, operator.pow, operator.gt, operator.ge, operator.lt, operator.le, operator.eq,
    operator.ne, torch.gt, torch.ge, torch.lt, torch.le, torch.eq, torch.ne,
    torch.add, torch.sub, torch.mul, torch.div, torch.true_divide,
    torch.maximum, torch.minimum, torch.relu, torch.sigmoid, torch.tanh, torch.abs, torch.exp, torch.neg, torch.sqrt,
    torch.clamp, torch.clip, torch.where, F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.sigmoid, F.tanh,
    F.gelu, F.leaky_relu, F.elu, F.mish, F.hardtanh, F.softplus, F.celu, F.selu, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout,
}
_ELEMENTWISE_METHODS = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum", "relu", "relu_",
    "sigmoid", "sigmoid_", "tanh", "tanh_", "abs", "exp", "neg", "sqrt", "clamp", "clamp_", "clamp_min", "clamp_max",
}
_UNARY_METHODS = {"float", "double", "half", "to", "type_as", "detach", "clone", "contiguous"}  # only `self` matters
_SPATIAL_FUNCS = {
    F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.interpolate, F.pad,
}
_REDUCE_FUNCS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin"}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin"}
_MOVE_FUNCS = {torch.flatten: "flatten", torch.reshape: "reshape", torch.permute: "permute",
               torch.transpose: "transpose", torch.squeeze: "squeeze", torch.unsqueeze: "unsqueeze",
               torch.swapaxes: "swapaxes"}
_MOVE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "unflatten",
                 "view_as", "swapaxes", "expand"}
_CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}
_SPLIT_FUNCS = {torch.chunk: "chunk", torch.split: "split"}
_SOFTMAX_FUNCS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_INTROSPECT_METHODS = {"size", "dim", "numel", "ndimension"}


# ----------------------------------------------------------------------------------------------------------------------
# union-find over channel atoms

class _Atoms:
    """Union-find: one atom per channel created; coupled atoms share a root; frozen roots carry a reason."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.frozen: dict[int, str] = {}

    def new(self, n: int, frozen: str | None = None) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        if frozen:
            for a in range(start, start + n):
                self.frozen[a] = frozen
        return torch.arange(start, start + n, dtype=torch.long)

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:  # the older atom stays root: stable class ids
            ra, rb = rb, ra
        self.parent[rb] = ra
        if rb in self.frozen:
            self.frozen.setdefault(ra, self.frozen.pop(rb))

    def union_all(self, xs: torch.Tensor, ys: torch.Tensor) -> None:
        pairs = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1).unique(dim=0)
        for a, b in pairs.tolist():
            if a != b:
                self.union(a, b)

    def resolve(self, atoms: torch.Tensor) -> torch.Tensor:
        if atoms.numel() == 0:
            return atoms.clone()
        uniq, inverse = torch.unique(atoms, return_inverse=True)
        roots = torch.tensor([self.find(a) for a in uniq.tolist()], dtype=torch.long)
        return roots[inverse]

    def freeze(self, atoms: torch.Tensor, reason: str) -> None:
        for a in torch.unique(atoms).tolist():
            self.frozen.setdefault(self.find(a), reason)

    def frozen_reason(self, roots: torch.Tensor) -> str | None:
        for r in torch.unique(roots).tolist():
            if r in self.frozen:
                return self.frozen[r]
        return None


@dataclass
class _Lab:
    """Channel labels of a tensor: labels vary only along `dim`; atoms[i] is the atom of index i along it."""

    dim: int
    atoms: torch.Tensor


@dataclass
class _Layer:
    kind: str                       # "conv", "linear" or "bn"
    in_atoms: torch.Tensor | None
    out_atoms: torch.Tensor
    origin: bool                    # creates new channels (a group can start here)
    nodes: list[fx.Node] = field(default_factory=list)
    out_dims: list[tuple[int, int]] = field(default_factory=list)  # (channel dim, rank) of the output, per call


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160]}" if text else type(err).__name__


def _walk(obj: Any):
    """Yield the leaves of nested lists/tuples/dicts."""
    if isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _walk(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _walk(x)
    else:
        yield obj


# ----------------------------------------------------------------------------------------------------------------------
# tracing

class _Tracer(fx.Tracer):
    """Traces into user modules; a module whose tracing fails, or a custom module holding its own parameters,
    becomes a leaf (its channels are frozen)."""

    def __init__(self) -> None:
        super().__init__()
        self.leaf_reasons: dict[str, str] = {}
        self._param_cache: dict | None = None

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        self._param_cache = parameter_proxy_cache  # kept so a failed trace-in can drop proxies of erased nodes
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_reasons or super().is_leaf_module(m, module_qualified_name):
            return True
        if isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        if next(m.parameters(recurse=False), None) is not None or next(m.buffers(recurse=False), None) is not None:
            self.leaf_reasons[module_qualified_name] = f"custom module {type(m).__name__} holds its own parameters"
            return True
        return False

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        if self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        n_before = len(self.graph.nodes)
        stack, calls = OrderedDict(self.module_stack), dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as err:  # noqa: BLE001 - any failure inside a user forward makes that module a leaf
            created = list(self.graph.nodes)[n_before:]
            for node in reversed(created):
                self.graph.erase_node(node)
            if self._param_cache is not None:
                erased = set(created)
                for key in [k for k, p in self._param_cache.items() if p.node in erased]:
                    del self._param_cache[key]
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.num_calls.clear()
            self.num_calls.update(calls)
            self.leaf_reasons[name] = f"fx cannot trace {type(m).__name__} ({_one_line(err)})"
            return super().call_module(m, forward, args, kwargs)


class _Interp(fx.Interpreter):
    """Runs the traced graph on the example input and hands each node's real args and result to the analyzer."""

    def __init__(self, gm: fx.GraphModule, analyzer: "_Analyzer") -> None:
        super().__init__(gm)
        self.analyzer = analyzer

    def run_node(self, n: fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            result = getattr(self, n.op)(n.target, args, kwargs)
        self.analyzer.visit(n, args, kwargs, result)
        return result


# ----------------------------------------------------------------------------------------------------------------------
# channel-label propagation

class _Analyzer:
    def __init__(self, gm: fx.GraphModule, leaf_reasons: dict[str, str]) -> None:
        self.modules = dict(gm.named_modules())
        self.leaf_reasons = leaf_reasons
        self.atoms = _Atoms()
        self.info: dict[fx.Node, Any] = {}
        self.layers: dict[str, _Layer] = {}
        self.blocks: list[tuple[torch.Tensor, int, str]] = []  # (atoms at a grouped conv's in/out, groups, conv)
        self.skipped: list[tuple[str, str]] = []

    # -- helpers --------------------------------------------------------------------------------------------------
    def report(self, name: str, reason: str) -> None:
        if (name, reason) not in self.skipped:
            self.skipped.append((name, reason))

    def lab(self, arg: Any) -> Any:
        return self.info.get(arg) if isinstance(arg, fx.Node) else None

    def fresh(self, value: Any, frozen: str) -> Any:
        """Labels for a result of unknown channel meaning: new atoms, frozen."""
        if isinstance(value, torch.Tensor):
            return _Lab(1, self.atoms.new(value.shape[1], frozen)) if value.dim() >= 2 else None
        if isinstance(value, (list, tuple)):
            return tuple(self.fresh(v, frozen) for v in value)
        return None

    def freeze_info(self, info: Any, reason: str) -> None:
        for lab in _walk(info):
            if isinstance(lab, _Lab):
                self.atoms.freeze(lab.atoms, reason)

    def freeze_args(self, node: fx.Node, reason: str) -> bool:
        """Freeze the channels of every labelled input of `node`; True if there was any."""
        found = False
        for arg in _walk((node.args, node.kwargs)):
            info = self.lab(arg)
            if info is not None:
                self.freeze_info(info, reason)
                found = True
        return found

    def unknown(self, node: fx.Node, result: Any, what: str, why: str) -> Any:
        if self.freeze_args(node, f"{why} at {what}") or node.op == "call_module":
            self.report(what, f"{why}: channels in and out are kept")
        return self.fresh(result, f"{why} at {what}")

    def tensor_inputs(self, node_args: Any, values: Any) -> list[tuple[Any, torch.Tensor]]:
        """(labels or None, tensor) for every tensor among the args, walking nested lists in parallel."""
        if isinstance(values, torch.Tensor):
            return [(self.lab(node_args), values)]
        if isinstance(values, dict) and isinstance(node_args, dict):
            return [p for k in values for p in self.tensor_inputs(node_args.get(k), values[k])]
        if isinstance(values, (list, tuple)):
            if isinstance(node_args, (list, tuple)) and len(node_args) == len(values):
                return [p for n, v in zip(node_args, values) for p in self.tensor_inputs(n, v)]
            infos = self.lab(node_args)  # one node holding a tuple (chunk/split output)
            infos = infos if isinstance(infos, tuple) and len(infos) == len(values) else [None] * len(values)
            return [(i, v) for i, v in zip(infos, values) if isinstance(v, torch.Tensor)]
        return []

    # -- dispatch -------------------------------------------------------------------------------------------------
    def visit(self, node: fx.Node, args: tuple, kwargs: dict, result: Any) -> None:
        if node.op == "placeholder":
            info = self.fresh(result, "network input channels")
        elif node.op == "get_attr":
            info = None  # a parameter/buffer used directly: unknown channel meaning
        elif node.op == "output":
            self.freeze_args(node, "network output channels")
            return
        elif node.op == "call_module":
            info = self.call_module(node, self.modules[node.target], args, kwargs, result)
        elif node.op == "call_function":
            info = self.call_function(node, node.target, args, kwargs, result)
        else:
            info = self.call_method(node, node.target, args, kwargs, result)
        self.info[node] = info

    def call_module(self, node, mod, args, kwargs, result):
        name = node.target
        x_node = node.args[0] if node.args else None
        x = args[0] if args else None
        lab = self.lab(x_node)
        if name in self.leaf_reasons:
            return self.unknown(node, result, name, self.leaf_reasons[name])
        known = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.PReLU, nn.Flatten, nn.Softmax,
                 nn.LogSoftmax) + _ELEMENTWISE_MODULES + _SPATIAL_MODULES
        if not isinstance(mod, known):
            return self.unknown(node, result, name, f"{type(mod).__name__} is not a module deploykit can prune through")
        if not isinstance(x, torch.Tensor) or len(args) != 1 or kwargs:
            return self.unknown(node, result, name, f"{type(mod).__name__} called with unusual arguments")
        if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            return self.conv(node, name, mod, lab, x, result)
        if isinstance(mod, nn.Linear):
            return self.linear(node, name, mod, lab, x, result)
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return self.batchnorm(node, name, mod, lab, x, result)
        if isinstance(mod, _ELEMENTWISE_MODULES) or (isinstance(mod, nn.PReLU) and mod.num_parameters == 1):
            return self.elementwise(node, [(lab, x)], result)
        if isinstance(mod, _SPATIAL_MODULES):
            return self.spatial(node, lab, x, result)
        if isinstance(mod, nn.Flatten):
            return self.movement(node, lab, x, lambda t: mod(t), result, set())
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
            return self.softmax(node, lab, x, mod.dim, result)
        return self.unknown(node, result, name, f"{type(mod).__name__} called in an unsupported way")

    def call_function(self, node, fn, args, kwargs, result):
        if fn is operator.getitem:
            return self.getitem(node, args, result)
        if fn is builtins.getattr:
            if self.lab(node.args[0]) is not None and args[1] not in ("shape", "ndim", "dtype", "device"):
                return self.unknown(node, result, node.name, f"tensor attribute .{args[1]}")
            return None
        tensor_args = self.tensor_inputs((node.args, node.kwargs), (args, kwargs))
        if not tensor_args:
            return None  # arithmetic on sizes and other Python values
        if fn in _CAT_FUNCS:
            return self.cat(node, args, kwargs, result)
        known = (_ELEMENTWISE_FUNCS | _SPATIAL_FUNCS | set(_REDUCE_FUNCS) | set(_MOVE_FUNCS) | set(_SPLIT_FUNCS)
                 | _SOFTMAX_FUNCS)
        if fn not in known:
            return self.unknown(node, result, node.name, f"unknown op {getattr(fn, '__name__', fn)}")
        if not args or not isinstance(args[0], torch.Tensor):
            return self.unknown(node, result, node.name, f"{getattr(fn, '__name__', fn)} with unusual arguments")
        x, lab = args[0], self.lab(node.args[0])
        if fn in _ELEMENTWISE_FUNCS:
            return self.elementwise(node, tensor_args, result)
        if fn in _SPATIAL_FUNCS:
            if fn is F.pad and len(args[1] if len(args) > 1 else kwargs.get("pad", ())) > 2 * (x.dim() - 2):
                return self.unknown(node, result, node.name, "padding on the channel dim")
            return self.spatial(node, lab, x, result)
        if fn in _REDUCE_FUNCS:
            return self.reduce(node, lab, x, args[1:], kwargs, result)
        if fn in _MOVE_FUNCS:
            return self.move_op(node, _MOVE_FUNCS[fn], lab, x, args[1:], kwargs, node.args[1:], result,
                                lambda t: fn(t, *args[1:], **kwargs))
        if fn in _SPLIT_FUNCS:
            return self.split(node, _SPLIT_FUNCS[fn], lab, x, args[1:], kwargs, node.args[1:], result)
        if fn in _SOFTMAX_FUNCS:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            return self.softmax(node, lab, x, dim, result)
        return self.unknown(node, result, node.name, f"unknown op {getattr(fn, '__name__', fn)}")

    def call_method(self, node, method, args, kwargs, result):
        x_node, x = node.args[0], args[0]
        if not isinstance(x, torch.Tensor):
            return None
        lab = self.lab(x_node)
        if method in _INTROSPECT_METHODS:
            return None
        if method in _UNARY_METHODS:
            return self.elementwise(node, [(lab, x)], result)
        if method in _ELEMENTWISE_METHODS:
            return self.elementwise(node, self.tensor_inputs((node.args, node.kwargs), (args, kwargs)), result)
        if method in _REDUCE_METHODS:
            return self.reduce(node, lab, x, args[1:], kwargs, result)
        if method in _MOVE_METHODS:
            return self.move_op(node, method, lab, x, args[1:], kwargs, node.args[1:], result,
                                lambda t: getattr(t, method)(*args[1:], **kwargs))
        if method in ("chunk", "split"):
            return self.split(node, method, lab, x, args[1:], kwargs, node.args[1:], result)
        if method in ("softmax", "log_softmax"):
            dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
            return self.softmax(node, lab, x, dim, result)
        return self.unknown(node, result, node.name, f"unknown tensor method .{method}()")

    # -- layers ---------------------------------------------------------------------------------------------------
    def _input_atoms(self, name: str, lab: Any, x: torch.Tensor, dim: int, n: int) -> torch.Tensor:
        if isinstance(lab, _Lab) and lab.dim == dim % x.dim() and lab.atoms.numel() == n:
            return lab.atoms
        if isinstance(lab, _Lab):
            self.atoms.freeze(lab.atoms, f"input of {name} in a layout deploykit does not follow")
            self.report(name, "input channels arrive in a layout deploykit does not follow: they are kept")
        return self.atoms.new(n, f"input of {name} has an unknown channel layout")

    def _record(self, name: str, node: fx.Node, kind: str, in_atoms, out_atoms, origin: bool,
                out_dim: tuple[int, int]) -> torch.Tensor:
        rec = self.layers.get(name)
        if rec is None:
            self.layers[name] = _Layer(kind, in_atoms, out_atoms, origin, [node], [out_dim])
            return out_atoms
        rec.out_dims.append(out_dim)
        # a module called again: the same weights see both inputs and produce both outputs
        if in_atoms is not None and rec.in_atoms is not None:
            self.atoms.union_all(rec.in_atoms, in_atoms)
        if out_atoms is not rec.out_atoms:
            self.atoms.union_all(rec.out_atoms, out_atoms)
        rec.nodes.append(node)
        return rec.out_atoms

    def conv(self, node, name, conv, lab, x, result):
        in_atoms = self._input_atoms(name, lab, x, 1, conv.in_channels)
        groups, cin, cout = conv.groups, conv.in_channels, conv.out_channels
        rec = self.layers.get(name)
        if groups > 1 and groups == cin:  # depthwise: output channel c*m + k is computed from input channel c only
            out_atoms, origin = in_atoms.repeat_interleave(cout // cin), False
        else:
            out_atoms = rec.out_atoms if rec is not None else self.atoms.new(cout)
            origin = True
            if groups > 1 and rec is None:
                self.blocks.append((in_atoms, groups, name))
                self.blocks.append((out_atoms, groups, name))
        out_atoms = self._record(name, node, "conv", in_atoms, out_atoms, origin, (1, result.dim()))
        return _Lab(1, out_atoms)

    def linear(self, node, name, fc, lab, x, result):
        in_atoms = self._input_atoms(name, lab, x, -1, fc.in_features)
        rec = self.layers.get(name)
        out_atoms = rec.out_atoms if rec is not None else self.atoms.new(fc.out_features)
        out_atoms = self._record(name, node, "linear", in_atoms, out_atoms, True, (result.dim() - 1, result.dim()))
        return _Lab(result.dim() - 1, out_atoms)

    def batchnorm(self, node, name, bn, lab, x, result):
        if not (isinstance(lab, _Lab) and lab.dim == 1 and lab.atoms.numel() == bn.num_features):
            return self.unknown(node, result, name, "BatchNorm over an unknown channel layout")
        atoms = self._record(name, node, "bn", lab.atoms, lab.atoms, False, (1, result.dim()))
        return _Lab(1, atoms)

    # -- generic ops ----------------------------------------------------------------------------------------------
    def elementwise(self, node, tensor_args, result):
        """Broadcasting elementwise op: operands that are not broadcast along the channel dim are coupled."""
        if not isinstance(result, torch.Tensor):
            return self.unknown(node, result, node.name, "elementwise op with a non-tensor result")
        rank = result.dim()
        labelled, unlabelled = [], []
        for info, v in tensor_args:
            offset = rank - v.dim()
            if isinstance(info, _Lab) and info.atoms.numel() == result.shape[info.dim + offset] \
                    and v.shape[info.dim] == result.shape[info.dim + offset]:
                labelled.append((info.dim + offset, info))
            elif isinstance(info, _Lab) and info.atoms.numel() > 1:
                return self.unknown(node, result, node.name, "elementwise op broadcasting over channels")
            else:
                unlabelled.append((offset, v))
        if not labelled:
            return None
        dims = {d for d, _ in labelled}
        if len(dims) > 1:
            return self.unknown(node, result, node.name, "elementwise op mixing different channel dims")
        dim = dims.pop()
        base = labelled[0][1].atoms
        for _, info in labelled[1:]:
            self.atoms.union_all(base, info.atoms)
        for offset, v in unlabelled:
            vd = dim - offset
            if 0 <= vd < v.dim() and v.shape[vd] > 1:  # a per-channel constant/parameter we cannot slice
                why = "combined with a per-channel tensor of unknown origin (parameter or constant)"
                self.atoms.freeze(base, f"{why} at {node.name}")
                self.report(node.name, f"{why}: channels are kept")
        return _Lab(dim, base)

    def spatial(self, node, lab, x, result):
        if isinstance(lab, _Lab) and lab.dim == 1 and x.dim() >= 3 and isinstance(result, torch.Tensor) \
                and result.shape[1] == x.shape[1]:
            return _Lab(1, lab.atoms)
        if lab is None:
            return None
        return self.unknown(node, result, node.name, "spatial op over an unexpected layout")

    def softmax(self, node, lab, x, dim, result):
        if not isinstance(lab, _Lab):
            return None
        if dim is None or dim % x.dim() == lab.dim:
            return self.unknown(node, result, node.name, "softmax over channels")
        return _Lab(lab.dim, lab.atoms)

    def reduce(self, node, lab, x, args, kwargs, result):
        if not isinstance(lab, _Lab):
            return None
        dims = kwargs.get("dim", args[0] if args else None)
        keepdim = kwargs.get("keepdim", args[1] if len(args) > 1 else False)
        if dims is None:
            return self.unknown(node, result, node.name, "reduction over all dims")
        dims = {d % x.dim() for d in ([dims] if isinstance(dims, int) else dims)}
        if lab.dim in dims:
            return self.unknown(node, result, node.name, "reduction over channels")
        if 0 in dims:
            return self.unknown(node, result, node.name, "reduction over the batch dim")
        return _Lab(lab.dim if keepdim else lab.dim - sum(d < lab.dim for d in dims), lab.atoms)

    def materialize(self, lab: _Lab, x: torch.Tensor) -> torch.Tensor:
        view = [1] * x.dim()
        view[lab.dim] = -1
        return lab.atoms.reshape(view).expand(x.shape).contiguous()

    def compress(self, node, labels: torch.Tensor, const_dims: set[int], result) -> Any:
        """Labels of a full tensor -> _Lab; dims of fixed size couple the channels they stride over."""
        atoms = self.atoms
        if labels.dim() < 2:
            return self.unknown(node, result, node.name, "channels folded into the batch dim")
        roots = atoms.resolve(labels)
        varied_const = False
        for d in sorted(const_dims):
            if 0 < d < roots.dim() and roots.shape[d] > 1 and bool((roots != roots.narrow(d, 0, 1)).any()):
                first = roots.narrow(d, 0, 1)
                for k in range(1, roots.shape[d]):
                    atoms.union_all(first, roots.narrow(d, k, 1))
                roots = atoms.resolve(roots)
                varied_const = True
        varying = [d for d in range(roots.dim()) if roots.shape[d] > 1
                   and bool((roots != roots.narrow(d, 0, 1)).any())]
        if 0 in varying or len(varying) > 1:
            atoms.freeze(roots, f"channels spread over several dims at {node.name}")
            self.report(node.name, "reshape spreads channels over several dims: channels are kept")
            return self.fresh(result, f"reshape at {node.name}")
        if not varying:
            if varied_const:
                atoms.freeze(roots, f"reshape to a fixed channel count at {node.name}")
                self.report(node.name, "reshape to a fixed channel count: channels are kept")
            dim = 1
        else:
            dim = varying[0]
        index = [0] * roots.dim()
        index[dim] = slice(None)
        return _Lab(dim, roots[tuple(index)].clone())

    def movement(self, node, lab, x, fn, result, const_dims):
        if not isinstance(lab, _Lab):
            return None
        if not isinstance(result, torch.Tensor):
            return self.unknown(node, result, node.name, "reshape-like op with a non-tensor result")
        return self.compress(node, fn(self.materialize(lab, x)), const_dims, result)

    def move_op(self, node, name, lab, x, args, kwargs, arg_nodes, result, fn):
        const_dims: set[int] = set()
        if name in ("view", "reshape"):
            shape_nodes = arg_nodes[0] if len(arg_nodes) == 1 and isinstance(arg_nodes[0], (list, tuple)) else arg_nodes
            if "shape" in kwargs or "size" in kwargs:
                shape_nodes = node.kwargs.get("shape", node.kwargs.get("size"))
            if isinstance(shape_nodes, (list, tuple)):
                const_dims = {d for d, s in enumerate(shape_nodes) if isinstance(s, int) and s != -1}
        elif name == "unflatten":
            dim = (arg_nodes[0] if arg_nodes else node.kwargs.get("dim")) % x.dim()
            sizes = arg_nodes[1] if len(arg_nodes) > 1 else node.kwargs.get("sizes", ())
            const_dims = {dim + i for i, s in enumerate(sizes) if isinstance(s, int) and s != -1}
        elif name == "expand":
            if isinstance(lab, _Lab) and result.shape[lab.dim] != x.shape[lab.dim]:
                return self.unknown(node, result, node.name, "expand over channels")
        if name == "view_as":
            fn = lambda t: t.reshape(result.shape)  # noqa: E731 - same layout, no tensor arg to substitute
        return self.movement(node, lab, x, fn, result, const_dims)

    def getitem(self, node, args, result):
        src, idx = args
        info = self.lab(node.args[0])
        if info is None:
            return None
        if isinstance(info, tuple):
            return info[idx]
        if not isinstance(src, torch.Tensor) or not isinstance(result, torch.Tensor):
            return self.unknown(node, result, node.name, "indexing")
        labels = self.materialize(info, src)
        try:
            sub = labels[idx]
        except Exception as err:  # noqa: BLE001 - tensor/boolean indices we do not model
            return self.unknown(node, result, node.name, f"indexing ({_one_line(err)})")
        out = self.compress(node, sub, set(), result)
        if isinstance(out, _Lab) and torch.equal(self.atoms.resolve(out.atoms), self.atoms.resolve(info.atoms)):
            return out
        return self.unknown(node, result, node.name, "indexing channels at fixed positions")

    def cat(self, node, args, kwargs, result):
        tensors = args[0] if args else kwargs.get("tensors", [])
        pairs = self.tensor_inputs(node.args[0] if node.args else node.kwargs.get("tensors"), tensors)
        if not isinstance(result, torch.Tensor) or len(pairs) != len(tensors):
            return self.unknown(node, result, node.name, "concatenation with unusual arguments")
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % result.dim()
        infos = [i for i, _ in pairs]
        if all(i is None for i in infos):
            return None
        known = [i for i in infos if isinstance(i, _Lab)]
        pdim = known[0].dim
        if dim == 0 or any(i.dim != pdim for i in known):
            return self.unknown(node, result, node.name, "concatenation across the batch or mixed channel dims")
        if dim == pdim:
            parts = [i.atoms if isinstance(i, _Lab) else
                     self.atoms.new(t.shape[dim], f"concatenated with unknown channels at {node.name}")
                     for i, t in zip(infos, tensors)]
            return _Lab(pdim, torch.cat(parts))
        if len(known) != len(infos):
            return self.unknown(node, result, node.name, "concatenation with a tensor of unknown channels")
        for i in known[1:]:
            self.atoms.union_all(known[0].atoms, i.atoms)
        return _Lab(pdim, known[0].atoms)

    def split(self, node, name, lab, x, args, kwargs, arg_nodes, result):
        if not isinstance(lab, _Lab):
            return None
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0) % x.dim()
        pieces = list(result)
        if dim != lab.dim:
            return tuple(_Lab(lab.dim, lab.atoms) for _ in pieces)
        size_node = arg_nodes[0] if arg_nodes else None
        sizes = [p.shape[dim] for p in pieces]
        equal = len(set(sizes)) == 1 and sum(sizes) == x.shape[dim]
        # chunk(n) keeps n parts after pruning; split(s) only when s is computed from the tensor's size
        understood = equal and (name == "chunk" or isinstance(size_node, fx.Node))
        if not understood:
            return self.unknown(node, result, node.name, "split of channels at fixed sizes")
        grid = lab.atoms.view(len(pieces), sizes[0])
        for k in range(1, len(pieces)):
            self.atoms.union_all(grid[0], grid[k])
        return tuple(_Lab(lab.dim, grid[k].clone()) for k in range(len(pieces)))


# ----------------------------------------------------------------------------------------------------------------------
# public API

def _trace(model: nn.Module) -> tuple[fx.GraphModule, dict[str, str]]:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure becomes one user-facing line
        raise DeployKitError(f"cannot trace {type(model).__name__} with torch.fx ({_one_line(err)}); move the "
                             "data-dependent Python control flow of its forward() into a submodule") from err
    return fx.GraphModule(tracer.root, graph), tracer.leaf_reasons


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as err:  # noqa: BLE001
        raise DeployKitError(f"cannot deep-copy {type(model).__name__} ({_one_line(err)}); pruning works on a copy") \
            from err


def _shapes(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (list, tuple)):
        return tuple(_shapes(o) for o in out)
    if isinstance(out, dict):
        return {k: _shapes(v) for k, v in out.items()}
    return None


def analyze(model: nn.Module, example_input: torch.Tensor) -> PruneGraph:
    """Trace `model` (a deep copy; the model is untouched) and find its prunable channel groups."""
    if not isinstance(model, nn.Module) or not isinstance(example_input, torch.Tensor):
        raise DeployKitError("analyze needs an nn.Module and one example input tensor, e.g. torch.randn(1, 3, 224, 224)")
    work = _copy(model).eval()
    gm, leaf_reasons = _trace(work)
    analyzer = _Analyzer(gm, leaf_reasons)
    try:
        with torch.no_grad():
            output = _Interp(gm, analyzer).run(example_input)
    except DeployKitError:
        raise
    except Exception as err:  # noqa: BLE001 - a model that does not run on the example is the user's to fix
        raise DeployKitError(f"the model does not run on an example input of shape {tuple(example_input.shape)} "
                             f"({_one_line(err)}); pass an input the model accepts") from err
    groups = _build_groups(analyzer, gm)
    atoms = analyzer.atoms
    layers = {name: (rec.kind, None if rec.in_atoms is None else atoms.resolve(rec.in_atoms),
                     atoms.resolve(rec.out_atoms)) for name, rec in analyzer.layers.items()}
    graph = PruneGraph(groups=groups, skipped=analyzer.skipped, _layers=layers, _num_classes=len(atoms.parent),
                       _example=example_input.detach().cpu().clone(), _output_shape=_shapes(output))
    _check_mask_exactness(work, graph, example_input)
    return graph


def _build_groups(an: _Analyzer, gm: fx.GraphModule) -> list[Group]:
    atoms = an.atoms
    out_roots = {name: atoms.resolve(rec.out_atoms) for name, rec in an.layers.items()}
    origins = [name for name, rec in an.layers.items() if rec.origin]
    # connected components of origin layers sharing a class
    owner: dict[int, str] = {}
    parent = {name: name for name in origins}

    def find(n: str) -> str:
        while parent[n] != n:
            n = parent[n]
        return n

    for name in origins:
        for r in torch.unique(out_roots[name]).tolist():
            if r in owner:
                a, b = find(owner[r]), find(name)
                if a != b:
                    parent[b] = a
            else:
                owner[r] = name
    components: dict[str, list[str]] = {}
    for name in origins:
        components.setdefault(find(name), []).append(name)

    candidates: list[tuple[list[str], torch.Tensor]] = []
    for names in components.values():
        key = out_roots[names[0]]
        reason = None
        if torch.unique(key).numel() != key.numel():
            reason = "channels are coupled with each other (channel shuffle, chunk or a fixed-size reshape)"
        elif any(not torch.equal(out_roots[n], key) for n in names[1:]):
            reason = "channels are coupled with differently ordered channels (shuffle or permuted concat)"
        else:
            frozen = atoms.frozen_reason(key)
            if frozen is not None:
                reason = frozen
        if reason is not None:
            atoms.freeze(key, reason)
            an.report(", ".join(names), f"{reason}: left intact")
            continue
        candidates.append((names, key))

    root_to_cand = {r: i for i, (_, key) in enumerate(candidates) for r in key.tolist()}
    blocks = [1] * len(candidates)
    invalid: dict[int, str] = {}
    for block_atoms, g, conv_name in an.blocks:
        roots = atoms.resolve(block_atoms)
        touched = {root_to_cand[r] for r in roots.tolist() if r in root_to_cand}
        if not touched:
            continue
        ci = next(iter(touched))
        if len(touched) > 1 or not torch.equal(candidates[ci][1], roots):
            for c in touched:
                invalid.setdefault(c, f"feeds grouped conv {conv_name} in a layout that cannot keep its groups equal")
            continue
        if blocks[ci] % g == 0:
            continue
        if g % blocks[ci] == 0:
            blocks[ci] = g
        else:
            invalid.setdefault(ci, f"grouped convs with incompatible group counts ({blocks[ci]}, {g})")

    bn_after: set[str] = set()  # conv/linear whose every call feeds only a BatchNorm: the BN is the producer
    for name, rec in an.layers.items():
        if rec.kind == "bn":
            continue
        if all(len(n.users) == 1 and next(iter(n.users)).op == "call_module"
               and an.layers.get(next(iter(n.users)).target, _Layer("", None, torch.empty(0), False)).kind == "bn"
               for n in rec.nodes):
            bn_after.add(name)

    groups: list[Group] = []
    for ci, (names, key) in enumerate(candidates):
        if ci in invalid:
            atoms.freeze(key, invalid[ci])
            an.report(", ".join(names), f"{invalid[ci]}: left intact")
            continue
        producers, weights, bns, dims = [], [], [], []
        for name, rec in an.layers.items():
            if not torch.equal(out_roots[name], key):
                continue
            dims += rec.out_dims
            if rec.kind == "bn":
                producers.append(name)
                bns.append(name)
                continue
            weights.append(name)
            if name not in bn_after:
                producers.append(name)
        if all(d == 1 for d, _ in dims):
            channel_dim = 1
        elif all(d == rank - 1 for d, rank in dims):
            channel_dim = -1
        else:
            reason = "its layers hold the channels in different dims"
            atoms.freeze(key, reason)
            an.report(", ".join(names), f"{reason}: left intact")
            continue
        groups.append(Group(id=len(groups), channels=int(key.numel()), producers=producers, weights=weights,
                            divisor=blocks[ci], min_channels=blocks[ci], blocks=blocks[ci], channel_dim=channel_dim,
                            _classes=key, _bns=bns))
    return groups


def _check_mask_exactness(model: nn.Module, graph: PruneGraph, example_input: torch.Tensor) -> None:
    """Zero every producer's output and check that no group's channel reaches a consumer non-zero."""
    if not graph.groups:
        return
    owner = torch.full((graph._num_classes,), -1, dtype=torch.long)
    for g in graph.groups:
        owner[g._classes] = g.id
    inexact: set[int] = set()
    handles = []

    def zero(_module, _args, out):
        return torch.zeros_like(out)

    def checker(in_classes: torch.Tensor, dim: int):
        gids = owner[in_classes]
        positions = (gids >= 0).nonzero().flatten()

        def pre(_module, args):
            x = args[0]
            if positions.numel() == 0 or x.shape[dim] != in_classes.numel():
                return
            nonzero = x.index_select(dim, positions.to(x.device)).movedim(dim, 0).flatten(1).ne(0).any(1).cpu()
            inexact.update(gids[positions[nonzero]].tolist())
        return pre

    try:
        for name in {p for g in graph.groups for p in g.producers}:
            handles.append(model.get_submodule(name).register_forward_hook(zero))
        for name, (kind, in_classes, _) in graph._layers.items():
            if kind in ("conv", "linear") and in_classes is not None:
                hook = checker(in_classes, 1 if kind == "conv" else -1)
                handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    for gid in inexact:
        graph.groups[gid].mask_exact = False


def importance(model: nn.Module, graph: PruneGraph, method: str = "magnitude") -> dict[int, torch.Tensor]:
    """Per group a float tensor [channels]: "magnitude" sums the mean-normalised L1 norms of the coupled filters;
    "bn" sums the mean-normalised |gamma| of the coupled BatchNorms (magnitude where a group has none)."""
    if method not in ("magnitude", "bn"):
        raise DeployKitError(f"unknown importance method {method!r}: use 'magnitude' or 'bn'")

    def normalised(v: torch.Tensor) -> torch.Tensor:
        v = v.detach().float()
        return v / v.mean().clamp_min(1e-12)

    scores: dict[int, torch.Tensor] = {}
    for g in graph.groups:
        gammas = [_module(model, n).weight for n in g._bns if _module(model, n).weight is not None]
        if method == "bn" and gammas:
            parts = [normalised(w.abs()) for w in gammas]
        else:
            parts = [normalised(_module(model, n).weight.abs().flatten(1).sum(1)) for n in g.weights]
        for p in parts:
            if p.numel() != g.channels:
                raise DeployKitError("this PruneGraph does not match the model (it was pruned since?): run analyze() "
                                     "again on the model you score")
        score = torch.stack(parts).sum(0).cpu()
        if g.blocks > 1:
            score._prune_blocks = g.blocks  # lets select() balance the blocks even when it is not given the graph
        scores[g.id] = score
    return scores


def select(scores: dict[int, torch.Tensor], counts: dict[int, int],
           graph: PruneGraph | None = None) -> dict[int, torch.Tensor]:
    """Indices (sorted ascending, int64) of the counts[g] highest-scoring channels per group. Groups with blocks > 1
    (grouped convs) keep the same number in each block when `graph` is given or the scores come from importance()."""
    keep: dict[int, torch.Tensor] = {}
    for gid, count in counts.items():
        if gid not in scores:
            raise DeployKitError(f"counts names group {gid}, which has no scores")
        blocks = graph.groups[gid].blocks if graph is not None else getattr(scores[gid], "_prune_blocks", 1)
        s = torch.as_tensor(scores[gid]).detach().float().flatten()
        count = int(count)
        if not 1 <= count <= s.numel():
            raise DeployKitError(f"group {gid}: cannot keep {count} of {s.numel()} channels; keep between 1 and "
                                 f"{s.numel()}")
        if blocks > 1:
            if count % blocks:
                raise DeployKitError(f"group {gid}: keep a multiple of {blocks} channels (grouped conv), not {count}")
            per, width = count // blocks, s.numel() // blocks
            idx = torch.cat([torch.sort(s[b * width:(b + 1) * width], descending=True, stable=True).indices[:per]
                             + b * width for b in range(blocks)])
        else:
            idx = torch.sort(s, descending=True, stable=True).indices[:count]
        keep[gid] = idx.sort().values.to(torch.int64)
    return keep


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        raise DeployKitError(f"the model has no submodule {name!r}: this PruneGraph was built for another model; run "
                             "analyze() on this one") from err


def _keep_mask(graph: PruneGraph, keep: dict) -> torch.Tensor:
    removed = torch.zeros(graph._num_classes, dtype=torch.bool)
    for gid, idx in keep.items():
        if not isinstance(gid, int) or not 0 <= gid < len(graph.groups):
            raise DeployKitError(f"keep names group {gid!r}, but the graph has groups 0..{len(graph.groups) - 1}")
        g = graph.groups[gid]
        idx = torch.as_tensor(idx)
        if idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise DeployKitError(f"group {gid}: keep holds channel indices (integers), not {idx.dtype}")
        idx = idx.long().flatten().cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= g.channels):
            raise DeployKitError(f"group {gid}: channel index out of range 0..{g.channels - 1}")
        if torch.unique(idx).numel() != idx.numel():
            raise DeployKitError(f"group {gid}: keep lists a channel twice")
        if idx.numel() < g.min_channels:
            raise DeployKitError(f"group {gid}: keep at least {g.min_channels} channels, not {idx.numel()}")
        if idx.numel() % g.divisor:
            raise DeployKitError(f"group {gid}: keep a multiple of {g.divisor} channels, not {idx.numel()}")
        if g.blocks > 1:
            per_block = torch.bincount(idx // (g.channels // g.blocks), minlength=g.blocks)
            if bool((per_block != per_block[0]).any()):
                raise DeployKitError(f"group {gid} feeds a grouped conv: keep the same number of channels in each of "
                                     f"its {g.blocks} blocks (select(..., graph=graph) does that)")
        gone = torch.ones(g.channels, dtype=torch.bool)
        gone[idx] = False
        removed[g._classes[gone]] = True
    return removed


def _param(new: torch.Tensor, old: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(new.detach().clone(), requires_grad=old.requires_grad)


def _slice_conv(conv: nn.Module, keep_in: torch.Tensor, keep_out: torch.Tensor) -> None:
    cin, cout, groups = conv.in_channels, conv.out_channels, conv.groups
    w = conv.weight.data
    if groups == 1:
        w = w[keep_out][:, keep_in]
        new_groups = 1
    elif groups == cin:  # depthwise (channel multiplier cout // cin)
        if keep_out.numel() != (cout // cin) * keep_in.numel():
            raise DeployKitError(f"internal: depthwise conv sliced inconsistently ({keep_in.numel()} in, "
                                 f"{keep_out.numel()} out)")
        w, new_groups = w[keep_out], keep_in.numel()
    else:
        in_per, out_per = cin // groups, cout // groups
        in_counts = torch.bincount(keep_in // in_per, minlength=groups)
        out_counts = torch.bincount(keep_out // out_per, minlength=groups)
        if bool((in_counts != in_counts[0]).any()) or bool((out_counts != out_counts[0]).any()):
            raise DeployKitError("internal: grouped conv sliced unevenly across its groups")
        rows = [w[o][keep_in[keep_in // in_per == o // out_per] % in_per] for o in keep_out.tolist()]
        w, new_groups = torch.stack(rows), groups
    conv.weight = _param(w, conv.weight)
    if conv.bias is not None:
        conv.bias = _param(conv.bias.data[keep_out], conv.bias)
    conv.in_channels, conv.out_channels, conv.groups = keep_in.numel(), keep_out.numel(), new_groups


def _slice_linear(fc: nn.Linear, keep_in: torch.Tensor, keep_out: torch.Tensor) -> None:
    fc.weight = _param(fc.weight.data[keep_out][:, keep_in], fc.weight)
    if fc.bias is not None:
        fc.bias = _param(fc.bias.data[keep_out], fc.bias)
    fc.in_features, fc.out_features = keep_in.numel(), keep_out.numel()


def _slice_bn(bn: nn.Module, keep: torch.Tensor) -> None:
    if bn.weight is not None:
        bn.weight = _param(bn.weight.data[keep], bn.weight)
        bn.bias = _param(bn.bias.data[keep], bn.bias)
    if bn.running_mean is not None:
        bn.running_mean = bn.running_mean[keep].clone()
        bn.running_var = bn.running_var[keep].clone()
    bn.num_features = keep.numel()


def prune(model: nn.Module, graph: PruneGraph, keep: dict[int, Sequence[int] | torch.Tensor]) -> nn.Module:
    """A pruned deep copy of `model` keeping, per group in `keep`, the listed channel indices (others untouched)."""
    removed = _keep_mask(graph, keep)
    new = _copy(model)
    if not bool(removed.any()):
        return new
    for name, (kind, in_classes, out_classes) in graph._layers.items():
        module = _module(new, name)
        expected = {"conv": (nn.Conv1d, nn.Conv2d), "linear": nn.Linear, "bn": (nn.BatchNorm1d, nn.BatchNorm2d)}[kind]
        sizes = {"conv": lambda m: (m.in_channels, m.out_channels), "linear": lambda m: (m.in_features, m.out_features),
                 "bn": lambda m: (m.num_features, m.num_features)}[kind]
        if not isinstance(module, expected) or sizes(module) != (in_classes.numel(), out_classes.numel()):
            raise DeployKitError(f"{name} does not match this PruneGraph (the model changed since analyze()): run "
                                 "analyze() again")
        keep_in = (~removed[in_classes]).nonzero().flatten()
        keep_out = (~removed[out_classes]).nonzero().flatten()
        if keep_in.numel() == in_classes.numel() and keep_out.numel() == out_classes.numel():
            continue
        if kind == "conv":
            _slice_conv(module, keep_in, keep_out)
        elif kind == "linear":
            _slice_linear(module, keep_in, keep_out)
        else:
            _slice_bn(module, keep_out)
    _check_runs(new, graph)
    return new


def _check_runs(model: nn.Module, graph: PruneGraph) -> None:
    """The pruned copy must run on the analysed example input and give the same output shapes."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    param = next(model.parameters(), None)
    example = graph._example if param is None else graph._example.to(param.device)
    try:
        with torch.no_grad():
            out = model(example)
    except Exception as err:  # noqa: BLE001 - a pattern the analysis missed: say so in one line
        raise DeployKitError(f"the pruned model fails to run ({_one_line(err)}): its forward() uses channel counts "
                             "deploykit cannot see; prune fewer groups or report this network") from err
    finally:
        for m, training in modes.items():
            m.train(training)
    if _shapes(out) != graph._output_shape:
        raise DeployKitError(f"pruning changed the output shape {graph._output_shape} -> {_shapes(out)}: its "
                             "forward() uses channel counts deploykit cannot see")


def channel_counts(model: nn.Module, example_input: torch.Tensor) -> dict[int, int]:
    """{group id: channels} of a (possibly pruned) model."""
    return {g.id: g.channels for g in analyze(model, example_input).groups}
