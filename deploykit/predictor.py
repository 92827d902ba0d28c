"""Kernel-level latency predictor: any ONNX model's latency on a profiled device, without running it.

`fit_predictor(table)` fits one regressor per kernel kind on the device table (the best of table
interpolation, random forest, gradient-boosted trees and an MLP, chosen on held-out entries), then
learns what kernels cost inside a network from the table's calibration networks (kind `net`, and the
user models measured into the table by `deploykit.feedback`, kind `model`: end to end only).

A kernel measured alone pays a session call and layout reorders of its own input and output that a
network does not (a depthwise conv costs about half as much inside a network as alone), while a
network streams weights that a repeated kernel keeps in cache (a classifier's Linear costs more).
Two steps, both fitted on the calibration networks:
1. context models: per kind, gradient-boosted trees map a kernel's features and standalone latency to
   its in-network latency, learned from the per-layer profiles the table stores for its calibration
   networks (each layer the runtime ran, attributed to the kernel whose nodes it covers);
2. network calibration: per kernel, in-network latency = a * context estimate + c + d * MB moved +
   e * MB of weights (a residual add the runtime fused into its conv: b * standalone), plus a
   constant, fitted on the networks' end-to-end latencies.
The fitted predictor is one JSON file beside the table (`NAME.predictor.json`).
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from .decompose import Decomposition, ModelKernel, decompose
from .errors import DeployKitError
from .fileio import atomic_write, read_versioned_json
from .fingerprint import mismatches
from .kernels import Kernel
from .onnx_io import InputSpec
from .profile import kernel_inputs
from .regressors import KindRegressor, errors, select
from .table import LatencyTable, resolve_device

FORMAT = "deploykit-predictor"
FORMAT_VERSION = 2  # 2: context models
OVERHEAD_TERMS = ("kernel", "fused", "count", "io_mb", "weight_mb", "const")
MIN_NETS = 8  # fewer calibration networks: keep the plain sum (a = 1, the rest 0)
CONTEXT_MIN_KERNELS = 40  # in-network instances a kind needs (from >= MIN_NETS profiled networks) for a context model
CONTEXT_FOLDS = 5  # context estimates of calibration networks come from models fitted without them
NETWORK_FEATURES_MIN_NETS = 40  # profiled networks the context models need before they also see `network_features`


def predictor_path(table_path: Path) -> Path:
    return table_path.with_name(table_path.name.removesuffix(".jsonl") + ".predictor.json")


def table_digest(table: LatencyTable) -> str:
    """Identifies the measurements a predictor was fitted on (changes when the table grows)."""
    h = hashlib.sha256()
    for key in sorted(table.entries):
        h.update(f"{key}={table.entries[key].stats.median_ms:.9g}\n".encode())
    for key in sorted(table.models):  # none in older tables: their digest is unchanged
        h.update(f"{key}={table.models[key].stats.median_ms:.9g}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class LayerPrediction:
    name: str
    op_type: str
    kind: str | None
    key: str | None
    latency_ms: float  # in-network estimate (sums, with overhead_ms, to the model's latency)
    kernel_ms: float  # the regressor's standalone latency of the kernel
    fused: bool = False
    note: str = ""

    def to_dict(self) -> dict:
        d = {"name": self.name, "op_type": self.op_type, "kind": self.kind, "key": self.key,
             "latency_ms": self.latency_ms, "kernel_ms": self.kernel_ms, "fused": self.fused}
        return {**d, "note": self.note} if self.note else d


@dataclass
class Prediction:
    latency_ms: float
    overhead_ms: float
    layers: list[LayerPrediction]
    missing: list[dict] = field(default_factory=list)  # kernels nothing could predict (with --allow-missing)
    runtime_fusion: bool = True

    def to_dict(self) -> dict:
        return {"latency_ms": self.latency_ms, "overhead_ms": self.overhead_ms, "kernels": len(self.layers),
                "layers": [x.to_dict() for x in self.layers], "missing": self.missing, "runtime_fusion": self.runtime_fusion}


def _design(kernels: list[Kernel], fused: list[bool], standalone: np.ndarray, context: np.ndarray) -> np.ndarray:
    """Per kernel, its columns of the overhead model (OVERHEAD_TERMS; the constant column stays 0)."""
    rows = np.zeros((len(kernels), len(OVERHEAD_TERMS)))
    for row, k, f, alone, ctx in zip(rows, kernels, fused, standalone, context):
        io = sum(math.prod(s) for s in k.input_shapes().values()) + math.prod(k.output_shape())
        row[:5] = (0.0, alone, 0.0, 0.0, 4e-6 * k.spec.weights(dict(k.params))) if f else \
            (ctx, 0.0, 1.0, 4e-6 * io, 4e-6 * k.spec.weights(dict(k.params)))
    return rows


def network_features(kernels: list[Kernel]) -> dict[str, float]:
    """What the rest of a network does to a kernel's caches: the weights and activations one inference streams.
    A kernel measured alone keeps its weights in cache from run to run; inside a network whose weights exceed the
    last-level cache it reads them from memory each time (a classifier's Linear costs 4 times its standalone latency
    in a 32 MB network on a 32 MB L3)."""
    return {"net_weight_mb": 4e-6 * sum(k.spec.weights(dict(k.params)) for k in kernels),
            "net_act_mb": 4e-6 * sum(math.prod(k.output_shape()) for k in kernels)}


def _context_rows(kernels: list[Kernel], standalone: np.ndarray, net: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{**k.features(), **n, "standalone_us": 1000.0 * float(v)} for k, v, n in zip(kernels, standalone, net)]


def _context_ms(context: dict[str, KindRegressor], kernels: list[Kernel], standalone: np.ndarray,
                net: list[dict[str, float]]) -> np.ndarray:
    """In-network latency of each kernel: its kind's context model, or the standalone latency for kinds without one.
    `net` holds each kernel's `network_features` (models fitted before they existed ignore them)."""
    out = np.array(standalone, dtype=np.float64)
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(kernels):
        if k.kind in context:
            by_kind[k.kind].append(i)
    for kind, idx in by_kind.items():
        out[idx] = context[kind].predict_ms(_context_rows([kernels[i] for i in idx], out[idx], [net[i] for i in idx]))
    return out


def _kernel_ms(kinds: dict[str, KindRegressor], kernels: list[Kernel], table: str) -> np.ndarray:
    """Standalone latency of each kernel, batched per kind; a kind without a regressor is named."""
    out = np.zeros(len(kernels))
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(kernels):
        by_kind[k.kind].append(i)
    for kind, idx in by_kind.items():
        if kind not in kinds:
            raise DeployKitError(_missing_kind_message(kind, table))
        out[idx] = kinds[kind].predict_ms([kernels[i].features() for i in idx])
    return out


def _missing_kind_message(kind: str, table: str) -> str:
    return (f"the device table {table} has no '{kind}' kernels: measure them with deploykit profile --resume --name "
            f"{table} --kinds {kind} --kernels <total>, refit with deploykit predictor fit, or pass --allow-missing")


class KernelPredictor:
    def __init__(self, doc: dict[str, Any], path: Path | None = None):
        self.doc = doc
        self.path = path
        self.kinds = {k: KindRegressor(v) for k, v in doc["kinds"].items()}
        self.context = {k: KindRegressor(v) for k, v in doc.get("context", {}).items()}
        self.coef = np.array([doc["overhead"]["coef"][t] for t in OVERHEAD_TERMS])

    @property
    def device(self) -> dict:
        return self.doc["device"]

    # ---------------------------------------------------------------- persistence
    def save(self, path: Path) -> Path:
        self.path = atomic_write(path, json.dumps(self.doc, separators=(",", ":")))
        return self.path

    @classmethod
    def load(cls, path: Path) -> "KernelPredictor":
        path = Path(path)
        doc = read_versioned_json(path, FORMAT, FORMAT_VERSION, "predictor",
                                  "refit it with deploykit predictor fit --device <table>")
        return cls(doc, path)

    @classmethod
    def for_device(cls, device: str, *, fit_if_missing: bool = False, progress: bool = False) -> "KernelPredictor":
        """The predictor fitted on a device's table (path or name); refuses one fitted on another device."""
        table_path = resolve_device(device)
        table = LatencyTable.load(table_path)
        path = predictor_path(table_path)
        if not path.exists() and fit_if_missing:
            return fit_predictor(table, progress=progress).save_beside(table_path)
        pred = cls.load(path)
        diff = mismatches(pred.device, table.device)
        if diff:
            raise DeployKitError(f"{path} was fitted for another device ({diff[0]}): refit it with deploykit predictor fit "
                                 f"--device {device}")
        if pred.doc.get("table_digest") != table_digest(table):
            print(f"deploykit: warning: {table_path} changed since {path.name} was fitted: refit with deploykit predictor "
                  f"fit --device {device}", file=sys.stderr)
        return pred

    def save_beside(self, table_path: Path) -> "KernelPredictor":
        self.save(predictor_path(table_path))
        return self

    # ---------------------------------------------------------------- prediction
    def kernel_ms(self, kernels: list[Kernel]) -> np.ndarray:
        """Standalone latency of each kernel (as the table measures it)."""
        return _kernel_ms(self.kinds, kernels, self.doc.get("table", "<table>"))

    def predict_kernels(self, kernels: list[Kernel], fused: list[bool] | None = None) -> float:
        """A network's latency from its kernel list (e.g. an architecture of a search space)."""
        return float(self._in_network([kernels], fused or [False] * len(kernels)).sum() + self.coef[-1])

    def predict_networks(self, networks: list[list[Kernel]]) -> np.ndarray:
        """Latency of many networks from their kernel lists, batched per kind (pre-training labels for a search space)."""
        if not networks:
            return np.zeros(0)
        flat = [k for ks in networks for k in ks]
        per_kernel = self._in_network(networks, [False] * len(flat)) if flat else np.zeros(0)
        ends = np.cumsum([len(ks) for ks in networks])
        return np.array([part.sum() for part in np.split(per_kernel, ends[:-1])]) + self.coef[-1]

    def _in_network(self, networks: list[list[Kernel]], fused: list[bool], standalone: np.ndarray | None = None) -> np.ndarray:
        """Each kernel's in-network latency, for the kernels of one or more networks (flattened in order); `standalone`:
        their standalone latencies where the caller has them already."""
        kernels = [k for ks in networks for k in ks]
        net = [f for ks in networks for f in [network_features(ks)] * len(ks)]
        standalone = self.kernel_ms(kernels) if standalone is None else standalone
        return np.maximum(_design(kernels, fused, standalone, _context_ms(self.context, kernels, standalone, net)) @ self.coef,
                          0.0)

    def predict_decomposition(self, dec: Decomposition, allow_missing: bool = False) -> Prediction:
        usable: list[ModelKernel] = []
        missing = []
        for mk in dec.kernels:
            if mk.kernel is None:
                missing.append({"name": mk.name, "op_type": mk.op_type, "reason": mk.note})
            elif mk.kernel.kind not in self.kinds:
                missing.append({"name": mk.name, "op_type": mk.op_type, "reason": f"no '{mk.kernel.kind}' kernels in the table"})
            else:
                usable.append(mk)
        if missing and not allow_missing:
            first = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            if first["reason"].startswith("no '"):
                raise DeployKitError(_missing_kind_message(first["reason"].split("'")[1], self.doc.get("table", "<table>")))
            raise DeployKitError(f"unsupported op in node {first['name']}: {first['op_type']}, {first['reason']}{more}: "
                                 "pass --allow-missing to predict the rest and report it")
        kernels = [mk.kernel for mk in usable]
        fused = [mk.fused for mk in usable]
        standalone = self.kernel_ms(kernels) if kernels else np.zeros(0)
        in_net = self._in_network([kernels], fused, standalone) if kernels else np.zeros(0)
        layers = [LayerPrediction(name=mk.name, op_type=mk.op_type, kind=mk.kernel.kind, key=mk.kernel.key,
                                  latency_ms=float(v), kernel_ms=float(s), fused=mk.fused, note=mk.note)
                  for mk, v, s in zip(usable, in_net, standalone)]
        overhead = float(self.coef[-1])
        return Prediction(latency_ms=float(in_net.sum()) + overhead, overhead_ms=overhead, layers=layers, missing=missing,
                          runtime_fusion=dec.runtime_fusion)

    def predict_onnx(self, model: onnx.ModelProto, inputs: list[InputSpec], allow_missing: bool = False,
                     runtime_fusion: bool = True) -> Prediction:
        threads = int(self.device.get("threads") or 1)
        return self.predict_decomposition(decompose(model, inputs, runtime_fusion=runtime_fusion, threads=threads),
                                          allow_missing=allow_missing)


# -------------------------------------------------------------------------------------------- fitting
CONTEXT_FLOOR_MS = 1e-4  # a kernel the runtime did away with inside a network (an in-place concat) costs ~0


@dataclass
class _CalNet:
    """A calibration network as the predictor sees it: its kernels and, when profiled, what each cost in it."""
    key: str
    measured_ms: float
    kernels: list[Kernel]
    fused: list[bool]
    standalone: np.ndarray
    in_network_ms: np.ndarray | None  # per kernel; NaN where a runtime node spans several kernels (or fused)

    @property
    def net(self) -> dict[str, float]:
        return network_features(self.kernels)


def net_structure(net: Kernel, threads: int) -> dict:
    """How a calibration network decomposes: its kernels (dicts, None where the table's kinds cannot stand for a
    node), fused flags, and which kernel owns each ONNX node index (for per-layer profiles). Rebuilding the network
    and decomposing it takes seconds; `fit_predictor` caches this beside the table (`net_cache_path`)."""
    model = net.build_onnx()
    dec = decompose(model, kernel_inputs(net), threads=threads)
    index = {n.name: i for i, n in enumerate(model.graph.node)}
    return {"kernels": [mk.kernel.to_dict() if mk.kernel is not None else None for mk in dec.kernels],
            "fused": [bool(mk.fused) for mk in dec.kernels],
            "owner": [[index[n], i] for i, mk in enumerate(dec.kernels) for n in mk.nodes if n in index]}


def _calibration_net(kinds: dict[str, KindRegressor], net: Kernel, measured_ms: float, layers: list | None,
                     structure: dict) -> _CalNet | None:
    if not structure["kernels"] or any(k is None or k["kind"] not in kinds for k in structure["kernels"]):
        return None  # a calibration network the table cannot fully describe teaches nothing
    ks, fused = [Kernel.from_dict(k) for k in structure["kernels"]], list(structure["fused"])
    in_net = None
    if layers:
        owner = {int(j): int(i) for j, i in structure["owner"]}
        in_net = np.zeros(len(ks))
        shared = np.array(fused, dtype=bool)
        for _, ms, nodes in layers:  # runtime nodes covering no kernel (layout reorders) stay with the calibration
            ids = {owner[j] for j in nodes if j in owner}
            if len(ids) == 1:
                in_net[ids.pop()] += ms
            else:
                shared[list(ids)] = True
        in_net[shared] = np.nan
    return _CalNet(net.key, measured_ms, ks, fused, _kernel_ms(kinds, ks, "<table>"), in_net)


NET_CACHE_FORMAT = "deploykit-net-structures"


def net_cache_path(table_path: Path) -> Path:
    return Path(table_path).with_name(Path(table_path).name.removesuffix(".jsonl") + ".nets.json")


def _structure_identity(threads: int) -> str:
    """What a cached decomposition depends on: the code that builds, exports and decomposes the networks, the
    exporter's torch version and the thread count. Any change makes the whole cache stale."""
    import torch

    from . import decompose as decompose_module
    from . import graphmap, netfamilies, zoo
    from .kernels import space

    h = hashlib.sha256(f"{torch.__version__}|{onnx.__version__}|{threads}".encode())
    for mod in (decompose_module, graphmap, netfamilies, zoo, space):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


def _net_structures(table: LatencyTable, nets: list[Kernel], threads: int, progress: bool) -> dict[str, dict]:
    """The structure of every calibration network: from the cache beside the table where it is current, built (and
    the cache rewritten atomically) otherwise. A read-only table folder just means no cache."""
    path = net_cache_path(table.path)
    ident = _structure_identity(threads)
    cached: dict[str, dict] = {}
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") == NET_CACHE_FORMAT and doc.get("identity") == ident:
            cached = doc["nets"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    todo = [k for k in nets if k.key not in cached]
    for k in tqdm(todo, desc="calibration networks", unit="net", file=sys.stderr, disable=not progress or not todo,
                  dynamic_ncols=True):
        cached[k.key] = net_structure(k, threads)
    if todo:
        try:
            atomic_write(path, json.dumps({"format": NET_CACHE_FORMAT, "identity": ident, "nets": cached},
                                          separators=(",", ":")))
        except OSError:
            pass
    return cached


def _calibration_model(kinds: dict[str, KindRegressor], entry) -> _CalNet | None:
    """A measured user model (`model` entry) as a calibration network: its stored kernel list, end to end only."""
    try:
        ks = [Kernel.from_dict(k) for k, _ in entry.kernels or []]
    except ValueError:
        return None  # a kind this deploykit does not know
    if not ks or any(k.kind not in kinds for k in ks):
        return None
    fused = [bool(f) for _, f in entry.kernels]
    return _CalNet(entry.key, entry.stats.median_ms, ks, fused, _kernel_ms(kinds, ks, "<table>"), None)


def fit_context(nets: list[_CalNet], seed: int = 0) -> tuple[dict[str, KindRegressor], dict, list[np.ndarray]]:
    """Per kind, gradient-boosted trees from (features, standalone latency) to in-network latency.

    Returns the models, a report (per kind: out-of-fold error against the in-network times, and the
    error of taking the standalone latency instead) and each network's context estimates, out of fold:
    a profiled network's kernels are estimated by models fitted on the other folds' networks.
    """
    profiled = [i for i, n in enumerate(nets) if n.in_network_ms is not None]
    estimates = [n.standalone.copy() for n in nets]
    if len(profiled) < MIN_NETS:
        return {}, {"note": f"{len(profiled)} calibration networks with per-layer profiles (< {MIN_NETS}): no context models"}, \
            estimates
    # a network's own features are constant over its kernels: a dozen networks would be told apart by them, not learned from
    net = [n.net if len(profiled) >= NETWORK_FEATURES_MIN_NETS else {} for n in nets]
    rng = np.random.default_rng(seed)
    fold = {i: f % CONTEXT_FOLDS for f, i in enumerate(rng.permutation(profiled))}
    every: dict[str, list[tuple[int, int]]] = defaultdict(list)  # (net, kernel) of each kind
    for i, n in enumerate(nets):
        for j, k in enumerate(n.kernels):
            if not n.fused[j]:
                every[k.kind].append((i, j))
    models: dict[str, KindRegressor] = {}
    report: dict[str, Any] = {}
    for kind, where in sorted(every.items()):
        train = [(i, j) for i, j in where if i in fold and np.isfinite(nets[i].in_network_ms[j])]
        if len(train) < CONTEXT_MIN_KERNELS or len({i for i, _ in train}) < MIN_NETS:
            report[kind] = {"n": len(train), "note": "too few in-network instances: standalone latency used"}
            continue
        rows = _context_rows([nets[i].kernels[j] for i, j in train], np.array([nets[i].standalone[j] for i, j in train]),
                             [net[i] for i, _ in train])
        y = np.maximum([nets[i].in_network_ms[j] for i, j in train], CONTEXT_FLOOR_MS)
        oof = np.zeros(len(train))
        for f in range(CONTEXT_FOLDS):
            model = KindRegressor.fit("gbdt", [r for r, (i, _) in zip(rows, train) if fold[i] != f],
                                      y[[fold[i] != f for i, _ in train]], seed)
            here = [(i, j) for i, j in where if fold.get(i) == f]
            if here:
                pred = model.predict_ms(_context_rows([nets[i].kernels[j] for i, j in here],
                                                      np.array([nets[i].standalone[j] for i, j in here]),
                                                      [net[i] for i, _ in here]))
                for (i, j), v in zip(here, pred):
                    estimates[i][j] = v
            mask = [fold[i] == f for i, _ in train]
            oof[mask] = np.array([estimates[i][j] for (i, j), m in zip(train, mask) if m])
        models[kind] = KindRegressor.fit("gbdt", rows, y, seed)
        rest = [(i, j) for i, j in where if i not in fold]  # networks without a profile: the full model never saw them
        if rest:
            pred = models[kind].predict_ms(_context_rows([nets[i].kernels[j] for i, j in rest],
                                                         np.array([nets[i].standalone[j] for i, j in rest]),
                                                         [net[i] for i, _ in rest]))
            for (i, j), v in zip(rest, pred):
                estimates[i][j] = v
        alone = np.array([nets[i].standalone[j] for i, j in train])
        report[kind] = {"n": len(train), "nets": len({i for i, _ in train}),
                        "in_network_over_standalone": float(y.sum() / alone.sum()),
                        "out_of_fold": errors(oof, y), "standalone": errors(alone, y)}
    return models, report, estimates


def fit_overhead(rows: np.ndarray, measured_ms: np.ndarray) -> tuple[np.ndarray, dict]:
    """Least squares on relative error, full or reduced (one scale + a constant), whichever transfers better; the
    constant (a per-network cost) is kept non-negative.

    Leave-one-out error on the calibration networks picks the form: a quick profile's dozen networks
    cannot pin six terms, and the reduced form keeps it from over-fitting.
    """
    if len(rows) < MIN_NETS:
        coef = np.zeros(len(OVERHEAD_TERMS))
        coef[0] = coef[1] = 1.0
        return coef, {"n": len(rows), "note": f"fewer than {MIN_NETS} calibration networks: plain sum of kernels"}

    def solve(a: np.ndarray, y: np.ndarray) -> np.ndarray:
        w = 1.0 / y[:, None]
        c = np.linalg.lstsq(a * w, y[:, None] * w, rcond=None)[0][:, 0]
        if c[-1] < 0:  # a negative per-network constant extrapolates small networks to negative latency: pin it at 0
            c = np.append(np.linalg.lstsq(a[:, :-1] * w, y[:, None] * w, rcond=None)[0][:, 0], 0.0)
        return c

    forms = {"full": rows,  # reduced: the summed kernel latency (fused adds included) and a constant
             "reduced": np.column_stack([rows[:, 0] + rows[:, 1], rows[:, -1]])}
    loo = {name: np.array([a[i] @ solve(np.delete(a, i, 0), np.delete(measured_ms, i)) for i in range(len(a))])
           for name, a in forms.items()}
    form = min(loo, key=lambda f: errors(loo[f], measured_ms)["mape"])
    c = solve(forms[form], measured_ms)
    coef = c if form == "full" else np.array([c[0], c[0], 0.0, 0.0, 0.0, c[1]])
    plain = rows[:, 0] + rows[:, 1]
    return coef, {"n": len(rows), "form": form, "fit": errors(rows @ coef, measured_ms),
                  "leave_one_out": errors(loo[form], measured_ms), "plain_sum": errors(plain, measured_ms)}


def _net_rows(nets: list[_CalNet], context: list[np.ndarray]) -> np.ndarray:
    rows = np.zeros((len(nets), len(OVERHEAD_TERMS)))
    for row, n, ctx in zip(rows, nets, context):
        row[:] = _design(n.kernels, n.fused, n.standalone, ctx).sum(axis=0)
        row[-1] = 1.0
    return rows


def fit_predictor(table: LatencyTable, *, seed: int = 0, progress: bool = True) -> KernelPredictor:
    by_kind: dict[str, list[tuple[Kernel, float]]] = defaultdict(list)
    net_entries = []
    for e in table.entries.values():
        k = Kernel.from_dict(e.kernel)
        if k.kind == "net":
            net_entries.append((k, e))
        else:
            by_kind[k.kind].append((k, e.stats.median_ms))
    if not by_kind:
        raise DeployKitError(f"{table.path} holds no kernels: profile the device first with deploykit profile")
    kinds: dict[str, KindRegressor] = {}
    selection: dict[str, Any] = {}
    bar = tqdm(sorted(by_kind), desc="fit regressors", unit="kind", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for kind in bar:
        items = by_kind[kind]
        lat = np.array([ms for _, ms in items])
        model, report = select([k.features() for k, _ in items], lat, seed=seed,
                               progress=lambda m, kind=kind: bar.set_postfix_str(f"{kind}: {m}"))
        kinds[kind] = model
        selection[kind] = report
    threads = int(table.device.get("threads") or 1)
    structures = _net_structures(table, [k for k, _ in net_entries], threads, progress)
    nets = [n for n in (_calibration_net(kinds, k, e.stats.median_ms, e.layers, structures[k.key])
                        for k, e in net_entries) if n is not None]
    nets += [n for n in (_calibration_model(kinds, e) for e in table.models.values()) if n is not None]
    measured = np.array([n.measured_ms for n in nets])
    context, context_report, estimates = fit_context(nets, seed) if nets else ({}, {}, [])
    coef, calib = fit_overhead(_net_rows(nets, estimates), measured)
    if context:  # keep the context models only if they transfer better (both errors are leave-one-out / out-of-fold)
        plain_coef, plain_calib = fit_overhead(_net_rows(nets, [n.standalone for n in nets]), measured)
        calib["without_context"] = plain_calib.get("leave_one_out")
        if plain_calib["leave_one_out"]["mape"] < calib["leave_one_out"]["mape"]:
            context, coef, calib = {}, plain_coef, {**plain_calib, "note": "context models did not help: left out"}
    from . import __version__

    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "table": table.name, "table_digest": table_digest(table),
           "device": table.device, "deploykit_version": __version__, "selection": selection,
           "context": {k: m.to_json() for k, m in context.items()}, "context_report": context_report,
           "overhead": {"terms": list(OVERHEAD_TERMS), "coef": dict(zip(OVERHEAD_TERMS, map(float, coef))),
                        "calibration": {**calib, "nets": [n.key for n in nets]}},
           "kinds": {k: m.to_json() for k, m in kinds.items()}}
    return KernelPredictor(doc)
