"""Architecture-level latency regressor (arXiv 2001.06392): a small MLP from an architecture's encoding to ms.

Pipeline: `measure_archs` samples architectures of a search space and measures them end to end
(resumable JSON Lines, like a latency table); `fit_arch_mlp` trains `ArchLatencyMLP` on log latency;
`save_arch_mlp`/`load_arch_mlp` keep it as versioned JSON. The model is a differentiable function of
the encoding, so a search can feed it a relaxed encoding (`relaxed_encoding`) and backpropagate a
latency loss. `pretrain_targets` labels architectures with a kernel-level predictor instead, so a
model can be pre-trained on cheap predictions and corrected with a few real measurements.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from scipy.stats import kendalltau
from torch import nn
from tqdm import tqdm

from . import __version__, zoo
from .archspace import Arch, SpaceSpec, arch_kernels, build_network, encode, encoding_size, groups, sample_arch
from .errors import DeployKitError
from .fileio import atomic_write, read_versioned_json
from .fingerprint import mismatches
from .kernels import Kernel
from .onnx_io import InputSpec
from .protocol import Measurement, Protocol
from .table import utc_now

DATA_FORMAT = "deploykit-arch-measurements"
MODEL_FORMAT = "deploykit-arch-mlp"
FORMAT_VERSION = 1
# ~0.15 s of timing per architecture at 224 on one thread; export and session setup bring it to ~0.45 s
ARCH_PROTOCOL = Protocol(warmup_runs=2, warmup_s=0.03, rounds=3, round_s=0.04, min_runs_per_round=3,
                         max_runs_per_round=500, tolerance=0.05, max_rounds=6)
DEFAULT_HIDDEN = (256, 256)
DEFAULT_EPOCHS = 400
PREDICT_CHUNK = 65536
MIN_SLOPE_POINTS = 10  # fewer measurements recalibrate a pretrained model's offset only


# -- the model -------------------------------------------------------------------------------

class ArchLatencyMLP(nn.Module):
    """Encoding [B, D] -> latency_ms [B]; predicts normalised log latency, so the output is always > 0.

    A linear path beside the MLP carries the main effects (resolution, widths and ops each scale
    latency roughly by a factor), the MLP their interactions: with a few hundred architectures a
    plain MLP generalises far worse. Input and target normalisation live in buffers: they travel
    with the weights and stay linear in the input, so gradients w.r.t. a relaxed encoding pass through.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int] = DEFAULT_HIDDEN):
        super().__init__()
        self.in_dim, self.hidden = int(in_dim), tuple(int(h) for h in hidden)
        dims = (self.in_dim, *self.hidden)
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.SiLU()]  # smooth: search gradients have no kinks
        layers.append(nn.Linear(dims[-1], 1))
        self.net = nn.Sequential(*layers)
        self.linear = nn.Linear(self.in_dim, 1)
        self.register_buffer("in_mean", torch.zeros(self.in_dim))
        self.register_buffer("in_std", torch.ones(self.in_dim))
        self.register_buffer("out_mean", torch.zeros(()))
        self.register_buffer("out_std", torch.ones(()))

    def set_normalisation(self, encodings: torch.Tensor, log_latency: torch.Tensor) -> None:
        std = encodings.std(0)
        self.in_mean.copy_(encodings.mean(0))
        self.in_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))  # constant columns pass unscaled
        self.out_mean.copy_(log_latency.mean())
        self.out_std.copy_(log_latency.std().clamp_min(1e-3) if len(log_latency) > 1 else torch.ones(()))

    def start_silent(self) -> None:
        """Zero the linear path and the MLP's last layer: the model predicts out_mean until fitted."""
        with torch.no_grad():
            for layer in (self.linear, self.net[-1]):
                layer.weight.zero_()
                layer.bias.zero_()

    def add_ridge(self, encodings: torch.Tensor, residual: torch.Tensor, alpha: float) -> None:
        """Add to the linear path the ridge regression of `residual` (normalised log units) on the encoding."""
        z = (encodings - self.in_mean) / self.in_std
        z_mean, r_mean = z.mean(0), residual.mean()
        zc = z - z_mean
        w = torch.linalg.solve(zc.T @ zc + alpha * torch.eye(self.in_dim, dtype=z.dtype), zc.T @ (residual - r_mean))
        with torch.no_grad():
            self.linear.weight += w.unsqueeze(0)
            self.linear.bias += r_mean - z_mean @ w

    def calibrate(self, encodings: torch.Tensor, log_latency: torch.Tensor, slope: bool = True) -> None:
        """Refit log latency as an affine function of the predicted log latency, folded into out_mean/out_std.

        A kernel-level predictor's labels are often right in ranking but off by a scale on the real
        device; two numbers fix that and a handful of measurements determines them.
        """
        with torch.no_grad():
            pred = self.normalised_log(encodings) * self.out_std + self.out_mean
            a = torch.stack([pred, torch.ones_like(pred)], 1)
            fitted, offset = torch.linalg.lstsq(a, log_latency.unsqueeze(1)).solution.squeeze(1)
            if not slope or len(pred) < MIN_SLOPE_POINTS or not fitted > 0:  # a slope from few points extrapolates wildly
                fitted, offset = torch.ones(()), (log_latency - pred).mean()
            self.out_mean.copy_(fitted * self.out_mean + offset)
            self.out_std.copy_(fitted * self.out_std)

    def normalised_log(self, x: torch.Tensor) -> torch.Tensor:
        """The network's raw output: (log latency - out_mean) / out_std, the quantity training fits."""
        z = (x - self.in_mean) / self.in_std
        return (self.linear(z) + self.net(z)).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.normalised_log(x) * self.out_std + self.out_mean)

    def predict_ms(self, encodings: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Batched prediction: a numpy array gives a numpy array (no graph); a tensor stays differentiable."""
        if isinstance(encodings, torch.Tensor):
            return self(encodings)
        x = torch.as_tensor(np.asarray(encodings), dtype=self.in_mean.dtype)
        squeeze = x.ndim == 1
        x = x.reshape(-1, self.in_dim)
        with torch.inference_mode():
            out = torch.cat([self(x[i:i + PREDICT_CHUNK]) for i in range(0, len(x), PREDICT_CHUNK)]) if len(x) else x.new_zeros(0)
        y = out.numpy()
        return y[0] if squeeze else y


def relaxed_encoding(spec: SpaceSpec, logits: torch.Tensor, tau: float = 1.0, hard: bool = False,
                     gumbel: bool = True) -> torch.Tensor:
    """Per-group (Gumbel-)softmax over the encoding's groups; `hard` gives one-hot rows with soft gradients."""
    if logits.shape[-1] != encoding_size(spec):
        raise DeployKitError(f"logits have {logits.shape[-1]} entries, space {spec.name!r} needs {encoding_size(spec)}")
    parts = []
    for _, start, size in groups(spec):
        g = logits[..., start:start + size]
        if gumbel:
            parts.append(F.gumbel_softmax(g, tau=tau, hard=hard, dim=-1))
            continue
        soft = torch.softmax(g / tau, dim=-1)
        if hard:  # straight-through: forward the argmax, backpropagate the softmax
            one_hot = F.one_hot(soft.argmax(-1), size).to(soft.dtype)
            soft = one_hot - soft.detach() + soft
        parts.append(soft)
    return torch.cat(parts, dim=-1)


# -- training and evaluation -----------------------------------------------------------------

def _split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation indices for early stopping: 10% (at least 2) held back once there are 20 points."""
    order = rng.permutation(n)
    n_val = max(2, n // 10) if n >= 20 else 0
    return order[n_val:], order[:n_val]


def fit_arch_mlp(spec: SpaceSpec, encodings: np.ndarray, latencies_ms: np.ndarray, *, epochs: int = DEFAULT_EPOCHS,
                 seed: int = 0, init: ArchLatencyMLP | None = None, hidden: Sequence[int] = DEFAULT_HIDDEN,
                 lr: float | None = None, weight_decay: float | None = None, batch_size: int = 32,
                 patience: int = 60) -> ArchLatencyMLP:
    """AdamW on MSE of normalised log latency (a relative-error loss), early-stopped on a validation split.

    With `init` a pretrained model (e.g. on kernel-predictor labels) is corrected instead, as much as
    the measurements support: cross-validation on them picks one of CORRECTIONS, from none (a good
    pretrained model is easily made worse by a few noisy measurements) through a log-space offset or
    affine recalibration to the full correction (affine, a ridge correction of the linear path whose
    strength the validation split picks, then gentle gradient steps without weight decay, which would
    pull the pretrained weights towards zero). Deterministic given `seed`.
    """
    x = torch.as_tensor(np.asarray(encodings, dtype=np.float32))
    y_ms = np.asarray(latencies_ms, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != encoding_size(spec) or len(x) != len(y_ms):
        raise DeployKitError(f"need encodings [N, {encoding_size(spec)}] and N latencies, got {tuple(x.shape)} and {y_ms.shape}")
    if len(y_ms) < 2 or not np.all(np.isfinite(y_ms)) or np.any(y_ms <= 0):
        raise DeployKitError("need at least 2 positive, finite latencies to fit the architecture predictor")
    if epochs < 1:
        raise DeployKitError(f"--epochs must be >= 1, got {epochs}")
    if init is not None and init.in_dim != encoding_size(spec):
        raise DeployKitError(f"the pretrained model takes {init.in_dim}-entry encodings, space {spec.name!r} has "
                             f"{encoding_size(spec)}: pretrain on this space")
    log_y = torch.as_tensor(np.log(y_ms), dtype=torch.float32)
    rng = np.random.default_rng(seed)
    tr, va = _split(len(x), rng)
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(seed)
        if init is None:
            model = ArchLatencyMLP(x.shape[1], hidden)
            model.set_normalisation(x[tr], log_y[tr])
            model.start_silent()
            model.add_ridge(x[tr], (log_y[tr] - model.out_mean) / model.out_std, alpha=1.0)
        else:
            train = (epochs, lr if lr is not None else 3e-4, weight_decay or 0.0, batch_size, patience)
            correction = _choose_correction(init, x, log_y, seed, train)
            model = _corrected(init, x, log_y, correction, seed, train)
            model.correction = correction
            return model.eval()
        lr = lr if lr is not None else 1e-3
        weight_decay = weight_decay if weight_decay is not None else 0.1
        _train(model, x, (log_y - model.out_mean) / model.out_std, tr, va, epochs, lr, weight_decay, batch_size, patience, rng)
    return model.eval()


CORRECTIONS = ("none", "offset", "affine", "full")
CORRECTION_FOLDS = 5


def _corrected(init: ArchLatencyMLP, x: torch.Tensor, log_y: torch.Tensor, correction: str, seed: int,
               train: tuple) -> ArchLatencyMLP:
    """A copy of the pretrained model with one correction fitted on (x, log_y)."""
    model = ArchLatencyMLP(init.in_dim, init.hidden)
    model.load_state_dict(init.state_dict())
    if correction == "none":
        return model
    model.calibrate(x, log_y, slope=correction != "offset")
    if correction == "full":
        rng = np.random.default_rng(seed)
        tr, va = _split(len(x), rng)
        _ridge_correction(model, x, log_y, tr, va)
        epochs, lr, weight_decay, batch_size, patience = train
        _train(model, x, (log_y - model.out_mean) / model.out_std, tr, va, epochs, lr, weight_decay, batch_size, patience, rng)
    return model


def _choose_correction(init: ArchLatencyMLP, x: torch.Tensor, log_y: torch.Tensor, seed: int, train: tuple) -> str:
    """The correction with the lowest cross-validated squared log error; an offset with too few points to tell."""
    if len(x) < 2 * CORRECTION_FOLDS:
        return "offset"
    fold = np.random.default_rng(seed).permutation(len(x)) % CORRECTION_FOLDS
    scores = {}
    for correction in CORRECTIONS:
        se = 0.0
        for f in range(CORRECTION_FOLDS):
            tr, te = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
            model = _corrected(init, x[tr], log_y[tr], correction, seed, train)
            with torch.no_grad():
                se += float((model.normalised_log(x[te]) * model.out_std + model.out_mean - log_y[te]).pow(2).sum())
        scores[correction] = se
    return min(CORRECTIONS, key=lambda c: scores[c])  # ties go to the simpler correction


FINETUNE_ALPHAS = (1.0, 10.0, 100.0, 1000.0)  # ridge strengths tried on the pretrained model's residuals
NO_VALIDATION_ALPHA = 100.0  # too few points to hold any back: a cautious correction


@contextmanager
def _one_thread():
    """Batches of 32 are all per-op overhead: a second thread only adds synchronisation, badly so on a busy core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _ridge_correction(model: ArchLatencyMLP, x: torch.Tensor, log_y: torch.Tensor, tr: np.ndarray, va: np.ndarray) -> None:
    """Add the ridge fit of the pretrained model's residuals, with the strength that does best on validation (or none)."""
    def residual(idx) -> torch.Tensor:
        with torch.no_grad():
            return (log_y[idx] - model.out_mean) / model.out_std - model.normalised_log(x[idx])

    r_tr = residual(tr)
    if not len(va):
        model.add_ridge(x[tr], r_tr, NO_VALIDATION_ALPHA)
        return
    start = {k: v.clone() for k, v in model.state_dict().items()}
    best_alpha, best = None, float(residual(va).pow(2).mean())
    for alpha in FINETUNE_ALPHAS:
        model.add_ridge(x[tr], r_tr, alpha)
        score = float(residual(va).pow(2).mean())
        if score < best:
            best_alpha, best = alpha, score
        model.load_state_dict(start)
    if best_alpha is not None:
        model.add_ridge(x[tr], r_tr, best_alpha)


def _train(model: ArchLatencyMLP, x: torch.Tensor, target: torch.Tensor, tr: np.ndarray, va: np.ndarray, epochs: int,
           lr: float, weight_decay: float, batch_size: int, patience: int, rng: np.random.Generator) -> None:
    """Minibatch AdamW with a cosine schedule; keeps the weights of the best validation epoch (the last epoch without validation)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=lr / 20)

    def val_loss() -> float:
        with torch.no_grad():
            return F.mse_loss(model.normalised_log(x[va]), target[va]).item()

    best, best_state, stale = (val_loss(), {k: v.clone() for k, v in model.state_dict().items()}, 0) if len(va) else (0.0, None, 0)
    model.train()
    for _ in range(epochs):
        for batch in np.array_split(rng.permutation(tr), max(1, len(tr) // batch_size)):
            idx = torch.as_tensor(batch)
            loss = F.mse_loss(model.normalised_log(x[idx]), target[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if len(va):
            val = val_loss()
            if val < best - 1e-7:
                best, best_state, stale = val, {k: v.clone() for k, v in model.state_dict().items()}, 0
            else:
                stale += 1
                if stale >= patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)


def evaluate(model: ArchLatencyMLP, encodings: np.ndarray, measured_ms: np.ndarray) -> dict:
    """Relative-error accuracy, RMSE and rank agreement of predictions against measurements."""
    pred = np.asarray(model.predict_ms(np.asarray(encodings, dtype=np.float32)), dtype=np.float64)
    true = np.asarray(measured_ms, dtype=np.float64)
    if len(true) == 0:
        raise DeployKitError("nothing to evaluate: the data holds no measurements")
    rel = np.abs(pred - true) / true
    tau = float(kendalltau(pred, true).statistic) if len(true) > 1 else float("nan")
    return {"n": len(true), "within_5": float(np.mean(rel <= 0.05)), "within_10": float(np.mean(rel <= 0.10)),
            "mape": float(np.mean(rel)), "rmse_ms": float(np.sqrt(np.mean((pred - true) ** 2))), "kendall_tau": tau}


# -- architectures, their measurements and kernel-predictor labels --------------------------

def plan_archs(spec: SpaceSpec, n: int, seed: int) -> list[Arch]:
    """The first n distinct architectures of the seed's stream; draw i depends only on (seed, i), so plans nest."""
    if n < 1:
        raise DeployKitError(f"need at least 1 architecture, got n={n}")
    plan: dict[str, Arch] = {}
    for i in range(100 * n + 1000):
        arch = sample_arch(spec, np.random.default_rng([seed, i]))
        plan.setdefault(arch.key, arch)
        if len(plan) == n:
            return list(plan.values())
    raise DeployKitError(f"space {spec.name!r} yields only about {len(plan)} distinct architectures: ask for fewer")


def pretrain_targets(spec: SpaceSpec, n: int, seed: int,
                     predict_kernels: Callable[[list[Kernel]], float | np.ndarray] | None = None, *,
                     predict_networks: Callable[[list[list[Kernel]]], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encodings and latencies of n architectures labelled by a kernel-level predictor.

    `predict_kernels(kernels)` returns the network's ms, or one ms per kernel (summed here);
    `predict_networks(list of kernel lists)` labels them all in one batch (`KernelPredictor.predict_networks`).
    """
    if (predict_kernels is None) == (predict_networks is None):
        raise ValueError("pass one of predict_kernels and predict_networks")
    archs = plan_archs(spec, n, seed)
    enc = np.stack([encode(spec, a) for a in archs])
    if predict_networks is not None:
        return enc, np.asarray(predict_networks([arch_kernels(spec, a) for a in archs]), dtype=np.float64)
    lat = np.array([float(np.sum(predict_kernels(arch_kernels(spec, a)))) for a in archs], dtype=np.float64)
    return enc, lat


def measure_arch(spec: SpaceSpec, arch: Arch, backend, protocol: Protocol = ARCH_PROTOCOL) -> Measurement:
    """Build, export to ONNX and time one architecture end to end on `backend`."""
    shape = (1, 3, arch.resolution, arch.resolution)
    with tempfile.TemporaryDirectory(prefix="deploykit-arch-") as tmp:
        model = onnx.load(str(zoo.export_onnx(build_network(spec, arch), shape, Path(tmp) / "arch.onnx")))
    return backend.measure(model, [InputSpec("input", shape, np.float32)], protocol)


def _parses(line: bytes):
    try:
        return json.loads(line)
    except ValueError:
        return None


def read_measurements(path: str | os.PathLike) -> tuple[dict, list[dict], bool]:
    """(header, records, torn). A last line without its newline was cut by a kill mid-write: dropped, reported."""
    path = Path(path)
    if not path.is_file():
        raise DeployKitError(f"architecture measurements not found: {path}: run `deploykit arch-predictor measure` first")
    lines = path.read_bytes().split(b"\n")
    torn = lines[-1] != b""
    lines = lines[:-1]  # the empty string after the final newline, or the torn tail
    header = _parses(lines[0]) if lines else None
    if not isinstance(header, dict) or header.get("format") != DATA_FORMAT:
        raise DeployKitError(f"{path} is not a deploykit architecture-measurement file (bad header): pass one written by "
                             "`deploykit arch-predictor measure`, or delete it")
    if header.get("format_version") != FORMAT_VERSION:
        raise DeployKitError(f"{path} has format_version {header.get('format_version')!r}, this deploykit reads "
                             f"{FORMAT_VERSION}: measure again with this version")
    records = []
    for no, line in enumerate(lines[1:], start=2):
        rec = _parses(line)
        if not (isinstance(rec, dict) and isinstance(rec.get("arch"), dict) and isinstance(rec.get("latency_ms"), (int, float))):
            raise DeployKitError(f"{path} is corrupt at line {no}: delete that line (only a torn last line is repaired automatically)")
        records.append(rec)
    return header, records, torn


def _open_measurements(path: Path, spec: SpaceSpec, device: dict, protocol: Protocol) -> list[dict]:
    """Existing records of a file measured for this spec on this device (torn tail cut off), or a new file."""
    if not path.exists():
        header = {"format": DATA_FORMAT, "format_version": FORMAT_VERSION, "spec": spec.to_dict(), "device": device,
                  "protocol": asdict(protocol), "created_utc": utc_now(), "deploykit_version": __version__}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(header, sort_keys=True) + "\n")
        return []
    header, records, torn = read_measurements(path)
    if SpaceSpec.from_dict(header.get("spec", {})) != spec:
        raise DeployKitError(f"{path} holds architectures of another search space ({header['spec'].get('name')!r}): "
                             "choose another --out for this space")
    diff = mismatches(header.get("device", {}), device)
    if diff:
        raise DeployKitError(f"{path} was measured on another device/config ({'; '.join(diff[:3])}): "
                             "choose another --out, or match its settings")
    if torn:
        raw = path.read_bytes()
        with open(path, "r+b") as f:
            f.truncate(raw.rfind(b"\n") + 1)
    return records


def _aggregate(records: list[dict]) -> dict:
    """One architecture's record over its passes: the median of the pass medians, the passes kept beside it."""
    if len(records) == 1:
        return records[0]
    pass_ms = [float(r["latency_ms"]) for r in records]
    return {"arch": records[0]["arch"], "latency_ms": float(np.median(pass_ms)),
            "p90_ms": float(np.median([r.get("p90_ms", r["latency_ms"]) for r in records])),
            "std_ms": float(np.median([r.get("std_ms", 0.0) for r in records])),
            "count": int(sum(r.get("count", 0) for r in records)), "passes": len(records), "pass_latencies_ms": pass_ms,
            "measured_utc": records[-1].get("measured_utc")}


def measure_archs(spec: SpaceSpec, n: int, backend, out_path: str | os.PathLike, seed: int = 0, progress: bool = True,
                  protocol: Protocol = ARCH_PROTOCOL, passes: int = 1) -> list[dict]:
    """Measure the seed's first n distinct architectures into `out_path`, one flushed JSON line per timing.

    `passes` > 1 times the whole plan that many times over, one pass after the other, so the timings of
    one architecture lie minutes apart and a slow spell of a shared machine hits one of them, not all:
    its `latency_ms` is then the median over passes (`pass_latencies_ms` keeps them).
    Resumable: timings already in the file are not taken again, and a torn last line is repaired.
    Returns one record per architecture of the plan, whether measured now or before.
    """
    if passes < 1:
        raise DeployKitError(f"passes must be >= 1, got {passes}: pass --passes 1 or more")
    plan = plan_archs(spec, n, seed)
    path = Path(out_path)
    have: dict[str, list[dict]] = {}
    for r in _open_measurements(path, spec, backend.fingerprint(), protocol):
        have.setdefault(Arch.from_dict(r["arch"]).key, []).append(r)
    before = {a.key: len(have.get(a.key, ())) for a in plan}
    todo = [(p, a) for p in range(1, passes + 1) for a in plan if before[a.key] < p]
    total = len(plan) * passes
    with tqdm(total=total, initial=total - len(todo), desc=f"measure {spec.name}" + (f" x{passes}" if passes > 1 else ""),
              unit="arch", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar, \
            open(path, "a", encoding="utf-8") as f:
        for p, arch in todo:
            m = measure_arch(spec, arch, backend, protocol)
            s = m.stats
            rec = {"arch": arch.to_dict(), "latency_ms": s.median_ms, "p90_ms": s.p90_ms, "std_ms": s.std_ms,
                   "count": s.count, "spread": round(m.spread, 5), "pass": p, "measured_utc": utc_now()}
            f.write(json.dumps(rec, sort_keys=True) + "\n")
            f.flush()  # in the kernel's hands now: survives kill -9 of this process
            have.setdefault(arch.key, []).append(rec)
            bar.update(1)
    return [_aggregate(have[a.key]) for a in plan]


def load_measurements(paths: Sequence[str | os.PathLike]) -> tuple[SpaceSpec, dict, list[Arch], np.ndarray]:
    """(spec, device, architectures, latencies) from one or more measurement files of one space and device.

    An architecture timed more than once (several passes, or in several files) gets the median of its timings.
    """
    if not paths:
        raise DeployKitError("no measurement files given: pass --data FILE.jsonl")
    spec, device, archs, timings = None, {}, {}, {}
    for p in paths:
        header, records, _ = read_measurements(p)
        s = SpaceSpec.from_dict(header.get("spec", {}))
        if spec is None:
            spec, device = s, dict(header.get("device", {}))
        elif s != spec:
            raise DeployKitError(f"{p} holds another search space than {paths[0]}: pass files of one space")
        elif mismatches(device, header.get("device", {})):
            raise DeployKitError(f"{p} was measured on another device/config than {paths[0]}: pass files of one device")
        for r in records:
            a = Arch.from_dict(r["arch"])
            archs[a.key] = a
            timings.setdefault(a.key, []).append(r)
    lat = [_aggregate(timings[k])["latency_ms"] for k in archs]  # several passes (or files): their median
    return spec, device, list(archs.values()), np.array(lat, dtype=np.float64)


# -- the model file --------------------------------------------------------------------------

def save_arch_mlp(model: ArchLatencyMLP, spec: SpaceSpec, path: str | os.PathLike, meta: dict | None = None,
                  device: dict | None = None) -> Path:
    """Versioned JSON (weights as nested lists, no pickle), written atomically."""
    def dump(m: nn.Linear) -> dict:
        return {"weight": m.weight.detach().float().tolist(), "bias": m.bias.detach().float().tolist()}

    path = Path(path)
    doc = {
        "format": MODEL_FORMAT, "format_version": FORMAT_VERSION, "spec": spec.to_dict(), "device": device or {},
        "hidden": list(model.hidden), "activation": "silu",
        "layers": [dump(m) for m in model.net if isinstance(m, nn.Linear)], "linear": dump(model.linear),
        "norm": {"in_mean": model.in_mean.float().tolist(), "in_std": model.in_std.float().tolist(),
                 "out_mean": float(model.out_mean), "out_std": float(model.out_std)},
        "meta": meta or {}, "created_utc": utc_now(), "deploykit_version": __version__,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(doc))
    return path


def load_arch_mlp(path: str | os.PathLike) -> tuple[ArchLatencyMLP, SpaceSpec, dict]:
    """(model, spec, meta); meta carries the file's device fingerprint under "device"."""
    path = Path(path)
    doc = read_versioned_json(path, MODEL_FORMAT, FORMAT_VERSION, "architecture predictor",
                              "train it again with `deploykit arch-predictor fit`")
    try:
        model, spec = _model_from_doc(doc)
    except (KeyError, TypeError, ValueError, RuntimeError):
        raise DeployKitError(f"architecture predictor {path} is malformed (missing or misshapen weights): train it again") from None
    return model, spec, {**doc.get("meta", {}), "device": doc.get("device", {})}


def _model_from_doc(doc: dict) -> tuple[ArchLatencyMLP, SpaceSpec]:
    spec = SpaceSpec.from_dict(doc["spec"])
    model = ArchLatencyMLP(encoding_size(spec), doc["hidden"])
    norm = doc["norm"]
    state = {name: norm[name] for name in ("in_mean", "in_std", "out_mean", "out_std")}
    linears = [i for i, m in enumerate(model.net) if isinstance(m, nn.Linear)]
    if len(linears) != len(doc["layers"]):
        raise ValueError("layer count does not match hidden")
    for i, layer in zip(linears, doc["layers"]):
        state[f"net.{i}.weight"], state[f"net.{i}.bias"] = layer["weight"], layer["bias"]
    state["linear.weight"], state["linear.bias"] = doc["linear"]["weight"], doc["linear"]["bias"]
    model.load_state_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in state.items()})
    return model.eval(), spec
