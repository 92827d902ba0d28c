"""Eager PyTorch on a CUDA GPU, fp32 or fp16: CUDA-event timing end to end and per layer."""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

from deploykit.errors import DeployKitError

from . import register_backend
from .torch_cpu import LayerTimes, TorchBackend

_NO_GPU = "backend torch-cuda needs a CUDA GPU and a CUDA build of PyTorch: none found (torch.cuda.is_available() is False)"


def cuda_fingerprint() -> dict:
    """GPU identity fields shared by the GPU backends."""
    import torch

    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {
        "gpu_name": props.name,
        "gpu_memory_gb": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version(),
        "driver_version": _driver_version(),
    }


def _driver_version() -> str | None:
    try:  # the kernel module reports it; torch does not expose it publicly
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            first = f.readline()
    except OSError:
        return None
    for word in first.split():
        if word[:1].isdigit() and "." in word:
            return word
    return None


@register_backend("torch-cuda")
class TorchCudaBackend(TorchBackend):
    device = "cuda"
    precisions = ("fp32", "fp16")

    @classmethod
    def check_available(cls) -> None:
        try:
            import torch
        except ImportError:
            raise DeployKitError("backend torch-cuda needs PyTorch with CUDA: pip install torch (a CUDA build) on a "
                                 "machine with an NVIDIA GPU") from None
        if not torch.cuda.is_available():
            raise DeployKitError(_NO_GPU)

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), **cuda_fingerprint()}

    def _place(self, module, inputs: Sequence[Any], *, ours: bool = True):
        import torch

        if not ours:  # measure_module must not move or cast the caller's module
            module = copy.deepcopy(module)
        half = self.precision == "fp16"
        module = module.to(self.device)
        if half:
            module = module.half()
        xs = tuple(x.to(self.device, dtype=torch.float16 if half and x.is_floating_point() else x.dtype) for x in inputs)
        return module, xs

    def _runner(self, module, xs: tuple) -> Callable[[], float]:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run_once() -> float:
            start.record()
            module(*xs)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return run_once

    def _hooks(self, times: LayerTimes):
        import torch

        events: dict[Any, tuple[Any, Any]] = {}  # node module -> (start, end) event, reused every run

        def pair(mod) -> tuple[Any, Any]:
            if mod not in events:
                events[mod] = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            return events[mod]

        def pre(mod, args) -> None:
            pair(mod)[0].record()

        def post(mod, args, out) -> None:
            pair(mod)[1].record()

        def end_of_run() -> None:  # events are read once per run, after the GPU has caught up
            torch.cuda.synchronize()
            for mod, (start, end) in events.items():
                times[mod].append(start.elapsed_time(end))

        return pre, post, end_of_run

