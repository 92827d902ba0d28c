"""Structured pruning to a millisecond budget: per-group widths chosen with the device's latency predictor (not
FLOPs), rounded to channel counts the table shows to be fast, then verified and steered by measurement.

The latency model is the device table's kernel regressors evaluated on every layer the pruned widths touch (a conv
between two groups costs what both widths make it cost), scaled through two real latencies: full width and every
group at its minimum, as measured on the device. Widths keep a share of each group that falls with the group's
milliseconds per channel, share_g = min(1, (t / ms_g) ** ALLOC_EXPONENT), t bisected to the aim (exponent 1 is the
optimum of sum_g C_g log share_g, the latency-optimal extreme; 0 is uniform pruning); with Dagger the shares are
its learned mean gates. The measured latency of each attempt steers the model's aim until a
measurement lands in the target band; on another device the kernel predictor stands in for the measurement.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import DeployKitError
from ..protocol import Measurement, alternate, round_ratio
from .latency import TableModel, fast_count, measure, predict_ms, to_onnx

BAND = (0.9, 1.0)           # accepted measured latency, as a fraction of the budget
AIM = 0.95                  # where inside the band to aim
GUARD = 0.03               # re-measurement moves by 1-3% on this machine: accept only [0.93, 0.97] x budget
MIN_KEEP_FRACTION = 0.1     # no layer is pruned below 10% of its width (layer collapse ruins recovery)
MAX_ATTEMPTS = 8
STEER_ROUNDS = 3            # an attempt is measured in alternation with the full network, this many times each
IMPORTANCE = ("magnitude", "bn", "dagger")
ALLOC_EXPONENT = 0.5        # halfway (in log share) between uniform and latency-optimal widths: early, expensive
                            # layers would otherwise be cut to their minimum, which recovery training cannot repair


@dataclass
class LinearLatency:
    """latency_ms ~= fixed_ms + sum_g ms_per_channel[g] * channels[g]: the table's per-channel costs, scaled through
    the full and the narrowest network's observed latencies (Dagger's differentiable expected latency)."""
    fixed_ms: float
    ms_per_channel: dict[int, float]


@dataclass
class PrunePlan:
    graph: object
    table: TableModel
    curves: dict[int, np.ndarray]
    min_keep: dict[int, int]
    full: dict[int, int]
    linear: LinearLatency      # Dagger's differentiable stand-in
    scale: float               # observed ms per table ms
    offset_ms: float           # observed ms the pruned layers do not explain
    full_ms: float   # observed: measured on the device, else predicted
    min_ms: float


@dataclass
class PruneResult:
    model: nn.Module
    counts: dict[int, int]
    keep: dict[int, list[int]]   # kept channel indices per group: the pruning, reproducible from the original
    predicted_ms: float
    measured: Measurement | None
    met: bool
    importance: str
    attempts: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    min_ms: float = 0.0

    def to_dict(self) -> dict:
        return {"importance": self.importance, "predicted_latency_ms": self.predicted_ms, "met": self.met,
                "groups": len(self.counts), "channels": {str(g): c for g, c in self.counts.items()},
                "keep": {str(g): ix for g, ix in self.keep.items()}, "attempts": self.attempts, "min_latency_ms": self.min_ms,
                "skipped": [{"name": n, "reason": r} for n, r in self.skipped]}


def _min_keep(group) -> int:
    step = max(int(group.divisor), 1)
    least = max(int(group.min_channels), step, math.ceil(MIN_KEEP_FRACTION * group.channels))
    return min(group.channels, -(-least // step) * step)


def plan(model: nn.Module, example: torch.Tensor, predictor, observe) -> PrunePlan:
    """Groups, the table model of their layers, calibrated through the full and the narrowest network as `observe`
    sees them (measured on the device, or predicted)."""
    from .prune import analyze

    graph = analyze(model, example)
    table = TableModel(model, graph, example, predictor)
    groups = [g for g in graph.groups if g.id in table.full]
    if not groups:
        reasons = "; ".join(f"{n}: {r}" for n, r in graph.skipped[:3])
        raise DeployKitError("nothing in this network can be pruned" + (f" ({reasons})" if reasons else "")
                             + ": use --method lowrank or int8")
    full = dict(table.full)
    min_keep = {g.id: _min_keep(g) for g in groups}
    full_ms = observe(model)
    min_ms = observe(build(model, graph, min_keep, None))
    table_full, table_min = table.cost_ms([full, min_keep])
    if table_full - table_min <= 0:  # the table is flat over these layers: their MACs rank the widths
        table.use_macs = True
        table_full, table_min = table.cost_ms([full, min_keep])
    if full_ms - min_ms <= 0 or table_full - table_min <= 0:
        raise DeployKitError(f"pruning does not make this network faster on the device ({full_ms:.4f} ms at full width, "
                             f"{min_ms:.4f} ms at the narrowest): use --method int8")
    scale = (full_ms - min_ms) / (table_full - table_min)
    offset = full_ms - scale * table_full
    curves = {g: table.curve(g) for g in full}
    # Dagger's linear stand-in, through the same two observations: per-channel slopes of the curves, one factor
    slope = {g: max((curves[g][full[g]] - curves[g][min_keep[g]]) / max(full[g] - min_keep[g], 1), 0.0) for g in full}
    factor = (full_ms - min_ms) / max(sum(slope[g] * (full[g] - min_keep[g]) for g in full), 1e-12)
    per_channel = {g: factor * slope[g] for g in full}
    linear = LinearLatency(max(0.0, full_ms - sum(per_channel[g] * full[g] for g in full)), per_channel)
    return PrunePlan(graph, table, curves, min_keep, full, linear, scale, offset, full_ms, min_ms)


def model_ms(p: PrunePlan, configs: list[dict[int, int]]) -> np.ndarray:
    """Calibrated latency of channel-count configs: observed units."""
    return p.offset_ms + p.scale * p.table.cost_ms(configs)


def build(model: nn.Module, graph, counts: dict[int, int], scores: dict[int, torch.Tensor] | None) -> nn.Module:
    """The pruned network keeping the `counts[g]` most important channels of each group (the first ones without scores)."""
    from .prune import prune, select

    groups = {g.id: g for g in graph.groups}
    if scores is None:  # the first channels (same share of every block of a grouped conv)
        scores = {g: -torch.arange(groups[g].channels, dtype=torch.float32) for g in counts}
    return prune(model, graph, select({g: scores[g] for g in counts}, counts, graph))


def allocate(p: PrunePlan, aim_ms: float, keep_share: dict[int, float] | None = None) -> dict[int, int]:
    """Channel counts per group whose calibrated table latency is at most `aim_ms` (see the module docstring)."""
    if model_ms(p, [p.full])[0] <= aim_ms:
        return dict(p.full)
    cost = p.linear.ms_per_channel

    def counts_at(t: float) -> dict[int, int]:  # t grows -> wider
        out = {}
        for g, full in p.full.items():
            if keep_share is not None:
                share = min(1.0, keep_share[g] * t)
            else:
                share = 1.0 if cost[g] <= 0 else min(1.0, (t / cost[g]) ** ALLOC_EXPONENT)
            out[g] = int(min(full, max(p.min_keep[g], round(share * full))))
        return out

    lo, hi = math.log(1e-9), math.log(1e9)
    for _ in range(3):  # three rounds of a 48-point grid in log t: ~1e-4 relative resolution
        grid = np.linspace(lo, hi, 48)
        configs = [counts_at(math.exp(v)) for v in grid]
        ok = np.nonzero(model_ms(p, configs) <= aim_ms)[0]
        if len(ok) == 0:
            return configs[0]
        i = int(ok.max())
        lo, hi = grid[i], grid[min(i + 1, len(grid) - 1)]
    return counts_at(math.exp(lo))


def round_counts(p: PrunePlan, counts: dict[int, int]) -> dict[int, int]:
    groups = {g.id: g for g in p.graph.groups}
    return {g: fast_count(p.curves[g], c, p.min_keep[g], p.full[g], max(int(groups[g].divisor), 1)) if c < p.full[g]
            else c for g, c in counts.items()}


def scores_for(model: nn.Module, p: PrunePlan, method: str, *, data=None, aim_ms: float | None = None,
               dagger_config=None, progress: bool = True) -> dict[int, torch.Tensor]:
    """Channel importance per group: weight magnitude, BatchNorm scale, or Dagger's learned gates (which also set
    the widths: the mean gate of a group is its kept share)."""
    from .prune import importance

    if method not in IMPORTANCE:
        raise DeployKitError(f"unknown importance {method!r}: choose one of {', '.join(IMPORTANCE)}")
    if method != "dagger":
        return importance(model, p.graph, method)
    if data is None:
        raise DeployKitError("--importance dagger learns from data: pass --data, or use --importance magnitude")
    from .dagger import dagger_importance

    aim = max(aim_ms, p.linear.fixed_ms * 1.05 + 1e-6)
    result = dagger_importance(model, [g for g in p.graph.groups if g.id in p.full], data,
                               ms_per_channel=p.linear.ms_per_channel, fixed_ms=p.linear.fixed_ms, target_ms=aim,
                               config=dagger_config, progress=progress)
    return result.importance


def prune_to_budget(model: nn.Module, example: torch.Tensor, predictor, backend, budget_ms: float, *,
                    importance: str = "magnitude", data=None, dagger_config=None, progress: bool = True,
                    device_name: str = "the device", reference_ms: float | None = None) -> PruneResult:
    """Prune `model` (untouched) so its latency on the device lands in [0.9, 1.0] x `budget_ms`: measured when
    `backend` measures on the device, else predicted by the device's kernel predictor.

    The widths come from the calibrated table model; each attempt is observed, and the model's aim is moved by
    log-log interpolation between the attempts that bracket the target. A measured attempt is observed as its
    latency relative to the full network, measured in alternation (STEER_ROUNDS each), times `reference_ms` (the
    full network's latency the budget was set against; default: its first measurement here).
    """
    shape = tuple(example.shape)
    measured: dict[int, Measurement] = {}

    def observe(net: nn.Module) -> float:
        if backend is None:
            return predict_ms(predictor, net, shape)
        m = measure(backend, net, shape)
        measured[id(net)] = m
        return m.latency_ms

    p = plan(model, example, predictor, observe)
    scale = (reference_ms or p.full_ms) / p.full_ms  # observations are relative to the full network, times the reference
    if budget_ms < p.min_ms * scale * BAND[0] / AIM:  # not even the narrowest pruning gets into the band
        raise DeployKitError(f"budget {budget_ms:g} ms is below what pruning can reach on {device_name}: the narrowest "
                             f"pruning ({MIN_KEEP_FRACTION:.0%} of every prunable layer) runs in {p.min_ms * scale:.4f} ms; "
                             "raise --budget-ms or use --method prune+int8")
    target_ms = AIM * budget_ms
    full_proto = to_onnx(model, shape) if backend is not None else None

    def observe_relative(net: nn.Module) -> float:
        """An attempt's latency as its median ratio to the full network over rounds measured in alternation, times
        the reference: the machine's drift (10-30% on a shared host) hits both alike, and the median of the rounds
        keeps one disturbed measurement from steering."""
        if backend is None:
            return predict_ms(predictor, net, shape)
        proto = to_onnx(net, shape)
        median, every = alternate({"full": lambda: measure(backend, full_proto, shape),
                                   "net": lambda: measure(backend, proto, shape)}, STEER_ROUNDS)
        measured[id(net)] = median["net"]
        return round_ratio(every, "net", "full") * (reference_ms or p.full_ms)

    scores = scores_for(model, p, importance, data=data, aim_ms=target_ms, dagger_config=dagger_config,
                        progress=progress)
    shares = {g: float(scores[g].mean()) for g in p.full} if importance == "dagger" else None
    known = [(float(v), ms * scale) for v, ms in zip(model_ms(p, [p.min_keep, p.full]), (p.min_ms, p.full_ms))]
    attempts: list[dict] = []
    best = fastest = None
    lo, hi = (BAND[0] + GUARD) * budget_ms, (BAND[1] - GUARD) * budget_ms
    tried: set[tuple] = set()
    for attempt in range(MAX_ATTEMPTS):
        aim = _aim(known, target_ms)
        counts = round_counts(p, allocate(p, aim, shares))
        for _ in range(8):  # the same widths again observe nothing new: push the aim until they change
            if tuple(sorted(counts.items())) not in tried or not attempts:
                break
            aim *= (target_ms / attempts[-1]["observed_ms"]) ** 0.5 if attempts[-1]["observed_ms"] != target_ms else 1.02
            counts = round_counts(p, allocate(p, aim, shares))
        tried.add(tuple(sorted(counts.items())))
        net = build(model, p.graph, counts, scores)
        got = observe_relative(net)
        modelled = float(model_ms(p, [counts])[0])
        attempts.append({"aim_model_ms": aim, "model_ms": modelled, "observed_ms": got,
                         "measured": backend is not None, "channels": sum(counts.values())})
        if progress:
            print(f"deploykit: prune attempt {attempt + 1}: {'measured' if backend else 'predicted'} {got:.4f} ms "
                  f"({got / budget_ms:.0%} of the budget)", file=sys.stderr)
        candidate = (counts, net, got)
        if fastest is None or got < fastest[2]:
            fastest = candidate
        if got <= budget_ms and (best is None or abs(got - target_ms) < abs(best[2] - target_ms)):
            best = candidate
        if lo <= got <= hi:
            best = candidate
            break
        known.append((modelled, got))
    counts, net, got = best if best is not None else fastest  # nothing under the budget: the fastest, as a miss
    from .prune import select

    keep = {g: [int(i) for i in ix] for g, ix in select({g: scores[g] for g in counts}, counts, p.graph).items()}
    return PruneResult(model=net, counts=counts, keep=keep, predicted_ms=predict_ms(predictor, net, shape),
                       measured=measured.get(id(net)), met=BAND[0] * budget_ms <= got <= BAND[1] * budget_ms,
                       importance=importance, attempts=attempts, skipped=list(p.graph.skipped), min_ms=p.min_ms)


def _aim(known: list[tuple[float, float]], target_ms: float) -> float:
    """The modelled latency whose observation should be `target_ms`: log-log interpolation between the closest known
    (modelled, observed) pairs that bracket the target, else the nearest pair's ratio."""
    pts = sorted(known)
    for (p0, m0), (p1, m1) in zip(pts, pts[1:]):
        if min(m0, m1) <= target_ms <= max(m0, m1) and m0 != m1 and p0 != p1 and min(p0, p1, m0, m1) > 0:
            t = math.log(target_ms / m0) / math.log(m1 / m0)
            return math.exp(math.log(p0) + t * math.log(p1 / p0))
    lin, seen = min(pts, key=lambda k: abs(math.log(k[1] / target_ms)))
    return target_ms * lin / seen
