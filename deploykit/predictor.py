"""Kernel-level latency predictor: any ONNX model's latency on a profiled device, without running it.

`fit_predictor(table)` fits one regressor per kernel kind on the device table (the best of table
interpolation, random forest, gradient-boosted trees and an MLP, chosen on held-out entries), then
calibrates how standalone kernel latencies add up inside a network on the table's calibration
networks (kind `net`): a kernel measured alone pays a session call and layout reorders of its own
input and output that a network does not, while a network streams weights that a repeated kernel
keeps in cache. Per kernel, in-network latency = a * predicted + c + d * MB moved + e * MB of weights
(a residual add the runtime fused into its conv: b * predicted); the model adds a constant.
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
from .regressors import KindRegressor, errors, select
from .table import LatencyTable, resolve_device

FORMAT = "deploykit-predictor"
FORMAT_VERSION = 1
OVERHEAD_TERMS = ("kernel", "fused", "count", "io_mb", "weight_mb", "const")
MIN_NETS = 8  # fewer calibration networks: keep the plain sum (a = 1, the rest 0)


def predictor_path(table_path: Path) -> Path:
    return table_path.with_name(table_path.name.removesuffix(".jsonl") + ".predictor.json")


def table_digest(table: LatencyTable) -> str:
    """Identifies the measurements a predictor was fitted on (changes when the table grows)."""
    h = hashlib.sha256()
    for key in sorted(table.entries):
        h.update(f"{key}={table.entries[key].stats.median_ms:.9g}\n".encode())
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


def _design(kernels: list[Kernel], fused: list[bool], ms: np.ndarray) -> np.ndarray:
    """Per kernel, its columns of the overhead model (OVERHEAD_TERMS; the constant column stays 0)."""
    rows = np.zeros((len(kernels), len(OVERHEAD_TERMS)))
    for row, k, f, v in zip(rows, kernels, fused, ms):
        io = sum(math.prod(s) for s in k.input_shapes().values()) + math.prod(k.output_shape())
        row[:5] = (0.0, v, 0.0, 0.0, 4e-6 * k.spec.weights(dict(k.params))) if f else \
            (v, 0.0, 1.0, 4e-6 * io, 4e-6 * k.spec.weights(dict(k.params)))
    return rows


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
        return float(self._in_network(kernels, fused or [False] * len(kernels)).sum() + self.coef[-1])

    def _in_network(self, kernels: list[Kernel], fused: list[bool]) -> np.ndarray:
        return np.maximum(_design(kernels, fused, self.kernel_ms(kernels)) @ self.coef, 0.0)

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
        in_net = self._in_network(kernels, fused) if kernels else np.zeros(0)
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
def _net_design_row(pred_kinds: dict[str, KindRegressor], dec: Decomposition) -> np.ndarray | None:
    kernels = [mk for mk in dec.kernels if mk.kernel is not None and mk.kernel.kind in pred_kinds]
    if len(kernels) != len(dec.kernels) or not kernels:
        return None  # a calibration network the table cannot fully describe teaches nothing
    ks, fused = [mk.kernel for mk in kernels], [mk.fused for mk in kernels]
    row = _design(ks, fused, _kernel_ms(pred_kinds, ks, "<table>")).sum(axis=0)
    row[-1] = 1.0
    return row


def fit_overhead(rows: np.ndarray, measured_ms: np.ndarray) -> tuple[np.ndarray, dict]:
    """Least squares on relative error, full or reduced (one scale + a constant), whichever transfers better.

    Leave-one-out error on the calibration networks picks the form: a quick profile's dozen networks
    cannot pin six terms, and the reduced form keeps it from over-fitting.
    """
    if len(rows) < MIN_NETS:
        coef = np.zeros(len(OVERHEAD_TERMS))
        coef[0] = coef[1] = 1.0
        return coef, {"n": len(rows), "note": f"fewer than {MIN_NETS} calibration networks: plain sum of kernels"}

    def solve(a: np.ndarray, y: np.ndarray) -> np.ndarray:
        w = 1.0 / y[:, None]
        return np.linalg.lstsq(a * w, y[:, None] * w, rcond=None)[0][:, 0]

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


def fit_predictor(table: LatencyTable, *, seed: int = 0, progress: bool = True) -> KernelPredictor:
    by_kind: dict[str, list[tuple[Kernel, float]]] = defaultdict(list)
    nets: list[tuple[Kernel, float]] = []
    for e in table.entries.values():
        k = Kernel.from_dict(e.kernel)
        (nets if k.kind == "net" else by_kind[k.kind]).append((k, e.stats.median_ms))
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
    rows, measured, used = [], [], []
    threads = int(table.device.get("threads") or 1)
    for net, ms in tqdm(nets, desc="calibration networks", unit="net", disable=not progress or not nets, file=sys.stderr,
                        dynamic_ncols=True):
        model = net.build_onnx()
        inputs = [InputSpec(n, tuple(s), np.float32) for n, s in net.input_shapes().items()]
        row = _net_design_row(kinds, decompose(model, inputs, threads=threads))
        if row is not None:
            rows.append(row)
            measured.append(ms)
            used.append(net.key)
    coef, calib = fit_overhead(np.array(rows).reshape(len(rows), len(OVERHEAD_TERMS)), np.array(measured))
    from . import __version__

    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "table": table.name, "table_digest": table_digest(table),
           "device": table.device, "deploykit_version": __version__, "selection": selection,
           "overhead": {"terms": list(OVERHEAD_TERMS), "coef": dict(zip(OVERHEAD_TERMS, map(float, coef))),
                        "calibration": {**calib, "nets": used}},
           "kinds": {k: m.to_json() for k, m in kinds.items()}}
    return KernelPredictor(doc)
