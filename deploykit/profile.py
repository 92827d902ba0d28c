"""`deploykit profile`: measure a device's kernels into a latency table, resumably."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import DeployKitError, TransportError
from .kernels import Kernel, propose_adaptive, sample_kernels
from .onnx_io import InputSpec
from .protocol import DEFAULT_KERNELS, DEFAULT_MINUTES, DEFAULT_NETS, KERNEL_PROTOCOL, Protocol
from .table import LatencyTable, TableEntry, utc_now

PRIOR_SHARE = 0.65  # the rest is spent where latency changes fast (adaptive sampling)
ADAPTIVE_BATCH = 100
PRIOR_CHUNK = 250
NET_RESOLUTIONS = (64, 96, 128, 160, 192, 224)


@dataclass
class ProfileResult:
    table_path: Path
    measured_now: int
    total: int
    failed: int
    seconds: float
    stopped_by: str  # "target", "time" or "interrupt"
    nets: int = 0  # calibration networks in the table


def kernel_inputs(kernel: Kernel) -> list[InputSpec]:
    return [InputSpec(name, tuple(shape), np.float32) for name, shape in kernel.input_shapes().items()]


def open_table(path: Path, name: str, device: dict, protocol: Protocol, resume: bool) -> LatencyTable:
    if path.exists():
        if not resume:
            raise DeployKitError(f"latency table {path} already exists: pass --resume to continue it, or choose another --name")
        table = LatencyTable.load(path)
        table.check_device(device)
        table.repair()
        return table
    return LatencyTable.create(path, name, device, {"kernel_protocol": asdict(protocol)})


def calibration_nets(n: int) -> list[Kernel]:
    """The first n calibration networks: seeds 0.., resolutions cycling small to large."""
    return [Kernel.make("net", seed=i, res=NET_RESOLUTIONS[i % len(NET_RESOLUTIONS)]) for i in range(n)]


def _kernel_count(table: LatencyTable) -> int:
    return sum(1 for e in table.entries.values() if e.kernel["kind"] != "net")


def profile_device(backend, path: Path, name: str, *, kernels: int = DEFAULT_KERNELS, minutes: float = DEFAULT_MINUTES,
                   resume: bool = False, seed: int = 0, protocol: Protocol = KERNEL_PROTOCOL,
                   progress: bool = True, kinds: list[str] | None = None, nets: int = DEFAULT_NETS) -> ProfileResult:
    """Measure `kernels` kernels (of `kinds`, default all), then `nets` calibration networks, into the table at path."""
    if kernels < 1:
        raise DeployKitError(f"--kernels must be >= 1, got {kernels}")
    if minutes <= 0:
        raise DeployKitError(f"--minutes must be > 0, got {minutes}")
    if nets < 0:
        raise DeployKitError(f"--nets must be >= 0, got {nets}")
    if kinds is not None:
        try:
            sample_kernels(1, np.random.default_rng(0), kinds=kinds)
        except ValueError as e:
            raise DeployKitError(f"--kinds: {e}") from None
    table = open_table(path, name, backend.fingerprint(), protocol, resume)
    arbitrary, backend.weights_are_arbitrary = backend.weights_are_arbitrary, True  # kernels carry random weights
    try:
        return _profile(backend, table, name, kernels, minutes, seed, protocol, progress, kinds, nets)
    finally:
        backend.weights_are_arbitrary = arbitrary


def _profile(backend, table: LatencyTable, name: str, kernels: int, minutes: float, seed: int, protocol: Protocol,
             progress: bool, kinds: list[str] | None, nets: int) -> ProfileResult:
    start = time.monotonic()
    deadline = start + minutes * 60.0
    # Separate generators: the prior plan depends only on the seed, so a resumed run replays it.
    prior_rng, adaptive_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    prior_left = int(kernels * PRIOR_SHARE)
    plan: list[Kernel] = []
    measured, failed, stopped_by = 0, 0, "target"
    bar = tqdm(total=kernels, initial=min(_kernel_count(table), kernels), desc=f"profile {name}", unit="kernel",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        while _kernel_count(table) < kernels:
            if time.monotonic() >= deadline:
                stopped_by = "time"
                break
            if not plan and prior_left > 0:
                chunk = sample_kernels(min(PRIOR_CHUNK, prior_left), prior_rng, kinds=kinds)
                prior_left -= len(chunk)
                plan = [k for k in chunk if k.key not in table.entries]
                continue
            if not plan:
                have = [(Kernel.from_dict(e.kernel), e.stats.median_ms) for e in table.entries.values()
                        if kinds is None or e.kernel["kind"] in kinds]
                plan = propose_adaptive(have, min(ADAPTIVE_BATCH, kernels - _kernel_count(table)), adaptive_rng,
                                        exclude_keys=set(table.entries))
                if not plan:
                    break
            kernel = plan.pop(0)
            bar.set_postfix_str(kernel.kind, refresh=False)
            if _measure_into(table, backend, kernel, protocol):
                measured += 1
                bar.update(1)
            else:
                failed += 1
    except KeyboardInterrupt:
        stopped_by = "interrupt"
    finally:
        bar.close()
    todo = [k for k in calibration_nets(nets) if k.key not in table.entries] if stopped_by == "target" else []
    if todo:
        bar = tqdm(todo, desc="calibration networks", unit="net", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        try:
            for net in bar:
                if time.monotonic() >= deadline:
                    stopped_by = "time"
                    break
                _measure_into(table, backend, net, protocol)
        except KeyboardInterrupt:
            stopped_by = "interrupt"
        finally:
            bar.close()
    n_nets = len(table.entries) - _kernel_count(table)
    return ProfileResult(table_path=table.path, measured_now=measured, total=_kernel_count(table), failed=failed,
                         seconds=time.monotonic() - start, stopped_by=stopped_by, nets=n_nets)


def _measure_into(table: LatencyTable, backend, kernel: Kernel, protocol: Protocol) -> bool:
    """Measure one kernel and append it; False when the runtime rejected it (it stays out of the table).

    A calibration network also gets its per-layer profile where the backend has one: what each kernel
    costs inside a network, which the predictor learns from (`deploykit.predictor`)."""
    model, inputs = kernel.build_onnx(), kernel_inputs(kernel)
    try:
        m = backend.measure(model, inputs, protocol)
    except TransportError:
        raise  # the device is unreachable, not the kernel at fault: stop here, --resume carries on
    except DeployKitError:
        return False
    layers = _net_layers(backend, model, inputs, m) if kernel.kind == "net" else None
    table.append(TableEntry(key=kernel.key, kernel=kernel.to_dict(), stats=m.stats, spread=m.spread,
                            noisy=m.noisy, measured_utc=utc_now(), layers=layers))
    return True


def _net_layers(backend, model, inputs, end_to_end) -> list | None:
    """[op_type, latency_ms, [original node indices]] per node the runtime ran; None without a per-layer profiler."""
    try:
        prof = backend.measure_layers(model, inputs, end_to_end=end_to_end)
    except TransportError:
        raise
    except (DeployKitError, NotImplementedError):
        return None
    index = {n.name: i for i, n in enumerate(model.graph.node)}
    return [[layer.op_type, round(layer.latency_ms, 5), [index[n] for n in layer.source_nodes if n in index]]
            for layer in prof.layers]
