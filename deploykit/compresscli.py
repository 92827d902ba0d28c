"""`deploykit compress`: shrink a user's trained network until it meets a millisecond budget on a device, recover
its accuracy on the user's data, and write the measured result.

  DIR/run.json                 the settings (a run resumes only with the same ones) and the finished phases
  DIR/trp.ckpt, finetune.ckpt  resumable training (TRP, recovery fine-tuning)
  DIR/model.pt2                the compressed float network (torch.export; loads without the user's code)
  DIR/model.onnx               the same as ONNX; DIR/model.int8.onnx for int8 methods (QDQ)
  DIR/report.json, report.md   budget, original/predicted/measured latency (distribution), accuracies, per-method details
"""
from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

from .errors import DeployKitError

METHODS = ("prune", "lowrank", "int8", "prune+int8")
TRP_AIM = 0.95  # low-rank: aim the measured latency here, as a fraction of the budget
LOWRANK_ATTEMPTS = 6


def register(subparsers) -> None:
    p = subparsers.add_parser("compress", help="prune, decompose or quantize a trained network to a latency budget")
    p.add_argument("--model", required=True, help="MODULE:FUNCTION returning the nn.Module, or a TorchScript / "
                   "torch.export file (int8 only)")
    p.add_argument("--checkpoint", help="state_dict for a MODULE:FUNCTION model")
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--device", required=True, help="device table (name or path) whose latency the budget is about")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-ms", type=float, help="latency budget in milliseconds (batch 1)")
    budget.add_argument("--budget-fraction", type=float, help="latency budget as a fraction of the original network's "
                        "latency measured at the start of the run (0.5: twice as fast); judged by the two measured "
                        "in alternation, so the machine's drift does not move it")
    p.add_argument("--data", help="'digits', an .npz with x and y, or an image folder: recovery training, calibration "
                   "and accuracy (without it: no fine-tuning and no accuracy; int8 needs it)")
    p.add_argument("--example-shape", required=True, help="input shape 1,C,H,W (batch 1, H == W)")
    p.add_argument("--out", required=True, help="output directory; rerun the same command to resume")
    p.add_argument("--importance", choices=("magnitude", "bn", "dagger"), default="magnitude",
                   help="prune: channel importance (dagger learns it under the latency target, needs --data)")
    p.add_argument("--finetune-epochs", type=int, default=5, help="recovery fine-tuning epochs after pruning or "
                   "decomposition (default 5; 0: none)")
    p.add_argument("--trp-epochs", type=int, default=5, help="lowrank: trained-rank-pruning epochs before decomposing")
    p.add_argument("--scheme", choices=("channel", "spatial"), default="channel", help="lowrank: decomposition scheme")
    p.add_argument("--calibration", choices=("minmax", "entropy", "percentile"), default="minmax",
                   help="int8: activation range calibration")
    p.add_argument("--max-drop", type=float, default=1.0, help="int8: accuracy drop bound in points (default 1.0); "
                   "the most sensitive layers stay float until it holds")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=run)


def run(args) -> int:
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"deploykit: interrupted; {args.out} keeps the finished work: rerun the same command to resume",
              file=sys.stderr)
        return 130


class _Ctx:
    """What every method needs: the network, the device, the data and the original's figures."""

    def __init__(self, args):
        from .compress.loader import check_example_shape, load_model, parse_example_shape
        from .data import load_dataset
        from .predictor import KernelPredictor
        from .searchcli import _local_backend

        self.args = args
        self.shape = parse_example_shape(args.example_shape)
        if args.budget_ms is not None and not args.budget_ms > 0:
            raise DeployKitError(f"--budget-ms must be positive, got {args.budget_ms:g}")
        if args.budget_fraction is not None and not 0 < args.budget_fraction < 1:
            raise DeployKitError(f"--budget-fraction must be between 0 and 1, got {args.budget_fraction:g}")
        for name, v in (("--finetune-epochs", args.finetune_epochs), ("--trp-epochs", args.trp_epochs)):
            if v < 0:
                raise DeployKitError(f"{name} must be at least 0, got {v}")
        if args.max_drop < 0:
            raise DeployKitError(f"--max-drop must be at least 0 points, got {args.max_drop:g}")
        self.loaded = load_model(args.model, checkpoint=args.checkpoint)
        if args.method in ("prune", "lowrank", "prune+int8") and not self.loaded.restructurable:
            raise DeployKitError(f"--method {args.method} rewrites the network's layers, which a {self.loaded.kind} file "
                                 "does not expose: give MODULE:FUNCTION, or use --method int8")
        self.example = check_example_shape(self.loaded.module, self.shape, self.loaded.source)
        self.predictor = KernelPredictor.for_device(args.device)
        self.device_name = self.predictor.doc.get("table", args.device)
        self.backend, why_not = _local_backend(self.predictor.device)
        if self.backend is None:
            if args.method in ("int8", "prune+int8"):
                raise DeployKitError(f"--method {args.method} measures the quantized network, but device "
                                     f"{self.device_name} is not this machine ({why_not}): run it on the device")
            print(f"deploykit: warning: device {self.device_name} is not this machine ({why_not}): latencies are "
                  "predicted only", file=sys.stderr)
        self.data = None
        if args.data is not None:
            self.data = load_dataset(args.data, self.shape[-1], seed=args.seed)
            if self.data.train_x.shape[1] != self.shape[1]:
                raise DeployKitError(f"the data has {self.data.train_x.shape[1]} channels, the example shape "
                                     f"{self.shape[1]}: pass --example-shape 1,{self.data.train_x.shape[1]},H,W")
            classes = int(self.loaded.module(self.example).shape[1])
            if classes != self.data.num_classes:
                raise DeployKitError(f"{self.loaded.source} outputs {classes} classes but {args.data} has "
                                     f"{self.data.num_classes}: pass the data the network was trained on")
        elif args.method in ("int8", "prune+int8"):
            raise DeployKitError(f"--method {args.method} calibrates on the user's images: pass --data")
        self.progress = not args.no_progress
        self.out = Path(args.out)

    def latency(self, net_or_onnx) -> dict:
        """Measured on the device (distribution) when it is this machine, else predicted."""
        from .compress.latency import measure, measurement_dict, predict_ms

        predicted = predict_ms(self.predictor, net_or_onnx, self.shape) if not _is_int8(net_or_onnx) else None
        measured = measure(self.backend, net_or_onnx, self.shape) if self.backend is not None else None
        return {"latency_ms": measured.latency_ms if measured else predicted, "predicted_latency_ms": predicted,
                "measured": measurement_dict(measured)}

    def compare(self, original, compressed, rounds: int = 3) -> dict:
        """The original and the compressed network measured in alternation, `rounds` times each: the machine's drift
        hits both alike, so the speedup holds even where a single measurement moves by 10-30%. The median round of
        each is kept (with its distribution)."""
        from .compress.latency import measure, measurement_dict
        from .protocol import alternate, round_ratio

        median, every = alternate({"original": lambda: measure(self.backend, original, self.shape),
                                   "compressed": lambda: measure(self.backend, compressed, self.shape)}, rounds)
        return {"original": measurement_dict(median["original"]), "compressed": measurement_dict(median["compressed"]),
                "rounds_ms": [[r["original"].latency_ms, r["compressed"].latency_ms] for r in every],
                "speedup": round_ratio(every, "original", "compressed")}

    def accuracy(self, net) -> float | None:
        from .train import accuracy

        if self.data is None:
            return None
        if net is self.loaded.module and self.loaded.kind == "export":  # eval() is refused: score its ONNX instead
            from .compress.quant import onnx_accuracy

            return onnx_accuracy(_original_onnx(self), self.data.val_x.numpy(), self.data.val_y.numpy())
        return accuracy(net, self.data)


def _is_int8(model) -> bool:
    import onnx

    return isinstance(model, onnx.ModelProto) and any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def _run(args) -> int:
    from .searchcli import Run

    t_start = time.monotonic()
    torch.set_num_threads(1)  # small-batch training on a few cores: one thread is much faster
    ctx = _Ctx(args)
    settings = {k: getattr(args, k) for k in ("model", "checkpoint", "method", "device", "budget_ms", "budget_fraction", "data",
                                              "example_shape", "importance", "finetune_epochs", "trp_epochs", "scheme",
                                              "calibration", "max_drop", "lr", "seed")}
    run_ = Run(ctx.out, settings)
    original = run_.done("original")
    if original is None:
        original = run_.finish("original", {**ctx.latency(_original_onnx(ctx)), "accuracy": ctx.accuracy(ctx.loaded.module)})
    if args.budget_fraction is not None:
        args.budget_ms = args.budget_fraction * original["latency_ms"]
    if args.method != "int8" and original["latency_ms"] <= args.budget_ms:
        raise DeployKitError(f"{ctx.loaded.source} already runs in {original['latency_ms']:.4f} ms on {ctx.device_name}, "
                             f"within the {args.budget_ms:g} ms budget: nothing to compress (lower --budget-ms)")
    method = {"prune": _prune, "lowrank": _lowrank, "int8": _int8, "prune+int8": _prune_int8}[args.method]
    report = method(ctx, run_, original)
    report.update({"method": args.method, "device": ctx.device_name, "budget_ms": args.budget_ms,
                   "original_latency_ms": original["latency_ms"], "original": original,
                   "original_accuracy": original["accuracy"], "model": ctx.loaded.source, "data": args.data,
                   "example_shape": list(ctx.shape), "settings": settings,
                   "seconds_this_call": round(time.monotonic() - t_start, 1)})
    lat = report["measured_latency_ms"] if report["measured_latency_ms"] is not None else report["predicted_latency_ms"]
    ver = report.get("verification") or (report.get("int8") or {}).get("verification")
    report["speedup"] = ver["speedup"] if ver else None  # measured in alternation with the original
    report["budget_fraction"] = args.budget_fraction
    if args.budget_fraction is not None and report["speedup"]:
        # the original's latency at the start, over the speedup measured in alternation: drift moves both alike
        lat = report["latency_ms_vs_original"] = original["latency_ms"] / report["speedup"]
    report["within_budget"] = lat <= args.budget_ms
    _write_report(ctx.out, report)
    acc = report.get("accuracy")
    print(f"{ctx.out}: {args.method}: {original['latency_ms']:.4f} -> {lat:.4f} ms "
          f"({'measured' if report['measured_latency_ms'] is not None else 'predicted'}; budget {args.budget_ms:g} ms, "
          f"{lat / args.budget_ms:.0%})"
          + (f", accuracy {original['accuracy']:.2%} -> {acc:.2%}" if acc is not None and original["accuracy"] is not None
             else "") + f"; {report['onnx_path']}")
    if not report["within_budget"]:
        print(f"deploykit: the compressed network runs in {lat:.4f} ms, over the {args.budget_ms:g} ms budget: "
              f"{report.get('hint', 'raise --budget-ms')}", file=sys.stderr)
        return 2
    return 0


# -- methods ----------------------------------------------------------------------------------------

def _finetune(ctx: _Ctx, net, name: str) -> dict | None:
    from .train import train_network

    if ctx.data is None or ctx.args.finetune_epochs == 0:
        return None
    return train_network(net, ctx.data, epochs=ctx.args.finetune_epochs, lr=ctx.args.lr, seed=ctx.args.seed,
                         progress=ctx.progress, desc=name, checkpoint=ctx.out / f"{name}.ckpt")


def _finish_float(ctx: _Ctx, net, before_finetune: float | None, tuned: dict | None) -> dict:
    """Export the compressed float network, measure it and score it."""
    from .compress.latency import export

    net.eval()
    onnx_path = export(net, ctx.shape, ctx.out / "model.onnx")
    model_path = _save_torch(net, ctx.example, ctx.out)
    import onnx

    from .compress.latency import predict_ms

    proto = onnx.load(str(onnx_path))
    predicted = predict_ms(ctx.predictor, proto, ctx.shape)
    cmp = ctx.compare(_original_onnx(ctx), proto) if ctx.backend is not None else None
    return {"predicted_latency_ms": predicted,
            "measured_latency_ms": cmp["compressed"]["latency_ms"] if cmp else None,
            "measured": cmp["compressed"] if cmp else None, "verification": cmp,
            "accuracy": ctx.accuracy(net), "accuracy_before_finetune": before_finetune, "finetune": _brief(tuned),
            "onnx_path": str(onnx_path), "model_path": model_path,
            "params": sum(p.numel() for p in net.parameters()),
            "original_params": sum(p.numel() for p in ctx.loaded.module.parameters())}


def _original_onnx(ctx: _Ctx):
    from .compress.latency import to_onnx

    return to_onnx(ctx.loaded.module, ctx.shape, ctx.loaded.program)


def _brief(tuned: dict | None) -> dict | None:
    return None if tuned is None else {k: tuned[k] for k in ("epochs", "epoch_losses", "seconds", "resumed_from_epoch")}


def _save_torch(net, example, out: Path) -> str:
    """The compressed network as a torch.export archive (falls back to TorchScript when export cannot trace it)."""
    import os

    path = out / "model.pt2"
    tmp = out / "model.tmp.pt2"
    try:
        torch.export.save(torch.export.export(net.eval(), (example,)), str(tmp))
    except Exception:  # torch.export cannot trace some user code (data-dependent control flow): TorchScript it
        path, tmp = out / "model.ts", out / "model.tmp.ts"
        torch.jit.save(torch.jit.trace(net.eval(), example), str(tmp))
    os.replace(tmp, path)
    return str(path)


def _prune_phase(ctx: _Ctx, run_, original: dict, budget_ms: float):
    """The pruned network (fine-tuned) and its pruning record; resumes from the recorded channel counts."""
    from .compress.budget import prune_to_budget
    from .compress.prune import analyze, prune

    model = ctx.loaded.module
    done = run_.done("prune")
    if done is None:
        # a budget set as a fraction of the original is steered against the original's latency it was set from
        reference = original["latency_ms"] if ctx.args.budget_fraction is not None and original["measured"] else None
        result = prune_to_budget(model, ctx.example, ctx.predictor, ctx.backend, budget_ms, importance=ctx.args.importance,
                                 data=ctx.data, progress=ctx.progress,
                                 device_name=ctx.device_name, reference_ms=reference)
        net = result.model
        done = run_.finish("prune", {**result.to_dict(), "accuracy_before_finetune": ctx.accuracy(net)})
    else:  # rebuild the recorded pruning (kept channel indices) to resume its fine-tuning
        net = prune(model, analyze(model, ctx.example), {int(g): torch.tensor(ix) for g, ix in done["keep"].items()})
    tuned = _finetune(ctx, net, "finetune")
    return net, done, tuned


def _prune(ctx: _Ctx, run_, original: dict) -> dict:
    net, done, tuned = _prune_phase(ctx, run_, original, ctx.args.budget_ms)
    report = _finish_float(ctx, net, done["accuracy_before_finetune"], tuned)
    report["prune"] = {k: v for k, v in done.items() if k != "accuracy_before_finetune"}
    report["hint"] = "raise --budget-ms, or use --method prune+int8"
    return report


def _lowrank(ctx: _Ctx, run_, original: dict) -> dict:
    from .compress.latency import measure
    from .compress.lowrank import TRPConfig, decompose, decomposed_report, trp_train

    args = ctx.args
    net = copy.deepcopy(ctx.loaded.module)
    exclude = _first_and_last(net)
    config = TRPConfig(scheme=args.scheme, exclude=exclude)
    trp = None
    if ctx.data is not None and args.trp_epochs > 0:
        trp = trp_train(net, ctx.data, epochs=args.trp_epochs, config=config, lr=args.lr, seed=args.seed,
                        progress=ctx.progress, checkpoint=ctx.out / "trp.ckpt")
    net.eval()
    done = run_.done("lowrank")
    if done is None:
        target_ms = TRP_AIM * args.budget_ms
        known = [(original["predicted_latency_ms"], original["latency_ms"])]
        tried, best = [], None
        for _ in range(LOWRANK_ATTEMPTS):
            ratio = known[-1][1] / known[-1][0]
            energy, ranks, pred = _energy_for(net, target_ms / ratio, config, ctx)
            small = decompose(net, ranks, scheme=args.scheme)
            got = measure(ctx.backend, small, ctx.shape).latency_ms if ctx.backend is not None else pred
            tried.append({"energy": energy, "predicted_ms": pred, "measured_ms": got if ctx.backend else None})
            if ctx.progress:
                print(f"deploykit: lowrank energy {energy:.4f}: predicted {pred:.4f} ms, "
                      f"{'measured' if ctx.backend else 'predicted'} {got:.4f} ms", file=sys.stderr)
            if got <= args.budget_ms and (best is None or abs(got - target_ms) < abs(best[2] - target_ms)):
                best = (energy, ranks, got)
            if 0.91 * args.budget_ms <= got <= 0.99 * args.budget_ms:
                break
            known.append((pred, got))
        if best is None:
            raise DeployKitError(f"no decomposition reaches the {args.budget_ms:g} ms budget on {ctx.device_name} "
                                 f"(fastest tried {min(t['measured_ms'] or t['predicted_ms'] for t in tried):.4f} ms): "
                                 "raise --budget-ms, or use --method prune")
        done = run_.finish("lowrank", {"energy": best[0], "ranks": best[1], "tried": tried,
                                       "trp": None if trp is None else {k: trp[k] for k in ("epochs", "epoch_losses",
                                                                                            "seconds", "accuracy")}})
    small = decompose(net, done["ranks"], scheme=args.scheme)
    before = ctx.accuracy(small)
    tuned = _finetune(ctx, small, "finetune")
    report = _finish_float(ctx, small, before, tuned)
    report["lowrank"] = {**done, "scheme": args.scheme, "excluded": list(exclude),
                         "decomposition": decomposed_report(ctx.loaded.module, small)}
    report["hint"] = "raise --budget-ms, or use --method prune"
    return report


def _first_and_last(net) -> tuple[str, ...]:
    """The stem conv (3 input channels: no rank to gain) and the classifier stay whole, as in the TRP papers."""
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return tuple(dict.fromkeys([layers[0][0], layers[-1][0]])) if layers else ()


def _energy_for(net, aim_pred_ms: float, config, ctx: _Ctx):
    """The largest retained energy whose decomposition is predicted within `aim_pred_ms` (bisection; monotone)."""
    from .compress.latency import predict_ms
    from .compress.lowrank import decompose, ranks_for_energy

    def at(e):
        ranks = ranks_for_energy(net, e, config.scheme, config.exclude)
        return ranks, predict_ms(ctx.predictor, decompose(net, ranks, scheme=config.scheme), ctx.shape)

    lo, hi = 0.05, 1.0
    ranks_lo, pred_lo = at(lo)
    best = (lo, ranks_lo, pred_lo)
    for _ in range(12):
        mid = (lo + hi) / 2
        ranks, pred = at(mid)
        if pred <= aim_pred_ms:
            lo, best = mid, (mid, ranks, pred)
        else:
            hi = mid
        if hi - lo < 2e-3:
            break
    return best


def _int8_phase(ctx: _Ctx, run_, float_net, name: str) -> tuple[dict, object]:
    """Mixed-precision INT8 of `float_net` on the user's data, measured against its float self."""
    import onnx

    from .compress.latency import to_onnx
    from .compress.quant import mixed_precision, refuse_if_slower

    done = run_.done(name)
    float_onnx = to_onnx(float_net, ctx.shape, ctx.loaded.program if float_net is ctx.loaded.module else None)
    calib = ctx.data.train_x[:256].numpy()
    if done is None:
        mixed = mixed_precision(float_onnx, calib, ctx.data.val_x.numpy(), ctx.data.val_y.numpy(),
                                max_drop=ctx.args.max_drop / 100.0, method=ctx.args.calibration, progress=ctx.progress)
        cmp = ctx.compare(float_onnx, mixed.model)
        float_ms, int8_ms = cmp["original"]["latency_ms"], cmp["compressed"]["latency_ms"]
        done = run_.finish(name, {"float_nodes": list(mixed.float_nodes), "float_accuracy": mixed.float_accuracy,
                                  "int8_accuracy": mixed.int8_accuracy, "accuracy": mixed.accuracy, "drop": mixed.drop,
                                  "met": mixed.met, "sensitivity": mixed.sensitivity, "evaluations": mixed.evaluations,
                                  "float_latency_ms": float_ms, "int8_latency_ms": int8_ms,
                                  "speedup": cmp["speedup"], "measured": cmp["compressed"], "verification": cmp})
        model = mixed.model
    else:
        from .compress.quant import quantize_int8

        model = quantize_int8(float_onnx, calib, method=ctx.args.calibration, float_nodes=done["float_nodes"])
    refuse_if_slower(done["float_latency_ms"], done["int8_latency_ms"], ctx.device_name)
    return done, model if isinstance(model, onnx.ModelProto) else onnx.load(model)


def _int8(ctx: _Ctx, run_, original: dict) -> dict:
    from .fileio import atomic_write

    done, model = _int8_phase(ctx, run_, ctx.loaded.module, "int8")
    path = atomic_write(ctx.out / "model.int8.onnx", model.SerializeToString())
    return {"predicted_latency_ms": None, "measured_latency_ms": done["int8_latency_ms"], "measured": done["measured"],
            "accuracy": done["accuracy"], "onnx_path": str(path), "model_path": None, "int8": done,
            "hint": "use --method prune+int8 to go further"}


def _prune_int8(ctx: _Ctx, run_, original: dict) -> dict:
    """Quantization's speedup is measured on the original first, so pruning aims at budget x speedup in float."""
    from .fileio import atomic_write

    probe, _ = _int8_phase(ctx, run_, ctx.loaded.module, "int8_probe")
    speedup = probe["speedup"]
    float_budget = ctx.args.budget_ms * speedup
    if original["latency_ms"] <= float_budget:
        net, done, tuned = copy.deepcopy(ctx.loaded.module), None, None
    else:
        net, done, tuned = _prune_phase(ctx, run_, original, float_budget)
    report = _finish_float(ctx, net, done["accuracy_before_finetune"] if done else None, tuned)
    q, model = _int8_phase(ctx, run_, net, "int8")
    path = atomic_write(ctx.out / "model.int8.onnx", model.SerializeToString())
    report.update({"float_onnx_path": report["onnx_path"], "onnx_path": str(path), "float_accuracy": report["accuracy"],
                   "accuracy": q["accuracy"], "measured_latency_ms": q["int8_latency_ms"], "measured": q["measured"],
                   "predicted_latency_ms": None, "int8": q, "int8_probe_speedup": speedup,
                   "prune": done and {k: v for k, v in done.items() if k != "accuracy_before_finetune"},
                   "hint": "raise --budget-ms"})
    return report


# -- outputs -----------------------------------------------------------------------------------------

def _write_report(out: Path, report: dict) -> None:
    from .fileio import atomic_write

    atomic_write(out / "report.json", json.dumps(report, indent=1, default=float))
    atomic_write(out / "report.md", _markdown(report))


def _markdown(r: dict) -> str:
    def ms(v):
        return "-" if v is None else f"{v:.4f} ms"

    def pct(v):
        return "-" if v is None else f"{v:.2%}"

    lat = r["measured_latency_ms"] if r["measured_latency_ms"] is not None else r["predicted_latency_ms"]
    lines = [f"# deploykit compress: {r['method']} on {r['device']}", "",
             "| | original | compressed |", "|---|---|---|",
             f"| latency | {ms(r['original_latency_ms'])} | {ms(lat)} |",
             f"| accuracy | {pct(r['original_accuracy'])} | {pct(r.get('accuracy'))} |", "",
             f"Budget {r['budget_ms']:g} ms: {'met' if r['within_budget'] else 'NOT met'} "
             f"({lat / r['budget_ms']:.0%} of it). Predicted latency: {ms(r.get('predicted_latency_ms'))}.", "",
             f"Artifacts: `{r['onnx_path']}`" + (f", `{r['model_path']}`" if r.get("model_path") else "") + "."]
    if r.get("prune"):
        skipped = r["prune"].get("skipped") or []
        lines += ["", f"Pruned {r['prune']['groups']} channel groups (importance: {r['prune']['importance']}); "
                  f"{len(skipped)} parts left intact" + (": " + "; ".join(f"{s['name']} ({s['reason']})"
                                                                          for s in skipped[:10]) if skipped else ".")]
    if r.get("int8"):
        q = r["int8"]
        lines += ["", f"INT8: {q['speedup']:.2f}x faster than float, accuracy drop {q['drop'] * 100:.2f} points, "
                  f"{len(q['float_nodes'])} layers kept in float."]
    return "\n".join(lines) + "\n"
