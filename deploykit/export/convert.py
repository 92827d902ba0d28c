"""The ONNX legs of export: PyTorch to ONNX at a pinned opset, the onnx-simplifier pass with its own check, FP16
conversion, and ONNX Runtime's offline graph optimisation with the `.ort` format for mobile builds."""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx

from ..errors import DeployKitError
from ..fileio import atomic_write

DEFAULT_OPSET = 17
INPUT_NAME = "input"


@contextlib.contextmanager
def captured_output() -> Iterator[list[str]]:
    """Everything written to stdout and stderr inside, by Python or by C++ (the exporters print graphs and warnings
    there), goes to a temporary file; the list yielded receives its text on exit, for error messages."""
    text: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(1), os.dup(2)
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield text
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            text.append(sink.read().decode("utf-8", "replace"))


def output_names(n: int) -> list[str]:
    return ["output"] if n == 1 else [f"output_{i}" for i in range(n)]


@dataclass
class TorchExport:
    path: str
    exporter: str  # "torchscript" or "dynamo" (torch.export-based), whichever produced the file
    opset: int
    outputs: list[str]
    seconds: float
    fallback_reason: str | None = None  # why the TorchScript exporter was not used

    def to_dict(self) -> dict:
        return asdict(self)


_UNSUPPORTED = re.compile(r"operator '([\w:.]+)' to ONNX opset version (\d+) is not supported")


def export_torch(module, example, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False,
                 n_outputs: int = 1, program=None) -> TorchExport:
    """`module` as ONNX at `path` (atomic), input named `input`, outputs `output` (or `output_i`).

    The TorchScript exporter goes first (its graphs are the ones the device predictor was fitted on); an op it has no
    conversion for sends the model through the torch.export-based exporter at the same opset. A torch.export
    `program` goes through the latter only. Both failing is the user's op, said in one line.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    names = output_names(n_outputs)
    axes = {n: {0: "batch"} for n in [INPUT_NAME, *names]} if dynamic_batch else None
    t0 = time.perf_counter()
    first_error = None
    if program is None:
        try:
            with captured_output(), torch.no_grad():
                torch.onnx.export(module, (example,), str(tmp), opset_version=opset, input_names=[INPUT_NAME],
                                  output_names=names, dynamic_axes=axes, dynamo=False, do_constant_folding=True)
            os.replace(tmp, path)
            return TorchExport(str(path), "torchscript", opset, names, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - any exporter failure: the dynamo exporter gets its turn
            first_error = e
            if isinstance(module, torch.jit.ScriptModule):  # the dynamo exporter cannot read TorchScript
                raise DeployKitError(_export_failure(e, opset)) from None
    try:
        kwargs = {}
        if dynamic_batch and program is None:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=1 << 16)},)
        with captured_output(), torch.no_grad():
            torch.onnx.export(program if program is not None else module, (example,), str(tmp), opset_version=opset,
                              input_names=[INPUT_NAME], output_names=names, dynamo=True, **kwargs)
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - both exporters failed: report the clearer message
        tmp.unlink(missing_ok=True)
        raise DeployKitError(_export_failure(first_error or e, opset)) from None
    return TorchExport(str(path), "dynamo", opset, names, time.perf_counter() - t0,
                       fallback_reason=_first_line(first_error) if first_error else None)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _export_failure(e: BaseException, opset: int) -> str:
    m = _UNSUPPORTED.search(str(e))
    if m:
        return (f"cannot export to ONNX: PyTorch has no ONNX conversion for {m.group(1)} at opset {m.group(2)}: "
                f"replace that op in the model (or try a higher --opset than {opset})")
    return f"cannot export to ONNX ({_first_line(e)}): simplify the model's forward, or try another --opset"


# -- onnx-simplifier -------------------------------------------------------------------------------------------------

@dataclass
class Simplification:
    applied: bool
    check_ok: bool | None  # onnxsim's own comparison of the simplified and original models on random inputs
    nodes_before: int
    nodes_after: int
    seconds: float
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def simplify(model: onnx.ModelProto, shape: tuple[int, ...], *, check_n: int = 3) -> tuple[onnx.ModelProto, Simplification]:
    """onnx-simplifier with its check on `check_n` random inputs of `shape`; a failed check or a simplifier error
    keeps the input model (recorded, never silent)."""
    import onnxsim

    before = len(model.graph.node)
    t0 = time.perf_counter()
    name = model.graph.input[0].name
    try:
        with captured_output():
            out, ok = onnxsim.simplify(model, check_n=check_n, test_input_shapes={name: list(shape)})
    except Exception as e:  # noqa: BLE001 - onnxsim raises many types; the unsimplified model is still valid
        return model, Simplification(False, None, before, before, time.perf_counter() - t0, _first_line(e))
    seconds = time.perf_counter() - t0
    if not ok:
        return model, Simplification(False, False, before, before, seconds, "onnxsim's check failed: kept the original")
    return out, Simplification(True, True, before, len(out.graph.node), seconds)


# -- precision ---------------------------------------------------------------------------------------------------------

def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and compute in FP16, inputs and outputs kept FP32 (callers feed and read float32)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with captured_output():
        return convert_float_to_float16(model, keep_io_types=True)


def is_quantized(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "QLinearConv", "ConvInteger", "MatMulInteger") for n in model.graph.node)


# -- ONNX Runtime offline optimisation and the ORT format ---------------------------------------------------------------

@dataclass
class OrtArtifacts:
    optimized_onnx: str  # the offline-optimised graph, still ONNX (portable optimisations only)
    ort: str             # the ORT-format file
    style: str           # "fixed" or "runtime", as ONNX Runtime's converter names them
    level: str           # optimisation level baked into the .ort
    nodes: int           # nodes of the optimised ONNX graph
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


ORT_STYLES = ("fixed", "runtime")


def ort_optimize(model: onnx.ModelProto, out_dir: Path, stem: str = "model", style: str = "fixed") -> OrtArtifacts:
    """`stem.opt.onnx` (ONNX Runtime's offline optimisation at the portable level `extended`, still ONNX) and
    `stem.ort` (the ORT format for mobile and minimal builds), atomically.

    style `fixed` bakes every optimisation into the .ort, including the layout (NCHWc) transforms of level `all`,
    which are what make convolutions fast on an x86 CPU but tie the file to CPUs with this one's instruction set.
    style `runtime` bakes in the portable level and records the layout optimisations as saved runtime
    optimisations, which a minimal build applies on the device (a phone's ARM CPU); a full build running that file
    on x86 does not apply them (measured here: about 3x slower than `fixed` on small convolutional networks).
    """
    import onnxruntime as ort

    if style not in ORT_STYLES:
        raise DeployKitError(f"unknown ORT optimisation style {style!r}: choose one of {', '.join(ORT_STYLES)}")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    levels = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    plan = [(".opt.onnx", "ONNX", "extended"), (".ort", "ORT", "all" if style == "fixed" else "extended")]
    files = {}
    with tempfile.TemporaryDirectory(prefix="deploykit-ort-", dir=out_dir) as tmp:
        for suffix, fmt, level in plan:
            target = Path(tmp) / f"{stem}{suffix}"
            so = ort.SessionOptions()
            so.graph_optimization_level = levels[level]
            so.optimized_model_filepath = str(target)
            so.log_severity_level = 3  # the "hardware specific optimizations" warning of style fixed is documented
            so.add_session_config_entry("session.save_model_format", fmt)
            if fmt == "ORT" and style == "runtime":
                so.add_session_config_entry("optimization.minimal_build_optimizations", "save")
            try:
                ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 - ORT's own exception types
                raise DeployKitError(f"ONNX Runtime cannot load the exported model ({_first_line(e)}): "
                                     "export with a supported --opset, or use --format onnx") from None
            files[suffix] = atomic_write(out_dir / target.name, target.read_bytes())
    nodes = len(onnx.load(str(files[".opt.onnx"])).graph.node)
    return OrtArtifacts(str(files[".opt.onnx"]), str(files[".ort"]), style, plan[1][2], nodes, time.perf_counter() - t0)


def ort_session(path_or_model, threads: int = 1, level: str = "all"):
    """An ONNX Runtime CPU session on an .onnx / .ort file or a ModelProto (the ORT format is read from the file)."""
    from deploykit.profilers.ort_cpu import make_session

    if isinstance(path_or_model, onnx.ModelProto):
        return make_session(path_or_model, threads, level=level)
    path = Path(path_or_model)
    return make_session(path.read_bytes(), threads, level=level, load_format="ORT" if path.suffix == ".ort" else None)


def run_session(sess, inputs: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Outputs of every input array (the session's outputs in order, float32)."""
    name = sess.get_inputs()[0].name
    return [[np.asarray(o, dtype=np.float32) for o in sess.run(None, {name: x})] for x in inputs]
