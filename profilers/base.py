"""The one small interface every device backend implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper

from deploykit.onnx_io import InputSpec
from deploykit.protocol import MODEL_PROTOCOL, Measurement, Protocol


@dataclass
class LayerTiming:
    name: str  # node name in the graph that really runs (after the runtime's fusion)
    op_type: str
    latency_ms: float  # corrected for profiler overhead
    raw_ms: float  # as the runtime's profiler reported it (median over runs)
    source_nodes: list[str] = field(default_factory=list)  # original ONNX node names it covers

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LayerProfile:
    layers: list[LayerTiming]
    end_to_end_ms: float  # unprofiled end-to-end median
    profiled_runs: int
    method: str  # how the overhead was corrected, in words

    @property
    def layers_sum_ms(self) -> float:
        return sum(layer.latency_ms for layer in self.layers)

    @property
    def sum_ratio(self) -> float:
        return self.layers_sum_ms / self.end_to_end_ms if self.end_to_end_ms > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "layers_sum_ms": self.layers_sum_ms,
            "end_to_end_ms": self.end_to_end_ms,
            "sum_ratio": self.sum_ratio,
            "profiled_runs": self.profiled_runs,
            "correction": self.method,
        }


class Backend(ABC):
    name: ClassVar[str] = "?"
    default_precision: ClassVar[str] = "fp32"
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    # Called between timed runs, outside the timing, by backends that honour it (ort-cpu): the measurement agent
    # stops a measurement there once it runs past its time limit or its client has gone away.
    between_runs: Callable[[], None] | None = None
    # measure() also takes the model's serialized bytes (the agent then skips re-serializing what it received)
    measures_bytes: ClassVar[bool] = False
    # Initializers the model marks external and the caller supplies from memory (name -> numpy array), for the
    # backends that can take them (takes_initializers): the agent's filled weights (deploykit.wire.fill_arrays).
    takes_initializers: ClassVar[bool] = False
    initializers: Mapping[str, Any] | None = None
    # Set by a caller whose models carry random weights (the profiler's kernels): their values may be replaced by
    # others of the backend's choosing. The remote backend then sends large weights as shapes, not bytes.
    weights_are_arbitrary: bool = False

    def __init__(self, threads: int | None = None, precision: str | None = None):
        from deploykit.errors import DeployKitError

        self.threads = 1 if threads is None else int(threads)
        if self.threads < 1:
            raise DeployKitError(f"--threads must be >= 1, got {self.threads}")
        self.precision = precision or self.default_precision
        if self.precision not in self.precisions:
            raise DeployKitError(
                f"backend {self.name} does not support precision {self.precision!r}: use one of {', '.join(self.precisions)}"
            )

    @classmethod
    def check_available(cls) -> None:
        """Raise DeployKitError naming what is missing when this backend cannot run here."""

    @abstractmethod
    def fingerprint(self) -> dict:
        """Device + runtime identity: backend, cpu/gpu model, runtime version, threads, precision."""

    @abstractmethod
    def measure(self, model: onnx.ModelProto, inputs: list[InputSpec], protocol: Protocol = MODEL_PROTOCOL) -> Measurement:
        """End-to-end latency of `model` under the shared timing protocol."""

    @abstractmethod
    def measure_layers(self, model: onnx.ModelProto, inputs: list[InputSpec], end_to_end: Measurement | None = None) -> LayerProfile:
        """Per-layer latency of the nodes that really run, mapped back to the original node names."""


CAL_NODES = 128
CAL_INPUT = InputSpec("x", (1, 8), np.float32)


def chain_model(n: int) -> onnx.ModelProto:
    """n cheap element-wise nodes on a tiny tensor: the time per node is almost all overhead."""
    nodes = [helper.make_node("Abs" if i % 2 else "Neg", [f"t{i}"], [f"t{i + 1}"], name=f"n{i}") for i in range(n)]
    nodes[0].input[0] = "x"
    nodes[-1].output[0] = "y"
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def calibrate_node_overhead_ms(wall_ms: Callable[[onnx.ModelProto], float],
                               layers_sum_ms: Callable[[onnx.ModelProto], float]) -> float:
    """What one node really costs in a plain run beyond what per-layer timing credits it with (may be negative).

    Compares a 1-node and a CAL_NODES-node chain of trivial nodes: the unprofiled wall time per extra
    node against the per-layer time per extra node. Per-layer figures are corrected by this amount,
    never rescaled to the end-to-end figure, so their sum against end-to-end stays a real check.
    """
    short, long = chain_model(1), chain_model(CAL_NODES)
    return ((wall_ms(long) - wall_ms(short)) - (layers_sum_ms(long) - layers_sum_ms(short))) / (CAL_NODES - 1)
