"""Loading user ONNX files with one-line errors, and resolving their input shapes."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from .errors import DeployKitError

_NP_DTYPES = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.DOUBLE: np.float64,
    TensorProto.INT64: np.int64,
    TensorProto.INT32: np.int32,
    TensorProto.INT8: np.int8,
    TensorProto.UINT8: np.uint8,
    TensorProto.BOOL: np.bool_,
}


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: type

    def random(self, rng: np.random.Generator) -> np.ndarray:
        if np.issubdtype(self.dtype, np.floating):
            return rng.standard_normal(self.shape).astype(self.dtype)
        if self.dtype is np.bool_:
            return rng.integers(0, 2, self.shape).astype(np.bool_)
        return rng.integers(0, 8, self.shape).astype(self.dtype)


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Load and check an ONNX file; every failure is a DeployKitError naming the fix."""
    p = Path(path)
    if not p.exists():
        raise DeployKitError(f"model file not found: {p}: check the path")
    if p.is_dir():
        raise DeployKitError(f"{p} is a directory: pass the path of an .onnx file")
    try:
        model = onnx.load(str(p))
    except Exception as e:  # protobuf raises DecodeError, RuntimeError or ValueError by version
        raise DeployKitError(
            f"{p} is not a readable ONNX model ({type(e).__name__}): re-export it, e.g. with torch.onnx.export"
        ) from None
    if not model.graph.node:
        raise DeployKitError(f"{p} holds no ONNX graph (empty or not an ONNX file): re-export the model")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DeployKitError(f"{p} is not a valid ONNX model ({first}): re-export it") from None
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' -> (1, 3, 224, 224)."""
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        raise DeployKitError(f"bad shape {text!r}: write it as comma-separated integers, e.g. 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise DeployKitError(f"bad shape {text!r}: every dim must be a positive integer, e.g. 1,3,224,224")
    return dims


def input_specs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]] | tuple[int, ...] | None = None) -> list[InputSpec]:
    """The model's real inputs (initializers excluded), with dynamic dims filled from `shapes`.

    `shapes` is either one shape (applied to a single-input model, or to every input) or a
    name -> shape mapping.
    """
    inits = {i.name for i in model.graph.initializer}
    specs = []
    graph_inputs = [i for i in model.graph.input if i.name not in inits]
    for inp in graph_inputs:
        tt = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tt.shape.dim]
        override = shapes.get(inp.name) if isinstance(shapes, dict) else shapes
        if override is not None:
            if len(override) != len(dims):
                raise DeployKitError(
                    f"--shape {','.join(map(str, override))} has {len(override)} dims but input "
                    f"'{inp.name}' has {len(dims)}: give a {len(dims)}-dim shape"
                )
            clash = [i for i, (d, o) in enumerate(zip(dims, override)) if d is not None and d != o]
            if clash:
                raise DeployKitError(
                    f"--shape conflicts with the fixed dims of input '{inp.name}' "
                    f"{_fmt(dims)} at position {clash[0]}: change only its dynamic dims"
                )
            dims = list(override)
        if any(d is None for d in dims):
            raise DeployKitError(
                f"input '{inp.name}' has dynamic dims {_fmt(dims)}: give them with --shape, e.g. --shape "
                + ",".join(str(d) if d is not None else ("1" if i == 0 else "224") for i, d in enumerate(dims))
            )
        dtype = _NP_DTYPES.get(tt.elem_type)
        if dtype is None:
            raise DeployKitError(f"input '{inp.name}' has an unsupported element type {tt.elem_type}")
        specs.append(InputSpec(inp.name, tuple(dims), dtype))
    return specs


def random_feeds(specs: list[InputSpec], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: s.random(rng) for s in specs}


def _fmt(dims) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"
