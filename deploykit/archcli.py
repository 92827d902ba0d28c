"""`deploykit arch-predictor`: measure architectures of a search space, fit, evaluate and query the latency MLP."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .errors import DeployKitError


def register(subparsers) -> None:
    """Add the `arch-predictor` command (measure | fit | evaluate | predict) to the main CLI's subparsers."""
    from .archmlp import DEFAULT_EPOCHS
    from .cli import _add_backend_args

    p = subparsers.add_parser("arch-predictor", help="architecture-level latency MLP for a search space")
    sub = p.add_subparsers(dest="arch_cmd", required=True)

    q = sub.add_parser("measure", help="measure sampled architectures into a JSONL file (resumable)")
    q.add_argument("--space", default="mbv2", help="built-in space (mbv2, digits) or a JSON spec file")
    _add_backend_args(q)
    q.add_argument("--n", type=int, required=True, help="architectures to have in the file for this seed")
    q.add_argument("--out", required=True, help="JSONL file; rerun with the same file to resume")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--passes", type=int, default=1, help="time the whole plan this many times over and keep each "
                   "architecture's median (a shared machine's slow spells hit one pass, not all; default 1)")
    q.add_argument("--no-progress", action="store_true")

    q = sub.add_parser("fit", help="train the MLP on measured architectures and report held-out accuracy")
    q.add_argument("--data", action="append", help="JSONL from `measure` (repeat for more files); without it, "
                   "--pretrain-device and --space give a model from kernel-predictor labels alone")
    q.add_argument("--space", help="search space (built-in name or JSON spec) when no --data is given")
    q.add_argument("--out", required=True, help="model file (JSON)")
    q.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    q.add_argument("--holdout", type=int, default=200, help="architectures held out for evaluation (default 200)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--pretrain-device", help="pre-train on the kernel predictor of this device table (path or name), "
                   "then correct with the measured architectures")
    q.add_argument("--pretrain-n", type=int, default=5000, help="architectures labelled by the kernel predictor (default 5000)")

    q = sub.add_parser("evaluate", help="accuracy of a model on measured architectures")
    q.add_argument("--model", required=True)
    q.add_argument("--data", action="append", required=True)
    q.add_argument("--json", action="store_true", help="print one JSON object")

    q = sub.add_parser("predict", help="predicted latency of architectures")
    q.add_argument("--model", required=True)
    q.add_argument("--arch", required=True, help="JSON file: one architecture {ops, widths, resolution} or a list of them")
    p.set_defaults(fn=run)


def run(args) -> int:
    return {"measure": _measure, "fit": _fit, "evaluate": _evaluate, "predict": _predict}[args.arch_cmd](args)


def _measure(args) -> int:
    from .archmlp import measure_archs
    from .archspace import get_space
    from .cli import _backend

    spec = get_space(args.space)
    backend = _backend(args)
    t0 = time.monotonic()
    records = measure_archs(spec, args.n, backend, args.out, seed=args.seed, progress=not args.no_progress,
                            passes=args.passes)
    lat = np.array([r["latency_ms"] for r in records])
    passes = min(r.get("passes", 1) for r in records)
    print(f"{args.out}: {len(records)} architectures of space {spec.name!r}, {passes} pass(es) each "
          f"({time.monotonic() - t0:.0f} s); "
          f"latency {lat.min():.3f}..{lat.max():.3f} ms, median {np.median(lat):.3f} ms")
    return 0


def _fit(args) -> int:
    from .archmlp import evaluate, fit_arch_mlp, load_measurements, save_arch_mlp
    from .archspace import encode

    if not args.data:
        return _fit_pretrained_only(args)
    spec, device, archs, lat = load_measurements(args.data)
    if args.holdout < 0 or len(archs) - args.holdout < 10:
        raise DeployKitError(f"{len(archs)} architectures leave fewer than 10 to train on with --holdout {args.holdout}: "
                             "measure more or pass a smaller --holdout")
    enc = np.stack([encode(spec, a) for a in archs])
    order = np.random.default_rng(args.seed).permutation(len(archs))
    test, train = order[:args.holdout], order[args.holdout:]
    t0 = time.monotonic()
    init = None
    if args.pretrain_device:
        from .archmlp import pretrain_targets
        from .predictor import KernelPredictor

        kp = KernelPredictor.for_device(args.pretrain_device)
        p_enc, p_lat = pretrain_targets(spec, args.pretrain_n, args.seed + 1, predict_networks=kp.predict_networks)
        init = fit_arch_mlp(spec, p_enc, p_lat, epochs=args.epochs, seed=args.seed)
    model = fit_arch_mlp(spec, enc[train], lat[train], epochs=args.epochs, seed=args.seed, init=init)
    meta = {"data": [str(d) for d in args.data], "n_train": len(train), "epochs": args.epochs, "seed": args.seed,
            "correction": getattr(model, "correction", None),
            "pretrained_on": args.pretrain_device and {"device": args.pretrain_device, "n": args.pretrain_n},
            "fit_s": round(time.monotonic() - t0, 2), "train": evaluate(model, enc[train], lat[train])}
    if len(test):
        meta["holdout"] = evaluate(model, enc[test], lat[test])
    save_arch_mlp(model, spec, args.out, meta, device=device)
    print(f"{args.out}: trained on {len(train)} architectures of space {spec.name!r} in {meta['fit_s']:.1f} s")
    if len(test):
        print("held out: " + _summary(meta["holdout"]))
    return 0


def _fit_pretrained_only(args) -> int:
    """No measurement: the MLP learns the kernel predictor's labels of --pretrain-n sampled architectures."""
    from .archmlp import fit_arch_mlp, pretrain_targets, save_arch_mlp
    from .archspace import get_space
    from .predictor import KernelPredictor

    if not (args.pretrain_device and args.space):
        raise DeployKitError("give --data (measured architectures), or --pretrain-device and --space to train on "
                             "kernel-predictor labels alone")
    spec = get_space(args.space)
    kp = KernelPredictor.for_device(args.pretrain_device)
    t0 = time.monotonic()
    enc, lat = pretrain_targets(spec, args.pretrain_n, args.seed + 1, predict_networks=kp.predict_networks)
    model = fit_arch_mlp(spec, enc, lat, epochs=args.epochs, seed=args.seed)
    meta = {"data": [], "n_train": 0, "epochs": args.epochs, "seed": args.seed, "correction": None,
            "pretrained_on": {"device": args.pretrain_device, "n": args.pretrain_n}, "fit_s": round(time.monotonic() - t0, 2)}
    save_arch_mlp(model, spec, args.out, meta, device=kp.device)
    print(f"{args.out}: trained on {args.pretrain_n} architectures of space {spec.name!r} labelled by the kernel predictor of "
          f"{args.pretrain_device} (no measurement) in {meta['fit_s']:.1f} s")
    return 0


def _evaluate(args) -> int:
    from .archmlp import evaluate, load_arch_mlp, load_measurements
    from .archspace import encode
    from .fingerprint import mismatches

    model, spec, meta = load_arch_mlp(args.model)
    data_spec, device, archs, lat = load_measurements(args.data)
    if data_spec != spec:
        raise DeployKitError(f"the data holds architectures of space {data_spec.name!r}, the model predicts space "
                             f"{spec.name!r}: pass measurements of the model's space")
    diff = mismatches(meta["device"], device)
    if diff:
        print(f"deploykit: warning: model and data come from different devices ({'; '.join(diff[:3])})", file=sys.stderr)
    result = evaluate(model, np.stack([encode(spec, a) for a in archs]), lat)
    print(json.dumps(result) if args.json else f"{args.model} on {len(archs)} architectures: " + _summary(result))
    return 0


def _predict(args) -> int:
    from .archmlp import load_arch_mlp
    from .archspace import Arch, encode

    model, spec, _ = load_arch_mlp(args.model)
    try:
        doc = json.loads(Path(args.arch).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DeployKitError(f"cannot read architecture file {args.arch} ({type(e).__name__}): "
                             "write {\"ops\": [...], \"widths\": [...], \"resolution\": R} as JSON") from None
    archs = [Arch.from_dict(d) for d in (doc if isinstance(doc, list) else [doc])]
    pred = model.predict_ms(np.stack([encode(spec, a) for a in archs]))
    for arch, ms in zip(archs, pred):
        print(f"{ms:.4f} ms  {json.dumps(arch.to_dict())}")
    return 0


def _summary(r: dict) -> str:
    return (f"{r['within_10']:.1%} within +-10%, {r['within_5']:.1%} within +-5%, MAPE {r['mape']:.2%}, "
            f"RMSE {r['rmse_ms']:.3f} ms, Kendall tau {r['kendall_tau']:.3f} (n={r['n']})")
