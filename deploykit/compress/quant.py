"""INT8 post-training static quantization (ONNX Runtime, QDQ format) with a per-layer mixed-precision policy.

`quantize_int8` calibrates on the user's images and writes a QDQ model; `mixed_precision` keeps the layers whose
quantization costs the most accuracy in float (the per-layer bit-width idea of DNQ, arXiv 1812.02375, restricted
to {INT8, float}) until the accuracy drop is within a bound. The quantizer itself is onnxruntime's.

Defaults measured here (ORT 1.31.1, 1 thread, AVX-512 VNNI x86-64, 2 shared cores), ResNet-style 32/64/128 at
1x3x32x32, float 0.88 ms: U8S8 per-channel 0.31 ms (2.9x), per-tensor and reduce_range the same speed, S8S8 0.78 ms
(1.1x), S8S8 + ActivationSymmetric 1.07 ms, U8U8 0.92 ms, Conv/Gemm/MatMul-only 0.33 ms, QDQKeepRemovableActivations
0.33 ms. Default: U8S8, per-channel (accuracy, free), no reduce_range (VNNI does not saturate), all op types. Biases the
exporter shares between layers left Convs unfused (0.76x, slower than float): `_unshare_biases` gives each its own.
"""
from __future__ import annotations

import contextlib
import io
import math
import numbers
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader

from deploykit.errors import DeployKitError

QUANTIZABLE_OP_TYPES = ("Conv", "Gemm", "MatMul")  # the layers the mixed-precision policy chooses between
_BIAS_OP_TYPES = ("Conv", "Gemm")  # input 2 is a bias the quantizer stores as int32 at input_scale * weight_scale
METHODS = ("minmax", "entropy", "percentile")


def _calibration_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    table = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}
    if method not in table:
        raise DeployKitError(f"unknown calibration method {method!r}: choose one of {', '.join(METHODS)}")
    return table[method]


def _as_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise DeployKitError(f"ONNX model {path} does not exist: pass a ModelProto or the path of an .onnx file")
    return onnx.load(str(path))


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _image_input(model: onnx.ModelProto) -> tuple[str, list[int | None]]:
    """Name and dims (None where symbolic) of the model's single image input."""
    inputs = _graph_inputs(model)
    if len(inputs) != 1:
        raise DeployKitError(f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}): "
                             "quantization here needs a single image input")
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def _check_images(images, dims: list[int | None], what: str) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 4 or len(arr) == 0 or not np.issubdtype(arr.dtype, np.floating):
        raise DeployKitError(f"{what} must be a non-empty float array N x C x H x W, got dtype {arr.dtype} shape {arr.shape}")
    if len(dims) == 4 and any(d is not None and d != s for d, s in zip(dims[1:], arr.shape[1:])):
        want = "x".join("?" if d is None else str(d) for d in dims[1:])
        raise DeployKitError(f"{what} are {'x'.join(map(str, arr.shape[1:]))} per image but the model takes {want}: "
                             "resize/normalise them as for training")
    return np.ascontiguousarray(arr, dtype=np.float32)


def name_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy in which every node has a unique name: nameless or repeated ones get `<op_type>_<index>` (graph order)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = {n.name for n in out.graph.node if n.name}
    seen: set[str] = set()
    for i, node in enumerate(out.graph.node):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        base = f"{node.op_type}_{i}"
        name, k = base, 1
        while name in taken or name in seen:
            name, k = f"{base}_{k}", k + 1
        node.name = name
        seen.add(name)
        taken.add(name)
    return out


def _unshare_biases(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give every Conv/Gemm a bias initializer of its own, in place.

    The TorchScript exporter dedups equal initializers (often through Identity nodes); a bias shared by two layers
    cannot be stored as int32 at each layer's scale, the quantizer then leaves those layers unfused (float Conv
    between Q/DQ) and the INT8 model is slower than the float one.
    """
    inits = {t.name: t for t in model.graph.initializer}
    graph_outputs = {o.name for o in model.graph.output}
    identity_of = {n.output[0]: n.input[0] for n in model.graph.node
                   if n.op_type == "Identity" and n.input and n.input[0] in inits and n.output[0] not in graph_outputs}
    for node in model.graph.node:
        if node.op_type in _BIAS_OP_TYPES and len(node.input) > 2 and node.input[2]:
            source = identity_of.get(node.input[2], node.input[2])
            if source in inits:
                private = numpy_helper.from_array(numpy_helper.to_array(inits[source]).copy(), f"{node.name}.bias")
                model.graph.initializer.append(private)
                node.input[2] = private.name
    used = {name for n in model.graph.node for name in n.input}
    dead = [n for n in model.graph.node if n.op_type == "Identity" and n.output[0] in identity_of and n.output[0] not in used]
    for node in dead:
        model.graph.node.remove(node)
    used = {name for n in model.graph.node for name in n.input} | graph_outputs
    for t in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(t)
    return model


def _prepare(model: onnx.ModelProto) -> onnx.ModelProto:
    """Named nodes (stable across calls: they are what float_nodes refer to) and private biases."""
    return _unshare_biases(name_nodes(model))


def quantizable_nodes(model: onnx.ModelProto | str | os.PathLike) -> list[str]:
    """Names (after `name_nodes`) of the Conv / Gemm / MatMul nodes the quantizer quantizes, in graph order."""
    named = name_nodes(_as_model(model))
    return [n.name for n in named.graph.node if n.op_type in QUANTIZABLE_OP_TYPES]


class ImageReader(CalibrationDataReader):
    """onnxruntime CalibrationDataReader over N x C x H x W images: one image per call, or `batch` per call when the
    model's batch dimension is fixed at `batch` (a remainder that does not fill a batch is left out)."""

    def __init__(self, images: np.ndarray, input_name: str, batch: int = 1):
        if batch < 1 or len(images) < batch:
            raise DeployKitError(f"calibration needs at least one full batch of {batch} images, got {len(images)}")
        self.images, self.input_name, self.batch = images, input_name, batch
        self._next = 0

    def __len__(self) -> int:
        return len(self.images) // self.batch

    def get_next(self) -> dict | None:
        if self._next >= len(self):
            return None
        start = self._next * self.batch
        self._next += 1
        return {self.input_name: self.images[start:start + self.batch]}

    def rewind(self) -> None:
        self._next = 0


def make_reader(model: onnx.ModelProto, images) -> ImageReader:
    """A calibration reader for `model`'s image input, batched as the model's batch dimension requires."""
    name, dims = _image_input(model)
    arr = _check_images(images, dims, "calibration images")
    batch = dims[0] if dims and dims[0] is not None else 1
    return ImageReader(arr, name, batch)


class _Int8Quantizer:
    """quantize_static on one prepared model, calibrating once: ranges are cached as JSON in a private temp dir and
    reused for every float_nodes policy (they depend on the model and the images only). Measured on the 4-layer test
    net, 256 images: a re-quantization takes 14-17 ms with the cache, 140 (minmax) to 260 ms (entropy) without."""

    def __init__(self, model: onnx.ModelProto, calib_images, *, method: str, per_channel: bool, reduce_range: bool,
                 extra_options: dict | None, cache_calibration: bool = True):
        self.method = _calibration_method(method)
        self.model = _prepare(_as_model(model))
        self.reader = make_reader(self.model, calib_images)
        self.per_channel, self.reduce_range = bool(per_channel), bool(reduce_range)
        self.extra_options = dict(extra_options or {})
        self.node_names = {n.name for n in self.model.graph.node}
        self._tmp = tempfile.TemporaryDirectory(prefix="deploykit-quant-")
        self._calls = 0
        # None: calibrate on every call (only to measure what the cache saves)
        self._cache_path = str(Path(self._tmp.name, "calibration.json")) if cache_calibration else None
        try:
            self._pre_processed = self._pre_process()
        except BaseException:
            self.close()
            raise

    def _pre_process(self) -> Path:
        """ORT's quantization pre-processing, shape inference only: graph optimisation would rename/fuse nodes and
        break float_nodes; the exporter has already folded BatchNorm."""
        from onnxruntime.quantization.shape_inference import quant_pre_process

        src, dst = Path(self._tmp.name, "prepared.onnx"), Path(self._tmp.name, "pre_processed.onnx")
        onnx.save(self.model, str(src))
        try:
            quant_pre_process(str(src), str(dst), skip_optimization=True)
        except Exception as e:  # symbolic shape inference fails on exotic ops: quantize_static infers shapes itself
            print(f"deploykit: quantization pre-processing skipped ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
            return src
        return dst

    def __enter__(self) -> _Int8Quantizer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._tmp.cleanup()

    def quantize(self, float_nodes: Iterable[str] = ()) -> onnx.ModelProto:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        float_nodes = list(dict.fromkeys(float_nodes))
        unknown = [n for n in float_nodes if n not in self.node_names]
        if unknown:
            raise DeployKitError(f"float_nodes names nodes the model does not have ({', '.join(unknown[:5])}): "
                                 "take names from quantizable_nodes(model)")
        self._calls += 1
        out = Path(self._tmp.name, f"int8_{self._calls}.onnx")
        self.reader.rewind()
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress to stdout
                quantize_static(
                    str(self._pre_processed), str(out), self.reader, quant_format=QuantFormat.QDQ,
                    per_channel=self.per_channel, reduce_range=self.reduce_range, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, nodes_to_exclude=float_nodes, calibrate_method=self.method,
                    extra_options=dict(self.extra_options), calibration_cache_path=self._cache_path)
        except (ValueError, RuntimeError, TypeError, KeyError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise DeployKitError(f"ONNX Runtime could not quantize the model ({first}): keep the failing layers in "
                                 "float with float_nodes, or export with opset >= 13") from None
        quantized = onnx.load(str(out))
        out.unlink()
        return quantized


def quantize_int8(model: onnx.ModelProto | str | os.PathLike, calib_images, *, method: str = "minmax",
                  per_channel: bool = True, float_nodes: Sequence[str] = (), reduce_range: bool = False,
                  extra_options: dict | None = None) -> onnx.ModelProto:
    """INT8 QDQ model (U8S8: uint8 activations, int8 weights) calibrated on `calib_images` (N x C x H x W float32,
    normalised as for training); `float_nodes` (names from `quantizable_nodes`) stay in float."""
    with _Int8Quantizer(model, calib_images, method=method, per_channel=per_channel, reduce_range=reduce_range,
                        extra_options=extra_options) as q:
        return q.quantize(float_nodes)


def _logits(model: onnx.ModelProto, images: np.ndarray) -> np.ndarray:
    """First output for each image, one image per run, on a 1-thread ORT CPU session."""
    from deploykit.profilers.ort_cpu import make_session

    name, dims = _image_input(model)
    if dims and dims[0] not in (None, 1):
        raise DeployKitError(f"the model has a fixed batch of {dims[0]}: export it with batch 1 to score it image by image")
    arr = _check_images(images, dims, "evaluation images")
    sess = make_session(model, threads=1)
    outputs = [sess.run(None, {name: arr[i:i + 1]})[0].reshape(-1) for i in range(len(arr))]
    return np.stack(outputs)


def _check_labels(images, labels) -> np.ndarray:
    y = np.asarray(labels).reshape(-1)
    if len(y) != len(images):
        raise DeployKitError(f"{len(images)} images but {len(y)} labels: pass one label per image")
    return y


def onnx_accuracy(model: onnx.ModelProto | str | os.PathLike, images, labels) -> float:
    """Top-1 accuracy in [0, 1] of an ONNX classifier (argmax of its first output), one image per run."""
    y = _check_labels(images, labels)
    return float(np.mean(_logits(_as_model(model), images).argmax(1) == y))


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|^2 / |ref - approx|^2)."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = float(np.sum((ref - np.asarray(approx, dtype=np.float64)) ** 2))
    return math.inf if noise == 0 else 10.0 * math.log10(float(np.sum(ref ** 2)) / noise)


@dataclass
class MixedPrecisionResult:
    model: onnx.ModelProto  # QDQ model, float_nodes kept in float
    float_nodes: list[str]
    float_accuracy: float
    int8_accuracy: float  # every quantizable layer in INT8
    accuracy: float  # of `model`
    drop: float  # float_accuracy - accuracy (a fraction: 0.01 = 1 point)
    met: bool  # drop <= max_drop
    max_drop: float
    sensitivity: dict[str, float] = field(default_factory=dict)  # node -> accuracy recovered when only it is float
    evaluations: int = 0  # quantized models built and scored
    steps: list[dict] = field(default_factory=list)  # greedy path: float_nodes count, node added, accuracy, drop
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """Everything but the model, JSON-ready."""
        return {"float_nodes": list(self.float_nodes), "float_accuracy": self.float_accuracy,
                "int8_accuracy": self.int8_accuracy, "accuracy": self.accuracy, "drop": self.drop, "met": self.met,
                "max_drop": self.max_drop, "sensitivity": dict(self.sensitivity), "evaluations": self.evaluations,
                "steps": [dict(s) for s in self.steps], "seconds": self.seconds}

    def summary(self) -> str:
        state = "met" if self.met else "NOT met"
        return (f"float {self.float_accuracy:.4f}, all-INT8 {self.int8_accuracy:.4f}, returned {self.accuracy:.4f} with "
                f"{len(self.float_nodes)} float layer(s): drop {self.drop * 100:.2f} points, bound "
                f"{self.max_drop * 100:.2f} {state} ({self.evaluations} evaluations, {self.seconds:.1f} s)")


def _within(drop: float, max_drop: float) -> bool:
    return drop <= max_drop + 1e-9  # accuracies are k/N: 0.97 - 0.96 must count as 0.01, not 0.0100000001


def mixed_precision(float_model: onnx.ModelProto | str | os.PathLike, calib_images, eval_images, eval_labels, *,
                    max_drop: float = 0.01, method: str = "minmax", per_channel: bool = True,
                    max_float_layers: int | None = None, progress: bool = True) -> MixedPrecisionResult:
    """Keep the fewest, most sensitive layers in float so that accuracy drops by at most `max_drop` (a fraction).

    Sensitivity of a layer = accuracy recovered (vs. all-INT8) when only that layer is kept in float. We use the
    recovery, not the drop of quantizing that layer alone, because it is exactly what the greedy step buys: the
    layer's error in the context of every other layer quantized, where upstream noise accumulates. Ties (accuracy
    is coarse on small sets) are broken by the logits' SQNR against the float model. Layers are then kept in float
    in that order, one at a time, re-quantizing and re-scoring each time, until the bound is met, the layers run out
    or `max_float_layers` is reached; if it is never met the best model seen is returned with met=False.
    """
    from tqdm import tqdm

    if isinstance(max_drop, bool) or not isinstance(max_drop, numbers.Real) or not math.isfinite(max_drop) or max_drop < 0:
        raise DeployKitError(f"max_drop must be a fraction >= 0 (0.01 = 1 point of accuracy), got {max_drop!r}")
    if max_float_layers is not None and (isinstance(max_float_layers, bool) or not isinstance(max_float_layers, int)
                                         or max_float_layers < 0):
        raise DeployKitError(f"max_float_layers must be None or an integer >= 0, got {max_float_layers!r}")
    t0 = time.perf_counter()
    model = _as_model(float_model)
    labels = _check_labels(eval_images, eval_labels)
    float_logits = _logits(model, eval_images)
    float_acc = float(np.mean(float_logits.argmax(1) == labels))

    with _Int8Quantizer(model, calib_images, method=method, per_channel=per_channel, reduce_range=False,
                        extra_options=None) as quantizer:
        evaluations = 0

        def score(nodes: list[str]) -> tuple[onnx.ModelProto, float, float]:
            nonlocal evaluations
            q = quantizer.quantize(nodes)
            logits = _logits(q, eval_images)
            evaluations += 1
            return q, float(np.mean(logits.argmax(1) == labels)), sqnr_db(float_logits, logits)

        int8_model, int8_acc, _ = score([])
        best = (int8_model, [], int8_acc)
        steps = [{"float_layers": 0, "added": None, "accuracy": int8_acc, "drop": float_acc - int8_acc}]
        sensitivity: dict[str, float] = {}
        layers = [n.name for n in quantizer.model.graph.node if n.op_type in QUANTIZABLE_OP_TYPES]
        limit = len(layers) if max_float_layers is None else min(max_float_layers, len(layers))
        if not _within(float_acc - int8_acc, max_drop) and limit > 0:
            tie_break: dict[str, float] = {}
            bar = tqdm(layers, desc="quant sensitivity", disable=not progress, leave=False, file=sys.stderr)
            for name in bar:
                _, acc, sqnr = score([name])
                sensitivity[name], tie_break[name] = acc - int8_acc, sqnr
            order = sorted(layers, key=lambda n: (-sensitivity[n], -tie_break[n], layers.index(n)))
            chosen: list[str] = []
            bar = tqdm(order[:limit], desc="quant float layers", disable=not progress, leave=False, file=sys.stderr)
            for name in bar:
                chosen.append(name)
                q, acc, _ = score(list(chosen))
                steps.append({"float_layers": len(chosen), "added": name, "accuracy": acc, "drop": float_acc - acc})
                if acc > best[2]:  # strictly better: among equals, fewer float layers wins
                    best = (q, list(chosen), acc)
                if _within(float_acc - acc, max_drop):
                    break
            bar.close()

    model_out, float_nodes, acc = best
    drop = float_acc - acc
    return MixedPrecisionResult(model=model_out, float_nodes=float_nodes, float_accuracy=float_acc, int8_accuracy=int8_acc,
                                accuracy=acc, drop=drop, met=_within(drop, max_drop), max_drop=float(max_drop),
                                sensitivity=sensitivity, evaluations=evaluations, steps=steps,
                                seconds=time.perf_counter() - t0)


def measure_speedup(float_model: onnx.ModelProto | str | os.PathLike, int8_model: onnx.ModelProto | str | os.PathLike,
                    backend, input_shape: Sequence[int]) -> dict:
    """Median latency of both models on `backend` (a Backend, or a name: 1 thread) and speedup = float / int8."""
    from deploykit.onnx_io import InputSpec

    if isinstance(backend, str):
        from deploykit.profilers import get_backend

        backend = get_backend(backend, threads=1)
    shape = tuple(int(d) for d in input_shape)
    measured = {}
    for key, m in (("float", _as_model(float_model)), ("int8", _as_model(int8_model))):
        name, _ = _image_input(m)
        measured[key] = backend.measure(m, [InputSpec(name, shape, np.float32)])
    float_ms, int8_ms = measured["float"].latency_ms, measured["int8"].latency_ms
    return {"float_ms": float_ms, "int8_ms": int8_ms, "speedup": float_ms / int8_ms if int8_ms > 0 else math.inf,
            "input_shape": list(shape), "backend": getattr(backend, "name", type(backend).__name__),
            "float": measured["float"].to_dict(), "int8": measured["int8"].to_dict()}


def refuse_if_slower(float_ms: float, int8_ms: float, device_name: str) -> None:
    """Raise DeployKitError when the INT8 model is not faster than its float input on the device."""
    if int8_ms >= float_ms:
        raise DeployKitError(f"the INT8 model is slower than its input on {device_name} ({int8_ms:.3f} ms vs "
                             f"{float_ms:.3f} ms): keep the float model, or quantize fewer layers")
