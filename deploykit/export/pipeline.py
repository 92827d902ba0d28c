"""`export_model`: a network (an `nn.Module`, MODULE:FUNCTION, a TorchScript / torch.export / ONNX file) to the
artifact that ships, verified against the source and measured on the device against its predicted latency.

DIR/model.onnx              the simplified FP32 ONNX (every format starts from it)
DIR/model.fp16.onnx         --fp16 (onnx, ort): FP16 weights and compute, FP32 inputs and outputs
DIR/model.int8.onnx         --int8 (onnx, ort): QDQ INT8, entropy-calibrated on the user's images
DIR/model[.P].opt.onnx, .ort  --format ort: ONNX Runtime's offline optimisation, and the ORT format
DIR/model.P.engine          --format tensorrt (+ timing.cache, and model.int8.engine.calib for --int8)
DIR/manifest.json           hashes, input spec, opset, precision, device, predicted and measured latency, errors
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..errors import DeployKitError
from ..fileio import atomic_write
from . import convert
from .verify import Verification, compare, verification_inputs

FORMATS = ("onnx", "ort", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
MANIFEST_FORMAT = "deploykit-export-manifest"
MANIFEST_VERSION = 1
UPDATE_THRESHOLD = 0.10  # --update-table feeds a measurement back when the prediction missed it by more than this
COMPARE_ROUNDS = 3
SLOWER_MARGIN = 1.05  # "slower than the plain ONNX" past this latency ratio: closer is the machine's noise


class VerificationFailed(DeployKitError):
    """The artifact does not compute what the source model computes (exit 1; the manifest says which output)."""


@dataclass
class Source:
    label: str
    kind: str  # "module" | "function" | "torchscript" | "export" | "onnx"
    module: object = None  # torch module (None for ONNX sources)
    program: object = None  # torch.export program
    onnx_model: onnx.ModelProto | None = None
    sha256: str = ""


@dataclass
class ExportResult:
    out: Path
    artifact: Path
    manifest: dict
    verification: Verification
    files: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.verification.passed


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_shape(text: str) -> tuple[int, ...]:
    """`1,3,224,224` (or 1x3x224x224) -> a shape of positive dims."""
    from ..onnx_io import parse_shape as parse

    try:
        return parse(text)
    except DeployKitError as e:
        raise DeployKitError(f"--example-shape: {e}") from None


# -- sources -----------------------------------------------------------------------------------------------------------

def load_source(model, checkpoint=None) -> Source:
    """An nn.Module, an onnx.ModelProto, MODULE:FUNCTION, or a path to an .onnx / TorchScript / torch.export file."""
    import torch

    if isinstance(model, torch.nn.Module):
        return Source(type(model).__name__, "module", module=model.eval())
    if isinstance(model, onnx.ModelProto):
        return Source("<onnx.ModelProto>", "onnx", onnx_model=model, sha256=hashlib.sha256(model.SerializeToString()).hexdigest())
    spec = os.fspath(model)
    if Path(spec).suffix == ".onnx":
        from ..onnx_io import load_onnx

        if checkpoint is not None:
            raise DeployKitError("--checkpoint applies to MODULE:FUNCTION models only: an ONNX file carries its weights")
        return Source(spec, "onnx", onnx_model=load_onnx(spec), sha256=sha256_file(spec))
    from ..compress.loader import load_model

    loaded = load_model(spec, checkpoint=checkpoint)
    digest = sha256_file(spec) if Path(spec).is_file() else ""
    return Source(loaded.source, loaded.kind, module=loaded.module, program=loaded.program, sha256=digest)


def example_shape_for(source: Source, shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """The example shape: required for PyTorch models; for ONNX, the graph's own shape unless it has dynamic dims."""
    if source.onnx_model is None:
        if shape is None:
            raise DeployKitError(f"{source.label} is a PyTorch model, whose input shape is not recorded: pass "
                                 "--example-shape 1,C,H,W")
        return shape
    inits = {i.name for i in source.onnx_model.graph.initializer}
    inputs = [i for i in source.onnx_model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise DeployKitError(f"{source.label} has {len(inputs)} inputs: export handles single-input models")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in inputs[0].type.tensor_type.shape.dim]
    if shape is None:
        if any(d is None for d in dims):
            raise DeployKitError(f"input '{inputs[0].name}' of {source.label} has dynamic dims "
                                 f"[{','.join('?' if d is None else str(d) for d in dims)}]: pass --example-shape "
                                 + ",".join(str(d or (1 if i == 0 else 224)) for i, d in enumerate(dims)))
        return tuple(dims)
    if len(shape) != len(dims) or any(d is not None and d != s for d, s in zip(dims, shape)):
        raise DeployKitError(f"--example-shape {','.join(map(str, shape))} does not fit input '{inputs[0].name}' "
                             f"[{','.join('?' if d is None else str(d) for d in dims)}]: change only its dynamic dims")
    return shape


def _torch_outputs(module, x) -> list[np.ndarray]:
    """The module's outputs on `x` as float32 arrays (a tensor, or a tuple / list / dict of tensors)."""
    import torch

    with torch.no_grad():
        y = module(torch.from_numpy(x))
    if isinstance(y, dict):
        y = list(y.values())
    ys = list(y) if isinstance(y, (tuple, list)) else [y]
    if not ys or not all(isinstance(t, torch.Tensor) for t in ys):
        raise DeployKitError("the model returns something other than tensors: export needs forward() to return a tensor "
                             "or a tuple of tensors")
    return [t.detach().float().numpy() for t in ys]


def _check_runs(source: Source, shape: tuple[int, ...]) -> int:
    """Run the PyTorch model once on the example shape; returns how many outputs it has."""
    try:
        return len(_torch_outputs(source.module, np.zeros(shape, np.float32)))
    except DeployKitError:
        raise
    except Exception as e:  # any error of the user's forward: the shape does not fit the network
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DeployKitError(f"{source.label} does not run on an input of shape {','.join(map(str, shape))} "
                             f"({first[:160]}): pass the --example-shape the network was built for") from None


# -- the job -----------------------------------------------------------------------------------------------------------

def export_model(model, example_shape: tuple[int, ...] | None, out: str | os.PathLike, *, format: str = "onnx",
                 precision: str = "fp32", dynamic_batch: bool = False, max_batch: int = 8, opset: int = convert.DEFAULT_OPSET,
                 device: str | None = None, threads: int = 1, data=None, checkpoint=None, verify_inputs: int = 16,
                 update_table: bool = False, simplify: bool = True, measure: bool = True, seed: int = 0,
                 ort_style: str = "fixed", remote: dict | None = None, log=None) -> ExportResult:
    """Export, verify, measure and write `manifest.json` into `out`. `data`: images for INT8 calibration and
    verification (an (N, C, H, W) float32 array, or what `deploykit.data.load_dataset` reads: 'digits', an .npz,
    an image folder). `remote` ({"url", "token_file"}): measure on that device's agent (`deploykit agent serve`)
    instead of here. Raises DeployKitError for the user's mistakes; a failed verification is returned
    (`result.passed` False, manifest written) rather than raised, so the caller decides."""
    t_start = time.monotonic()
    log = log or (lambda msg: None)
    if format not in FORMATS:
        raise DeployKitError(f"unknown --format {format!r}: choose one of {', '.join(FORMATS)}")
    if precision not in PRECISIONS:
        raise DeployKitError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if max_batch < 1 or verify_inputs < 1 or threads < 1:
        raise DeployKitError("--max-batch, --verify-inputs and --threads must be at least 1")
    if remote is not None and format == "tensorrt" and measure:
        raise DeployKitError("--backend remote measures ONNX and ORT artifacts: build a TensorRT engine on its GPU "
                             "(run deploykit export there), or pass --no-measure")
    if format == "tensorrt":  # before any work: no TensorRT or no GPU is one line, not a half-written DIR
        from .tensorrt_engine import check_tensorrt

        check_tensorrt()
    source = load_source(model, checkpoint)
    shape = example_shape_for(source, tuple(example_shape) if example_shape is not None else None)
    calib_images, verify_images = _images(data, shape, seed)
    if precision == "int8" and calib_images is None:
        raise DeployKitError("--int8 calibrates on the user's images: pass --data (an image folder, an .npz, or digits)")
    if source.kind == "onnx" and dynamic_batch:
        raise DeployKitError("--dynamic-batch re-exports from PyTorch: give the PyTorch model, or an ONNX file whose "
                             "batch dim is already dynamic (without --dynamic-batch)")
    if source.program is not None and dynamic_batch:
        raise DeployKitError("a torch.export file fixes its batch size: export it with a dynamic batch Dim, or drop "
                             "--dynamic-batch")
    notes: list[str] = []
    files: dict[str, str] = {}
    here = _device(device, format, threads, notes, remote) if (measure or device is not None) else (None, None, None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # a manifest describes the files beside it: an earlier export's must not outlive this one's rewriting them
    (out / "manifest.json").unlink(missing_ok=True)

    # 1. ONNX (simplified, FP32)
    if source.onnx_model is None:
        n_out = _check_runs(source, shape)
        log("exporting to ONNX")
        exp = convert.export_torch(source.module, _tensor(np.zeros(shape, np.float32)), out / "model.raw.onnx",
                                   opset=opset, dynamic_batch=dynamic_batch, n_outputs=n_out, program=source.program)
        raw = onnx.load(exp.path)
        Path(exp.path).unlink()
        exporter = exp.to_dict()
        if exp.fallback_reason:
            notes.append(f"the TorchScript exporter failed ({exp.fallback_reason}): exported with the dynamo exporter")
    else:
        raw = source.onnx_model
        opset = next((o.version for o in raw.opset_import if o.domain in ("", "ai.onnx")), opset)
        exporter = {"exporter": "given", "opset": opset}
    if simplify:
        log("simplifying")
        plain, simp = convert.simplify(raw, shape)
        if simp.error:
            notes.append(f"onnx-simplifier: {simp.error}")
    else:
        plain, simp = raw, None
    files["onnx"] = str(atomic_write(out / "model.onnx", plain.SerializeToString()))
    source_quantized = convert.is_quantized(plain)
    if source_quantized and precision != "fp32":
        raise DeployKitError("the model is already quantized (QDQ): export it without --fp16 / --int8")
    effective = "int8" if source_quantized else precision

    # 2. precision and format
    model_for_format, stem = plain, "model"
    if format in ("onnx", "ort") and precision == "fp16":
        model_for_format, stem = convert.to_fp16(plain), "model.fp16"
        files["fp16"] = str(atomic_write(out / f"{stem}.onnx", model_for_format.SerializeToString()))
    elif format in ("onnx", "ort") and precision == "int8":
        from ..compress.quant import quantize_int8

        log("calibrating INT8")
        model_for_format, stem = quantize_int8(plain, calib_images[:256], method="entropy"), "model.int8"
        files["int8"] = str(atomic_write(out / f"{stem}.onnx", model_for_format.SerializeToString()))
    trt_build = ort_files = None
    if format == "onnx":
        artifact = Path(files.get(precision if precision != "fp32" else "onnx"))
    elif format == "ort":
        log("optimising for ONNX Runtime")
        ort_files = convert.ort_optimize(model_for_format, out, stem, style=ort_style)
        if ort_style == "fixed":
            notes.append("the .ort file has this CPU's layout optimisations baked in (style fixed): for another CPU "
                         "(a phone) export with --ort-style runtime")
        files.update(ort_optimized_onnx=ort_files.optimized_onnx, ort=ort_files.ort)
        artifact = Path(ort_files.ort)
    else:
        from .tensorrt_engine import build_engine_file

        log("building the TensorRT engine")
        trt_build = build_engine_file(files["onnx"], out / f"model.{precision}.engine", input_name=plain.graph.input[0].name,
                                      example_shape=shape, precision=precision, dynamic_batch=dynamic_batch,
                                      max_batch=max_batch, calibration=calib_images if precision == "int8" else None,
                                      timing_cache_path=out / "timing.cache")
        files["engine"] = trt_build.engine_path
        artifact = Path(trt_build.engine_path)
    files["artifact"] = str(artifact)

    # 3. verification against the source
    log("verifying")
    xs = verification_inputs(shape, verify_inputs, images=verify_images, seed=seed,
                             extra_batch=min(max_batch, 4) if dynamic_batch else None)
    reference = _reference(source, xs)
    names = [o.name for o in plain.graph.output]
    checks = {"onnx": compare(reference, _ort_outputs(plain, xs), names, "int8" if source_quantized else "fp32")}
    if format == "tensorrt":
        from .tensorrt_engine import run_engine

        checks["artifact"] = compare(reference, run_engine(artifact, xs), names, effective)
    elif str(artifact) != files["onnx"]:
        checks["artifact"] = compare(reference, _ort_outputs(artifact, xs), names, effective)
    verification = checks.get("artifact", checks["onnx"])
    passed = all(c.passed for c in checks.values())

    # 4. closed loop: measured on the device against the prediction
    loop = _closed_loop(source, plain, artifact, shape, format, effective, here, device, measure and passed, update_table,
                        notes, log)
    if not passed:
        notes.append("verification failed: not measured")
    manifest = {
        "format": MANIFEST_FORMAT, "format_version": MANIFEST_VERSION, "deploykit_version": _version(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "artifact": {"format": format, "path": artifact.name, "sha256": sha256_file(artifact),
                     "bytes": artifact.stat().st_size},
        "model_sha256": sha256_file(artifact),
        "source": {"model": source.label, "kind": source.kind, "sha256": source.sha256 or None,
                   "onnx_sha256": sha256_file(files["onnx"])},
        "input": {"name": plain.graph.input[0].name, "shape": list(shape), "dtype": "float32",
                  "dynamic_batch": dynamic_batch, "batch_range": [1, shape[0], max_batch] if dynamic_batch else None},
        "outputs": names, "opset": opset, "precision": effective, "exporter": exporter,
        "simplifier": simp.to_dict() if simp else None,
        "ort": ort_files.to_dict() if ort_files else None, "tensorrt": trt_build.to_dict() if trt_build else None,
        "verified": passed, "max_abs_error": verification.max_abs_error,
        "verification": {k: v.to_dict() for k, v in checks.items()},
        **loop,
        "files": {k: Path(v).name for k, v in files.items()}, "notes": notes,
        "seconds": round(time.monotonic() - t_start, 2),
    }
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=1, default=float))
    failed = next((c for c in checks.values() if not c.passed), None)
    return ExportResult(out, artifact, manifest, failed or verification, files)


def _version() -> str:
    from .. import __version__

    return __version__


def _tensor(x: np.ndarray):
    import torch

    return torch.from_numpy(x)


def _images(data, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(calibration images, verification images) as the model sees them: a dataset's training and held-out parts;
    a given array serves both."""
    if data is None:
        return None, None
    if isinstance(data, np.ndarray):
        calib = verify = data.astype(np.float32)
    else:
        from ..data import load_dataset

        if len(shape) != 4 or shape[2] != shape[3]:
            raise DeployKitError(f"--data needs a square image input 1,C,H,H; the example shape is {list(shape)}")
        split = load_dataset(data, shape[-1], seed=seed)
        calib, verify = split.train_x.numpy().astype(np.float32), split.val_x.numpy().astype(np.float32)
    if calib.ndim != len(shape) or tuple(calib.shape[1:]) != tuple(shape[1:]):
        raise DeployKitError(f"the data's images are {list(calib.shape[1:])}, the model's input {list(shape[1:])}: pass "
                             "data of the model's input size and channels")
    return calib, verify


def _reference(source: Source, xs: list[np.ndarray]) -> list[list[np.ndarray]]:
    if source.onnx_model is not None:  # the given graph, run as written (no runtime optimisation)
        return convert.run_session(convert.ort_session(source.onnx_model, level="none"), xs)
    return [_torch_outputs(source.module, x) for x in xs]


def _ort_outputs(model, xs: list[np.ndarray]) -> list[list[np.ndarray]]:
    return convert.run_session(convert.ort_session(model, level="all"), xs)


# -- measurement and prediction ---------------------------------------------------------------------------------------

def _closed_loop(source: Source, plain: onnx.ModelProto, artifact: Path, shape, format: str, precision: str, here,
                 device: str | None, measure: bool, update_table: bool, notes: list[str], log) -> dict:
    from ..onnx_io import InputSpec

    inputs = [InputSpec(plain.graph.input[0].name, tuple(shape), np.float32)]
    predictor, table_name, backend = here
    loop: dict = {"device": {"table": table_name, "fingerprint": backend.fingerprint() if backend else None},
                  "predicted_latency_ms": None, "measured_latency_ms": None, "measured": None,
                  "prediction_error": None, "comparison": None, "table_update": None}
    if predictor is not None:
        if precision == (predictor.device.get("precision") or "fp32"):
            pred = predictor.predict_onnx(plain, inputs, allow_missing=True)
            loop["predicted_latency_ms"] = pred.latency_ms
            if pred.missing:
                notes.append(f"{len(pred.missing)} nodes are not in the table's kernels and were left out of the "
                             f"prediction (first: {pred.missing[0]['name']} {pred.missing[0]['op_type']})")
        else:
            notes.append(f"table {table_name} holds {predictor.device.get('precision') or 'fp32'} kernels: no prediction "
                         f"for the {precision} artifact")
    if not measure or backend is None:
        return loop
    log("measuring")
    cmp = _compare(source, plain, artifact, inputs, format, precision, backend)
    loop["comparison"] = cmp
    loop["measured"] = cmp["artifact"]
    measured = loop["measured_latency_ms"] = cmp["artifact"]["latency_ms"]
    if cmp.get("slower_than_plain_onnx"):
        notes.append(f"the {format} artifact is slower than the plain ONNX of the same model "
                     f"({cmp['latency_ratio_vs_plain_onnx']:.2f}x its latency, median of {COMPARE_ROUNDS} alternating "
                     "rounds): ship model.onnx instead")
    if loop["predicted_latency_ms"] is not None:
        err = (loop["predicted_latency_ms"] - measured) / measured
        loop["prediction_error"] = err
        if update_table and abs(err) > UPDATE_THRESHOLD:
            from ..feedback import update_table as feed_back
            from ..protocol import MODEL_PROTOCOL

            log("feeding the measurement back into the table")
            plain_measured = backend.measure(plain, inputs, MODEL_PROTOCOL)
            loop["table_update"] = feed_back(device or table_name, plain, inputs, plain_measured, backend, progress=True)
        elif update_table:
            loop["table_update"] = {"skipped": f"prediction within {UPDATE_THRESHOLD:.0%} of the measurement"}
    elif update_table:
        loop["table_update"] = {"skipped": "no prediction to correct (no table for this device and precision)"}
    return loop


def _device(device: str | None, format: str, threads: int, notes: list[str], remote: dict | None = None):
    """(predictor or None, table name or None, backend measuring here or None).

    With `device`, its table's predictor, and its backend when the table's device is this machine. Without, the
    format's backend on this machine, and the predictor of a table (local or shipped) recorded on this very device.
    With `remote`, the device is the agent's: it must be the table's device, and measures there.
    """
    from ..fingerprint import mismatches
    from ..predictor import KernelPredictor
    from ..profilers import get_backend
    from ..searchcli import _local_backend
    from ..table import LatencyTable, local_tables, shipped_tables

    want = "tensorrt" if format == "tensorrt" else "ort-cpu"
    if remote is not None:
        predictor = KernelPredictor.for_device(device) if device is not None else None
        dev = predictor.device if predictor is not None else {}
        backend = get_backend("remote", threads=int(dev.get("threads") or threads), precision=dev.get("precision"),
                              url=remote["url"], token_file=remote["token_file"], device_backend=want)
        fp = backend.fingerprint()
        if predictor is not None:
            name = predictor.doc.get("table", device)
            diff = mismatches(predictor.device, fp)
            if diff:
                raise DeployKitError(f"the agent at {backend.url} is not the device of table {name} ({diff[0]}): point "
                                     "--url at that device, or pass its own table as --device")
            notes.append(f"measured on the agent at {backend.url}")
            return predictor, name, backend
        notes.append(f"measured on the agent at {backend.url}")
        device_fp = fp
    else:
        device_fp = None
    if device is not None and remote is None:
        predictor = KernelPredictor.for_device(device)
        name = predictor.doc.get("table", device)
        if predictor.device.get("backend") != want:
            raise DeployKitError(f"table {name} was measured with backend {predictor.device.get('backend')}, but a "
                                 f"{format} artifact runs on {want}: pass a {want} table as --device (deploykit profile "
                                 f"--backend {want}), or omit --device")
        backend, why_not = _local_backend(predictor.device)
        if backend is None:
            notes.append(f"device {name} is not this machine ({why_not}): predicted only, not measured")
            print(f"deploykit: warning: device {name} is not this machine ({why_not}): the artifact is predicted, not "
                  "measured", file=sys.stderr)
        return predictor, name, backend
    if device_fp is None:
        backend = get_backend(want, threads=threads)
    fp = device_fp or backend.fingerprint()
    for name, path in {**shipped_tables(), **local_tables()}.items():
        try:
            table = LatencyTable.load(path)
            if not mismatches(table.device, fp):
                notes.append(f"predicted with table {name}, recorded on " + ("the agent's device" if device_fp else "this device"))
                return KernelPredictor.for_device(str(path)), name, backend
        except DeployKitError:
            continue
    notes.append("no latency table for this device: measured, not predicted (deploykit profile builds one)")
    return None, None, backend


def _compare(source: Source, plain: onnx.ModelProto, artifact: Path, inputs, format: str, precision: str, backend) -> dict:
    """The artifact, the plain ONNX and (for a PyTorch source on the CPU) eager PyTorch, measured in alternation
    `COMPARE_ROUNDS` times: the machine's drift hits all alike. The median round of each is kept."""
    from ..compress.latency import measurement_dict
    from ..protocol import MODEL_PROTOCOL, alternate, round_ratio

    runners = {"artifact": _artifact_runner(artifact, inputs, format, backend)}
    if artifact.name != "model.onnx" and not (format == "tensorrt" and precision == "fp32"):  # else: the same thing
        runners["plain_onnx"] = lambda: backend.measure(plain, inputs, MODEL_PROTOCOL)
    if source.module is not None and format != "tensorrt" and source.kind != "export" and backend.name != "remote":
        torch_backend = _torch_cpu(backend.threads)
        runners["pytorch_eager"] = lambda: torch_backend.measure_module(source.module, _tensor(np.zeros(inputs[0].shape,
                                                                                                        np.float32)))
    median, every = alternate(runners, COMPARE_ROUNDS)
    out = {k: measurement_dict(m) for k, m in median.items()}
    out["rounds_ms"] = [{k: m.latency_ms for k, m in r.items()} for r in every]
    for k, label in (("plain_onnx", "vs_plain_onnx"), ("pytorch_eager", "vs_pytorch_eager")):
        if k in runners:
            out[f"latency_ratio_{label}"] = round_ratio(every, "artifact", k)
    if "plain_onnx" in runners:
        out["slower_than_plain_onnx"] = out["latency_ratio_vs_plain_onnx"] > SLOWER_MARGIN
    return out


def _artifact_runner(artifact: Path, inputs, format: str, backend):
    from ..protocol import MODEL_PROTOCOL

    if format == "tensorrt":
        from .tensorrt_engine import measure_engine

        return lambda: measure_engine(artifact, inputs[0].shape, MODEL_PROTOCOL)
    if artifact.suffix == ".ort" and backend.name == "remote":  # the agent takes ONNX: the same optimised graph
        model = onnx.load(str(artifact.with_suffix(".opt.onnx")))
        return lambda: backend.measure(model, inputs, MODEL_PROTOCOL)
    if artifact.suffix == ".ort":
        sess = convert.ort_session(artifact, backend.threads, level=backend.graph_optimization)
        return lambda: backend.measure_session(sess, inputs, MODEL_PROTOCOL)
    model = onnx.load(str(artifact))
    return lambda: backend.measure(model, inputs, MODEL_PROTOCOL)


def _torch_cpu(threads: int):
    from ..profilers import get_backend

    return get_backend("torch-cpu", threads=threads)
