"""The `deploykit` command line. User errors: one line on stderr, exit 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .errors import DeployKitError


def _backend(args):
    from deploykit.profilers import get_backend

    return get_backend(args.backend, threads=args.threads, precision=getattr(args, "precision", None))


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
          f"cv {out['cv']:.3f}, {out['runs']} runs in {out['rounds']} rounds)  [{backend.name}, {backend.threads} thread(s)]")
    if args.per_layer:
        print(f"{'layer':<60} {'op':<18} {'ms':>9}  sources")
        for layer in sorted(out["layers"], key=lambda x: -x["latency_ms"]):
            print(f"{layer['name'][:60]:<60} {layer['op_type'][:18]:<18} {layer['latency_ms']:9.4f}  {len(layer['source_nodes'])}")
        print(f"layers sum {out['layers_sum_ms']:.3f} ms = {out['sum_ratio']:.3f} x end-to-end ({out['correction']})")
    return 0


def cmd_profile(args) -> int:
    from .profile import profile_device

    backend = _backend(args)
    out_dir = Path(args.out_dir)
    result = profile_device(backend, out_dir / f"{args.name}.jsonl", args.name, kernels=args.kernels, minutes=args.minutes,
                            resume=args.resume, seed=args.seed, progress=not args.no_progress)
    msg = (f"{result.table_path}: {result.total} kernels ({result.measured_now} measured now in {result.seconds:.0f} s"
           + (f", {result.failed} rejected by the runtime" if result.failed else "") + ")")
    if result.stopped_by == "interrupt":
        print(f"interrupted; {msg}; continue with --resume", file=sys.stderr)
        return 130
    if result.stopped_by == "time":
        msg += f"; stopped at --minutes {args.minutes:g}, continue with --resume"
    print(msg)
    return 0


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
               "created_utc": table.header.get("created_utc"), "kernels": len(table.entries), "kinds": table.kinds(),
               "device": table.device}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{summary['name']}  ({summary['path']}, format_version {summary['format_version']}, created {summary['created_utc']})")
        for k, v in summary["device"].items():
            print(f"  {k:<20} {v}")
        print(f"  {len(table.entries)} kernels: " + ", ".join(f"{k} {n}" for k, n in summary["kinds"].items()))
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
    """The main job on built-in defaults: quick-profile this machine, measure a built-in network."""
    from . import zoo
    from .onnx_io import input_specs, load_onnx
    from .profile import profile_device

    out = Path(args.out)
    backend = _backend(args)
    result = profile_device(backend, out / "latency_tables" / f"{args.name}.jsonl", args.name, kernels=args.kernels,
                            minutes=args.minutes, resume=True, progress=not args.no_progress)
    print(f"profiled: {result.table_path} ({result.total} kernels)")
    onnx_path = zoo.export_onnx(zoo.build(args.model), (1, 3, args.resolution, args.resolution), out / f"{args.model}.onnx")
    model = load_onnx(onnx_path)
    specs = input_specs(model)
    m = backend.measure(model, specs)
    layers = backend.measure_layers(model, specs, end_to_end=m)
    report = {"model": str(onnx_path), **m.to_dict(), **layers.to_dict(), "device": backend.fingerprint(),
              "table": str(result.table_path)}
    (out / "quickstart.json").write_text(json.dumps(report, indent=1))
    print(f"{args.model} {args.resolution}x{args.resolution}: {m.latency_ms:.2f} ms median (p90 {m.stats.p90_ms:.2f}), "
          f"{len(layers.layers)} fused layers summing to {layers.sum_ratio:.3f} x end-to-end; report: {out / 'quickstart.json'}")
    return 0


def _add_backend_args(p, default_threads: int | None = 1) -> None:
    p.add_argument("--backend", default="ort-cpu", help="device backend (see `deploykit backends`)")
    p.add_argument("--threads", type=int, default=default_threads, help="intra-op threads (default 1)")
    p.add_argument("--precision", default=None, help="fp32 (default) or fp16 on GPU backends")


def build_parser() -> argparse.ArgumentParser:
    from .profile import DEFAULT_KERNELS, DEFAULT_MINUTES

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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="latency_tables", help="where tables go (default ./latency_tables)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_profile)

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
    p.add_argument("--kernels", type=int, default=200)
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_quickstart)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except DeployKitError as e:
        print(f"deploykit: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("deploykit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
