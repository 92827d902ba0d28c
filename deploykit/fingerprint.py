"""What identifies the machine a latency was measured on."""
from __future__ import annotations

import os
import platform
from functools import lru_cache


@lru_cache(maxsize=1)
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def host_fingerprint() -> dict:
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count() or 1,
        "machine": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


# The fields that must match for two latency figures to be comparable. The rest is informative.
IDENTITY_FIELDS = ("backend", "cpu_model", "logical_cores", "machine", "runtime", "runtime_version",
                   "threads", "precision", "graph_optimization", "gpu_name")


def identity(fp: dict) -> dict:
    return {k: fp.get(k) for k in IDENTITY_FIELDS if k in fp}


def mismatches(a: dict, b: dict) -> list[str]:
    """Identity fields on which two fingerprints disagree, as 'field: a != b'."""
    ia, ib = identity(a), identity(b)
    return [f"{k}: {ia.get(k)!r} != {ib.get(k)!r}" for k in sorted(set(ia) | set(ib)) if ia.get(k) != ib.get(k)]
