"""The timing protocol every backend shares: warm-up, rounds, median of round medians.

A backend supplies `run_once() -> elapsed_ms` (wall clock on a CPU, CUDA events on a GPU);
this module decides how often to call it and how to summarise the result.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .stats import LatencyStats


@dataclass(frozen=True)
class Protocol:
    warmup_runs: int = 5
    warmup_s: float = 0.2  # also warms caches and lets the CPU clock settle
    rounds: int = 5
    round_s: float = 0.25  # each round runs at least this long ...
    min_runs_per_round: int = 10  # ... and at least this many times
    max_runs_per_round: int = 2000
    tolerance: float = 0.03  # rounds agree when (max - min) / median of round medians <= this
    max_rounds: int = 15

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.max_rounds < self.rounds:
            raise ValueError("need 1 <= rounds <= max_rounds")
        if self.min_runs_per_round < 1 or self.max_runs_per_round < self.min_runs_per_round:
            raise ValueError("need 1 <= min_runs_per_round <= max_runs_per_round")
        if self.tolerance <= 0:
            raise ValueError("tolerance must be > 0")


# End-to-end measurement of a whole model (`deploykit measure`).
MODEL_PROTOCOL = Protocol()
# Single kernels in `deploykit profile`: thousands of them, so shorter rounds.
KERNEL_PROTOCOL = Protocol(
    warmup_runs=3, warmup_s=0.02, rounds=3, round_s=0.05, min_runs_per_round=5,
    max_runs_per_round=1000, tolerance=0.05, max_rounds=6,
)

# What `deploykit profile` measures by default (here, so the command line can name them without importing the profiler).
DEFAULT_KERNELS = 3000
DEFAULT_MINUTES = 15.0
DEFAULT_NETS = 60  # calibration networks measured after the kernels (about a minute)


@dataclass
class Measurement:
    stats: LatencyStats
    round_medians_ms: list[float]
    spread: float  # (max - min) / median over round medians
    noisy: bool  # rounds still disagreed beyond tolerance after max_rounds
    extra: dict = field(default_factory=dict)

    @property
    def latency_ms(self) -> float:
        return self.stats.median_ms

    def to_dict(self) -> dict:
        s = self.stats
        return {
            "latency_ms": s.median_ms,
            "p90_ms": s.p90_ms,
            "std_ms": s.std_ms,
            "mean_ms": s.mean_ms,
            "cv": s.cv,
            "runs": s.count,
            "rounds": len(self.round_medians_ms),
            "round_medians_ms": self.round_medians_ms,
            "round_spread": self.spread,
            "noisy": self.noisy,
        }


def _spread(medians: list[float]) -> float:
    m = float(np.median(medians))
    return (max(medians) - min(medians)) / m if m > 0 else 0.0


def run_protocol(run_once: Callable[[], float], protocol: Protocol = MODEL_PROTOCOL) -> Measurement:
    """Time `run_once` under `protocol`; adds rounds (up to max_rounds) while rounds disagree."""
    p = protocol
    start = time.perf_counter()
    warm: list[float] = []
    while len(warm) < max(p.warmup_runs, 1) or time.perf_counter() - start < p.warmup_s:  # one run at least: it sizes the rounds
        warm.append(run_once())
        if len(warm) >= 10 * max(p.warmup_runs, 1) and time.perf_counter() - start >= p.warmup_s / 4:
            break  # very fast models: enough warm-up, don't spin
    typical_ms = max(float(np.median(warm[-max(1, len(warm) // 2):])), 1e-4)
    runs_per_round = int(np.clip(np.ceil(p.round_s * 1000.0 / typical_ms), p.min_runs_per_round, p.max_runs_per_round))

    samples: list[float] = []
    medians: list[float] = []
    while True:
        rnd = [run_once() for _ in range(runs_per_round)]
        samples.extend(rnd)
        medians.append(float(np.median(rnd)))
        # The latest `rounds` rounds decide: early rounds are the likeliest to be disturbed.
        window = medians[-p.rounds:]
        if len(medians) >= p.rounds and (_spread(window) <= p.tolerance or len(medians) >= p.max_rounds):
            break
    spread = _spread(window)
    stats = LatencyStats.from_samples(samples, median_ms=float(np.median(window)))
    return Measurement(stats=stats, round_medians_ms=medians, spread=spread, noisy=spread > p.tolerance)


def alternate(runners: dict[str, Callable[[], Measurement]], rounds: int = 3) -> tuple[dict[str, Measurement], list[dict]]:
    """Every runner measured once per round, in turn, `rounds` times: the machine's drift (10-30% between single
    measurements on a shared machine) hits all of them alike. Returns each runner's median round and all rounds."""
    every = [{name: run() for name, run in runners.items()} for _ in range(rounds)]
    median = {name: sorted((r[name] for r in every), key=lambda m: m.latency_ms)[rounds // 2] for name in runners}
    return median, every


def round_ratio(every: list[dict], a: str, b: str) -> float:
    """Median over rounds of a's latency over b's in the same round: robust to drift between rounds."""
    return float(np.median([r[a].latency_ms / r[b].latency_ms for r in every]))
