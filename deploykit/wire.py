"""The wire protocol between a measurement agent (`deploykit agent serve`, on the device) and its clients
(`--backend remote`). HTTP/1.1 + JSON; a model travels as raw ONNX bytes in a request body.

Version 1. Every request carries

    X-Deploykit-Protocol: 1
    Authorization: Bearer <token>

and every reply carries `X-Deploykit-Protocol` and a JSON body (`Content-Type: application/json`).

    GET  /v1/info                  -> {"protocol", "deploykit_version", "backends": {name: "ok" | why not},
                                       "limits": {...}, "queued", "served", "refused": {code: n}}
    POST /v1/fingerprint           body: {"backend", "threads", "precision"}
                                   -> {"protocol", "fingerprint"}
    POST /v1/measure               body: the ONNX model's bytes (application/octet-stream)
                                   X-Deploykit-Request: {"backend", "threads", "precision",
                                                         "inputs": [{"name", "shape", "dtype"}],
                                                         "protocol": {Protocol fields}, "per_layer": bool}
                                   -> {"protocol", "measurement": {...}, "layers": {...} | null,
                                       "fingerprint", "seconds": {"queued", "measure"}}

A refused request gets {"protocol", "error": one line, "code"} with the status below; the agent keeps serving.
A refused request does no work: authentication and the version are checked before the body is read.
"""
from __future__ import annotations

import math

PROTOCOL_VERSION = 1
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
