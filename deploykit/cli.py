"""The `deploykit` command line. User errors: one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import DeployKitError

# what `pip install deploykit[full]` adds to the measuring part (`deploykit[agent]`)
FULL_INSTALL_MODULES = {"torch", "sklearn", "tqdm", "matplotlib", "onnxsim", "onnxscript"}


def _backend(args):
    from deploykit.profilers import get_backend

    options = {"threads": args.threads, "precision": getattr(args, "precision", None)}
    if args.backend == "remote":
        options.update(url=args.url, token_file=args.token_file, device_backend=args.remote_backend)
    elif args.url or args.token_file:
        raise DeployKitError(f"--url and --token-file go with --backend remote, not --backend {args.backend}")
    return get_backend(args.backend, **options)


def cmd_measure(args) -> int:
    from .onnx_io import input_specs, load_onnx, parse_shape

    model = load_onnx(args.model)
    specs = input_specs(model, parse_shape(args.shape) if args.shape else None)
    backend = _backend(args)
    m = backend.measure(model, specs)
    out = {"model": str(args.model), **m.to_dict(), "inputs": {s.name: list(s.shape) for s in specs},
           "device": backend.fingerprint()}
    if args.per_layer:
        out.update(backend.measure_layers(model, specs, end_to_end=m).to_dict())
    if m.noisy:
        print(f"deploykit: warning: rounds disagree by {m.spread:.1%} after {len(m.round_medians_ms)} rounds "
              "(a noisy machine): close other programs or pin the process with taskset", file=sys.stderr)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{args.model}: {out['latency_ms']:.3f} ms median  (p90 {out['p90_ms']:.3f}, std {out['std_ms']:.3f}, "
          f"cv {out['cv']:.3f}, {out['runs']} runs in {out['rounds']} rounds)  [{_where(backend)}, {backend.threads} thread(s)]")
    if args.per_layer:
        print(f"{'layer':<60} {'op':<18} {'ms':>9}  sources")
        for layer in sorted(out["layers"], key=lambda x: -x["latency_ms"]):
            print(f"{layer['name'][:60]:<60} {layer['op_type'][:18]:<18} {layer['latency_ms']:9.4f}  {len(layer['source_nodes'])}")
        print(f"layers sum {out['layers_sum_ms']:.3f} ms = {out['sum_ratio']:.3f} x end-to-end ({out['correction']})")
    return 0


def _where(backend) -> str:
    return f"{backend.device_backend} on {backend.url}" if backend.name == "remote" else backend.name


def cmd_profile(args) -> int:
    from .profile import profile_device

    backend = _backend(args)
    out_dir = Path(args.out_dir)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    result = profile_device(backend, out_dir / f"{args.name}.jsonl", args.name, kernels=args.kernels, minutes=args.minutes,
                            resume=args.resume, seed=args.seed, progress=not args.no_progress, kinds=kinds, nets=args.nets)
    msg = (f"{result.table_path}: {result.total} kernels ({result.measured_now} measured now in {result.seconds:.0f} s"
           + (f", {result.failed} rejected by the runtime" if result.failed else "") + ")")
    if result.stopped_by == "interrupt":
        print(f"interrupted; {msg}; continue with --resume", file=sys.stderr)
        return 130
    if result.stopped_by == "time":
        msg += f"; stopped at --minutes {args.minutes:g}, continue with --resume"
    print(msg)
    if result.stopped_by == "target" and not args.no_fit:
        _fit_and_report(result.table_path, progress=not args.no_progress)
    return 0


def _fit_and_report(table_path: Path, progress: bool, out: Path | None = None) -> Path:
    from .predictor import fit_predictor, predictor_path
    from .table import LatencyTable

    table = LatencyTable.load(table_path)
    pred = fit_predictor(table, progress=progress)
    path = pred.save(out or predictor_path(table.path))
    chosen = ", ".join(f"{k} {v['chosen']}" for k, v in pred.doc["selection"].items())
    calib = pred.doc["overhead"]["calibration"]
    loo = calib.get("leave_one_out")
    tail = (f"; calibration on {calib['n']} networks: leave-one-out MAPE {loo['mape']:.1%}, {loo['within_10']:.0%} within 10%"
            if loo else f"; {calib.get('note', '')}")
    print(f"{path}: regressors per kind: {chosen}{tail}")
    return path


def cmd_predict(args) -> int:
    from .onnx_io import input_specs, load_onnx, parse_shape
    from .predictor import KernelPredictor

    model = load_onnx(args.model)
    specs = input_specs(model, parse_shape(args.shape) if args.shape else None)
    predictor = KernelPredictor.for_device(args.device)
    pred = predictor.predict_onnx(model, specs, allow_missing=args.allow_missing)
    out = {"model": str(args.model), "device": predictor.doc["table"], **pred.to_dict(),
           "inputs": {s.name: list(s.shape) for s in specs}}
    for m in pred.missing:
        print(f"deploykit: warning: not predicted (counted as 0 ms): node {m['name']} {m['op_type']}: {m['reason']}",
              file=sys.stderr)
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{args.model}: {pred.latency_ms:.3f} ms predicted on {predictor.doc['table']} ({len(pred.layers)} kernels, "
          f"model overhead {pred.overhead_ms:+.3f} ms)" + (f", {len(pred.missing)} NOT PREDICTED" if pred.missing else ""))
    if args.layers:
        print(f"{'kernel':<40} {'op':<28} {'kind':<8} {'ms':>9}")
        for layer in pred.layers:
            print(f"{layer.name[:40]:<40} {layer.op_type[:28]:<28} {layer.kind:<8} {layer.latency_ms:9.4f}"
                  + ("  (fused)" if layer.fused else ""))
    return 0


def cmd_predictor(args) -> int:
    from .table import LatencyTable, resolve_device

    if args.predictor_cmd == "fit":
        table_path = resolve_device(args.device)
        LatencyTable.load(table_path)  # refuse a bad table before the work starts
        _fit_and_report(table_path, progress=not args.no_progress, out=Path(args.out) if args.out else None)
        return 0
    from .evaluate import drift, evaluate_models, plot, reference_networks, summarise, write_json
    from .predictor import KernelPredictor

    predictor = KernelPredictor.for_device(args.device)
    backend = _backend_for_table(predictor.device, remote=args if args.backend == "remote" else None)
    refs = reference_networks(LatencyTable.load(resolve_device(args.device)), args.drift_nets) if args.drift_nets != 0 else []
    rows = evaluate_models(predictor, Path(args.models), backend, allow_missing=args.allow_missing,
                           progress=not args.no_progress, force=args.force, passes=args.passes, references=refs)
    report = {"device": predictor.doc["table"], "models_dir": str(args.models), "passes": args.passes, **summarise(rows)}
    if refs:
        report["drift"] = drift(refs)
    out = Path(args.out)
    write_json(report, out / "evaluation.json")
    plot(rows, out / "predicted_vs_measured.png", f"{predictor.doc['table']}: {len(rows)} models")
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{'model':<44} {'measured ms':>11} {'predicted':>10} {'error':>7}")
    for r in rows:
        print(f"{r.model[:44]:<44} {r.measured_ms:11.3f} {r.predicted_ms:10.3f} {r.rel_error:+7.1%}")
    for name, acc in (("predictor", report["predictor"]), ("MACs baseline", report["macs_baseline"])):
        print(f"{name:<14} within 5%: {acc['within_5']:.1%}  within 10%: {acc['within_10']:.1%}  MAPE {acc['mape']:.1%}  "
              f"RMSE {acc['rmse_ms']:.3f} ms  Kendall tau {acc['kendall_tau']:.3f}  (n={acc['n']})")
    if refs:
        d = report["drift"]
        print(f"drift: {d['n']} of the table's calibration networks measure {d['now_over_table']:.3f}x their table latency "
              f"now (10th-90th percentile {d['p10']:.3f}-{d['p90']:.3f})")
    print(f"report: {out / 'evaluation.json'}, plot: {out / 'predicted_vs_measured.png'}")
    return 0


def _backend_for_table(device: dict, remote=None):
    """The backend a table was measured with, configured as it was (threads, precision); with `remote` (args with
    url and token_file), that backend on the device's agent."""
    from deploykit.profilers import get_backend

    name, threads, precision = device.get("backend", "ort-cpu"), int(device.get("threads") or 1), device.get("precision")
    if remote is not None:
        return get_backend("remote", threads=threads, precision=precision, url=remote.url,
                           token_file=remote.token_file, device_backend=name)
    return get_backend(name, threads=threads, precision=precision)


def cmd_table(args) -> int:
    from .table import LatencyTable, merge_tables, resolve_device

    if args.table_cmd == "merge":
        tables = [LatencyTable.load(resolve_device(t)) for t in args.tables]
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise DeployKitError(f"{out} already exists: choose another --out, or pass --overwrite")
        merged = merge_tables(tables, name=args.name or out.stem, force=args.force)
        merged.write(out)
        print(f"{out}: {len(merged.entries)} kernels merged from {len(tables)} tables")
        return 0
    table = LatencyTable.load(resolve_device(args.device))
    if args.table_cmd == "validate":
        problems = table.validate()
        for p in problems:
            print(f"{table.path}: {p}")
        if problems:
            return 1
        print(f"{table.path}: ok ({len(table.entries)} kernels, format_version {table.header['format_version']})")
        return 0
    summary = {"path": str(table.path), "name": table.name, "format_version": table.header["format_version"],
               "created_utc": table.header.get("created_utc"), "kinds": table.kinds(),
               "kernels": sum(n for k, n in table.kinds().items() if k != "net"), "nets": table.kinds().get("net", 0),
               "device": table.device}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['name']}  ({summary['path']}, format_version {summary['format_version']}, created {summary['created_utc']})")
        for k, v in summary["device"].items():
            print(f"  {k:<20} {v}")
        print(f"  {summary['kernels']} kernels, {summary['nets']} calibration networks: "
              + ", ".join(f"{k} {n}" for k, n in summary["kinds"].items()))
    return 0


def cmd_backends(args) -> int:
    from deploykit.profilers import backend_class, list_backends

    for name in list_backends():
        try:
            backend_class(name).check_available()
            status = "available"
        except DeployKitError as e:
            status = f"unavailable: {e}"
        print(f"{name:<12} {status}")
    return 0


def cmd_quickstart(args) -> int:
    """The main job on built-in defaults: quick-profile this machine, fit its predictor, predict and measure a network,
    then search the digits space under a budget, train, export and measure the result."""
    from . import zoo
    from .onnx_io import input_specs, load_onnx
    from .predictor import KernelPredictor
    from .profile import profile_device

    out = Path(args.out)
    backend = _backend(args)
    result = profile_device(backend, out / "latency_tables" / f"{args.name}.jsonl", args.name, kernels=args.kernels,
                            minutes=args.minutes, resume=True, progress=not args.no_progress, nets=args.nets)
    print(f"profiled: {result.table_path} ({result.total} kernels, {result.nets} calibration networks)")
    _fit_and_report(result.table_path, progress=not args.no_progress)
    onnx_path = zoo.export_onnx(zoo.build(args.model), (1, 3, args.resolution, args.resolution), out / f"{args.model}.onnx")
    model = load_onnx(onnx_path)
    specs = input_specs(model)
    pred = KernelPredictor.for_device(str(result.table_path)).predict_onnx(model, specs)
    m = backend.measure(model, specs)
    layers = backend.measure_layers(model, specs, end_to_end=m)
    report = {"model": str(onnx_path), **m.to_dict(), **layers.to_dict(), "device": backend.fingerprint(),
              "table": str(result.table_path), "predicted_latency_ms": pred.latency_ms,
              "prediction_error": (pred.latency_ms - m.latency_ms) / m.latency_ms}
    (out / "quickstart.json").write_text(json.dumps(report, indent=1))
    print(f"{args.model} {args.resolution}x{args.resolution}: predicted {pred.latency_ms:.2f} ms from the quick table, "
          f"measured {m.latency_ms:.2f} ms median (p90 {m.stats.p90_ms:.2f}, {report['prediction_error']:+.1%}); "
          f"{len(layers.layers)} fused layers summing to {layers.sum_ratio:.3f} x end-to-end; report: {out / 'quickstart.json'}")
    if args.no_search:
        return 0
    return _quick_search(args, result.table_path, backend, out)


def _quick_search(args, table_path: Path, backend, out: Path) -> int:
    """Search the digits space under a budget on this machine (default: the middle of its measured feasible range)."""
    from .archspace import DIGITS_SPACE
    from .predictor import KernelPredictor
    from .search import space_range_ms

    budget = args.budget_ms
    if budget is None:
        lo, hi, _ = space_range_ms(DIGITS_SPACE, KernelPredictor.for_device(str(table_path)), backend)
        budget = round((lo + hi) / 2, 4)
        print(f"search budget: {budget:g} ms, the middle of the digits space's measured range {lo:.4f}-{hi:.4f} ms")
    argv = ["search", "--device", str(table_path), "--budget-ms", str(budget), "--data", "digits", "--out",
            str(out / "search")] + (["--no-progress"] if args.no_progress else [])
    search_args = build_parser().parse_args(argv)
    return int(search_args.fn(search_args) or 0)


def _add_backend_args(p, default_threads: int | None = 1) -> None:
    p.add_argument("--backend", default="ort-cpu",
                   help="device backend (see `deploykit backends`); remote: a device running `deploykit agent serve`")
    p.add_argument("--threads", type=int, default=default_threads, help="intra-op threads (default 1)")
    p.add_argument("--precision", default=None, help="fp32 (default) or fp16 on GPU backends")
    add_remote_args(p)


def add_remote_args(p) -> None:
    p.add_argument("--url", help="with --backend remote: http://HOST:PORT of the device's agent")
    p.add_argument("--token-file", help="with --backend remote: the agent's token file")
    p.add_argument("--remote-backend", default="ort-cpu", help="with --backend remote: the backend on the device "
                                                               "(default ort-cpu)")


def _register_full(sub, module: str, name: str, help: str) -> None:
    """Register a subcommand whose module needs the full install; on an agent-only install (no torch), a
    placeholder that says how to get it."""
    import importlib

    try:
        importlib.import_module(f".{module}", __package__).register(sub)  # imports come before add_parser there
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] not in FULL_INSTALL_MODULES:
            raise
        p = sub.add_parser(name, help=f"{help} (needs the full install)")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        missing = e.name
        p.set_defaults(fn=lambda args: _needs_full(name, missing))


def _needs_full(command: str, missing: str | None) -> int:
    raise DeployKitError(_full_install_message(command, missing))


def _full_install_message(command: str, missing: str | None) -> str:
    return (f"`deploykit {command}` needs the full install (no module {missing!r} here, an agent-only install?): "
            "pip install torch==2.13.0 && pip install 'deploykit[full]'")


def build_parser() -> argparse.ArgumentParser:
    from .protocol import DEFAULT_KERNELS, DEFAULT_MINUTES, DEFAULT_NETS

    ap = argparse.ArgumentParser(prog="deploykit", description=__doc__)
    ap.add_argument("--version", action="version", version=f"deploykit {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("measure", help="end-to-end (and per-layer) latency of an ONNX model")
    p.add_argument("model", help="path of an .onnx file")
    _add_backend_args(p)
    p.add_argument("--shape", help="input shape for dynamic dims, e.g. 1,3,224,224")
    p.add_argument("--per-layer", action="store_true", help="add per-layer latency of the fused graph")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=cmd_measure)

    p = sub.add_parser("profile", help="build a device latency table by measuring sampled kernels")
    _add_backend_args(p)
    p.add_argument("--name", required=True, help="device name; the table is OUT_DIR/NAME.jsonl")
    p.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, help=f"wall-time bound (default {DEFAULT_MINUTES:g})")
    p.add_argument("--kernels", type=int, default=DEFAULT_KERNELS, help=f"kernels to measure (default {DEFAULT_KERNELS})")
    p.add_argument("--resume", action="store_true", help="continue an existing table")
    p.add_argument("--kinds", help="comma-separated kernel kinds to sample (default all); --kernels stays the table total")
    p.add_argument("--nets", type=int, default=DEFAULT_NETS,
                   help=f"calibration networks measured after the kernels, for the predictor (default {DEFAULT_NETS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="latency_tables", help="where tables go (default ./latency_tables)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-fit", action="store_true", help="do not fit the latency predictor at the end")
    p.set_defaults(fn=cmd_profile)

    p = sub.add_parser("predict", help="predict an ONNX model's latency on a profiled device, without running it")
    p.add_argument("model", help="path of an .onnx file")
    p.add_argument("--device", required=True, help="latency table path or device name")
    p.add_argument("--shape", help="input shape for dynamic dims, e.g. 1,3,224,224")
    p.add_argument("--allow-missing", action="store_true", help="predict the rest when some op has no kernel, and report it")
    p.add_argument("--layers", action="store_true", help="print the per-kernel breakdown")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("predictor", help="fit or evaluate a device's latency predictor")
    psub = p.add_subparsers(dest="predictor_cmd", required=True)
    q = psub.add_parser("fit", help="fit the per-kind regressors and the network calibration on a device table")
    q.add_argument("--device", required=True, help="latency table path or device name")
    q.add_argument("--out", help="predictor file (default: NAME.predictor.json beside the table)")
    q.add_argument("--no-progress", action="store_true")
    q = psub.add_parser("evaluate", help="measure each model in a folder here, predict it, and score the predictor")
    q.add_argument("--device", required=True, help="latency table path or device name (must be this machine)")
    q.add_argument("--models", required=True, help="folder of .onnx models with static input shapes")
    q.add_argument("--out", default="runs/predictor-eval", help="where evaluation.json and the plot go")
    q.add_argument("--allow-missing", action="store_true")
    q.add_argument("--force", action="store_true", help="evaluate even if this machine differs from the table's device")
    q.add_argument("--passes", type=int, default=1, help="measure the folder this many times over and take each model's "
                                                         "median (on a shared, noisy machine: 3)")
    q.add_argument("--drift-nets", type=int, default=0, help="also re-measure this many of the table's calibration "
                                                             "networks: how far the device moved since it was profiled")
    q.add_argument("--backend", choices=("remote",), help="remote: measure on the device's agent (--url, --token-file) "
                                                          "instead of here")
    add_remote_args(q)
    q.add_argument("--json", action="store_true")
    q.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_predictor)

    p = sub.add_parser("table", help="show, validate or merge latency tables")
    tsub = p.add_subparsers(dest="table_cmd", required=True)
    for name in ("show", "validate"):
        q = tsub.add_parser(name)
        q.add_argument("device", help="table path or device name")
        if name == "show":
            q.add_argument("--json", action="store_true")
    q = tsub.add_parser("merge")
    q.add_argument("tables", nargs="+", help="table paths or device names")
    q.add_argument("--out", required=True)
    q.add_argument("--name")
    q.add_argument("--force", action="store_true", help="merge tables of different devices")
    q.add_argument("--overwrite", action="store_true")
    p.set_defaults(fn=cmd_table)

    p = sub.add_parser("backends", help="list backends and whether they run here")
    p.set_defaults(fn=cmd_backends)

    p = sub.add_parser("quickstart", help="the main job on built-in defaults")
    _add_backend_args(p)
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--name", default="this-machine-quick")
    p.add_argument("--kernels", type=int, default=300)
    p.add_argument("--nets", type=int, default=12, help="calibration networks (default 12)")
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--budget-ms", type=float, help="budget of the digits search (default: the middle of the space's range)")
    p.add_argument("--no-search", action="store_true", help="stop after the predictor check, before the search")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_quickstart)

    _register_full(sub, "archcli", "arch-predictor", "architecture-level latency MLP for a search space")
    _register_full(sub, "searchcli", "search", "search an architecture under a latency budget")
    _register_full(sub, "compresscli", "compress", "prune, decompose or quantize a model under a latency budget")
    from .exportcli import register as register_export

    register_export(sub)
    from .agentcli import register as register_agent

    register_agent(sub)
    return ap


def _agent_parser() -> argparse.ArgumentParser:
    """`deploykit agent ...` alone: its command line needs none of the search, compression and export modules (torch,
    scikit-learn: seconds to import on a Raspberry Pi). The backends the agent offers are probed once, at start."""
    from .agentcli import register as register_agent

    ap = argparse.ArgumentParser(prog="deploykit")
    register_agent(ap.add_subparsers(dest="cmd", required=True))
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = (_agent_parser() if argv[:1] == ["agent"] else build_parser()).parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except DeployKitError as e:
        print(f"deploykit: error: {e}", file=sys.stderr)
        return e.exit_code
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] not in FULL_INSTALL_MODULES:
            raise
        print(f"deploykit: error: {_full_install_message(args.cmd, e.name)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deploykit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
