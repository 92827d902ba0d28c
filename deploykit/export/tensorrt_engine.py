"""The TensorRT leg of export: a (simplified) ONNX file -> a serialized TensorRT engine file, and running it.

fp32, fp16, or int8 calibrated on the user's images (IInt8EntropyCalibrator2, FP16 as the fallback precision);
a fixed batch or a dynamic one (one optimisation profile, batch 1 .. max_batch); a timing cache that later builds
reuse. Written against the TensorRT 10.x Python API, and 8.6 where it agrees. Buffers are torch CUDA tensors (no
pycuda); binding, dtype mapping and the CUDA-event timer are the tensorrt profiler's (profilers/tensorrt.py).

Files beside the engine: `<engine>.timing` (the timing cache, unless a path is given), and for int8
`<engine>.calib` (TensorRT's calibration cache) with `<engine>.calib.key`, a digest of what the scales were
computed from (the ONNX file, the images, the batch shape, the TensorRT version). A rebuild reads the scales back
only when the digest still matches: a retrained model or new images written to the same engine path recalibrate
instead of silently reusing stale scales.
"""
from __future__ import annotations

import functools
import hashlib
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from deploykit.errors import DeployKitError
from deploykit.fileio import atomic_write
from deploykit.onnx_io import InputSpec
from deploykit.profilers.tensorrt import TensorRTBackend, _Bound, _Engine, _torch_dtype, _trt_major
from deploykit.protocol import MODEL_PROTOCOL, Measurement, Protocol, run_protocol

PRECISIONS = ("fp32", "fp16", "int8")
MIN_TENSORRT = (8, 6)  # name-based tensor API (set_input_shape, set_tensor_address, execute_async_v3)
_MISSING = ("exporting a TensorRT engine needs TensorRT and a CUDA GPU: pip install deploykit[tensorrt] on a machine "
            "with an NVIDIA GPU")
_NO_DATA = "--int8 calibrates on the user's images: pass --data"
_CALIB_DEVICE = "cuda"  # where calibration batches live; the fake-TensorRT tests feed them from host memory


def check_tensorrt() -> None:
    """Raise DeployKitError (one line naming the fix) when TensorRT or a CUDA GPU is missing, or TensorRT is too old."""
    try:
        TensorRTBackend.check_available()
    except DeployKitError:
        raise DeployKitError(_MISSING) from None
    import tensorrt as trt

    if _version(trt.__version__) < MIN_TENSORRT:
        raise DeployKitError(f"TensorRT {trt.__version__} is too old for deploykit export: pip install 'tensorrt>=8.6'")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:2])


def _one_line(text: object, limit: int = 300) -> str:
    """The first line of an error text (DeployKitError messages are one line)."""
    lines = str(text).strip().splitlines()
    return lines[0][:limit] if lines else ""


@dataclass
class EngineBuild:
    engine_path: str
    precision: str  # "fp32" | "fp16" | "int8"
    dynamic_batch: bool
    batch_range: tuple[int, int, int] | None  # (min, opt, max) batch of the optimisation profile; None: fixed batch
    timing_cache_path: str
    timing_cache_reused: bool  # an existing timing cache was loaded and accepted by TensorRT
    calibration_cache_path: str | None  # int8 only
    build_seconds: float  # parse + build + writes
    tensorrt_version: str
    calibration_cache_reused: bool = False  # int8: scales read back from calibration_cache_path, no image fed

    def to_dict(self) -> dict:
        d = asdict(self)
        d["batch_range"] = list(self.batch_range) if self.batch_range else None
        return d


def calibration_batches(images: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    """The user's (N, C, H, W) images as contiguous float32 batches of `batch`; the last partial batch is dropped.

    Checked when called, not at the first batch: fewer images than one batch is a DeployKitError naming how many
    are needed.
    """
    images = np.asarray(images)
    batch = int(batch)
    if batch < 1:
        raise DeployKitError(f"the int8 calibration batch must be >= 1, got {batch}")
    if images.ndim < 2:
        raise DeployKitError(f"calibration images must be an (N, C, H, W) array, got shape {images.shape}: "
                             "pass a folder of images with --data")
    if len(images) < batch:
        raise DeployKitError(f"int8 calibration needs at least {batch} images (one batch of {batch}), got "
                             f"{len(images)}: pass more images with --data")

    def batches() -> Iterator[np.ndarray]:
        for start in range(0, len(images) - batch + 1, batch):
            yield np.ascontiguousarray(images[start:start + batch], dtype=np.float32)

    return batches()


def build_engine_file(onnx_path, engine_path, *, input_name: str, example_shape: tuple[int, ...],
                      precision: str = "fp32", dynamic_batch: bool = False, max_batch: int = 8,
                      calibration: np.ndarray | None = None, calibration_batch: int = 8,
                      timing_cache_path=None, workspace_bytes: int = 1 << 30) -> EngineBuild:
    """Build a TensorRT engine from the ONNX file and write it (atomically) to `engine_path`.

    The batch is explicit. With `dynamic_batch` the engine has one optimisation profile: batch 1 .. `max_batch`,
    tuned for `example_shape` (the ONNX input's batch dim must be dynamic); otherwise it takes `example_shape` only.
    int8 calibrates on `calibration` ((N, C, H, W) float32 images, in batches of `calibration_batch`; an ONNX
    input with a fixed batch dim calibrates in batches of that size instead).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    example_shape = tuple(int(d) for d in example_shape)
    _check_request(onnx_path, example_shape, precision, dynamic_batch, max_batch, calibration, calibration_batch)
    check_tensorrt()
    import tensorrt as trt

    t0 = time.perf_counter()
    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise DeployKitError(f"TensorRT cannot parse {onnx_path.name} ({_first_parser_error(parser)}): simplify or "
                             "re-export the model, or export to ONNX only")
    net_inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    if input_name not in net_inputs:
        raise DeployKitError(f"{onnx_path.name} has no input '{input_name}' (its inputs: {', '.join(net_inputs)}): "
                             "name one of them")
    if precision == "int8" and len(net_inputs) != 1:
        raise DeployKitError(f"int8 calibration feeds images to one input, {onnx_path.name} has {len(net_inputs)} "
                             f"({', '.join(net_inputs)}): export fp16")
    for other, dims in net_inputs.items():
        if other != input_name and any(d < 0 for d in dims):
            raise DeployKitError(f"input '{other}' of {onnx_path.name} has dynamic dims {list(dims)}: deploykit builds "
                                 "engines whose only dynamic input is the image input; fix the others' shapes")
    net_shape = net_inputs[input_name]
    shapes = profile_shapes(input_name, net_shape, example_shape, dynamic_batch, max_batch)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if shapes is not None:
        _add_profile(builder, config, input_name, shapes)
    if precision in ("fp16", "int8"):  # fp16 is int8's fallback for layers without an int8 kernel
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise DeployKitError(f"TensorRT {trt.__version__} has no FP16 builder flag (strong typing only): convert "
                                 "the model to fp16 first, or export fp32")
        config.set_flag(trt.BuilderFlag.FP16)

    calibrator = None
    calib_path = engine_path.with_name(engine_path.name + ".calib") if precision == "int8" else None
    if precision == "int8":
        if not hasattr(trt.BuilderFlag, "INT8") or not hasattr(trt, "IInt8EntropyCalibrator2"):
            raise DeployKitError(f"TensorRT {trt.__version__} has no int8 calibration (explicit quantization only): "
                                 "export fp16, or quantize the model to a Q/DQ ONNX first")
        calib_shape = ((calibration_batch if net_shape[0] < 0 else net_shape[0]), *example_shape[1:])
        runtime_dims = any(d < 0 for d in net_shape)
        if runtime_dims and not hasattr(config, "set_calibration_profile"):
            calib_shape = example_shape  # TensorRT then calibrates at profile 0's opt shape
        key = _calibration_key(onnx_path, calibration, calib_shape, trt.__version__)
        calibrator = _entropy_calibrator(trt, calibration, calib_shape[0], calib_path, key)
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
        if runtime_dims and hasattr(config, "set_calibration_profile"):
            # calibration runs at one shape, the calibration profile's opt: our batch, not the build profile's
            calib_profile = _profile(builder, input_name, (calib_shape, calib_shape, calib_shape))
            if config.set_calibration_profile(calib_profile) is False:
                raise DeployKitError(f"TensorRT rejected the calibration shape {list(calib_shape)}: pass a smaller "
                                     "calibration batch")

    timing_path = Path(timing_cache_path) if timing_cache_path else engine_path.with_name(engine_path.name + ".timing")
    timing_reused = _attach_timing_cache(config, timing_path)

    serialized = builder.build_serialized_network(network, config)
    if calibrator is not None and calibrator.error:
        raise DeployKitError(f"int8 calibration failed ({_one_line(calibrator.error)}): check the images passed "
                             "with --data, or export fp16")
    if serialized is None:
        fix = "export fp32 or fp16" if precision == "int8" else "export fp32" if precision == "fp16" else \
            "simplify the model, or export to ONNX only"
        raise DeployKitError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above): {fix}")
    atomic_write(engine_path, bytes(serialized))
    cache = config.get_timing_cache()
    if cache is not None:
        atomic_write(timing_path, bytes(cache.serialize()))
    return EngineBuild(
        engine_path=str(engine_path), precision=precision, dynamic_batch=bool(dynamic_batch),
        batch_range=(shapes[0][0], shapes[1][0], shapes[2][0]) if dynamic_batch and shapes else None,
        timing_cache_path=str(timing_path), timing_cache_reused=timing_reused,
        calibration_cache_path=str(calib_path) if calib_path else None,
        build_seconds=time.perf_counter() - t0, tensorrt_version=trt.__version__,
        calibration_cache_reused=bool(calibrator is not None and calibrator.cache is not None and calibrator.fed == 0),
    )


def _check_request(onnx_path: Path, example_shape: tuple[int, ...], precision: str, dynamic_batch: bool,
                   max_batch: int, calibration, calibration_batch: int) -> None:
    """The arguments' own consistency, before TensorRT is needed."""
    if precision not in PRECISIONS:
        raise DeployKitError(f"unknown TensorRT precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if not onnx_path.is_file():
        raise DeployKitError(f"ONNX model not found: {onnx_path}: check the path")
    if not example_shape or any(d < 1 for d in example_shape):
        raise DeployKitError(f"bad example shape {list(example_shape)}: every dim must be a positive integer, "
                             "e.g. 1,3,224,224")
    if dynamic_batch and int(max_batch) < example_shape[0]:
        raise DeployKitError(f"the max batch ({max_batch}) is below the example batch ({example_shape[0]}): "
                             f"raise the max batch to at least {example_shape[0]}")
    if precision != "int8":
        return
    if calibration is None:
        raise DeployKitError(_NO_DATA)
    if int(calibration_batch) < 1:
        raise DeployKitError(f"the int8 calibration batch must be >= 1, got {calibration_batch}")
    shape = tuple(np.shape(calibration))
    if len(shape) != len(example_shape) or shape[1:] != example_shape[1:]:
        raise DeployKitError(f"calibration images have shape {list(shape)}, the model takes "
                             f"{['N', *example_shape[1:]]}: pass images at the model's input size with --data")
    if not np.all(np.isfinite(calibration)):
        raise DeployKitError("calibration images contain NaN or infinite values: check the images passed with --data")


def profile_shapes(name: str, net_shape: tuple[int, ...], example_shape: tuple[int, ...], dynamic_batch: bool,
                   max_batch: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """(min, opt, max) of the input's one optimisation profile, or None when the ONNX input is fully static.

    `net_shape` is the input as TensorRT parsed it (-1 for a dynamic dim).
    """
    if len(net_shape) != len(example_shape):
        raise DeployKitError(f"input '{name}' has {len(net_shape)} dims, the example shape {list(example_shape)} has "
                             f"{len(example_shape)}: give a {len(net_shape)}-dim shape")
    clash = [i for i, (d, e) in enumerate(zip(net_shape, example_shape)) if d >= 0 and d != e]
    if dynamic_batch and net_shape[0] >= 0:
        raise DeployKitError(f"a dynamic-batch engine needs an ONNX model with a dynamic batch dim; input '{name}' is "
                             f"fixed at {list(net_shape)}: re-export it with a dynamic batch axis "
                             "(torch.onnx.export(..., dynamic_axes={name: {0: 'batch'}}))")
    if clash:
        raise DeployKitError(f"the example shape {list(example_shape)} differs from the fixed dims of input '{name}' "
                             f"{list(net_shape)} at position {clash[0]}: change only its dynamic dims")
    if dynamic_batch:
        rest = example_shape[1:]
        return (1, *rest), example_shape, (int(max_batch), *rest)
    if any(d < 0 for d in net_shape):
        return example_shape, example_shape, example_shape
    return None


@functools.lru_cache(maxsize=None)
def _logger():
    """One logger for the process: TensorRT warns when builders and runtimes are given different ones."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def _network_flags(trt) -> int:
    if _trt_major(trt) < 10:  # explicit batch is a flag before TensorRT 10, the only mode from 10 on
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return 0


def _first_parser_error(parser) -> str:
    first = _one_line(parser.get_error(0)) if parser.num_errors else ""
    return first or "unknown parser error"


def _profile(builder, name: str, shapes):
    profile = builder.create_optimization_profile()
    try:
        profile.set_shape(name, *shapes)
    except (ValueError, TypeError, RuntimeError) as e:
        raise DeployKitError(f"TensorRT rejected the shapes {[list(s) for s in shapes]} for input '{name}' "
                             f"({_one_line(e)}): check the example shape and max batch") from None
    return profile


def _add_profile(builder, config, name: str, shapes) -> None:
    if config.add_optimization_profile(_profile(builder, name, shapes)) < 0:
        raise DeployKitError(f"TensorRT rejected the optimisation profile {[list(s) for s in shapes]} for input "
                             f"'{name}': check the example shape and max batch")


def _attach_timing_cache(config, path: Path) -> bool:
    """Load the timing cache at `path` when there is one TensorRT accepts (True), else start an empty one."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    except OSError as e:
        raise DeployKitError(f"cannot read the timing cache {path} ({type(e).__name__}): delete it or pass another "
                             "path") from None
    if data:
        try:
            cache = config.create_timing_cache(data)
        except (RuntimeError, ValueError, TypeError):  # damaged: rebuilt below
            cache = None
        # a cache from another GPU or TensorRT version is refused: start afresh rather than mix timings
        if cache is not None and config.set_timing_cache(cache, False):
            return True
    config.set_timing_cache(config.create_timing_cache(b""), False)
    return False


def _calibration_key(onnx_path: Path, images: np.ndarray, batch_shape: tuple[int, ...], trt_version: str) -> str:
    """What the int8 scales depend on: the model, the images, the shape they are fed at, the TensorRT version."""
    h = hashlib.sha256()
    with open(onnx_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(np.ascontiguousarray(images, dtype=np.float32))
    h.update(repr((tuple(np.shape(images)), tuple(batch_shape), trt_version)).encode())
    return h.hexdigest()


def _entropy_calibrator(trt, images: np.ndarray, batch: int, cache_path: Path, key: str):
    """An IInt8EntropyCalibrator2 feeding `images` from one torch buffer, its scales kept at `cache_path`.

    TensorRT calls these methods from C++ (noexcept): an exception must not cross back, so each callback records
    it in `error` and answers "no more data"; build_engine_file raises it after the build.
    """
    import torch

    key_path = cache_path.with_name(cache_path.name + ".key")
    batches = calibration_batches(images, batch)  # checked here: too few images fail before the build starts

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # pybind11 trampolines need the base initialised explicitly
            self.buffer: Any = None  # one torch tensor, refilled per batch; alive until the build ends
            self.fed = 0
            self.cache: bytes | None = None  # held: TensorRT reads it after read_calibration_cache returns
            self.error: str | None = None

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names):
            try:
                host = next(batches, None)
                if host is None:
                    return None
                if len(names) != 1:
                    raise ValueError(f"the calibrator feeds one input, TensorRT asks for {len(names)}: {names}")
                if self.buffer is None:
                    self.buffer = torch.empty(host.shape, dtype=torch.float32, device=_CALIB_DEVICE)
                self.buffer.copy_(torch.from_numpy(host))
                if self.buffer.is_cuda:
                    torch.cuda.synchronize()  # the copy is done before TensorRT reads the buffer on its own stream
                self.fed += 1
                return [int(self.buffer.data_ptr())]
            except Exception as e:  # noqa: BLE001 - reported after the build, see the class docstring
                self.error = f"{type(e).__name__}: {e}"
                return None

        def read_calibration_cache(self):
            try:
                if key_path.is_file() and key_path.read_text(encoding="utf-8").strip() == key and cache_path.is_file():
                    self.cache = cache_path.read_bytes() or None
                    return self.cache
            except Exception as e:  # noqa: BLE001
                self.error = f"cannot read the calibration cache {cache_path} ({type(e).__name__}: {e})"
            return None

        def write_calibration_cache(self, cache) -> None:
            try:
                data = bytes(cache)
                key_path.unlink(missing_ok=True)  # a crash between the two writes leaves no key: recalibrate
                atomic_write(cache_path, data)
                atomic_write(key_path, key + "\n")
            except Exception as e:  # noqa: BLE001
                self.error = f"cannot write the calibration cache {cache_path} ({type(e).__name__}: {e})"

    return EntropyCalibrator()


def load_engine(engine_path) -> _Engine:
    """Deserialize an engine file; every failure is one line naming the fix."""
    check_tensorrt()
    import tensorrt as trt

    path = Path(engine_path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DeployKitError(f"TensorRT engine not found: {path}: build it with deploykit export first") from None
    except OSError as e:
        raise DeployKitError(f"cannot read the TensorRT engine {path} ({type(e).__name__}): check the path") from None
    runtime = trt.Runtime(_logger())
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise DeployKitError(f"TensorRT {trt.__version__} cannot load {path} (built by another TensorRT version or "
                             "for another GPU, or damaged): rebuild it on this machine")
    return _Engine(runtime, engine)


def _io_names(engine) -> tuple[str, list[str]]:
    """The engine's one input, and its outputs in the engine's order."""
    import tensorrt as trt

    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    if len(inputs) != 1:
        raise DeployKitError(f"the engine has {len(inputs)} inputs ({', '.join(inputs)}); deploykit runs single-input "
                             "engines: export a model with one input")
    return inputs[0], [n for n in names if n not in inputs]


def _check_input_shape(engine, name: str, shape: tuple[int, ...]) -> None:
    declared = tuple(engine.get_tensor_shape(name))
    if len(declared) != len(shape) or any(d >= 0 and d != s for d, s in zip(declared, shape)):
        raise DeployKitError(f"the engine takes input '{name}' of shape {list(declared)}, got {list(shape)}: "
                             "feed that shape, or rebuild the engine for this one")
    if any(d < 0 for d in declared):
        lo, _, hi = (tuple(s) for s in engine.get_tensor_profile_shape(name, 0))
        if any(s < a or s > b for s, a, b in zip(shape, lo, hi)):
            raise DeployKitError(f"the engine takes input '{name}' from {list(lo)} to {list(hi)}, got {list(shape)}: "
                                 "feed a shape in that range, or rebuild with a larger max batch")


def run_engine(engine_path, inputs: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Run the engine on each input array (batch as given; set_input_shape per call for dynamic engines);
    returns, per input, the list of output arrays (float32 numpy, in the engine's output order).

    Integer and boolean outputs keep their type.
    """
    import torch

    loaded = load_engine(engine_path)
    engine = loaded.engine
    name, outputs = _io_names(engine)
    context = engine.create_execution_context()
    if context is None:
        raise DeployKitError("TensorRT could not create an execution context (out of GPU memory?): free GPU memory, "
                             "or rebuild with a smaller max batch")
    in_dtype = _torch_dtype(engine.get_tensor_dtype(name))
    stream = torch.cuda.Stream()
    results = []
    for x in inputs:
        x = np.ascontiguousarray(x)
        _check_input_shape(engine, name, tuple(x.shape))
        buffers = {name: torch.from_numpy(x).to("cuda", in_dtype)}
        if context.set_input_shape(name, tuple(x.shape)) is False:
            raise DeployKitError(f"TensorRT refused input shape {list(x.shape)} for '{name}': feed a shape the engine "
                                 "was built for")
        for out in outputs:  # output shapes are known once the input shape is set
            shape = tuple(context.get_tensor_shape(out))
            if any(d < 0 for d in shape):
                raise DeployKitError(f"output '{out}' has a data-dependent shape {list(shape)} that deploykit cannot "
                                     "bind: export a model with static output shapes")
            buffers[out] = torch.empty(shape, dtype=_torch_dtype(engine.get_tensor_dtype(out)), device="cuda")
        for tensor_name, t in buffers.items():
            context.set_tensor_address(tensor_name, t.data_ptr())
        torch.cuda.synchronize()  # the input was copied on the default stream
        if not context.execute_async_v3(stream.cuda_stream):
            raise DeployKitError("TensorRT failed to run the engine (see its log above): rebuild it fp32")
        stream.synchronize()
        results.append([_to_numpy(buffers[out]) for out in outputs])
    return results


def _to_numpy(t) -> np.ndarray:
    return (t.float() if t.is_floating_point() else t).cpu().numpy()


def measure_engine(engine_path, shape: tuple[int, ...], protocol: Protocol = MODEL_PROTOCOL) -> Measurement:
    """End-to-end latency of the engine on random input of `shape` (CUDA events), deploykit's timing protocol."""
    loaded = load_engine(engine_path)  # held: the engine lives as long as its runtime
    name, _ = _io_names(loaded.engine)
    shape = tuple(int(d) for d in shape)
    _check_input_shape(loaded.engine, name, shape)
    dtype = np.float32 if _torch_dtype(loaded.engine.get_tensor_dtype(name)).is_floating_point else np.int64
    bound = _Bound(loaded.engine, [InputSpec(name, shape, dtype)])
    m = run_protocol(bound.timer(), protocol)
    m.extra.update({"engine": str(engine_path), "shape": list(shape)})
    return m
