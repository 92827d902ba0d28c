"""Search under a budget: BCNet's prior, evolution under a hard latency band, moving an architecture into the band,
the space's latency model on this machine, verification by measurement."""
from __future__ import annotations

import json

import numpy as np
import pytest

from deploykit.archspace import DIGITS_SPACE, arch_macs, choice_groups, sample_arch
from deploykit.errors import DeployKitError
from deploykit.predictor import KernelPredictor
from deploykit.profilers import get_backend
from deploykit.search import (
    build_latency_model,
    check_budget,
    choice_prior,
    evolutionary_search,
    fit_to_band,
    landscape,
    verify_on_device,
)
from deploykit.supernet import largest_arch, smallest_arch

SPEC = DIGITS_SPACE


def macs_ms(archs):
    """A latency proportional to MACs: a cheap, exact stand-in where the algorithm, not the device, is under test."""
    return np.array([arch_macs(SPEC, a) / 1e6 for a in archs])


def depth_fitness(arch) -> float:
    """A known objective for the evolution's mechanics: more non-skip blocks and larger kernels score higher."""
    return sum(0 if op == "skip" else int(op[1]) for op in arch.ops) / 100.0


def band_around(q_low: float, q_high: float):
    rng = np.random.default_rng(0)
    ms = np.sort(macs_ms([sample_arch(SPEC, rng) for _ in range(2000)]))
    return float(np.quantile(ms, q_low)), float(np.quantile(ms, q_high))


# -- BCNet's prior -------------------------------------------------------------------------------

def test_prior_is_uniform_without_statistics():
    prior = choice_prior(SPEC, None)
    for g in choice_groups(SPEC):
        assert prior[g.name] == pytest.approx(np.full(len(g.choices), 1 / len(g.choices)))


def test_prior_prefers_choices_with_lower_training_loss():
    groups = choice_groups(SPEC)
    g = groups[0]
    losses = {g.name: [[0.2] + [0.6] * (len(g.choices) - 2) + [None], [5] * len(g.choices)],
              groups[1].name: [[0.4] * len(groups[1].choices), [5] * len(groups[1].choices)]}
    prior = choice_prior(SPEC, losses)
    p = prior[g.name]
    assert p.sum() == pytest.approx(1.0)
    assert p[0] == p.max() and p[0] > 2 * p[1]
    assert p[1] < p[-1] < p[0]  # never sampled: the group's mean loss, between the best and the rest
    assert prior[groups[1].name] == pytest.approx(np.full(len(groups[1].choices), 1 / len(groups[1].choices)))


# -- evolution -------------------------------------------------------------------------------------

def test_evolution_keeps_every_candidate_in_the_band_and_improves(tmp_path):
    low, high = band_around(0.4, 0.6)
    calls = []

    def fitness(arch):
        calls.append(arch.key)
        return depth_fitness(arch)

    res = evolutionary_search(SPEC, fitness, macs_ms, low, high, population=8, generations=5, seed=1, progress=False,
                              log_path=tmp_path / "evo.jsonl")
    assert res.candidates and all(low <= c.predicted_ms <= high for c in res.candidates)
    assert all(low <= m <= high for m in macs_ms([c.arch for c in res.candidates]))
    assert len(set(calls)) == len(calls) == len(res.candidates)  # nothing evaluated twice
    assert res.rejected > 0  # the band is narrow: the latency model turned candidates away before evaluation
    first = max(c.accuracy for c in res.candidates if c.generation == 0)
    assert res.best.accuracy >= first
    assert res.history[-1]["mean_accuracy"] > res.history[0]["mean_accuracy"]

    # resume: the same seeded run replays from the log without evaluating anything
    calls.clear()
    again = evolutionary_search(SPEC, fitness, macs_ms, low, high, population=8, generations=5, seed=1, progress=False,
                                log_path=tmp_path / "evo.jsonl")
    assert calls == [] and again.resumed == len(again.candidates)
    assert [c.arch for c in again.candidates] == [c.arch for c in res.candidates]


def test_evolution_reports_an_unreachable_band():
    with pytest.raises(DeployKitError, match="no architecture of space 'digits' is predicted within"):
        evolutionary_search(SPEC, depth_fitness, macs_ms, 1e6, 2e6, population=4, generations=1, progress=False,
                            max_draws=512)


def test_landscape_spans_the_latency_range():
    front = landscape(SPEC, depth_fitness, macs_ms, 8, progress=False)
    ms = sorted(c.predicted_ms for c in front)
    lo, hi = band_around(0.0, 1.0)
    assert len(front) >= 7 and ms[0] <= lo * 1.01 and ms[-1] >= hi * 0.99


# -- into the band ---------------------------------------------------------------------------------

@pytest.mark.parametrize("start", ["largest", "smallest"])
def test_fit_to_band_moves_an_architecture_into_the_band(start):
    low, high = band_around(0.45, 0.55)
    arch = largest_arch(SPEC) if start == "largest" else smallest_arch(SPEC)
    fitted, ms, moves = fit_to_band(SPEC, arch, macs_ms, low, high)
    assert low <= ms <= high and moves > 0
    assert ms == pytest.approx(macs_ms([fitted])[0])
    same, _, none = fit_to_band(SPEC, fitted, macs_ms, low, high)
    assert same == fitted and none == 0


def test_fit_to_band_follows_the_preference():
    low, high = band_around(0.3, 0.4)
    groups = choice_groups(SPEC)
    # without a preference the first stage is narrowed (it saves the most per move); strongly prefer it wide
    plain, _, _ = fit_to_band(SPEC, largest_arch(SPEC), macs_ms, low, high)
    assert plain.widths[0] == min(SPEC.width_ratios)
    pref = {g.name: np.zeros(len(g.choices)) for g in groups}
    pref["s0.width"] = np.log(np.array([0.01, 0.01, 0.98]))
    fitted, ms, _ = fit_to_band(SPEC, largest_arch(SPEC), macs_ms, low, high, preference=pref)
    assert low <= ms <= high and fitted.widths[0] == max(SPEC.width_ratios)


def test_check_budget_names_the_feasible_range():
    check_budget(0.05, SPEC, 0.03, 0.1, "measured", "dev")
    with pytest.raises(DeployKitError, match=r"outside the feasible range .*0\.03-0\.1 ms \(measured\).*--budget-ms"):
        check_budget(5.0, SPEC, 0.03, 0.1, "measured", "dev")
    with pytest.raises(DeployKitError, match="positive number"):
        check_budget(-1.0, SPEC, 0.03, 0.1, "measured", "dev")


# -- the latency model and the device --------------------------------------------------------------

@pytest.fixture(scope="module")
def backend():
    return get_backend("ort-cpu", threads=1)


def test_latency_model_is_corrected_on_measurements_and_reloads(tmp_path, backend):
    kp = KernelPredictor.for_device("epyc-2c-ort-t1")
    path = tmp_path / "lm.json"
    model = build_latency_model(SPEC, kp, path, backend=backend, measurements=tmp_path / "m.jsonl", pretrain_n=400,
                                measure_n=12, seed=0, progress=False)
    assert model.info["measured_n"] == 12 and model.info["correction"] in ("none", "offset", "affine", "full")
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()[1:]]
    assert len(records) == 12
    again = build_latency_model(SPEC, kp, path, progress=False)  # reloaded, not refitted
    archs = [largest_arch(SPEC), smallest_arch(SPEC)]
    assert again.predict_ms(archs) == pytest.approx(model.predict_ms(archs), rel=1e-5)
    # the corrected model against fresh measurements of other architectures (a loose bound: timing noise)
    from deploykit.archmlp import measure_arch

    rng = np.random.default_rng(123)
    fresh = [sample_arch(SPEC, rng) for _ in range(4)]
    measured = np.array([measure_arch(SPEC, a, backend).latency_ms for a in fresh])
    assert np.median(np.abs(model.predict_ms(fresh) / measured - 1)) < 0.3


def test_verify_on_device_skips_candidates_outside_the_target(backend):
    from deploykit.archmlp import measure_arch

    big, small = largest_arch(SPEC), smallest_arch(SPEC)
    small_ms = measure_arch(SPEC, small, backend).latency_ms
    budget = small_ms / 0.93  # the small network sits inside [0.85, 1.0] x budget, the big one far above it
    # a badly wrong latency model: both predicted inside the band, so the better-ranked big one is measured first
    v = verify_on_device(SPEC, [(big, 0.92 * budget), (small, 0.9 * budget)], backend, budget, progress=False)
    assert v.tried[0]["arch"] == big.to_dict() and v.tried[0]["latency_ms"] > budget
    assert v.arch == small or not v.in_target  # timing noise may push it out; then the fastest is kept
    # the kept measurement is the small network's, not the big one's (a bound on the budget itself failed in CI when
    # one measurement of this 0.03 ms network came out 1.7x the first: the machine's noise at this scale)
    assert v.measured["latency_ms"] < v.tried[0]["latency_ms"]
    for key in ("latency_ms", "p90_ms", "std_ms", "runs"):
        assert key in v.measured


def test_latency_model_refuses_a_predictor_that_predicts_negative_latency(tmp_path):
    import copy

    doc = copy.deepcopy(KernelPredictor.for_device("epyc-2c-ort-t1").doc)
    doc["overhead"]["coef"]["const"] = -1.0  # a calibration that extrapolates small networks below zero
    with pytest.raises(DeployKitError, match=r"predicts no positive latency for \d+ of 200 .*refit it"):
        build_latency_model(SPEC, KernelPredictor(doc), tmp_path / "lm.json", pretrain_n=200, progress=False)
    assert not (tmp_path / "lm.json").exists()
