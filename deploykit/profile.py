"""`deploykit profile`: measure a device's kernels into a latency table, resumably."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import DeployKitError
from .kernels import Kernel, propose_adaptive, sample_kernels
from .onnx_io import InputSpec
from .protocol import KERNEL_PROTOCOL, Protocol
from .table import LatencyTable, TableEntry, utc_now

DEFAULT_KERNELS = 3000
DEFAULT_MINUTES = 15.0
PRIOR_SHARE = 0.65  # the rest is spent where latency changes fast (adaptive sampling)
ADAPTIVE_BATCH = 100
PRIOR_CHUNK = 250


@dataclass
class ProfileResult:
    table_path: Path
    measured_now: int
    total: int
    failed: int
    seconds: float
    stopped_by: str  # "target", "time" or "interrupt"


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


def profile_device(backend, path: Path, name: str, *, kernels: int = DEFAULT_KERNELS, minutes: float = DEFAULT_MINUTES,
                   resume: bool = False, seed: int = 0, protocol: Protocol = KERNEL_PROTOCOL,
                   progress: bool = True) -> ProfileResult:
    if kernels < 1:
        raise DeployKitError(f"--kernels must be >= 1, got {kernels}")
    if minutes <= 0:
        raise DeployKitError(f"--minutes must be > 0, got {minutes}")
    table = open_table(path, name, backend.fingerprint(), protocol, resume)
    start = time.monotonic()
    deadline = start + minutes * 60.0
    # Separate generators: the prior plan depends only on the seed, so a resumed run replays it.
    prior_rng, adaptive_rng = np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])
    prior_left = int(kernels * PRIOR_SHARE)
    plan: list[Kernel] = []
    done_before = len(table.entries)
    measured, failed, stopped_by = 0, 0, "target"
    bar = tqdm(total=kernels, initial=min(done_before, kernels), desc=f"profile {name}", unit="kernel",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        while len(table.entries) < kernels:
            if time.monotonic() >= deadline:
                stopped_by = "time"
                break
            if not plan and prior_left > 0:
                chunk = sample_kernels(min(PRIOR_CHUNK, prior_left), prior_rng)
                prior_left -= len(chunk)
                plan = [k for k in chunk if k.key not in table.entries]
                continue
            if not plan:
                have = [(Kernel.from_dict(e.kernel), e.stats.median_ms) for e in table.entries.values()]
                plan = propose_adaptive(have, min(ADAPTIVE_BATCH, kernels - len(table.entries)), adaptive_rng,
                                        exclude_keys=set(table.entries))
                if not plan:
                    break
            kernel = plan.pop(0)
            bar.set_postfix_str(kernel.kind, refresh=False)
            try:
                m = backend.measure(kernel.build_onnx(), kernel_inputs(kernel), protocol)
            except DeployKitError:
                failed += 1  # the runtime rejected this configuration; it stays out of the table
                continue
            table.append(TableEntry(key=kernel.key, kernel=kernel.to_dict(), stats=m.stats, spread=m.spread,
                                    noisy=m.noisy, measured_utc=utc_now()))
            measured += 1
            bar.update(1)
    except KeyboardInterrupt:
        stopped_by = "interrupt"
    finally:
        bar.close()
    return ProfileResult(table_path=table.path, measured_now=measured, total=len(table.entries), failed=failed,
                         seconds=time.monotonic() - start, stopped_by=stopped_by)
