"""Per-kind kernel latency regressors, fitted with scikit-learn, stored and evaluated as plain JSON.

Every candidate models log-latency as a power law in the kernel's sizes (a linear model on log
features, which extrapolates sanely beyond the table) plus a learned residual: table interpolation
(k nearest measured kernels), a random forest, gradient-boosted trees or a small MLP. Fitted models
are exported to arrays and evaluated with numpy, so a predictor file never depends on pickle or on
the scikit-learn version that wrote it.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
from sklearn.linear_model import RidgeCV
from sklearn.neural_network import MLPRegressor

Json = dict[str, Any]
METHODS = ("interp", "forest", "gbdt", "mlp")
_INTERP_K = 4


def log_features(rows: list[dict[str, float]], names: list[str]) -> np.ndarray:
    """log1p of each named feature (sizes span five decades; one-hots stay 0/1 up to a constant)."""
    return np.log1p(np.maximum(0.0, np.array([[r.get(n, 0.0) for n in names] for r in rows], dtype=np.float64)))


def _round(a: np.ndarray) -> list:
    return np.asarray(a, dtype=np.float64).round(7).tolist()  # JSON size; far below measurement noise


# ------------------------------------------------------------------------------------------- export
def _tree_json(tree) -> Json:
    t = tree.tree_
    return {"left": t.children_left.tolist(), "right": t.children_right.tolist(), "feature": t.feature.tolist(),
            "threshold": _round(t.threshold), "value": _round(t.value[:, 0, 0])}


def _tree_predict(t: Json, x: np.ndarray) -> np.ndarray:
    left, right = np.asarray(t["left"]), np.asarray(t["right"])
    feature, threshold, value = np.asarray(t["feature"]), np.asarray(t["threshold"]), np.asarray(t["value"])
    node = np.zeros(len(x), dtype=np.int64)
    rows = np.arange(len(x))
    while True:
        inner = left[node] >= 0
        if not inner.any():
            return value[node]
        r, n = rows[inner], node[inner]
        go_left = x[r, feature[n]] <= threshold[n]
        node[r] = np.where(go_left, left[n], right[n])


def _fit_residual(method: str, x: np.ndarray, r: np.ndarray, seed: int) -> Json:
    """The residual model as JSON arrays."""
    if method == "interp":
        return {"x": _round(x), "r": _round(r)}
    if method == "forest":
        m = RandomForestRegressor(n_estimators=60, min_samples_leaf=2, max_features=0.6, random_state=seed, n_jobs=1).fit(x, r)
        return {"trees": [_tree_json(t) for t in m.estimators_]}
    if method == "gbdt":
        m = GradientBoostingRegressor(n_estimators=600, max_depth=4, learning_rate=0.05, subsample=0.8,
                                      random_state=seed).fit(x, r)
        return {"init": float(m.init_.constant_[0][0]) if hasattr(m.init_, "constant_") else float(np.mean(r)),
                "rate": m.learning_rate, "trees": [_tree_json(t[0]) for t in m.estimators_]}
    if method == "mlp":
        m = MLPRegressor(hidden_layer_sizes=(64, 64), alpha=1e-3, learning_rate_init=3e-3, max_iter=2000,
                         early_stopping=len(x) >= 50, n_iter_no_change=30, random_state=seed).fit(x, r)
        return {"weights": [_round(w) for w in m.coefs_], "biases": [_round(b) for b in m.intercepts_]}
    raise ValueError(f"unknown regressor {method!r}; valid: {', '.join(METHODS)}")


def _predict_residual(method: str, p: Json, x: np.ndarray) -> np.ndarray:
    if method == "interp":
        ref, r = np.asarray(p["x"]), np.asarray(p["r"])
        d = np.sqrt(((x[:, None, :] - ref[None, :, :]) ** 2).sum(-1))
        k = min(_INTERP_K, len(ref))
        idx = np.argsort(d, axis=1)[:, :k]
        dk = np.take_along_axis(d, idx, axis=1)
        w = 1.0 / (dk + 1e-6)  # inverse distance: a kernel in the table gets its own residual back
        return (w * r[idx]).sum(1) / w.sum(1)
    if method == "forest":
        return np.mean([_tree_predict(t, x) for t in p["trees"]], axis=0)
    if method == "gbdt":
        return p["init"] + p["rate"] * np.sum([_tree_predict(t, x) for t in p["trees"]], axis=0)
    if method == "mlp":
        h = x
        for i, (w, b) in enumerate(zip(p["weights"], p["biases"])):
            h = h @ np.asarray(w) + np.asarray(b)
            if i < len(p["weights"]) - 1:
                h = np.maximum(h, 0.0)
        return h[:, 0]
    raise ValueError(f"unknown regressor {method!r}; valid: {', '.join(METHODS)}")


# ------------------------------------------------------------------------------------------- model
class KindRegressor:
    """log(ms) = power-law baseline(x) + residual(x) on standardised log features of one kernel kind."""

    def __init__(self, spec: Json):
        self.spec = spec
        self.names: list[str] = spec["features"]
        self._mean, self._scale = np.asarray(spec["mean"]), np.asarray(spec["scale"])
        self._coef, self._icpt = np.asarray(spec["base_coef"]), float(spec["base_intercept"])

    @property
    def method(self) -> str:
        return self.spec["method"]

    def _x(self, rows: list[dict[str, float]]) -> np.ndarray:
        return (log_features(rows, self.names) - self._mean) / self._scale

    def predict_ms(self, rows: list[dict[str, float]]) -> np.ndarray:
        if not rows:
            return np.zeros(0)
        x = self._x(rows)
        log_ms = x @ self._coef + self._icpt + _predict_residual(self.method, self.spec["residual"], x)
        return np.exp(log_ms)

    def to_json(self) -> Json:
        return self.spec

    @classmethod
    def fit(cls, method: str, rows: list[dict[str, float]], latency_ms: np.ndarray, seed: int = 0) -> "KindRegressor":
        names = sorted(rows[0])
        raw = log_features(rows, names)
        mean, scale = raw.mean(0), raw.std(0)
        scale = np.where(scale > 1e-9, scale, 1.0)
        x, y = (raw - mean) / scale, np.log(latency_ms)
        # the strength chosen by leave-one-out: a quick profile's dozen kernels of a kind must not extrapolate wildly
        base = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(x, y)
        resid = y - base.predict(x)
        return cls({"method": method, "features": names, "mean": _round(mean), "scale": _round(scale),
                    "base_coef": _round(base.coef_), "base_intercept": float(base.intercept_),
                    "residual": _fit_residual(method, x, resid, seed), "n": len(rows)})


def errors(pred: np.ndarray, true: np.ndarray) -> Json:
    rel = np.abs(pred - true) / true
    return {"mape": float(rel.mean()), "within_10": float((rel <= 0.10).mean()), "within_5": float((rel <= 0.05).mean()),
            "n": int(len(true))}


def select(rows: list[dict[str, float]], latency_ms: np.ndarray, seed: int = 0, holdout: float = 0.2,
           methods: tuple[str, ...] = METHODS, progress: Callable[[str], None] | None = None) -> tuple[KindRegressor, Json]:
    """Fit every method on (1 - holdout) of the entries, keep the lowest held-out MAPE, refit it on all entries."""
    n = len(rows)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    n_test = max(1, int(round(n * holdout))) if n >= 10 else 0
    test, train = order[:n_test], order[n_test:]
    scores: Json = {}
    if n_test:
        tr_rows, te_rows = [rows[i] for i in train], [rows[i] for i in test]
        for m in methods:
            if progress:
                progress(m)
            model = KindRegressor.fit(m, tr_rows, latency_ms[train], seed)
            scores[m] = errors(model.predict_ms(te_rows), latency_ms[test])
        best = min(scores, key=lambda m: (scores[m]["mape"], -scores[m]["within_10"]))
    else:
        best = "interp"  # too few entries to compare: interpolate the table
    return KindRegressor.fit(best, rows, latency_ms, seed), {"chosen": best, "holdout": scores, "n": n}
