"""Search under a latency budget: the latency model of a space on a device, the budget band, BCNet's prior initial
population, evolutionary search and the measured verification of the chosen network.

- `build_latency_model`: an `ArchLatencyMLP` over the space's encoding, trained on kernel-predictor labels of
  sampled architectures (no measurement) and, when the device is this machine, corrected on a few measured ones
  (the correction that cross-validates best: none, offset, affine or full). One model serves both searches: the
  evolution asks it for thousands of candidates per second, the differentiable search backpropagates through it.
- The budget band: a search aims the predicted latency at [band_low, band_high] x budget (default 0.88-0.97),
  inside the target [0.85, 1.0] x budget with room for the model's error; the measured check decides.
- `choice_prior` (BCNet, arXiv 2105.10533, "prior initial population sampling"): the supernet's training
  recorded, per choice, the moving-average loss of the random sub-networks that made it; the initial population
  is drawn from p(choice) proportional to exp(-loss / T) per group rather than uniformly, so it starts among the
  choices the supernet found useful. (Our reading of the idea; the paper's exact estimator differs in details.)
- `evolutionary_search`: candidates are drawn, and the latency model rejects those outside the band before
  any evaluation; the fitness (the supernet's accuracy on held-out training images) is logged per candidate,
  so a resumed run replays the same seeded generations without evaluating anything twice.
- `verify_on_device`: the most accurate candidates are built, exported and measured until one lands in the
  target band; the latency model is only a filter, the device has the last word.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .archmlp import (
    ArchLatencyMLP,
    fit_arch_mlp,
    load_arch_mlp,
    measure_arch,
    measure_archs,
    pretrain_targets,
    save_arch_mlp,
)
from .archspace import Arch, SpaceSpec, arch_from_choices, arch_kernels, choice_groups, choices, encode
from .errors import DeployKitError
from .protocol import MODEL_PROTOCOL
from .supernet import largest_arch, smallest_arch

TARGET_LOW, TARGET_HIGH = 0.85, 1.0  # where the measured latency must land, as fractions of the budget
VERIFY_GUARD = 0.02  # verification accepts [0.85 + guard/2, 1.0 - guard] x budget: a re-measurement moves by ~1-2%
BAND = (0.88, 0.97)  # where a search aims the predicted latency
PRETRAIN_N = 3000
PRETRAIN_EPOCHS = 150
MEASURE_N = 30


# -- the latency model of a space on a device -------------------------------------------------

@dataclass
class LatencyModel:
    spec: SpaceSpec
    mlp: ArchLatencyMLP
    info: dict

    def predict_ms(self, archs: Sequence[Arch]) -> np.ndarray:
        if not archs:
            return np.zeros(0)
        return np.asarray(self.mlp.predict_ms(np.stack([encode(self.spec, a) for a in archs])), dtype=np.float64)

    def encoding_ms(self, encoding: torch.Tensor) -> torch.Tensor:
        """Differentiable: a (soft) encoding to predicted ms."""
        return self.mlp(encoding)


def build_latency_model(spec: SpaceSpec, predictor, path: str | os.PathLike, *, backend=None,
                        measurements: str | os.PathLike | None = None, pretrain_n: int = PRETRAIN_N,
                        measure_n: int = MEASURE_N, seed: int = 0, progress: bool = True) -> LatencyModel:
    """The space's latency model on the predictor's device, saved to `path` (JSON; reloaded when it exists).

    `backend` (the device is this machine): `measure_n` sampled architectures are measured into `measurements`
    (resumable JSON lines) and the model is corrected on them."""
    path = Path(path)
    if path.exists():
        mlp, saved_spec, meta = load_arch_mlp(path)
        if saved_spec != spec:
            raise DeployKitError(f"{path} models space {saved_spec.name!r}, not {spec.name!r}: delete it to rebuild")
        return LatencyModel(spec, mlp, meta)
    t0 = time.monotonic()
    _status(progress, f"latency model: labelling {pretrain_n} architectures of space {spec.name!r} with the kernel predictor")
    enc, lat = pretrain_targets(spec, pretrain_n, seed + 1, predict_networks=predictor.predict_networks)
    usable = np.isfinite(lat) & (lat > 0)
    if usable.sum() < max(2, pretrain_n // 2):  # the predictor extrapolates badly to this space's networks
        raise DeployKitError(f"the kernel predictor of {predictor.doc.get('table')} predicts no positive latency for "
                             f"{pretrain_n - int(usable.sum())} of {pretrain_n} architectures of space {spec.name!r}: refit it "
                             "(deploykit predictor fit --device ...) or profile more calibration networks (--nets)")
    mlp = fit_arch_mlp(spec, enc[usable], lat[usable], epochs=PRETRAIN_EPOCHS, seed=seed)
    info: dict = {"pretrained_on": {"table": predictor.doc.get("table"), "n": pretrain_n}, "measured_n": 0,
                  "correction": None}
    if backend is not None and measure_n > 0:
        if measurements is None:
            raise ValueError("measuring needs a measurements path")
        records = measure_archs(spec, measure_n, backend, measurements, seed=seed + 2, progress=progress)
        m_enc = np.stack([encode(spec, Arch.from_dict(r["arch"])) for r in records])
        m_lat = np.array([r["latency_ms"] for r in records])
        before = np.abs(mlp.predict_ms(m_enc) / m_lat - 1)
        mlp = fit_arch_mlp(spec, m_enc, m_lat, init=mlp, epochs=PRETRAIN_EPOCHS, seed=seed)
        info.update(measured_n=len(records), correction=mlp.correction,
                    pretrained_mape_on_measured=float(before.mean()))
    info["fit_s"] = round(time.monotonic() - t0, 1)
    save_arch_mlp(mlp, spec, path, info, device=predictor.device)
    return LatencyModel(spec, mlp, info)


def space_range_ms(spec: SpaceSpec, predictor, backend=None) -> tuple[float, float, str]:
    """(fastest, slowest) latency of the space and how it was obtained: measured on this machine when `backend`
    is given (the smallest and the largest architecture), else predicted by the kernel predictor."""
    extremes = [smallest_arch(spec), largest_arch(spec)]
    if backend is not None:
        # the full protocol (rounds until stable): a budget is refused on these two figures
        lo, hi = (measure_arch(spec, a, backend, MODEL_PROTOCOL).latency_ms for a in extremes)
        return lo, hi, "measured"
    lo, hi = predictor.predict_networks([arch_kernels(spec, a) for a in extremes])
    return float(lo), float(hi), "predicted"


def check_budget(budget_ms: float, spec: SpaceSpec, lo_ms: float, hi_ms: float, how: str, device: str) -> None:
    if not (math.isfinite(budget_ms) and budget_ms > 0):
        raise DeployKitError(f"--budget-ms must be a positive number of milliseconds, got {budget_ms!r}")
    if not lo_ms <= budget_ms <= hi_ms:
        raise DeployKitError(f"budget {budget_ms:g} ms is outside the feasible range of space {spec.name!r} on {device}: "
                             f"{lo_ms:.4g}-{hi_ms:.4g} ms ({how}); choose --budget-ms in that range")


# -- BCNet's prior ---------------------------------------------------------------------------

def choice_prior(spec: SpaceSpec, choice_losses: dict | None) -> dict[str, np.ndarray]:
    """Per group, p(choice) proportional to exp(-(loss - min loss) / T), T the spread (std) of all recorded losses;
    a choice never sampled gets its group's mean loss; uniform without statistics."""
    groups = choice_groups(spec)
    uniform = {g.name: np.full(len(g.choices), 1.0 / len(g.choices)) for g in groups}
    if not choice_losses:
        return uniform
    recorded = [v for g in groups for v in (choice_losses.get(g.name) or [[]])[0] if v is not None]
    temperature = float(np.std(recorded)) if len(recorded) > 1 else 0.0
    if temperature <= 1e-9:
        return uniform
    prior = {}
    for g in groups:
        losses = [v for v in (choice_losses.get(g.name) or [[None] * len(g.choices)])[0]]
        known = [v for v in losses if v is not None]
        if len(losses) != len(g.choices) or not known:
            prior[g.name] = uniform[g.name]
            continue
        filled = np.array([v if v is not None else float(np.mean(known)) for v in losses])
        w = np.exp(-(filled - filled.min()) / temperature)
        prior[g.name] = w / w.sum()
    return prior


def sample_from(spec: SpaceSpec, prior: dict[str, np.ndarray], rng: np.random.Generator) -> Arch:
    return arch_from_choices(spec, [g.choices[int(rng.choice(len(g.choices), p=prior[g.name]))] for g in choice_groups(spec)])


# -- evolution under a hard budget ------------------------------------------------------------

@dataclass
class Candidate:
    arch: Arch
    predicted_ms: float
    accuracy: float
    generation: int

    def to_dict(self) -> dict:
        return {"arch": self.arch.to_dict(), "predicted_ms": self.predicted_ms, "accuracy": self.accuracy,
                "generation": self.generation}


@dataclass
class EvolutionResult:
    candidates: list[Candidate]  # every evaluated candidate, in order
    history: list[dict]  # per generation: best and mean accuracy of the population, candidates drawn and rejected
    seconds: float
    rejected: int = 0
    drawn: int = 0
    resumed: int = 0  # candidates whose fitness came from the log

    @property
    def best(self) -> Candidate:
        return max(self.candidates, key=lambda c: (c.accuracy, -c.predicted_ms))


def _read_log(path: Path | None) -> dict[str, float]:
    if path is None or not path.exists():
        return {}
    done = {}
    for line in path.read_bytes().splitlines():
        try:
            rec = json.loads(line)
            done[Arch.from_dict(rec["arch"]).key] = float(rec["accuracy"])
        except (ValueError, KeyError, TypeError, DeployKitError):
            continue  # a torn last line (killed mid-write) is simply evaluated again
    return done


def _logged_fitness(arch: Arch, ms: float, generation: int, fitness: Callable[[Arch], float], logged: dict[str, float],
                    log: Path | None) -> float:
    """The fitness from the log when there, else evaluated and appended to the log (one flushed line)."""
    if arch.key in logged:
        return logged[arch.key]
    acc = float(fitness(arch))
    if log is not None:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"arch": arch.to_dict(), "accuracy": acc, "predicted_ms": ms, "generation": generation}) + "\n")
    logged[arch.key] = acc
    return acc


def landscape(spec: SpaceSpec, fitness: Callable[[Arch], float], predict_ms: Callable[[list[Arch]], np.ndarray], n: int, *,
              seed: int = 0, progress: bool = True, log_path: str | os.PathLike | None = None) -> list[Candidate]:
    """`n` architectures spread over the space's whole latency range (evenly spaced quantiles of 2,000 uniform
    draws), evaluated: the accuracy/latency front beyond the budget band, for the report's plot."""
    rng = np.random.default_rng([seed, 99])
    pool = [sample_from(spec, choice_prior(spec, None), rng) for _ in range(2000)]
    ms = predict_ms(pool)
    order = np.argsort(ms)
    picks = sorted({int(order[int(round(q * (len(order) - 1)))]) for q in np.linspace(0, 1, n)})
    log = Path(log_path) if log_path is not None else None
    logged = _read_log(log)
    out = []
    for i in tqdm(picks, desc="latency/accuracy front", unit="arch", disable=not progress, file=sys.stderr, dynamic_ncols=True):
        out.append(Candidate(pool[i], float(ms[i]), _logged_fitness(pool[i], float(ms[i]), -1, fitness, logged, log), -1))
    return out


def _mutate(spec: SpaceSpec, arch: Arch, prior: dict[str, np.ndarray], prob: float, rng: np.random.Generator) -> Arch:
    picked = choices(arch)
    for i, g in enumerate(choice_groups(spec)):
        if rng.random() < prob:
            picked[i] = g.choices[int(rng.choice(len(g.choices), p=prior[g.name]))]
    return arch_from_choices(spec, picked)


def _crossover(spec: SpaceSpec, a: Arch, b: Arch, rng: np.random.Generator) -> Arch:
    return arch_from_choices(spec, [x if rng.random() < 0.5 else y for x, y in zip(choices(a), choices(b))])


def evolutionary_search(spec: SpaceSpec, fitness: Callable[[Arch], float], predict_ms: Callable[[list[Arch]], np.ndarray],
                        low_ms: float, high_ms: float, *, population: int = 16, generations: int = 6,
                        mutation_prob: float = 0.25, prior: dict[str, np.ndarray] | None = None, seed: int = 0,
                        progress: bool = True, log_path: str | os.PathLike | None = None,
                        max_draws: int = 20000) -> EvolutionResult:
    """Maximise `fitness` over architectures whose predicted latency lies in [low_ms, high_ms].

    Generation 0 is drawn from `prior` (uniform when None); each later generation keeps the best half as
    parents and fills the rest with children, half by crossover of two parents then mutation, half by
    mutation alone (each choice redrawn from the prior with `mutation_prob`). Over-budget (or under-band)
    children are rejected by `predict_ms` before evaluation; no architecture is evaluated twice.
    `log_path`: JSON lines of evaluated candidates; fitness found there is reused (resume)."""
    if population < 2 or generations < 1:
        raise DeployKitError(f"evolution needs population >= 2 and generations >= 1, got {population} and {generations}")
    prior = prior or choice_prior(spec, None)
    log = Path(log_path) if log_path is not None else None
    logged = _read_log(log)
    t0 = time.perf_counter()
    evaluated: dict[str, Candidate] = {}
    result = EvolutionResult([], [], 0.0)
    pop: list[Candidate] = []
    n_parents = max(2, population // 2)
    bar = tqdm(total=population + (generations - 1) * (population - n_parents), unit="arch", desc=f"evolution {spec.name}",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for gen in range(generations):
            rng = np.random.default_rng([seed, gen])
            want = population if gen == 0 else population - n_parents
            parents = pop[:n_parents]

            def draw() -> Arch:
                if gen == 0:
                    return sample_from(spec, prior, rng)
                if rng.random() < 0.5:
                    i, j = rng.choice(len(parents), size=2, replace=False)
                    child = _crossover(spec, parents[i].arch, parents[j].arch, rng)
                else:
                    child = parents[int(rng.integers(len(parents)))].arch
                return _mutate(spec, child, prior, mutation_prob, rng)

            fresh, drawn, rejected = _draw_in_band(draw, predict_ms, low_ms, high_ms, want, set(evaluated), max_draws)
            result.drawn += drawn
            result.rejected += rejected
            if gen == 0 and not fresh:
                raise DeployKitError(f"no architecture of space {spec.name!r} is predicted within {low_ms:.4g}-{high_ms:.4g} ms "
                                     f"after {drawn} draws: choose another --budget-ms")
            for arch, ms in fresh:
                result.resumed += arch.key in logged
                acc = _logged_fitness(arch, ms, gen, fitness, logged, log)
                c = Candidate(arch, ms, acc, gen)
                evaluated[arch.key] = c
                result.candidates.append(c)
                pop.append(c)
                bar.update(1)
            pop = sorted(pop, key=lambda c: (-c.accuracy, c.predicted_ms))[:population]
            accs = [c.accuracy for c in pop]
            result.history.append({"generation": gen, "best_accuracy": max(accs), "mean_accuracy": float(np.mean(accs)),
                                   "evaluated": len(fresh), "drawn": drawn, "rejected": rejected})
            bar.set_postfix(best=f"{max(accs):.3f}", rejected=result.rejected)
    finally:
        bar.close()
    result.seconds = time.perf_counter() - t0
    return result


def _draw_in_band(draw: Callable[[], Arch], predict_ms, low_ms: float, high_ms: float, want: int, seen: set,
                  max_draws: int, batch: int = 256) -> tuple[list[tuple[Arch, float]], int, int]:
    """Up to `want` new architectures predicted inside the band, drawn in batches; (kept, drawn, rejected)."""
    kept: list[tuple[Arch, float]] = []
    keys = set(seen)
    drawn = rejected = 0
    while len(kept) < want and drawn < max_draws:
        archs = [draw() for _ in range(batch)]
        drawn += batch
        for arch, ms in zip(archs, predict_ms(archs)):
            if arch.key in keys:
                continue
            keys.add(arch.key)
            if low_ms <= ms <= high_ms:
                kept.append((arch, float(ms)))
                if len(kept) == want:
                    break
            else:
                rejected += 1
    return kept, drawn, rejected


# -- into the band ---------------------------------------------------------------------------

def fit_to_band(spec: SpaceSpec, arch: Arch, predict_ms: Callable[[list[Arch]], np.ndarray], low_ms: float, high_ms: float,
                preference: dict[str, np.ndarray] | None = None, max_moves: int = 64) -> tuple[Arch, float, int]:
    """Move `arch` into the band one choice at a time: each move is the single-choice change that brings the
    predicted latency towards the band at the least cost in `preference` (per group log-probabilities, e.g. a
    differentiable search's; uniform when None) per millisecond gained, never overshooting the far edge.
    Returns (arch, predicted ms, moves made)."""
    groups = choice_groups(spec)
    pref = preference or {g.name: np.zeros(len(g.choices)) for g in groups}
    ms = float(predict_ms([arch])[0])
    moves = 0
    while not low_ms <= ms <= high_ms and moves < max_moves:
        picked = choices(arch)
        options = []
        for i, g in enumerate(groups):
            cur = g.choices.index(picked[i])
            for j, choice in enumerate(g.choices):
                if j != cur:
                    options.append((i, choice, float(pref[g.name][cur] - pref[g.name][j])))
        archs = [arch_from_choices(spec, picked[:i] + [choice] + picked[i + 1:]) for i, choice, _ in options]
        new_ms = predict_ms(archs)
        best, best_score = None, math.inf
        for k, (_, _, cost) in enumerate(options):
            gain = (ms - new_ms[k]) if ms > high_ms else (new_ms[k] - ms)
            overshoots = new_ms[k] < low_ms if ms > high_ms else new_ms[k] > high_ms
            if gain <= 0 or overshoots:
                continue
            score = max(cost, 0.0) / gain - 1e-9 * gain  # the cheapest per ms; among free moves the biggest
            if score < best_score:
                best, best_score = k, score
        if best is None:  # every move overshoots: take the one that lands closest to the band
            dist = [max(low_ms - v, v - high_ms, 0.0) for v in new_ms]
            best = int(np.argmin(dist))
            if dist[best] >= max(low_ms - ms, ms - high_ms):
                break
        arch, ms = archs[best], float(new_ms[best])
        moves += 1
    return arch, ms, moves


# -- verification on the device --------------------------------------------------------------

@dataclass
class Verification:
    arch: Arch
    predicted_ms: float
    measured: dict  # the Measurement's distribution (latency_ms, p90_ms, std_ms, count, ...)
    in_target: bool
    tried: list[dict] = field(default_factory=list)  # every candidate measured, in order


def verify_on_device(spec: SpaceSpec, ranked: Sequence[tuple[Arch, float]], backend, budget_ms: float, *,
                     tries: int = 4, progress: bool = True) -> Verification:
    """Measure candidates (arch, predicted ms), best-ranked first, until one lands in the target band [0.85, 1.0] x
    budget, narrowed by VERIFY_GUARD so that the final network's own measurement stays inside it too.

    After each measurement the latency model's error at these candidates (median measured / predicted so far) is
    known, so the next candidate measured is the best-ranked one whose corrected prediction falls inside the
    target band (the closest to it when none does). If none of `tries` lands, `fallback_pick` decides."""
    ranked = list(ranked)
    lo, hi = (TARGET_LOW + VERIFY_GUARD / 2) * budget_ms, (TARGET_HIGH - VERIFY_GUARD) * budget_ms
    tried: list[dict] = []
    untried = list(range(len(ranked)))
    bar = tqdm(total=min(tries, len(ranked)), desc="verify on device", unit="arch", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        while untried and len(tried) < tries:
            scale = float(np.median([t["latency_ms"] / t["predicted_ms"] for t in tried])) if tried else 1.0
            inside = [i for i in untried if lo <= ranked[i][1] * scale <= hi]
            pick = inside[0] if inside else min(untried, key=lambda i: abs(ranked[i][1] * scale - (lo + hi) / 2))
            untried.remove(pick)
            arch, pred = ranked[pick]
            m = measure_arch(spec, arch, backend)
            tried.append({"arch": arch.to_dict(), "predicted_ms": pred, "rank": pick, **m.to_dict()})
            bar.update(1)
            if lo <= m.latency_ms <= hi:
                return Verification(arch, pred, tried[-1], True, tried)
    finally:
        bar.close()
    pick_rec = fallback_pick(tried, budget_ms)
    return Verification(Arch.from_dict(pick_rec["arch"]), pick_rec["predicted_ms"], pick_rec, False, tried)


def fallback_pick(tried: Sequence[dict], budget_ms: float) -> dict:
    """When no measurement landed in the guarded band: the first one in the target band, else the first within the
    budget, else the fastest (in the order measured, i.e. best-ranked first)."""
    in_target = [t for t in tried if TARGET_LOW * budget_ms <= t["latency_ms"] <= TARGET_HIGH * budget_ms]
    within = [t for t in tried if t["latency_ms"] <= budget_ms]
    return (in_target or within or [min(tried, key=lambda t: t["latency_ms"])])[0]


def _status(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)
