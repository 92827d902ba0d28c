"""ONNX Runtime, CPU execution provider: end-to-end and per-node latency."""
from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import onnx

from deploykit.errors import DeployKitError
from deploykit.fingerprint import host_fingerprint
from deploykit.graphmap import map_source_nodes
from deploykit.onnx_io import InputSpec, random_feeds
from deploykit.protocol import MODEL_PROTOCOL, Measurement, Protocol, run_protocol

from . import register_backend
from .base import CAL_INPUT, CAL_NODES, Backend, LayerProfile, LayerTiming, calibrate_node_overhead_ms

PROVIDER = "CPUExecutionProvider"
_TRACE_WARMUP_RUNS = 3  # profiled runs whose node events are discarded


def make_session(model: onnx.ModelProto | bytes, threads: int, *, profile_prefix: str | None = None,
                 optimized_path: str | None = None, level: str = "all", load_format: str | None = None,
                 initializers: Mapping[str, np.ndarray] | None = None):
    """An InferenceSession configured for repeatable timing (sequential, fixed threads); `load_format` "ORT" reads
    bytes in the ORT format. `initializers` supplies, from memory, the model's initializers marked external."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.log_severity_level = 3  # the NCHWc serialisation warning is expected, not news
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    if load_format:
        so.add_session_config_entry("session.load_model_format", load_format)
    values = []
    if initializers:
        values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for a in initializers.values()]
        so.add_external_initializers(list(initializers), values)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        sess = ort.InferenceSession(data, so, providers=[PROVIDER])
        sess._deploykit_initializers = (initializers, values)  # the runtime reads their memory for the session's life
        return sess
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DeployKitError(f"ONNX Runtime cannot load the model ({first}): export it with a supported opset/ops") from None


@register_backend("ort-cpu")
class OrtCpuBackend(Backend):
    graph_optimization = "all"
    measures_bytes = True  # make_session takes bytes as they are
    takes_initializers = True

    @classmethod
    def check_available(cls) -> None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise DeployKitError("backend ort-cpu needs onnxruntime: pip install onnxruntime") from None

    def fingerprint(self) -> dict:
        import onnxruntime as ort

        return {
            "backend": self.name,
            **host_fingerprint(),
            "runtime": "onnxruntime",
            "runtime_version": ort.__version__,
            "provider": PROVIDER,
            "threads": self.threads,
            "graph_optimization": self.graph_optimization,
            "precision": self.precision,
        }

    def _runner(self, sess, inputs: list[InputSpec]):
        feeds = random_feeds(inputs)
        run = sess.run
        between = self.between_runs

        def run_once() -> float:
            if between is not None:
                between()
            t0 = time.perf_counter()
            run(None, feeds)
            return (time.perf_counter() - t0) * 1000.0

        return run_once

    def measure(self, model: onnx.ModelProto | bytes, inputs: list[InputSpec],
                protocol: Protocol = MODEL_PROTOCOL) -> Measurement:
        sess = make_session(model, self.threads, level=self.graph_optimization, initializers=self.initializers)
        return run_protocol(self._runner(sess, inputs), protocol)

    def measure_session(self, sess, inputs: list[InputSpec], protocol: Protocol = MODEL_PROTOCOL) -> Measurement:
        """End-to-end latency of a session made elsewhere (an ORT-format file: `make_session(..., load_format="ORT")`)."""
        return run_protocol(self._runner(sess, inputs), protocol)

    def measure_layers(self, model: onnx.ModelProto, inputs: list[InputSpec], end_to_end: Measurement | None = None) -> LayerProfile:
        if end_to_end is None:
            end_to_end = self.measure(model, inputs)
        raw, optimised = self._profile_nodes(model, inputs, min_runs=20, min_s=1.0)
        sources = map_source_nodes(model, [(n, list(i), list(o)) for n, (_, i, o) in optimised.items()])
        per_node_ms = node_overhead_ms(self.threads)
        layers = []
        for name, times in raw.items():
            op_type = optimised[name][0] if name in optimised else "?"
            raw_ms = float(np.median(times))
            layers.append(LayerTiming(name=name, op_type=op_type, latency_ms=max(raw_ms + per_node_ms, 0.0), raw_ms=raw_ms,
                                      source_nodes=sources.get(name, [])))
        return LayerProfile(
            layers=layers, end_to_end_ms=end_to_end.latency_ms, profiled_runs=len(next(iter(raw.values()), [])),
            method=f"per-node executor/profiler overhead {per_node_ms * 1000:+.2f} us, calibrated on a {CAL_NODES}-node chain",
        )

    def _profile_nodes(self, model, inputs, min_runs: int, min_s: float):
        """Median kernel time of each node of the optimised graph, over repeated profiled runs."""
        with tempfile.TemporaryDirectory(prefix="deploykit-prof-") as tmp:
            opt_path = os.path.join(tmp, "optimised.onnx")
            sess = make_session(model, self.threads, profile_prefix=os.path.join(tmp, "trace"),
                                optimized_path=opt_path, level=self.graph_optimization, initializers=self.initializers)
            run_once = self._runner(sess, inputs)
            for _ in range(_TRACE_WARMUP_RUNS):
                run_once()  # dropped from the trace below
            t0, n = time.perf_counter(), 0
            while n < min_runs or time.perf_counter() - t0 < min_s:
                run_once()
                n += 1
            with open(sess.end_profiling(), encoding="utf-8") as f:
                events = json.load(f)
            opt = onnx.load(opt_path, load_external_data=False)
        optimised = {nd.name: (nd.op_type, nd.input, nd.output) for nd in opt.graph.node}
        per_node: dict[str, list[float]] = defaultdict(list)
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                per_node[e["name"][: -len("_kernel_time")]].append(e["dur"] / 1000.0)
        # graph order first, then any node the trace has but the saved graph lacks
        names = [n for n in optimised if n in per_node] + [n for n in per_node if n not in optimised]
        ordered = {n: per_node[n][_TRACE_WARMUP_RUNS:] or per_node[n] for n in names}
        return ordered, optimised


@lru_cache(maxsize=None)
def node_overhead_ms(threads: int) -> float:
    """Executor cost per node the profiler does not see, net of the profiler's own cost; once per process."""
    backend = OrtCpuBackend(threads=threads)
    return calibrate_node_overhead_ms(
        lambda m: backend.measure(m, [CAL_INPUT]).latency_ms,
        lambda m: sum(float(np.median(v)) for v in backend._profile_nodes(m, [CAL_INPUT], min_runs=200, min_s=0.3)[0].values()),
    )
