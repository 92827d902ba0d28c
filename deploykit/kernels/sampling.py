"""Samplers over the kernel space: a prior shaped like real CNNs, and adaptive proposals near fast change.

The prior follows nn-Meter: configurations come from where networks actually put them (few channels
at high resolution, many at low), not from a uniform grid. `propose_adaptive` then spends further
samples where a quick regressor predicts measured latency worst.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import LinearRegression
from sklearn.neighbors import NearestNeighbors

from . import space
from .space import Kernel, Site, kind_spec

# ~0.4 s per kernel on one thread at this cost keeps a 1,500-kernel profile within 15 minutes
DEFAULT_MAX_MACS = 600_000_000

# (feature-map side, min channels, max channels, weight): the joint resolution/channel prior
SHAPE_PRIOR: tuple[tuple[int, int, int, float], ...] = (
    (224, 3, 64, 0.04),  # ImageNet-224 networks
    (112, 8, 128, 0.10),
    (56, 16, 256, 0.14),
    (28, 32, 512, 0.15),
    (14, 64, 1024, 0.16),
    (7, 128, 2048, 0.10),
    (192, 3, 32, 0.01),  # stems of 192/160/128 inputs
    (160, 3, 32, 0.01),
    (128, 3, 48, 0.01),
    (96, 8, 128, 0.02),  # 192/2
    (80, 8, 128, 0.02),  # 160/2
    (64, 8, 128, 0.03),  # 128/2, 64 inputs
    (48, 16, 256, 0.02),  # 192/4, 96/2
    (40, 16, 256, 0.02),  # 160/4
    (32, 16, 256, 0.03),  # 128/4, CIFAR inputs
    (24, 24, 512, 0.02),  # 192/8, 96/4
    (20, 32, 512, 0.02),  # 160/8
    (16, 32, 512, 0.03),  # 128/8, 64/4, 32/2
    (12, 64, 1024, 0.02),  # 192/16, 96/8
    (10, 64, 1024, 0.02),  # 160/16
    (8, 64, 1024, 0.03),  # 128/16, 32/4
)
SITES = tuple(Site(h, lo, hi) for h, lo, hi, _ in SHAPE_PRIOR)
_SITE_P = np.array([w for *_, w in SHAPE_PRIOR]) / sum(w for *_, w in SHAPE_PRIOR)
RESOLUTIONS = tuple(sorted({s.h for s in SITES}))

# conv/dwconv carry most of a CNN's time; every kind keeps >= 4% so 1,500 samples give ~60 per kind
DEFAULT_KIND_WEIGHTS: dict[str, float] = {
    "conv": 0.30, "dwconv": 0.19, "gconv": 0.05, "se": 0.06, "add": 0.05, "mul": 0.05, "concat": 0.05,
    "linear": 0.05, "shuffle": 0.04, "maxpool": 0.04, "avgpool": 0.04, "gap": 0.04, "resize": 0.04, "split": 0.03, "act": 0.03,
}
MIN_FIT = 10  # fewer measured points of a kind than this: no regressor, treat the kind as unexplored
_TRIES_PER_KERNEL = 60
_NEIGHBOURS = 6


def _apportion(n: int, mass: Mapping[str, float]) -> dict[str, int]:
    """Split n proportionally to mass by largest remainder (deterministic, ties by insertion order)."""
    total = sum(mass.values())
    share = {k: n * m / total for k, m in mass.items()} if total > 0 else {k: n / len(mass) for k in mass}
    out = {k: int(v) for k, v in share.items()}
    for k in sorted(share, key=lambda k: out[k] - share[k])[: n - sum(out.values())]:
        out[k] += 1
    return out


def _kind_weights(kinds: Sequence[str] | Mapping[str, float] | None) -> dict[str, float]:
    if isinstance(kinds, Mapping):
        weights = {k: float(w) for k, w in kinds.items()}
    else:
        fallback = min(DEFAULT_KIND_WEIGHTS.values())  # later-registered kinds get the smallest default share
        names = [k for k in space.KERNEL_KINDS if kind_spec(k).sampled] if kinds is None else kinds
        weights = {k: DEFAULT_KIND_WEIGHTS.get(k, fallback) for k in names}
    for k, w in weights.items():
        if not kind_spec(k).sampled:  # kind_spec raises ValueError naming the valid kinds
            raise ValueError(f"kind {k!r} is measured on purpose, not sampled")
        if not w >= 0:
            raise ValueError(f"kind weight for {k!r} must be >= 0, got {w}")
    if not weights or sum(weights.values()) <= 0:
        raise ValueError("need at least one kind with positive weight")
    return weights


def _collect(quota: dict[str, int], draw: Callable[[str], Kernel | None], seen: set[str],
             max_macs: int) -> list[Kernel]:
    """Draw per-kind quotas of new kernels within max_macs; a kind that runs dry passes its rest on."""
    out: list[Kernel] = []
    for pass_quota in (quota, None):
        if pass_quota is None:  # second pass: shortfall spread over kinds that still produce
            short = sum(quota.values()) - len(out)
            if short <= 0:
                break
            pass_quota = _apportion(short, {k: float(q) for k, q in quota.items() if q})
        for kind, q in pass_quota.items():
            got, tries = 0, 0
            while got < q and tries < _TRIES_PER_KERNEL * q + 100:
                tries += 1
                kern = draw(kind)
                if kern is None or kern.key in seen or kern.macs > max_macs:
                    continue
                seen.add(kern.key)
                out.append(kern)
                got += 1
    return out


def _draw_prior(kind: str, rng: np.random.Generator) -> Kernel | None:
    site = SITES[int(rng.choice(len(SITES), p=_SITE_P))]
    p = kind_spec(kind).sample(rng, site)
    return None if p is None else Kernel.make(kind, **p)


def sample_kernels(n: int, rng: np.random.Generator, kinds: Sequence[str] | Mapping[str, float] | None = None,
                   max_macs: int = DEFAULT_MAX_MACS) -> list[Kernel]:
    """n distinct kernels from the prior, kinds in fixed proportions, returned in shuffled order."""
    quota = _apportion(n, _kind_weights(kinds))
    out = _collect(quota, lambda kind: _draw_prior(kind, rng), set(), max_macs)
    return [out[i] for i in rng.permutation(len(out))]  # interleave kinds so drift does not hit one kind


def _log_features(kernels: Sequence[Kernel]) -> np.ndarray:
    names = sorted(kernels[0].features())
    return np.log1p(np.maximum(0.0, np.array([[k.features()[f] for f in names] for k in kernels])))


def _local_errors(kernels: Sequence[Kernel], latencies: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Leave-one-out |log error| of a k-NN model per point: large where latency changes fast.

    A log-linear baseline absorbs the smooth power-law scaling, so edges of the space do not look
    surprising; neighbours are taken in a metric weighted by a small forest's feature importances,
    so "near" means near in what drives latency.
    """
    x, y = _log_features(kernels), np.log(latencies)
    resid = y - LinearRegression().fit(x, y).predict(x)
    forest = RandomForestRegressor(n_estimators=32, max_features=0.6, n_jobs=1,
                                   random_state=int(rng.integers(2**31))).fit(x, y)
    imp = forest.feature_importances_ if forest.feature_importances_.sum() > 0 else np.ones(x.shape[1])
    sd = x.std(axis=0)
    xs = (x - x.mean(axis=0)) / np.where(sd > 0, sd, 1.0) * np.sqrt(imp)
    k = min(_NEIGHBOURS, len(x) - 1)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(xs).kneighbors(xs)
    others = np.array([row[row != i][:k] for i, row in enumerate(idx)])  # drop self (ties may reorder it)
    return np.abs(resid - resid[others].mean(axis=1))


def propose_adaptive(measured: Iterable[tuple[Kernel, float]], n: int, rng: np.random.Generator,
                     max_macs: int = DEFAULT_MAX_MACS, exclude_keys: Iterable[str] = ()) -> list[Kernel]:
    """n new kernels perturbed from measured ones where latency is predicted worst, kinds by error mass."""
    by_kind: dict[str, list[tuple[Kernel, float]]] = defaultdict(list)
    for kern, lat in measured:
        if np.isfinite(lat) and lat > 0 and kern.spec.sampled:  # failed measurements carry no information
            by_kind[kern.kind].append((kern, float(lat)))
    if not by_kind:
        return sample_kernels(n, rng, max_macs=max_macs) if n > 0 else []
    errors: dict[str, np.ndarray] = {}
    for kind in sorted(by_kind):
        kerns, lats = zip(*by_kind[kind])
        if len(kerns) >= MIN_FIT:
            errors[kind] = _local_errors(kerns, np.array(lats), rng)
    # unexplored kinds count each point as badly as the worst-predicted fitted kind on average
    unexplored = max((float(e.mean()) for e in errors.values()), default=1.0)
    for kind in sorted(by_kind):
        errors.setdefault(kind, np.full(len(by_kind[kind]), unexplored))
    seen = set(exclude_keys) | {k.key for pts in by_kind.values() for k, _ in pts}
    quota = _apportion(n, {kind: float(e.sum()) for kind, e in errors.items()})

    def draw(kind: str) -> Kernel | None:
        w = errors[kind] ** 2 + 1e-12  # squared: concentrate on the worst-predicted seeds
        seed = by_kind[kind][int(rng.choice(len(w), p=w / w.sum()))][0]
        spec = kind_spec(kind)
        try:
            return Kernel.make(kind, **spec.perturb(dict(seed.params), rng, RESOLUTIONS))
        except ValueError:  # perturbation left the kind's valid space; draw again
            return None

    return _collect(quota, draw, seen, max_macs)
