"""The phases of a budgeted search, from data to a measured ONNX file; `deploykit search` and tools/bench_search.py
both run them. Each phase takes the paths it resumes from, so an interrupted run loses at most an epoch.

1. `evolution_phase` / `differentiable_phase`: an architecture predicted inside the budget band;
2. `verify_phase`: measured on the device, with fallbacks until one lands in [0.85, 1.0] x budget;
3. `train_phase`: the chosen network's weights (fine-tuned from the supernet, or trained from scratch);
4. `export_phase`: model.pt, model.onnx checked against PyTorch, and the ONNX file's measured latency.
"""
from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import torch

from .archspace import Arch, SpaceSpec, build_network
from .data import DataSplit, stratified_split
from .errors import DeployKitError
from .search import (
    LatencyModel,
    choice_prior,
    evolutionary_search,
    fallback_pick,
    fit_to_band,
    landscape,
    verify_on_device,
)

SEARCH_HOLDOUT = 0.2  # of the training split, for the evolution's fitness; the validation split stays unseen
FITNESS_CALIBRATION_IMAGES = 512  # BatchNorm re-estimation per candidate: enough for digits-sized batches
FRONT_POINTS = 16  # architectures over the whole latency range, evaluated for the report's front
MODEL_FORMAT = "deploykit-search-model"


def search_split(data: DataSplit, seed: int) -> DataSplit:
    """The training split divided in two: the supernet trains on one part and candidates are scored on the other,
    which plays the validation split's role, so the user's validation split scores only the final network."""
    tr, va = stratified_split(data.train_y.numpy(), SEARCH_HOLDOUT, seed + 7)
    tr, va = torch.as_tensor(tr), torch.as_tensor(va)
    return DataSplit(data.train_x[tr], data.train_y[tr], data.train_x[va], data.train_y[va], data.num_classes,
                     data.class_names, data.source, data.mean, data.std)


# -- 1. search -------------------------------------------------------------------------------

def train_search_supernet(spec: SpaceSpec, data: DataSplit, *, width_mode: str, epochs: int, seed: int, progress: bool,
                          checkpoint: str | os.PathLike):
    """(supernet, training report): the weight-sharing supernet trained on the search split (resumes from checkpoint)."""
    from .supernet import Supernet, train_supernet

    supernet = Supernet(spec, width_mode, seed=seed)
    report = train_supernet(supernet, search_split(data, seed), epochs=epochs, seed=seed, progress=progress,
                            checkpoint=checkpoint)
    return supernet, report


def evolution_phase(spec: SpaceSpec, data: DataSplit, latency: LatencyModel, band_ms: tuple[float, float], supernet,
                    choice_losses: dict | None, *, population: int, generations: int, seed: int, progress: bool,
                    log_dir: Path) -> dict:
    """Evolution under the band with the supernet as the fitness, seeded by BCNet's prior; plus a front over the
    whole latency range for the report. Returns the ranked candidates (most accurate first)."""
    from .supernet import evaluate_arch

    fitness_data = search_split(data, seed)
    prior = choice_prior(spec, choice_losses)

    def fitness(arch: Arch) -> float:
        return evaluate_arch(supernet, arch, fitness_data, calibration_images=FITNESS_CALIBRATION_IMAGES)

    t = time.monotonic()
    result = evolutionary_search(spec, fitness, latency.predict_ms, *band_ms, population=population,
                                 generations=generations, prior=prior, seed=seed, progress=progress,
                                 log_path=log_dir / "evolution.jsonl")
    seconds = time.monotonic() - t
    front = landscape(spec, fitness, latency.predict_ms, FRONT_POINTS, seed=seed, progress=progress,
                      log_path=log_dir / "front.jsonl")
    ranked = sorted(result.candidates, key=lambda c: (-c.accuracy, c.predicted_ms))
    return {"arch": ranked[0].arch.to_dict(), "predicted_ms": ranked[0].predicted_ms, "supernet_accuracy": ranked[0].accuracy,
            "ranked": [c.to_dict() for c in ranked], "history": result.history, "evaluated": len(result.candidates),
            "drawn": result.drawn, "rejected": result.rejected, "evolution_s": round(seconds, 1),
            "prior": {k: [round(float(p), 4) for p in v] for k, v in prior.items()}, "front": [c.to_dict() for c in front]}


def differentiable_phase(spec: SpaceSpec, data: DataSplit, latency: LatencyModel, budget_ms: float,
                         band_ms: tuple[float, float], *, epochs: int, latency_weight: float, seed: int, progress: bool,
                         checkpoint: str | os.PathLike) -> dict:
    """PC-DARTS-style search with the latency loss, then the argmax architecture moved into the band along the
    learned preferences (usually no move: the latency loss already aims at the band)."""
    from .darts import differentiable_search

    warmup = min(2, epochs // 4)  # PC-DARTS warms up for 15 of 50 epochs; short searches keep most epochs for the logits
    result = differentiable_search(spec, data, latency.encoding_ms, budget_ms, epochs=epochs, warmup_epochs=warmup,
                                   latency_weight=latency_weight, seed=seed, progress=progress, checkpoint=checkpoint)
    preference = {name: np.log(np.maximum(np.asarray(p), 1e-12)) for name, p in result.probabilities.items()}
    arch, ms, moves = fit_to_band(spec, result.arch, latency.predict_ms, *band_ms, preference=preference)
    return {"arch": arch.to_dict(), "predicted_ms": ms, "argmax_arch": result.arch.to_dict(),
            "argmax_predicted_ms": float(latency.predict_ms([result.arch])[0]), "band_moves": moves,
            "expected_latency_ms": result.expected_latency_ms, "probabilities": result.probabilities,
            "history": result.history, "search_s": round(result.seconds, 1),
            "preference": {k: v.tolist() for k, v in preference.items()}}


# -- 2. verify -------------------------------------------------------------------------------

def verify_phase(spec: SpaceSpec, found: dict, latency: LatencyModel, backend, budget_ms: float,
                 band_ms: tuple[float, float], *, progress: bool) -> dict:
    """Measure the found architecture. Evolution falls back on its next-best candidates; the differentiable search
    moves its architecture again, with the latency model rescaled by what was measured. Without a backend (another
    device) nothing is measured."""
    if backend is None:
        return {"arch": found["arch"], "predicted_ms": found["predicted_ms"], "measured": None, "in_target": None, "tried": []}
    if "ranked" in found:
        ranked = [(Arch.from_dict(c["arch"]), c["predicted_ms"]) for c in found["ranked"]]
        v = verify_on_device(spec, ranked, backend, budget_ms, progress=progress)
        return {"arch": v.arch.to_dict(), "predicted_ms": v.predicted_ms, "measured": v.measured, "in_target": v.in_target,
                "tried": v.tried}
    arch, pred, tried, scale = Arch.from_dict(found["arch"]), found["predicted_ms"], [], 1.0
    preference = {k: np.asarray(v) for k, v in found["preference"].items()}
    for _ in range(3):
        v = verify_on_device(spec, [(arch, pred)], backend, budget_ms, tries=1, progress=False)
        tried += v.tried
        if v.in_target:
            break
        scale *= v.measured["latency_ms"] / pred  # the model's error here, folded into its scale

        def scaled(archs, s=scale):
            return latency.predict_ms(archs) * s

        arch, pred, _ = fit_to_band(spec, arch, scaled, *band_ms, preference=preference)
    pick = v.measured if v.in_target else fallback_pick(tried, budget_ms)
    return {"arch": pick["arch"], "predicted_ms": pick["predicted_ms"], "measured": pick, "in_target": v.in_target,
            "tried": tried}


# -- 3. train --------------------------------------------------------------------------------

def train_phase(spec: SpaceSpec, data: DataSplit, arch: Arch, *, supernet=None, epochs: int, seed: int, progress: bool,
                checkpoint: str | os.PathLike | None) -> tuple[torch.nn.Module, dict]:
    """With a supernet: the sub-network's weights (the better of its two sides) fine-tuned on the whole training
    split. Without: trained from scratch, as PC-DARTS retrains its result."""
    from .supernet import calibrate_bn, evaluate_arch, extract
    from .train import accuracy, train_network

    if supernet is not None:
        fitness_data = search_split(data, seed)
        sides = ["left"] if supernet.width_mode == "left" else ["left", "right"]
        scores = {s: evaluate_arch(supernet, arch, fitness_data, s, calibration_images=FITNESS_CALIBRATION_IMAGES)
                  for s in sides}
        side = max(sides, key=lambda s: scores[s])
        calibrate_bn(supernet, arch, fitness_data.train_x, side)
        net = extract(supernet, arch, side)
        init = {"init": "supernet", "side": side, "supernet_side_accuracy": scores,
                "accuracy_before_training": accuracy(net, data)}
        lr = 1e-3
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = build_network(spec, arch)
        init, lr = {"init": "scratch"}, 3e-3
    rep = train_network(net, data, epochs=epochs, lr=lr, seed=seed, progress=progress, desc="train chosen network",
                        checkpoint=checkpoint)
    return net.eval(), {**init, "lr": lr, **rep}


# -- 4. export -------------------------------------------------------------------------------

def export_phase(out: Path, spec: SpaceSpec, arch: Arch, net: torch.nn.Module, data: DataSplit, backend) -> dict:
    """model.pt (loadable with weights_only=True), model.onnx checked against PyTorch on validation images, and the
    ONNX file's latency measured on the device (None without a backend)."""
    import onnxruntime as ort

    from .fileio import atomic_write
    from .onnx_io import InputSpec, load_onnx
    from .zoo import export_onnx

    shape = (1, 3, arch.resolution, arch.resolution)
    buf = io.BytesIO()
    torch.save({"format": MODEL_FORMAT, "format_version": 1, "spec": spec.to_dict(), "arch": arch.to_dict(),
                "state_dict": net.state_dict(), "input_mean": list(data.mean), "input_std": list(data.std)}, buf)
    atomic_write(out / "model.pt", buf.getvalue())
    onnx_path = export_onnx(net, shape, out / "model.onnx")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    x = data.val_x[:64]
    with torch.no_grad():
        ref = net(x).numpy()
    got = np.concatenate([sess.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    check = {"images": len(x), "max_abs_diff": float(np.abs(ref - got).max()),
             "top1_agreement": float(np.mean(ref.argmax(1) == got.argmax(1)))}
    if check["max_abs_diff"] > 1e-3 * max(1.0, float(np.abs(ref).max())):
        raise DeployKitError(f"{onnx_path} disagrees with the PyTorch model (max abs diff {check['max_abs_diff']:.3g}): "
                             "report this with the run directory")
    measured = None
    if backend is not None:
        measured = backend.measure(load_onnx(onnx_path), [InputSpec("input", shape, np.float32)]).to_dict()
    return {"onnx_path": str(onnx_path), "model_path": str(out / "model.pt"), "onnx_check": check, "measured": measured}
