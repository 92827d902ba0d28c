"""Eager PyTorch on the CPU: end-to-end and per-layer latency of ONNX graphs (run as torch ops) or nn.Modules.

The ONNX graph becomes a `deploykit.onnx_torch.OnnxGraphModule` (one submodule per ONNX node), so the
per-layer profile names the original ONNX nodes. torch is imported inside functions only: discovering
backends must not pay for it.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import onnx

from deploykit.errors import DeployKitError
from deploykit.fingerprint import host_fingerprint
from deploykit.onnx_io import InputSpec, random_feeds
from deploykit.protocol import MODEL_PROTOCOL, Measurement, Protocol, run_protocol

from . import register_backend
from .base import CAL_INPUT, CAL_NODES, Backend, LayerProfile, LayerTiming, calibrate_node_overhead_ms

LayerTimes = dict[Any, list[float]]  # node module -> per-run milliseconds (modules: names need not be unique)


class TorchBackend(Backend):
    """What torch-cpu and torch-cuda share: conversion, the protocol, hooks and the overhead correction.

    Subclasses say where tensors live (`device`, `_place`) and how a span of work is timed
    (`_runner`, `_hooks`).
    """
    device = "cpu"

    @contextmanager
    def _session(self) -> Iterator[None]:
        """Our thread count and inference mode for the duration; the caller's thread count afterwards."""
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                yield
        finally:
            torch.set_num_threads(previous)

    def _place(self, module, inputs: Sequence[Any], *, ours: bool = True):
        """The module and inputs on this backend's device, in its precision; the caller's module unchanged unless `ours`."""
        return module, tuple(inputs)

    def _convert(self, model: onnx.ModelProto, inputs: list[InputSpec]):
        import torch

        from deploykit.onnx_torch import onnx_to_torch

        module = onnx_to_torch(model)
        feeds = random_feeds(inputs)
        missing = [n for n in module.input_names if n not in feeds]
        if missing:
            raise DeployKitError(f"no shape given for model input(s) {', '.join(missing)}: pass one with --shape")
        return self._place(module, [torch.from_numpy(feeds[n]) for n in module.input_names])

    def _runner(self, module, xs: tuple) -> Callable[[], float]:
        """run_once() -> elapsed ms of one forward pass."""
        perf_counter = time.perf_counter

        def run_once() -> float:
            t0 = perf_counter()
            module(*xs)
            return (perf_counter() - t0) * 1000.0

        return run_once

    def _hooks(self, times: LayerTimes):
        """(pre_hook, post_hook, end_of_run) recording each node module's time into `times`."""
        perf_counter = time.perf_counter
        started: dict[Any, float] = {}

        def pre(mod, args) -> None:
            started[mod] = perf_counter()

        def post(mod, args, out) -> None:
            t = perf_counter()
            times[mod].append((t - started[mod]) * 1000.0)

        return pre, post, lambda: None

    # ------------------------------------------------------------------------------------------ API

    def fingerprint(self) -> dict:
        import torch

        return {
            "backend": self.name,
            **host_fingerprint(),
            "runtime": "torch",
            "runtime_version": torch.__version__,
            "device": self.device,
            "threads": self.threads,
            "precision": self.precision,
        }

    def measure(self, model: onnx.ModelProto, inputs: list[InputSpec], protocol: Protocol = MODEL_PROTOCOL) -> Measurement:
        module, xs = self._convert(model, inputs)
        return self._measure_placed(module, xs, protocol)

    def measure_module(self, module, example_inputs: Sequence[Any] | Any, protocol: Protocol = MODEL_PROTOCOL) -> Measurement:
        """End-to-end latency of a plain nn.Module (set to eval mode) on `example_inputs` (a tensor or a sequence)."""
        import torch

        xs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        module, xs = self._place(module.eval(), xs, ours=False)
        return self._measure_placed(module, xs, protocol)

    def _measure_placed(self, module, xs: tuple, protocol: Protocol) -> Measurement:
        with self._session():
            return run_protocol(self._runner(module, xs), protocol)

    def measure_layers(self, model: onnx.ModelProto, inputs: list[InputSpec], end_to_end: Measurement | None = None) -> LayerProfile:
        module, xs = self._convert(model, inputs)
        if end_to_end is None:
            end_to_end = self._measure_placed(module, xs, MODEL_PROTOCOL)
        times = self._layer_times(module, xs, min_runs=20, min_s=1.0)
        per_node_ms = hook_overhead_ms(type(self), self.threads, self.precision)
        layers = []
        for op in module.node_modules():
            raw_ms = float(np.median(times[op]))
            layers.append(LayerTiming(name=op.onnx_name, op_type=op.onnx_op_type, latency_ms=max(raw_ms + per_node_ms, 0.0),
                                      raw_ms=raw_ms, source_nodes=[op.onnx_name]))
        return LayerProfile(
            layers=layers, end_to_end_ms=end_to_end.latency_ms, profiled_runs=len(next(iter(times.values()), [])),
            method=f"per-node module-call/hook overhead {per_node_ms * 1000:+.2f} us, calibrated on a {CAL_NODES}-node chain",
        )

    def _layer_times(self, module, xs: tuple, min_runs: int, min_s: float) -> LayerTimes:
        """Time of every node module in each of >= min_runs forward passes (and >= min_s), warm-up dropped."""
        times: LayerTimes = defaultdict(list)
        pre, post, end_of_run = self._hooks(times)
        handles = []
        try:
            for op in module.node_modules():
                handles.append(op.register_forward_pre_hook(pre))
                handles.append(op.register_forward_hook(post))
            with self._session():
                for _ in range(3):
                    module(*xs)
                    end_of_run()
                times.clear()
                t0, n = time.perf_counter(), 0
                while n < min_runs or time.perf_counter() - t0 < min_s:
                    module(*xs)
                    end_of_run()
                    n += 1
        finally:
            for h in handles:
                h.remove()
        return times


@register_backend("torch-cpu")
class TorchCpuBackend(TorchBackend):
    @classmethod
    def check_available(cls) -> None:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise DeployKitError("backend torch-cpu needs PyTorch: pip install torch") from None


# ---------------------------------------------------------------------------------------------- calibration

@lru_cache(maxsize=None)
def hook_overhead_ms(backend_cls: type[TorchBackend], threads: int, precision: str) -> float:
    """Module-call and dispatch cost per node the hooks do not see, net of the hooks' own cost; once per process."""
    backend = backend_cls(threads=threads, precision=precision)

    def wall_ms(model: onnx.ModelProto) -> float:
        module, xs = backend._convert(model, [CAL_INPUT])
        return backend._measure_placed(module, xs, MODEL_PROTOCOL).latency_ms

    def hooked_ms(model: onnx.ModelProto) -> float:
        module, xs = backend._convert(model, [CAL_INPUT])
        return sum(float(np.median(v)) for v in backend._layer_times(module, xs, min_runs=200, min_s=0.3).values())

    return calibrate_node_overhead_ms(wall_ms, hooked_ms)
