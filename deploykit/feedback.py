"""Feed a model's measured latency back into its device's latency table (`deploykit export --update-table`).

The model is decomposed into the table's kernels; every kernel the table lacks is measured standalone,
as `deploykit profile` measures kernels, and appended. The model's own end-to-end measurement is
appended as a `model` entry (its kernel list and fused flags, no per-layer profile), which
`fit_predictor` then uses as one more calibration network. Finally the predictor is refitted.

Tables are append-only: a kernel or model already in the table is never measured again or replaced.
A table shipped inside deploykit is never written: it is copied to ./latency_tables/ first, where
`--device NAME` finds it before the shipped one.
"""
from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import onnx
from tqdm import tqdm

from . import table as tables
from .decompose import Decomposition, decompose
from .errors import DeployKitError
from .fileio import atomic_write
from .fingerprint import mismatches
from .kernels import Kernel
from .onnx_io import InputSpec
from .predictor import KernelPredictor, fit_predictor, net_cache_path, predictor_path, table_digest
from .profile import _measure_into
from .protocol import KERNEL_PROTOCOL, Measurement, Protocol
from .table import MODEL_KIND, LatencyTable, TableEntry, utc_now


def model_key(model: onnx.ModelProto, inputs: list[InputSpec]) -> str:
    """`model:sha=<first 16 hex of the sha256 of the ONNX bytes>`; models with dynamic input dims add the shapes
    they were measured at (the same bytes at another shape are another measurement)."""
    sha = model_sha(model)
    if all(_static(i) for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}):
        return f"{MODEL_KIND}:sha={sha}"
    return f"{MODEL_KIND}:sha={sha},inputs=" + "+".join("x".join(map(str, s.shape)) for s in inputs)


def model_sha(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString()).hexdigest()[:16]


def _static(value: onnx.ValueInfoProto) -> bool:
    t = value.type.tensor_type
    return t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim)


def _say(message: str) -> None:
    print(f"deploykit: {message}", file=sys.stderr)


def _writable_table(src: Path) -> tuple[Path, bool]:
    """The table to update: src itself, or for a shipped table its copy in ./latency_tables/ (made if missing)."""
    shipped = {p.resolve() for p in tables.shipped_tables().values()}
    if src.resolve() not in shipped:
        return src, False
    dest = tables.LOCAL_DIR / src.name
    if dest.resolve() == src.resolve():  # run from a source checkout: ./latency_tables/ is the package folder itself
        raise DeployKitError(f"{src} is a table shipped inside deploykit and ./{tables.LOCAL_DIR}/ is deploykit's own "
                             "folder here: run from another directory (the update goes to a copy in its "
                             f"./{tables.LOCAL_DIR}/), or pass --device a copy of the table")
    if dest.exists():  # what `--device NAME` resolves to from here anyway
        _say(f"{src.stem} is a shipped table: updating its local copy {dest}")
        return dest, False
    atomic_write(dest, src.read_bytes())
    for beside in (predictor_path, net_cache_path):  # the predictor, and the calibration networks' structures
        if beside(src).exists():
            atomic_write(beside(dest), beside(src).read_bytes())
    _say(f"{src.stem} is a shipped table: copied it to {dest} and updating the copy (--device {src.stem} uses it from "
         "this directory)")
    return dest, True


def _kernel_protocol(table: LatencyTable) -> Protocol:
    """The protocol the table's kernels were measured with, so new kernels compare with the old."""
    recorded = table.header.get("protocol", {}).get("kernel_protocol")
    if not recorded:
        return KERNEL_PROTOCOL
    try:
        return Protocol(**recorded)
    except (TypeError, ValueError):
        return KERNEL_PROTOCOL


def _current_predictor(path: Path, table: LatencyTable, progress: bool) -> KernelPredictor:
    """The predictor `deploykit predict` would use now; fitted in memory when the table has none (or an unusable one)."""
    try:
        pred = KernelPredictor.load(predictor_path(path))
        if not mismatches(pred.device, table.device):
            return pred
    except DeployKitError:
        pass
    return fit_predictor(table, progress=progress)


def _predict_ms(pred: KernelPredictor, dec: Decomposition) -> float | None:
    try:
        return pred.predict_decomposition(dec).latency_ms
    except DeployKitError:  # a kind the table did not hold yet
        return None


def update_table(device: str, model: onnx.ModelProto, inputs: list[InputSpec], measured: Measurement, backend, *,
                 progress: bool = False) -> dict:
    """Append the model's missing kernels (measured now) and its end-to-end measurement to the device's table, refit the
    predictor beside it, and report the prediction before and after against the measurement.

    `measured` must come from `backend` (whose fingerprint must match the table's device) at `inputs`.
    """
    start = time.monotonic()
    src = tables.resolve_device(device)
    table = LatencyTable.load(src)
    table.check_device(backend.fingerprint())
    path, copied = _writable_table(src)
    if path != src:
        table = LatencyTable.load(path)
        table.check_device(backend.fingerprint())
    table.repair()  # a torn last line from an interrupted write holds no measurement

    dec = decompose(model, inputs, threads=int(table.device.get("threads") or 1))
    unsupported = [mk for mk in dec.kernels if mk.kernel is None]
    if unsupported:
        mk = unsupported[0]
        raise DeployKitError(f"cannot feed the model back into {path}: node {mk.name} ({mk.op_type}) has no kernel kind "
                             f"({mk.note}); the predictor cannot describe this model")
    if not dec.kernels:
        raise DeployKitError(f"cannot feed the model back into {path}: it decomposes into no kernels")

    before = _current_predictor(path, table, progress)
    predicted_before = _predict_ms(before, dec)

    todo: dict[str, Kernel] = {}
    for mk in dec.kernels:
        if mk.kernel.key not in table.entries:
            todo.setdefault(mk.kernel.key, mk.kernel)
    protocol = _kernel_protocol(table)
    added = failed = 0
    for kernel in tqdm(list(todo.values()), desc="missing kernels", unit="kernel", disable=not progress or not todo,
                       file=sys.stderr, dynamic_ncols=True):
        if _measure_into(table, backend, kernel, protocol):
            added += 1
        else:
            failed += 1

    key = model_key(model, inputs)
    if key in table.models:
        first = table.models[key]
        _say(f"{key} is already in {path} (measured {first.measured_utc}, {first.stats.median_ms:.4g} ms): tables are "
             f"append-only, kept the first measurement (now {measured.latency_ms:.4g} ms)")
        model_added = False
    else:
        table.append(TableEntry(key=key, kernel={"kind": MODEL_KIND, "sha": model_sha(model),
                                                 "inputs": {s.name: list(s.shape) for s in inputs}},
                                stats=measured.stats, spread=measured.spread, noisy=measured.noisy,
                                measured_utc=utc_now(), kernels=[[mk.kernel.to_dict(), bool(mk.fused)] for mk in dec.kernels]))
        model_added = True

    if added or model_added or before.doc.get("table_digest") != table_digest(table) or before.path is None:
        after = fit_predictor(table, progress=progress).save_beside(path)
    else:  # nothing new and the predictor on disk was fitted on exactly this table
        _say(f"nothing new for {path}: its predictor is up to date, not refitted")
        after = before
    predicted_after = _predict_ms(after, dec)
    measured_ms = measured.latency_ms
    return {"table": str(path), "copied_from_shipped": copied, "kernels_added": added, "kernels_failed": failed,
            "model_entry": key, "model_entry_added": model_added,
            "predicted_before_ms": predicted_before, "predicted_after_ms": predicted_after, "measured_ms": measured_ms,
            "error_before": None if predicted_before is None else (predicted_before - measured_ms) / measured_ms,
            "error_after": None if predicted_after is None else (predicted_after - measured_ms) / measured_ms,
            "seconds": time.monotonic() - start}
