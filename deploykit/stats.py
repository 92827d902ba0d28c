"""Latency is a distribution: one value type carries median, p90, std and count."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p90_ms: float
    std_ms: float
    mean_ms: float
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("LatencyStats needs at least one sample")
        if not self.median_ms >= 0:
            raise ValueError(f"median_ms must be >= 0, got {self.median_ms}")

    @property
    def cv(self) -> float:
        """Coefficient of variation of the individual runs."""
        return self.std_ms / self.mean_ms if self.mean_ms > 0 else 0.0

    @classmethod
    def from_samples(cls, samples_ms, median_ms: float | None = None) -> "LatencyStats":
        """`median_ms` overrides the pooled median (the protocol reports the median of round medians)."""
        a = np.asarray(samples_ms, dtype=np.float64)
        if a.size == 0:
            raise ValueError("no latency samples")
        return cls(
            median_ms=float(np.median(a) if median_ms is None else median_ms),
            p90_ms=float(np.percentile(a, 90)),
            std_ms=float(a.std(ddof=1)) if a.size > 1 else 0.0,
            mean_ms=float(a.mean()),
            count=int(a.size),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyStats":
        return cls(
            median_ms=float(d["median_ms"]),
            p90_ms=float(d["p90_ms"]),
            std_ms=float(d["std_ms"]),
            mean_ms=float(d.get("mean_ms", d["median_ms"])),
            count=int(d["count"]),
        )
