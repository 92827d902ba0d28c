"""NVIDIA TensorRT (10.x Python API; 8.6 where it agrees): engines built from the ONNX bytes, CUDA-event timing.

Buffers are torch CUDA tensors bound by name (`set_tensor_address`), so no pycuda is needed. The
per-layer profile comes from TensorRT's own IProfiler; layer names (DETAILED verbosity) carry the ONNX
node names they were built from, fused ones joined with " + ", which maps them back.
"""
from __future__ import annotations

import hashlib
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import onnx

from deploykit.errors import DeployKitError
from deploykit.fingerprint import host_fingerprint
from deploykit.onnx_io import InputSpec, random_feeds
from deploykit.protocol import MODEL_PROTOCOL, Measurement, Protocol, run_protocol

from . import register_backend
from .base import Backend, LayerProfile, LayerTiming

_MISSING = "backend tensorrt needs TensorRT and a CUDA GPU: pip install deploykit[tensorrt] on a machine with an NVIDIA GPU"
WORKSPACE_BYTES = 1 << 30


@dataclass
class _Engine:
    runtime: Any  # kept alive as long as the engine deserialized from it
    engine: Any


def _trt_major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def build_engine(onnx_bytes: bytes, inputs: list[InputSpec], fp16: bool, workspace: int = WORKSPACE_BYTES) -> _Engine:
    """Parse the ONNX bytes and build a TensorRT engine for these input shapes."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if _trt_major(trt) < 10:  # explicit batch is a flag before TensorRT 10, the only mode from 10 on
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = [str(parser.get_error(i)).strip() for i in range(parser.num_errors)]
        first = errors[0].splitlines()[0][:300] if errors and errors[0] else "unknown parser error"
        raise DeployKitError(f"TensorRT cannot parse the model ({first}): simplify or re-export it, or use --backend ort-cpu")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer names that map back to ONNX nodes
    if fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise DeployKitError(f"TensorRT {trt.__version__} has no FP16 builder flag (strong typing only): "
                                 "convert the model to fp16 first, or use --precision fp32")
        config.set_flag(trt.BuilderFlag.FP16)
    shapes = {s.name: tuple(s.shape) for s in inputs}
    dynamic = [network.get_input(i) for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)]
    if dynamic:  # one optimisation profile pinned to the shapes we measure
        profile = builder.create_optimization_profile()
        for t in dynamic:
            if t.name not in shapes:
                raise DeployKitError(f"input '{t.name}' has dynamic dims: give its shape with --shape")
            profile.set_shape(t.name, shapes[t.name], shapes[t.name], shapes[t.name])
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise DeployKitError("TensorRT could not build an engine for this model (see its log above): "
                             "try --precision fp32, or use --backend torch-cuda")
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise DeployKitError("TensorRT could not load the engine it built: check the TensorRT and driver versions")
    return _Engine(runtime, engine)


def _torch_dtype(trt_dtype):
    import tensorrt as trt
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}
    for trt_name, torch_name in (("int64", "int64"), ("bf16", "bfloat16"), ("uint8", "uint8")):
        if hasattr(trt, trt_name):  # newer TensorRT types
            table[getattr(trt, trt_name)] = getattr(torch, torch_name)
    if trt_dtype not in table:
        raise DeployKitError(f"TensorRT engine uses tensor type {trt_dtype} that deploykit cannot bind: use --backend torch-cuda")
    return table[trt_dtype]


class _Bound:
    """An execution context with torch CUDA tensors bound to every I/O tensor, and a stream to run on."""

    def __init__(self, engine, inputs: list[InputSpec]):
        import tensorrt as trt
        import torch

        feeds = random_feeds(inputs)
        self.context = engine.create_execution_context()
        self.buffers: dict[str, Any] = {}
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        for name in (n for n in names if is_input[n]):
            if name not in feeds:
                raise DeployKitError(f"no shape given for model input '{name}': pass one with --shape")
            t = torch.from_numpy(feeds[name]).to("cuda", _torch_dtype(engine.get_tensor_dtype(name))).contiguous()
            self.context.set_input_shape(name, tuple(t.shape))
            self.buffers[name] = t
        for name in (n for n in names if not is_input[n]):  # output shapes are known once every input shape is set
            shape = tuple(self.context.get_tensor_shape(name))
            self.buffers[name] = torch.empty(shape, dtype=_torch_dtype(engine.get_tensor_dtype(name)), device="cuda")
        for name, t in self.buffers.items():
            self.context.set_tensor_address(name, t.data_ptr())
        self.stream = torch.cuda.Stream()
        torch.cuda.synchronize()  # inputs were copied on the default stream

    def run(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise DeployKitError("TensorRT failed to run the engine (see its log above): try --precision fp32")

    def timer(self) -> Callable[[], float]:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run_once() -> float:
            start.record(self.stream)
            self.run()
            end.record(self.stream)
            end.synchronize()
            return start.elapsed_time(end)

        return run_once


def _layer_profiler():
    """An IProfiler collecting every layer's milliseconds per run, in execution order."""
    import tensorrt as trt

    class LayerProfiler(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)  # pybind11 trampolines need the base initialised explicitly
            self.times: dict[str, list[float]] = defaultdict(list)

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.times[layer_name].append(ms)

    return LayerProfiler()


_BOUNDARY_BEFORE = re.compile(r"[\w/]")
_BOUNDARY_AFTER = re.compile(r"\w")


def trt_layer_sources(layer_name: str, nodes: list[tuple[str, list[str]]]) -> list[str]:
    """The ONNX nodes a TensorRT layer covers, in graph order; `nodes` is [(node name, output tensor names)].

    A node counts when its name (or one of its output tensors' names) appears in the layer name as a
    whole token: "/0/Conv" does not match inside "/0/Conv_1" or "/1/0/Conv". Overlapping matches keep the
    longest. Myelin regions ("{ForeignNode[first...last]}") cover every node from first to last.
    """
    spans: list[tuple[int, int, int]] = []
    for idx, (name, outputs) in enumerate(nodes):
        for token in [name, *outputs]:
            if not token:
                continue
            at = layer_name.find(token)
            while at >= 0:
                end = at + len(token)
                before = layer_name[at - 1] if at > 0 else ""
                after = layer_name[end] if end < len(layer_name) else ""
                if not (before and _BOUNDARY_BEFORE.match(before)) and not (after and _BOUNDARY_AFTER.match(after)):
                    spans.append((at, end, idx))
                at = layer_name.find(token, at + 1)
    keep = {i for a, b, i in spans
            if not any(a2 <= a and b <= b2 and (b2 - a2) > (b - a) for a2, b2, _ in spans)}
    hits = sorted(keep)
    if hits and "ForeignNode[" in layer_name:
        hits = list(range(hits[0], hits[-1] + 1))
    return [nodes[i][0] for i in hits]


@register_backend("tensorrt")
class TensorRTBackend(Backend):
    precisions = ("fp32", "fp16")

    def __init__(self, threads: int | None = None, precision: str | None = None):
        if precision == "int8":
            raise DeployKitError("backend tensorrt does not do int8 yet (it needs calibration data): "
                                 "use --precision fp16 or fp32")
        super().__init__(threads=threads, precision=precision)
        self._engines: dict[str, _Engine] = {}

    @classmethod
    def check_available(cls) -> None:
        try:
            import tensorrt  # noqa: F401
            import torch
        except (ImportError, OSError):  # OSError: the wheel is there but libnvinfer cannot be loaded
            raise DeployKitError(_MISSING) from None
        if not torch.cuda.is_available():
            raise DeployKitError(_MISSING)

    def fingerprint(self) -> dict:
        import tensorrt as trt

        from .torch_cuda import cuda_fingerprint

        return {
            "backend": self.name,
            **host_fingerprint(),
            "runtime": "tensorrt",
            "runtime_version": trt.__version__,
            **cuda_fingerprint(),
            "threads": self.threads,
            "precision": self.precision,
        }

    def _engine(self, model: onnx.ModelProto, inputs: list[InputSpec]):
        """Built once per model, shapes and precision: building takes seconds to minutes."""
        data = model.SerializeToString()
        key = hashlib.sha256(data + repr([(s.name, s.shape) for s in inputs]).encode()).hexdigest()
        if key not in self._engines:
            self._engines[key] = build_engine(data, inputs, fp16=self.precision == "fp16")
        return self._engines[key].engine

    def measure(self, model: onnx.ModelProto, inputs: list[InputSpec], protocol: Protocol = MODEL_PROTOCOL) -> Measurement:
        bound = _Bound(self._engine(model, inputs), inputs)
        return run_protocol(bound.timer(), protocol)

    def measure_layers(self, model: onnx.ModelProto, inputs: list[InputSpec], end_to_end: Measurement | None = None) -> LayerProfile:
        if end_to_end is None:
            end_to_end = self.measure(model, inputs)
        bound = _Bound(self._engine(model, inputs), inputs)
        profiler = _layer_profiler()
        bound.context.profiler = profiler
        run_once = bound.timer()
        for _ in range(3):
            run_once()
        profiler.times.clear()  # warm-up runs dropped
        t0, n = time.perf_counter(), 0
        while n < 20 or time.perf_counter() - t0 < 1.0:
            run_once()
            n += 1
        nodes = [(nd.name or f"{nd.op_type}_{i}", [o for o in nd.output if o]) for i, nd in enumerate(model.graph.node)]
        op_types = {name: nd.op_type for (name, _), nd in zip(nodes, model.graph.node)}
        layers = []
        for name, times in profiler.times.items():
            sources = trt_layer_sources(name, nodes)
            op_type = "+".join(dict.fromkeys(op_types[s] for s in sources)) or ("Reformat" if "Reformat" in name else "?")
            raw_ms = float(np.median(times))
            layers.append(LayerTiming(name=name, op_type=op_type, latency_ms=raw_ms, raw_ms=raw_ms, source_nodes=sources))
        return LayerProfile(
            layers=layers, end_to_end_ms=end_to_end.latency_ms, profiled_runs=n,
            method="none: TensorRT's own per-layer GPU times, as reported (compare layers_sum_ms with end_to_end_ms)",
        )
