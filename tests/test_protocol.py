import itertools

import numpy as np
import pytest

from deploykit.protocol import Protocol, run_protocol
from deploykit.stats import LatencyStats


def test_stats_from_samples():
    s = LatencyStats.from_samples([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s.median_ms == 3.0 and s.count == 5
    assert s.p90_ms == pytest.approx(np.percentile([1, 2, 3, 4, 100], 90))
    assert s.std_ms > 0 and s.cv == pytest.approx(s.std_ms / s.mean_ms)
    assert LatencyStats.from_dict(s.to_dict()) == s


def test_stats_rejects_empty():
    with pytest.raises(ValueError, match="no latency samples"):
        LatencyStats.from_samples([])


def _fake_clock(values):
    it = itertools.cycle(values)
    return lambda: next(it)


def test_protocol_median_of_round_medians_and_outliers():
    # one slow outlier in every ten runs must not move the median
    m = run_protocol(_fake_clock([1.0] * 9 + [50.0]), Protocol(warmup_runs=2, warmup_s=0.0, rounds=3, round_s=0.0,
                                                               min_runs_per_round=10))
    assert m.latency_ms == 1.0
    assert m.stats.p90_ms >= 1.0 and m.stats.count == 30
    assert not m.noisy and len(m.round_medians_ms) == 3


def test_protocol_adds_rounds_when_noisy_and_flags_it():
    # rounds alternate between 1 ms and 2 ms medians: never within tolerance
    values = [1.0] * 10 + [2.0] * 10
    p = Protocol(warmup_runs=0, warmup_s=0.0, rounds=3, round_s=0.0, min_runs_per_round=10, max_rounds=7)
    m = run_protocol(_fake_clock(values), p)
    assert len(m.round_medians_ms) == 7
    assert m.noisy and m.spread > p.tolerance


def test_protocol_recovers_when_later_rounds_agree():
    values = [5.0] * 10 + [1.0] * 1000  # a disturbed first round, then steady
    p = Protocol(warmup_runs=0, warmup_s=0.0, rounds=3, round_s=0.0, min_runs_per_round=10, max_rounds=8)
    m = run_protocol(_fake_clock(values), p)
    assert len(m.round_medians_ms) == 4
    assert m.latency_ms == 1.0 and not m.noisy


def test_protocol_validates():
    with pytest.raises(ValueError):
        Protocol(rounds=5, max_rounds=2)
