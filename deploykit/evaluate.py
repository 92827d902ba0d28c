"""`deploykit predictor evaluate`: measure every ONNX model of a folder, predict it, and score the predictor."""
from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from scipy.stats import kendalltau
from tqdm import tqdm

from .errors import DeployKitError
from .fileio import atomic_write
from .fingerprint import mismatches
from .kernels import Kernel
from .onnx_io import InputSpec, input_specs, load_onnx
from .predictor import KernelPredictor
from .profile import kernel_inputs
from .protocol import KERNEL_PROTOCOL, MODEL_PROTOCOL
from .table import LatencyTable


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


@dataclass
class Reference:
    """A calibration network of the device's table, re-measured beside the models: how far the device moved since the
    table was profiled (a shared machine runs 5-10% faster or slower from one hour to the next)."""
    key: str
    model: onnx.ModelProto
    inputs: list[InputSpec]
    table_ms: float
    measured_ms: float = 0.0


def reference_networks(table: LatencyTable, n: int, seed: int = 0) -> list[Reference]:
    """n of the table's calibration networks (kind `net`), drawn at random, rebuilt from their keys."""
    nets = sorted((e for e in table.entries.values() if e.kernel["kind"] == "net"), key=lambda e: e.key)
    if not 0 <= n <= len(nets):
        raise DeployKitError(f"--drift-nets {n}: the table holds {len(nets)} calibration networks; give 0 to {len(nets)}")
    out = []
    for i in np.random.default_rng(seed).choice(len(nets), n, replace=False) if n else []:
        k = Kernel.from_dict(nets[i].kernel)
        out.append(Reference(nets[i].key, k.build_onnx(), kernel_inputs(k), nets[i].stats.median_ms))
    return out


def drift(references: list[Reference]) -> dict:
    """The reference networks' latency now over the table's: median and 10th/90th percentiles."""
    r = np.array([x.measured_ms / x.table_ms for x in references])
    return {"n": len(r), "now_over_table": float(np.median(r)), "p10": float(np.percentile(r, 10)),
            "p90": float(np.percentile(r, 90))} if len(r) else {"n": 0}


def accuracy(pred: np.ndarray, true: np.ndarray) -> dict:
    rel = np.abs(pred - true) / true
    tau = kendalltau(pred, true).statistic if len(true) > 1 else float("nan")
    return {"n": int(len(true)), "within_5": float((rel <= 0.05).mean()), "within_10": float((rel <= 0.10).mean()),
            "mape": float(rel.mean()), "rmse_ms": float(np.sqrt(((pred - true) ** 2).mean())), "kendall_tau": float(tau)}


def model_macs(dec) -> int:
    return sum(mk.kernel.macs for mk in dec.kernels if mk.kernel is not None)


def evaluate_models(predictor: KernelPredictor, models_dir: Path, backend, *, allow_missing: bool = False,
                    progress: bool = True, force: bool = False, passes: int = 1,
                    references: list[Reference] = ()) -> list[ModelResult]:
    """Measure and predict each *.onnx in models_dir (sorted). MAC baseline: one ms-per-MAC factor from the same set.

    With passes > 1 the whole folder is measured that many times over, one model after the other, and each model's
    latency is the median of its passes: a slowdown of the machine lasting a minute (a busy neighbour on a shared
    host) then moves one pass of the models it overlaps, not their result. `references` (from `reference_networks`)
    are measured in the same passes, after the models, with the table's kernel protocol; their `measured_ms` is set."""
    from .decompose import decompose

    if passes < 1:
        raise DeployKitError(f"--passes {passes}: give 1 or more")

    diff = mismatches(predictor.device, backend.fingerprint())
    if diff and not force:
        raise DeployKitError(f"the table was measured on another device than this one ({diff[0]}): evaluate on that device, "
                             "or pass --force to compare anyway")
    files = sorted(Path(models_dir).glob("*.onnx")) if Path(models_dir).is_dir() else []
    if not Path(models_dir).is_dir():
        raise DeployKitError(f"--models {models_dir} is not a directory: give a folder of .onnx files")
    if not files:
        raise DeployKitError(f"no .onnx files in {models_dir}: export the models there first (e.g. python tools/make_eval_set.py)")
    rows, loaded = [], []
    for f in tqdm(files, desc="predict", unit="model", disable=not progress, file=sys.stderr, dynamic_ncols=True):
        model = load_onnx(f)
        specs = input_specs(model)
        dec = decompose(model, specs, threads=backend.threads)
        pred = predictor.predict_decomposition(dec, allow_missing=allow_missing)
        loaded.append((model, specs))
        rows.append(ModelResult(model=f.name, measured_ms=0.0, predicted_ms=pred.latency_ms, macs_ms=float(model_macs(dec)),
                                kernel_sum_ms=sum(x.kernel_ms for x in pred.layers), kernels=len(pred.layers),
                                missing=len(pred.missing)))
    jobs = [(m, specs, MODEL_PROTOCOL) for m, specs in loaded] + [(r.model, r.inputs, KERNEL_PROTOCOL) for r in references]
    measured = np.zeros((passes, len(jobs)))
    with tqdm(total=passes * len(jobs), desc="measure", unit="model", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for p in range(passes):
            for i, (model, specs, protocol) in enumerate(jobs):
                measured[p, i] = backend.measure(model, specs, protocol).latency_ms
                bar.update()
    for r, ms in zip([*rows, *references], np.median(measured, axis=0)):
        r.measured_ms = float(ms)
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
