"""`deploykit search`: the most accurate network of a space within a millisecond budget on a device, trained,
exported to ONNX and measured.

The run directory holds every phase's output, so Ctrl-C (or a kill) loses at most the phase's current epoch
or candidate, and the same command resumes:

  run.json                    the settings (a run resumes only with the same ones) and the finished phases
  latency_model.json          the space's latency model on the device (+ latency_measurements.jsonl)
  supernet.ckpt, evolution.jsonl, front.jsonl   evolution: the supernet, the evaluated candidates and front
  search.ckpt                 differentiable: the search network and architecture logits
  finetune.ckpt               the chosen network's training
  arch.json, model.pt, model.onnx    the result; report.json, report.md, front.png
"""
from __future__ import annotations

import dataclasses
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .errors import DeployKitError

METHODS = ("evolution", "differentiable")
DEFAULTS = {"evolution": {"epochs": 16, "finetune_epochs": 10}, "differentiable": {"epochs": 12, "finetune_epochs": 20}}


def register(subparsers) -> None:
    p = subparsers.add_parser("search", help="find, train, export and measure the most accurate network within a budget")
    p.add_argument("--device", required=True, help="device table (name or path) whose latency the budget is about")
    p.add_argument("--budget-ms", type=float, required=True, help="latency budget in milliseconds (batch 1)")
    p.add_argument("--data", default="digits", help="'digits' (built in), an .npz with x and y, or an image folder "
                   "with one sub-folder per class")
    p.add_argument("--out", required=True, help="run directory; rerun the same command to resume")
    p.add_argument("--method", choices=METHODS, default="evolution")
    p.add_argument("--space", default="digits", help="search space: built-in name (digits, mbv2) or a JSON spec file")
    p.add_argument("--epochs", type=int, help="supernet training (evolution, default 16) or search (differentiable, "
                   "default 12) epochs")
    p.add_argument("--finetune-epochs", type=int, help="epochs of training the chosen network (default 10 fine-tuning "
                   "from the supernet for evolution, 20 from scratch for differentiable)")
    p.add_argument("--width-mode", choices=("bilateral", "left"), default="bilateral",
                   help="supernet width sharing (evolution): BCNet's bilateral (default) or left-aligned")
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--latency-weight", type=float, default=1.0, help="differentiable: weight of the latency loss")
    p.add_argument("--measure-n", type=int, default=30, help="architectures measured to calibrate the latency model "
                   "when the device is this machine (default 30; 0: kernel predictor only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=run)


# -- the run directory -----------------------------------------------------------------------

class Run:
    def __init__(self, out: Path, settings: dict):
        self.dir = out
        self.path = out / "run.json"
        self.doc = {"settings": settings, "phases": {}}
        if self.path.exists():
            try:
                doc = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise DeployKitError(f"{self.path} is unreadable: delete {out} or pass another --out") from None
            old = doc.get("settings", {})
            diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
            if diff:
                k = diff[0]
                raise DeployKitError(f"{out} holds a run with {k}={old.get(k)!r}, not {settings.get(k)!r}: repeat its "
                                     "command to resume it, or pass another --out")
            self.doc = doc

    def done(self, phase: str) -> dict | None:
        return self.doc["phases"].get(phase)

    def finish(self, phase: str, result: dict) -> dict:
        from .fileio import atomic_write

        self.doc["phases"][phase] = result
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(self.doc, indent=1))
        return result


def _local_backend(device: dict):
    """The backend that measures on `device` when that is this machine, else None."""
    from .fingerprint import mismatches
    from .profilers import get_backend

    try:
        backend = get_backend(device.get("backend", ""), threads=int(device.get("threads") or 1),
                              precision=device.get("precision"))
        diff = mismatches(device, backend.fingerprint())
    except (DeployKitError, ImportError, RuntimeError):
        return None, "its backend does not run here"
    return (None, diff[0]) if diff else (backend, "")


# -- the command -----------------------------------------------------------------------------

def run(args) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"deploykit: interrupted; {args.out} keeps the finished work: rerun the same command to resume",
              file=sys.stderr)
        return 130


def _run(args) -> int:
    from .archspace import Arch, get_space
    from .data import load_dataset
    from .predictor import KernelPredictor
    from .pipeline import (
        differentiable_phase,
        evolution_phase,
        export_phase,
        train_phase,
        train_search_supernet,
        verify_phase,
    )
    from .search import BAND, build_latency_model, check_budget, space_range_ms

    t_start = time.monotonic()
    torch.set_num_threads(1)  # small-batch training on a few cores: one thread is much faster (no synchronisation)
    method = args.method
    epochs = args.epochs if args.epochs is not None else DEFAULTS[method]["epochs"]
    finetune_epochs = args.finetune_epochs if args.finetune_epochs is not None else DEFAULTS[method]["finetune_epochs"]
    for name, v, least in (("--epochs", epochs, 1), ("--finetune-epochs", finetune_epochs, 0),
                           ("--population", args.population, 2), ("--generations", args.generations, 1),
                           ("--measure-n", args.measure_n, 0)):
        if v < least:
            raise DeployKitError(f"{name} must be at least {least}, got {v}")
    predictor = KernelPredictor.for_device(args.device)
    device_name = predictor.doc.get("table", args.device)
    spec = get_space(args.space)
    data = load_dataset(args.data, max(spec.resolutions), seed=args.seed)
    if data.num_classes != spec.num_classes:
        spec = dataclasses.replace(spec, num_classes=data.num_classes)
    backend, why_not = _local_backend(predictor.device)
    if backend is None:
        print(f"deploykit: warning: device {device_name} is not this machine ({why_not}): latencies are predicted only, "
              "nothing is measured", file=sys.stderr)
    out = Path(args.out)
    settings = {"device": device_name, "budget_ms": args.budget_ms, "data": str(args.data), "method": method,
                "space": spec.to_dict(), "epochs": epochs, "finetune_epochs": finetune_epochs, "seed": args.seed,
                "width_mode": args.width_mode, "population": args.population, "generations": args.generations,
                "latency_weight": args.latency_weight, "measure_n": args.measure_n if backend else 0}
    run_ = Run(out, settings)  # another run's directory is refused before anything is measured
    # the feasible range is measured once: a resumed run keeps it, so timing noise cannot refuse a budget it accepted
    recorded = run_.done("range")
    if recorded is None:
        lo_ms, hi_ms, how = space_range_ms(spec, predictor, backend)
        check_budget(args.budget_ms, spec, lo_ms, hi_ms, how, device_name)
        run_.finish("range", {"fastest_ms": lo_ms, "slowest_ms": hi_ms, "how": how})
    else:
        lo_ms, hi_ms, how = recorded["fastest_ms"], recorded["slowest_ms"], recorded["how"]
    progress = not args.no_progress
    timings = {}

    t = time.monotonic()
    latency = build_latency_model(spec, predictor, out / "latency_model.json", backend=backend,
                                  measurements=out / "latency_measurements.jsonl", measure_n=settings["measure_n"],
                                  seed=args.seed, progress=progress)
    timings["latency_model_s"] = time.monotonic() - t
    band_ms = (BAND[0] * args.budget_ms, BAND[1] * args.budget_ms)

    found = run_.done("search")
    supernet = None
    if method == "evolution":
        t = time.monotonic()
        supernet, trained = train_search_supernet(spec, data, width_mode=args.width_mode, epochs=epochs, seed=args.seed,
                                                  progress=progress, checkpoint=out / "supernet.ckpt")
        timings["supernet_s"] = time.monotonic() - t
        if found is None:
            t = time.monotonic()
            found = run_.finish("search", {**evolution_phase(
                spec, data, latency, band_ms, supernet, trained["choice_losses"], population=args.population,
                generations=args.generations, seed=args.seed, progress=progress, log_dir=out),
                "supernet": {k: trained[k] for k in ("epochs", "epoch_losses")}})
            timings["search_s"] = time.monotonic() - t
    elif found is None:
        t = time.monotonic()
        found = run_.finish("search", differentiable_phase(
            spec, data, latency, args.budget_ms, band_ms, epochs=epochs, latency_weight=args.latency_weight, seed=args.seed,
            progress=progress, checkpoint=out / "search.ckpt"))
        timings["search_s"] = time.monotonic() - t

    verified = run_.done("verify")
    if verified is None:
        t = time.monotonic()
        verified = run_.finish("verify", verify_phase(spec, found, latency, backend, args.budget_ms, band_ms,
                                                      progress=progress))
        timings["verify_s"] = time.monotonic() - t
    arch = Arch.from_dict(verified["arch"])

    t = time.monotonic()
    net, train_report = train_phase(spec, data, arch, supernet=supernet, epochs=finetune_epochs, seed=args.seed,
                                    progress=progress, checkpoint=out / "finetune.ckpt")
    timings["train_s"] = time.monotonic() - t
    t = time.monotonic()
    exported = export_phase(out, spec, arch, net, data, backend)
    timings["export_measure_s"] = time.monotonic() - t
    timings["total_s_this_call"] = time.monotonic() - t_start

    report = _report(args, settings, spec, data, arch, latency, found, verified, train_report, exported, (lo_ms, hi_ms, how),
                     timings, device_name)
    _write_outputs(out, report, found)
    m = report["measured_latency_ms"]
    print(f"{out}: {method} found an architecture of {report['predicted_latency_ms']:.4f} ms predicted"
          + (f", {m:.4f} ms measured ({m / args.budget_ms:.0%} of the {args.budget_ms:g} ms budget)" if m is not None
             else f" (budget {args.budget_ms:g} ms; not measured: another device)")
          + f", accuracy {report['accuracy']:.2%} on {report['val_images']} validation images; {exported['onnx_path']}")
    return 0


def _report(args, settings, spec, data, arch, latency, found, verified, train_report, exported, range_ms, timings,
            device_name) -> dict:
    from .search import BAND, TARGET_HIGH, TARGET_LOW

    budget = args.budget_ms
    measured = exported["measured"]
    m_ms = measured["latency_ms"] if measured else None
    pred_ms = float(latency.predict_ms([arch])[0])
    return {
        "budget_ms": budget, "predicted_latency_ms": pred_ms, "measured_latency_ms": m_ms,
        "measured": measured, "accuracy": train_report["accuracy"], "onnx_path": exported["onnx_path"],
        "model_path": exported["model_path"], "arch": arch.to_dict(), "method": args.method, "device": device_name,
        "space": spec.name, "data": str(args.data), "val_images": len(data.val_y),
        "within_budget": (m_ms <= TARGET_HIGH * budget) if m_ms is not None else None,
        "in_target_band": (TARGET_LOW * budget <= m_ms <= TARGET_HIGH * budget) if m_ms is not None else None,
        "target_band_ms": [TARGET_LOW * budget, TARGET_HIGH * budget],
        "search_band_ms": [BAND[0] * budget, BAND[1] * budget],
        "feasible_range_ms": {"fastest": range_ms[0], "slowest": range_ms[1], "how": range_ms[2]},
        "latency_model": latency.info, "training": train_report, "onnx_check": exported["onnx_check"],
        "verification": {"in_target": verified["in_target"], "tried": verified["tried"]},
        "search": {k: v for k, v in found.items() if k not in ("ranked", "preference")},
        "input": {"shape": [1, 3, arch.resolution, arch.resolution], "mean": list(data.mean), "std": list(data.std),
                  "note": "pixels in [0, 1], then (x - mean) / std per channel"},
        "settings": settings, "seconds": {k: round(v, 1) for k, v in timings.items()},
    }


def _write_outputs(out: Path, report: dict, found: dict) -> None:
    from .fileio import atomic_write

    atomic_write(out / "arch.json", json.dumps(report["arch"], indent=1))
    atomic_write(out / "report.json", json.dumps(report, indent=1))
    atomic_write(out / "report.md", _markdown(report))
    _plot_front(out / "front.png", report, found)


def _markdown(r: dict) -> str:
    m = r["measured"]
    meas = (f"{r['measured_latency_ms']:.4f} ms median (p90 {m['p90_ms']:.4f}, std {m['std_ms']:.4f}, {m['runs']} runs) = "
            f"{r['measured_latency_ms'] / r['budget_ms']:.1%} of the budget" if m
            else "not measured (the device is not this machine)")
    lines = [
        f"# deploykit search: {r['space']} under {r['budget_ms']:g} ms on {r['device']}", "",
        "| | |", "|---|---|",
        f"| method | {r['method']} |",
        f"| budget | {r['budget_ms']:g} ms (target {r['target_band_ms'][0]:.4f}-{r['target_band_ms'][1]:.4f} ms) |",
        f"| predicted latency | {r['predicted_latency_ms']:.4f} ms |",
        f"| measured latency | {meas} |",
        f"| in target band | {r['in_target_band']} |",
        f"| accuracy | {r['accuracy']:.2%} ({r['data']}, {r['val_images']} validation images) |",
        f"| ONNX | `{r['onnx_path']}` (max abs diff vs PyTorch {r['onnx_check']['max_abs_diff']:.2g}, top-1 agreement "
        f"{r['onnx_check']['top1_agreement']:.0%}) |",
        f"| feasible range | {r['feasible_range_ms']['fastest']:.4f}-{r['feasible_range_ms']['slowest']:.4f} ms "
        f"({r['feasible_range_ms']['how']}) |",
        f"| latency model | {r['latency_model'].get('measured_n', 0)} measured architectures, correction "
        f"{r['latency_model'].get('correction')} |",
        "", "## Architecture", "", f"- resolution {r['arch']['resolution']}, stage widths {r['arch']['widths']}",
        f"- block ops {', '.join(r['arch']['ops'])}", "",
        "## Time", "", *[f"- {k}: {v:g} s" for k, v in r["seconds"].items()], "",
        "![front](front.png)", "",
    ]
    return "\n".join(lines)


def _plot_front(path: Path, r: dict, found: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fileio import atomic_write

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=110)
    budget = r["budget_ms"]
    ax.axvspan(*r["target_band_ms"], color="tab:green", alpha=0.12, label="target band (0.85-1.0 x budget)")
    ax.axvline(budget, color="tab:red", lw=1, ls="--", label=f"budget {budget:g} ms")
    if "ranked" in found:
        pts = np.array([(c["predicted_ms"], c["accuracy"]) for c in found["ranked"] + found.get("front", [])])
        ax.scatter(pts[:, 0], pts[:, 1], s=14, color="tab:gray", alpha=0.7, label="evaluated architectures (supernet)")
        order = np.argsort(pts[:, 0])
        front, best = [], -1.0
        for i in order:
            if pts[i, 1] > best:
                front.append(pts[i])
                best = pts[i, 1]
        front = np.array(front)
        ax.step(front[:, 0], front[:, 1], where="post", color="tab:blue", label="predicted latency/accuracy front")
        chosen_y = r["search"].get("supernet_accuracy", r["accuracy"])
        ylabel = "accuracy (supernet, held-out training images)"
    else:
        hist = found.get("history", [])
        if hist:
            ax.plot([h["latency_ms"] for h in hist], [r["accuracy"]] * len(hist), "o-", color="tab:gray", ms=3,
                    label="expected latency per search epoch")
        chosen_y = r["accuracy"]
        ylabel = "accuracy"
    ax.scatter([r["predicted_latency_ms"]], [chosen_y], marker="*", s=160, color="tab:orange", zorder=5,
               label="chosen (predicted)")
    if r["measured_latency_ms"] is not None:
        ax.scatter([r["measured_latency_ms"]], [r["accuracy"]], marker="D", s=50, color="tab:purple", zorder=5,
                   label=f"chosen, measured {r['measured_latency_ms']:.4f} ms, trained")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{r['space']} on {r['device']}: {r['method']}", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())
