"""Compression of a user's trained network under a latency budget: structured pruning, trained low-rank
decomposition, INT8 mixed-precision quantization, each followed by verification on the device.

The Python API works on plain `nn.Module`s (names resolve lazily, so `import deploykit.compress` stays light):

    from deploykit.compress.prune import analyze, importance, select, prune # structured pruning, any CNN
    from deploykit.compress import prune_to_budget                           # widths chosen for a budget_ms
    from deploykit.compress import dagger_importance                         # learned, latency-aware importance
    from deploykit.compress import TRPConfig, trp_train, ranks_for_energy, decompose   # trained low-rank
    from deploykit.compress import quantize_int8, mixed_precision            # INT8 QDQ for ONNX Runtime
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "analyze": "prune", "importance": "prune", "select": "prune", "PruneGraph": "prune", "Group": "prune",
    "prune_to_budget": "budget", "PruneResult": "budget",
    "dagger_importance": "dagger", "DaggerConfig": "dagger", "DaggerResult": "dagger",
    "TRPConfig": "lowrank", "trp_train": "lowrank", "ranks_for_energy": "lowrank", "decompose": "lowrank",
    "decomposable_layers": "lowrank", "decomposed_report": "lowrank",
    "quantize_int8": "quant", "mixed_precision": "quant", "MixedPrecisionResult": "quant", "onnx_accuracy": "quant",
    "measure_speedup": "quant",
    "load_model": "loader",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'deploykit.compress' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
