"""`deploykit predictor evaluate`: measure every ONNX model of a folder, predict it, and score the predictor."""
from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau
from tqdm import tqdm

from .errors import DeployKitError
from .fileio import atomic_write
from .fingerprint import mismatches
from .onnx_io import input_specs, load_onnx
from .predictor import KernelPredictor


@dataclass
class ModelResult:
    model: str
    measured_ms: float
    predicted_ms: float
    macs_ms: float  # the latency-proportional-to-MACs baseline
    kernel_sum_ms: float  # plain sum of standalone kernel predictions (no network calibration)
    kernels: int
    missing: int

    @property
    def rel_error(self) -> float:
        return (self.predicted_ms - self.measured_ms) / self.measured_ms


def accuracy(pred: np.ndarray, true: np.ndarray) -> dict:
    rel = np.abs(pred - true) / true
    tau = kendalltau(pred, true).statistic if len(true) > 1 else float("nan")
    return {"n": int(len(true)), "within_5": float((rel <= 0.05).mean()), "within_10": float((rel <= 0.10).mean()),
            "mape": float(rel.mean()), "rmse_ms": float(np.sqrt(((pred - true) ** 2).mean())), "kendall_tau": float(tau)}


def model_macs(dec) -> int:
    return sum(mk.kernel.macs for mk in dec.kernels if mk.kernel is not None)


def evaluate_models(predictor: KernelPredictor, models_dir: Path, backend, *, allow_missing: bool = False,
                    progress: bool = True, force: bool = False) -> list[ModelResult]:
    """Measure and predict each *.onnx in models_dir (sorted). MAC baseline: one ms-per-MAC factor from the same set."""
    from .decompose import decompose

    diff = mismatches(predictor.device, backend.fingerprint())
    if diff and not force:
        raise DeployKitError(f"the table was measured on another device than this one ({diff[0]}): evaluate on that device, "
                             "or pass --force to compare anyway")
    files = sorted(Path(models_dir).glob("*.onnx")) if Path(models_dir).is_dir() else []
    if not Path(models_dir).is_dir():
        raise DeployKitError(f"--models {models_dir} is not a directory: give a folder of .onnx files")
    if not files:
        raise DeployKitError(f"no .onnx files in {models_dir}: export the models there first (e.g. python tools/make_eval_set.py)")
    rows = []
    for f in tqdm(files, desc="evaluate", unit="model", disable=not progress, file=sys.stderr, dynamic_ncols=True):
        model = load_onnx(f)
        specs = input_specs(model)
        dec = decompose(model, specs, threads=backend.threads)
        pred = predictor.predict_decomposition(dec, allow_missing=allow_missing)
        measured = backend.measure(model, specs).latency_ms
        rows.append(ModelResult(model=f.name, measured_ms=measured, predicted_ms=pred.latency_ms, macs_ms=float(model_macs(dec)),
                                kernel_sum_ms=sum(x.kernel_ms for x in pred.layers), kernels=len(pred.layers),
                                missing=len(pred.missing)))
    # MACs baseline: latency = MACs x (median ms per MAC over the set), the best single factor in relative terms
    factor = float(np.median([r.measured_ms / r.macs_ms for r in rows if r.macs_ms > 0])) if rows else 0.0
    for r in rows:
        r.macs_ms = r.macs_ms * factor
    return rows


def summarise(rows: list[ModelResult]) -> dict:
    meas = np.array([r.measured_ms for r in rows])
    return {"predictor": accuracy(np.array([r.predicted_ms for r in rows]), meas),
            "kernel_sum": accuracy(np.array([r.kernel_sum_ms for r in rows]), meas),
            "macs_baseline": accuracy(np.array([r.macs_ms for r in rows]), meas),
            "models": [{**r.__dict__, "rel_error": r.rel_error} for r in rows]}


def plot(rows: list[ModelResult], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meas = np.array([r.measured_ms for r in rows])
    pred = np.array([r.predicted_ms for r in rows])
    lo, hi = min(meas.min(), pred.min()) * 0.8, max(meas.max(), pred.max()) * 1.25
    fig, ax = plt.subplots(figsize=(6, 6), dpi=110)
    line = np.geomspace(lo, hi, 50)
    ax.plot(line, line, "k-", lw=1, label="exact")
    ax.fill_between(line, line * 0.9, line * 1.1, color="tab:green", alpha=0.15, label="±10%")
    ax.scatter(meas, pred, s=18, c="tab:blue", label="predicted")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel="measured latency (ms)",
           ylabel="predicted latency (ms)", title=title)
    ax.legend(loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write(path, buf.getvalue())


def write_json(obj: dict, path: Path) -> Path:
    return atomic_write(path, json.dumps(obj, indent=1))
