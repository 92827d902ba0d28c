"""`deploykit export`: a network to the artifact that ships (simplified ONNX, ONNX Runtime format, TensorRT engine),
verified against the source and measured on the device against its predicted latency. See deploykit.export."""
from __future__ import annotations

import sys

from .errors import DeployKitError


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="export a network to a verified, measured ONNX / ORT / TensorRT artifact")
    p.add_argument("--model", required=True, help="MODULE:FUNCTION returning the nn.Module, or a TorchScript, "
                   "torch.export (.pt2) or ONNX file (e.g. the model.pt2 / model.onnx / model.int8.onnx that "
                   "search and compress write)")
    p.add_argument("--checkpoint", help="state_dict for a MODULE:FUNCTION model")
    p.add_argument("--format", choices=("onnx", "ort", "tensorrt"), default="onnx",
                   help="onnx: simplified ONNX; ort: ONNX Runtime offline-optimised + .ort for mobile builds; "
                   "tensorrt: a TensorRT engine (needs TensorRT and a CUDA GPU)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", action="store_true", help="FP16 weights and compute")
    prec.add_argument("--int8", action="store_true", help="INT8, calibrated on --data (entropy calibration)")
    p.add_argument("--example-shape", help="input shape, e.g. 1,3,224,224 (required for PyTorch models and for ONNX "
                   "inputs with dynamic dims)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dynamic-batch", action="store_true", help="a dynamic batch dim (TensorRT: an optimisation "
                   "profile from 1 to --max-batch)")
    p.add_argument("--max-batch", type=int, default=8, help="largest batch of a --dynamic-batch artifact (default 8)")
    p.add_argument("--ort-style", choices=("fixed", "runtime"), default="fixed",
                   help="--format ort: fixed bakes in every optimisation, this CPU's layout transforms included (fastest "
                   "here); runtime keeps the file portable and saves the layout optimisations for a minimal build to "
                   "apply on the device (a phone)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--data", help="'digits', an .npz with x (and y), or an image folder: INT8 calibration and the "
                   "verification inputs (default: random inputs)")
    p.add_argument("--device", help="device table (name or path): predicted latency and the backend to measure on "
                   "(default: this machine, with a table recorded on it if there is one)")
    p.add_argument("--backend", choices=("remote",), help="remote: measure on a device running `deploykit agent "
                                                          "serve` (--url, --token-file) instead of here")
    p.add_argument("--url", help="with --backend remote: http://HOST:PORT of the device's agent")
    p.add_argument("--token-file", help="with --backend remote: the agent's token file")
    p.add_argument("--threads", type=int, default=1, help="CPU threads when measuring without --device (default 1)")
    p.add_argument("--verify-inputs", type=int, default=16, help="inputs the artifact is checked on (default 16)")
    p.add_argument("--update-table", action="store_true", help="when measured and predicted latency differ by more "
                   "than 10%%, feed the measurement back into the device's table and refit its predictor")
    p.add_argument("--no-simplify", action="store_true", help="skip the onnx-simplifier pass")
    p.add_argument("--no-measure", action="store_true", help="verify only; no latency measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="say each step on stderr")
    p.set_defaults(fn=run)


def run(args) -> int:
    from .export.pipeline import export_model, parse_shape

    precision = "fp16" if args.fp16 else "int8" if args.int8 else "fp32"
    shape = parse_shape(args.example_shape) if args.example_shape else None
    if (args.url or args.token_file) and args.backend != "remote":
        raise DeployKitError("--url and --token-file go with --backend remote")
    remote = {"url": args.url, "token_file": args.token_file} if args.backend == "remote" else None
    if args.opset < 13:
        raise DeployKitError(f"--opset {args.opset} is too old: use 13 or later (default 17)")
    try:
        result = export_model(args.model, shape, args.out, format=args.format, precision=precision,
                              dynamic_batch=args.dynamic_batch, max_batch=args.max_batch, opset=args.opset,
                              device=args.device, threads=args.threads, data=args.data, checkpoint=args.checkpoint,
                              verify_inputs=args.verify_inputs, update_table=args.update_table,
                              simplify=not args.no_simplify, measure=not args.no_measure, seed=args.seed,
                              ort_style=args.ort_style, remote=remote,
                              log=(lambda msg: print(f"deploykit: {msg}", file=sys.stderr)) if args.verbose else None)
    except KeyboardInterrupt:
        print(f"deploykit: interrupted; {args.out} keeps the files already written: rerun the same command",
              file=sys.stderr)
        return 130
    m = result.manifest
    if not result.passed:
        print(f"deploykit: verification failed: {result.verification.summary()} is beyond the {result.verification.precision} "
              f"thresholds ({'; '.join(result.verification.worst.failures)}); see {result.out / 'manifest.json'}",
              file=sys.stderr)
        return 1
    for note in m["notes"]:
        print(f"deploykit: note: {note}", file=sys.stderr)
    lat = m.get("measured_latency_ms")
    pred = m.get("predicted_latency_ms")
    parts = [f"{result.artifact}", f"{m['precision']}", f"max_abs_error {m['max_abs_error']:.2e}"]
    if lat is not None:
        parts.append(f"measured {lat:.4f} ms")
    if pred is not None:
        parts.append(f"predicted {pred:.4f} ms" + (f" ({m['prediction_error']:+.1%})" if m.get("prediction_error") is not None
                                                   else ""))
    cmp = m.get("comparison") or {}
    if "latency_ratio_vs_pytorch_eager" in cmp:
        parts.append(f"{cmp['latency_ratio_vs_pytorch_eager']:.2f}x PyTorch eager latency")
    if "latency_ratio_vs_plain_onnx" in cmp:
        parts.append(f"{cmp['latency_ratio_vs_plain_onnx']:.2f}x plain ONNX latency")
    print("; ".join(parts))
    return 0
