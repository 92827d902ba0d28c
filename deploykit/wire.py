"""The wire protocol between a measurement agent (`deploykit agent serve`, on the device) and its clients
(`--backend remote`). HTTP/1.1 + JSON; a model travels as raw ONNX bytes in a request body.

Version 2. Every request carries

    X-Deploykit-Protocol: 2
    Authorization: Bearer <token>

and every reply carries `X-Deploykit-Protocol` and a JSON body (`Content-Type: application/json`).

    GET  /v1/info                  -> {"protocol", "deploykit_version", "backends": {name: "ok" | why not},
                                       "limits": {...}, "queued", "served", "refused": {code: n}}
    POST /v1/fingerprint           body: {"backend", "threads", "precision"}
                                   -> {"protocol", "fingerprint"}
    POST /v1/measure               body: the ONNX model's bytes (application/octet-stream)
                                   X-Deploykit-Request: {"backend", "threads", "precision",
                                                         "inputs": [{"name", "shape", "dtype"}],
                                                         "protocol": {Protocol fields}, "per_layer": bool,
                                                         "fill_weights": bool}
                                   -> {"protocol", "measurement": {...}, "layers": {...} | null,
                                       "fingerprint", "seconds": {"queued", "measure", "fill"}}

A refused request gets {"protocol", "error": one line, "code"} with the status below; the agent keeps serving.
A refused request does no work: authentication and the version are checked before the body is read.

Filled weights (new in version 2). A client whose weights' values do not matter (the profiler's kernels carry
random weights) may send the large ones as shapes only: with "fill_weights": true, every graph initializer of the
body that is marked external with the single entry location = "deploykit:fill" (and no data) is filled by the agent
with values of its own (`fill_arrays`: a fixed pseudo-random block, repeated) before the runtime loads the model.
Only float32, float16, int8 and uint8 tensors of the top-level graph may be filled; any other external tensor is
refused as before, so the runtime never opens a file. The filled bytes count against the agent's size limit as if
they had been uploaded. A 38 MB conv kernel then travels as a few hundred bytes (`strip_weights` on the client).
"""
from __future__ import annotations

import math

PROTOCOL_VERSION = 2
PROTOCOL_HEADER = "X-Deploykit-Protocol"
REQUEST_HEADER = "X-Deploykit-Request"

# code -> HTTP status
STATUS = {
    "unauthorized": 401,  # no token, or the wrong one
    "protocol_version": 400,  # the client speaks another protocol version
    "bad_request": 400,  # malformed parameters
    "not_found": 404,
    "length_required": 411,
    "too_large": 413,  # the model exceeds --max-model-mb
    "not_onnx": 415,  # the body is not an ONNX model, or refers to files outside it
    "runtime_rejected": 422,  # ONNX, but the device's runtime cannot load or run it
    "time_limit": 422,  # the measurement ran past --max-measure-s
    "busy": 503,  # the queue is full
    "backend_unavailable": 503,
    "read_timeout": 408,  # the body did not arrive within --read-timeout-s
}

# Protocol fields a client may set, with the largest value an agent accepts (requests beyond are refused,
# so one client cannot hold the device for hours).
PROTOCOL_LIMITS = {
    "warmup_runs": 10_000, "warmup_s": 10.0, "rounds": 50, "round_s": 10.0, "min_runs_per_round": 100_000,
    "max_runs_per_round": 1_000_000, "tolerance": 1.0, "max_rounds": 100,
}
DTYPES = ("float32", "float16", "float64", "int64", "int32", "int8", "uint8", "bool")
MAX_INPUT_ELEMENTS = 1 << 28  # 1 GiB of float32 per input
FILL_LOCATION = "deploykit:fill"
FILL_MIN_BYTES = 64 * 1024  # smaller weights cost nothing to send as they are
FILL_DTYPES = {1: "float32", 10: "float16", 3: "int8", 2: "uint8"}  # onnx.TensorProto data types that may be filled
_FILL_BLOCK = 1 << 16  # values of the repeated block


def _nbytes(dims, data_type: int) -> int:
    import numpy as np

    return math.prod(int(d) for d in dims) * np.dtype(FILL_DTYPES[data_type]).itemsize


def strip_weights(model, min_bytes: int = FILL_MIN_BYTES):
    """(model, bytes left out): `model` with each graph initializer of at least `min_bytes` of a fillable type
    replaced by its shape, marked for the agent to fill. The model given is not changed (nor copied: the large
    tensors are never duplicated); it comes back as it is when nothing is large."""
    import onnx

    def large(t) -> bool:
        return (t.data_type in FILL_DTYPES and t.data_location != onnx.TensorProto.EXTERNAL and not t.external_data
                and _nbytes(t.dims, t.data_type) >= min_bytes)

    if not any(large(t) for t in model.graph.initializer):
        return model, 0
    graph = onnx.GraphProto()
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(graph, field, value)
    stripped = 0
    for t in model.graph.initializer:
        if large(t):
            graph.initializer.add(name=t.name, dims=t.dims, data_type=t.data_type,
                                  data_location=onnx.TensorProto.EXTERNAL).external_data.add(key="location",
                                                                                              value=FILL_LOCATION)
            stripped += _nbytes(t.dims, t.data_type)
        else:
            graph.initializer.append(t)
    out = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(out, field, value)
    out.graph.CopyFrom(graph)
    return out, stripped


def _copy_field(msg, field, value) -> None:
    repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED  # protobuf 6+/older
    if repeated:
        getattr(msg, field.name).extend(value)
    elif field.message_type is not None:
        getattr(msg, field.name).CopyFrom(value)
    else:
        setattr(msg, field.name, value)


def fill_specs(model) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, dims, data type) of each initializer `strip_weights` marked; ValueError for a marked tensor that
    may not be filled (wrong type, data present, another external entry)."""
    import onnx

    specs = []
    for t in model.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL and not t.external_data:
            continue
        entries = [(e.key, e.value) for e in t.external_data]
        if entries != [("location", FILL_LOCATION)] or t.data_location != onnx.TensorProto.EXTERNAL:
            raise ValueError(f"initializer {t.name!r} refers to an external file")
        if t.data_type not in FILL_DTYPES:
            raise ValueError(f"initializer {t.name!r} of data type {t.data_type} cannot be filled "
                             f"(only {', '.join(FILL_DTYPES.values())})")
        if t.raw_data or any(len(getattr(t, f)) for f in ("float_data", "int32_data")) or any(d < 0 for d in t.dims):
            raise ValueError(f"initializer {t.name!r} is marked for filling but carries data or negative dims")
        specs.append((t.name, tuple(int(d) for d in t.dims), int(t.data_type)))
    return specs


def fill_bytes(specs) -> int:
    return sum(_nbytes(dims, dt) for _, dims, dt in specs)


def fill_arrays(specs) -> dict:
    """name -> the agent's values for each marked initializer: one fixed pseudo-random block (normal x 0.05 for
    floats, uniform integers otherwise), repeated to the tensor's size. Deterministic, and about memory speed."""
    import numpy as np

    rng = np.random.default_rng(0)
    blocks = {"float32": (rng.standard_normal(_FILL_BLOCK) * 0.05).astype(np.float32)}
    blocks["float16"] = blocks["float32"].astype(np.float16)
    blocks["int8"] = rng.integers(-127, 128, _FILL_BLOCK).astype(np.int8)
    blocks["uint8"] = rng.integers(0, 256, _FILL_BLOCK).astype(np.uint8)
    return {name: np.resize(blocks[FILL_DTYPES[dt]], dims) for name, dims, dt in specs}


def materialize(model, arrays: dict) -> None:
    """Write `arrays` into the marked initializers of `model`, in place (for a runtime that takes no
    initializers from memory)."""
    from onnx import numpy_helper

    for t in model.graph.initializer:
        if t.name in arrays:
            t.CopyFrom(numpy_helper.from_array(arrays[t.name], t.name))


def measurement_to_wire(m) -> dict:
    return {"stats": m.stats.to_dict(), "round_medians_ms": list(m.round_medians_ms), "spread": m.spread,
            "noisy": m.noisy, "extra": m.extra}


def measurement_from_wire(d: dict):
    from .protocol import Measurement
    from .stats import LatencyStats

    return Measurement(stats=LatencyStats.from_dict(d["stats"]), round_medians_ms=[float(x) for x in d["round_medians_ms"]],
                       spread=float(d["spread"]), noisy=bool(d["noisy"]), extra=dict(d.get("extra") or {}))


def layers_to_wire(profile) -> dict:
    return profile.to_dict()


def layers_from_wire(d: dict):
    """A LayerProfile from its `to_dict()` form."""
    from deploykit.profilers.base import LayerProfile, LayerTiming

    return LayerProfile(
        layers=[LayerTiming(name=x["name"], op_type=x["op_type"], latency_ms=float(x["latency_ms"]),
                            raw_ms=float(x["raw_ms"]), source_nodes=list(x.get("source_nodes") or []))
                for x in d["layers"]],
        end_to_end_ms=float(d["end_to_end_ms"]), profiled_runs=int(d["profiled_runs"]), method=str(d["correction"]))


def protocol_from_wire(d: dict):
    """A Protocol from a client's fields, each checked against PROTOCOL_LIMITS; ValueError names the first bad one."""
    from dataclasses import asdict, replace

    from .protocol import MODEL_PROTOCOL

    if not isinstance(d, dict):
        raise ValueError("protocol must be an object")
    fields = asdict(MODEL_PROTOCOL)
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown protocol field {unknown[0]!r}")
    clean = {}
    for k, v in d.items():
        kind = type(fields[k])
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"protocol field {k} must be a number >= 0")
        if v > PROTOCOL_LIMITS[k]:
            raise ValueError(f"protocol field {k}={v} is above this agent's limit {PROTOCOL_LIMITS[k]}")
        clean[k] = kind(v)
    return replace(MODEL_PROTOCOL, **clean)
