"""The TensorRT leg of `deploykit export` (deploykit/export/tensorrt_engine.py).

Everywhere: the pure pieces (calibration batches, argument checks, profile shapes), the one-line error without
TensorRT, and the build logic driven through a small fake `tensorrt` module that records what it is asked (it checks
our orchestration, not TensorRT's API). With TensorRT and a CUDA GPU (marked tensorrt, skipped cleanly otherwise):
real engines, fp32 / fp16 / int8 against the torch model, dynamic batch, timing and calibration cache reuse.
"""
from __future__ import annotations

import ctypes
import importlib.util
import json
import math
import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from deploykit import zoo
from deploykit.errors import DeployKitError
from deploykit.export import tensorrt_engine as te
from deploykit.protocol import Protocol

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
HAS_CUDA = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_trt = pytest.mark.skipif(not (HAS_CUDA and HAS_TRT), reason="needs TensorRT and a CUDA GPU")
without_trt = pytest.mark.skipif(HAS_CUDA and HAS_TRT, reason="TensorRT and a CUDA GPU are here")
QUICK = Protocol(warmup_runs=5, warmup_s=0.1, rounds=3, round_s=0.05, min_runs_per_round=5, max_rounds=5, tolerance=0.2)
HW = 32


def _images(n: int, seed: int = 0, hw: int = HW) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, hw, hw)).astype(np.float32)


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert text and "\n" not in text, text
    return text


def _relu_onnx(path, batch) -> str:
    """A one-node graph whose input batch dim is fixed (an int) or dynamic (a name)."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 8, 8])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["output"], name="relu")], "relu", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return str(path)


# ---- the pure pieces -------------------------------------------------------------------------------------------

def test_calibration_batches_are_contiguous_float32_and_drop_the_partial_one():
    images = _images(21).astype(np.float64)[:, :, ::2, ::2]  # float64 and strided: both must be fixed
    batches = list(te.calibration_batches(images, 8))
    assert len(batches) == 2
    for i, b in enumerate(batches):
        assert b.shape == (8, 3, HW // 2, HW // 2) and b.dtype == np.float32 and b.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(b, images[i * 8:(i + 1) * 8].astype(np.float32))
    assert len(list(te.calibration_batches(_images(16), 8))) == 2
    assert len(list(te.calibration_batches(_images(3), 1))) == 3


def test_calibration_batches_need_one_full_batch_and_say_how_many():
    with pytest.raises(DeployKitError, match=r"at least 8 images .*got 5.*--data") as err:
        te.calibration_batches(_images(5), 8)  # raised at the call, before any batch is asked for
    _one_line(err)
    with pytest.raises(DeployKitError, match="batch must be >= 1"):
        te.calibration_batches(_images(5), 0)
    with pytest.raises(DeployKitError, match=r"\(N, C, H, W\)"):
        te.calibration_batches(np.zeros(5, np.float32), 1)


@pytest.mark.parametrize("kwargs,match", [
    ({"precision": "int4"}, "unknown TensorRT precision 'int4'"),
    ({"precision": "int8"}, "^--int8 calibrates on the user's images: pass --data$"),
    ({"precision": "int8", "calibration": _images(16, hw=16)}, "calibration images have shape"),
    ({"precision": "int8", "calibration": _images(16), "calibration_batch": 0}, "batch must be >= 1"),
    ({"precision": "int8", "calibration": np.full((16, 3, HW, HW), np.nan, np.float32)}, "NaN or infinite"),
    ({"dynamic_batch": True, "max_batch": 2}, r"max batch \(2\) is below the example batch \(4\)"),
    ({"example_shape": (4, 3, 0, HW)}, "bad example shape"),
])
def test_bad_requests_fail_before_tensorrt_is_needed(tmp_path, kwargs, match):
    args = {"input_name": "input", "example_shape": (4, 3, HW, HW), **kwargs}
    with pytest.raises(DeployKitError, match=match) as err:
        te.build_engine_file(_relu_onnx(tmp_path / "m.onnx", "batch"), tmp_path / "m.engine", **args)
    _one_line(err)


def test_missing_onnx_file_is_one_line(tmp_path):
    with pytest.raises(DeployKitError, match="ONNX model not found") as err:
        te.build_engine_file(tmp_path / "nope.onnx", tmp_path / "m.engine", input_name="input", example_shape=(1, 3, 8, 8))
    _one_line(err)


def test_profile_shapes():
    ex = (2, 3, 8, 8)
    assert te.profile_shapes("x", (2, 3, 8, 8), ex, False, 8) is None  # fully static: no profile
    assert te.profile_shapes("x", (-1, 3, 8, 8), ex, False, 8) == (ex, ex, ex)
    assert te.profile_shapes("x", (-1, 3, 8, 8), ex, True, 6) == ((1, 3, 8, 8), ex, (6, 3, 8, 8))
    assert te.profile_shapes("x", (-1, 3, -1, -1), ex, True, 6) == ((1, 3, 8, 8), ex, (6, 3, 8, 8))
    with pytest.raises(DeployKitError, match="dynamic batch axis"):
        te.profile_shapes("x", (2, 3, 8, 8), ex, True, 8)
    with pytest.raises(DeployKitError, match="at position 1"):
        te.profile_shapes("x", (-1, 1, 8, 8), ex, False, 8)
    with pytest.raises(DeployKitError, match="has 3 dims"):
        te.profile_shapes("x", (-1, 8, 8), ex, False, 8)


def test_engine_build_to_dict_is_json():
    b = te.EngineBuild("m.engine", "int8", True, (1, 2, 8), "m.engine.timing", False, "m.engine.calib", 1.5, "10.3.0")
    d = json.loads(json.dumps(b.to_dict()))
    assert d["batch_range"] == [1, 2, 8] and d["calibration_cache_reused"] is False and d["precision"] == "int8"


@without_trt
def test_without_tensorrt_every_entry_point_says_what_to_install(tmp_path):
    onnx_path = _relu_onnx(tmp_path / "m.onnx", 1)
    calls = [te.check_tensorrt,
             lambda: te.build_engine_file(onnx_path, tmp_path / "m.engine", input_name="input", example_shape=(1, 3, 8, 8)),
             lambda: te.run_engine(tmp_path / "m.engine", [np.zeros((1, 3, 8, 8), np.float32)]),
             lambda: te.measure_engine(tmp_path / "m.engine", (1, 3, 8, 8))]
    for call in calls:
        with pytest.raises(DeployKitError, match=r"needs TensorRT and a CUDA GPU: pip install deploykit\[tensorrt\]") as err:
            call()
        _one_line(err)
    assert not (tmp_path / "m.engine").exists()


# ---- the build logic against a fake tensorrt module ---------------------------------------------------------------

def _fake_tensorrt(version: str = "10.3.0", parse_ok: bool = True, build_ok: bool = True) -> types.ModuleType:
    """Just enough of `tensorrt` for build_engine_file; `trt.log` records what was asked of it.

    Its builder calibrates like TensorRT: it asks for the cache, and without one reads batches of the calibration
    shape from the pointers get_batch returns (host memory here) until there are none, then writes a cache.
    """
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    log: dict = {"profiles": [], "flags": set(), "calibration_profile": None, "fed": [], "builds": 0, "timing_loaded": None}
    trt.log = log
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity: None})
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    trt.IInt8EntropyCalibrator2 = type("IInt8EntropyCalibrator2", (), {"__init__": lambda self: None})

    class Network:
        def __init__(self):
            self.inputs: list = []

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            if not parse_ok:
                self.num_errors = 1
                return False
            for inp in onnx.load(path).graph.input:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in inp.type.tensor_type.shape.dim)
                self.network.inputs.append(types.SimpleNamespace(name=inp.name, shape=dims))
            return True

        def get_error(self, i):
            return "In node 0 (parseGraph): UNSUPPORTED_NODE: no importer for op Foo\nsecond line of the error"

    class Profile:
        def __init__(self):
            self.shapes: dict = {}

        def set_shape(self, name, lo, opt, hi):
            if not all(1 <= a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise ValueError("need 1 <= min <= opt <= max")
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return memoryview(b"fake-timing-cache")

    class Config:
        def __init__(self):
            self.int8_calibrator, self.timing = None, None

        def set_memory_pool_limit(self, pool, size):
            log["workspace"] = (pool, size)

        def set_flag(self, flag):
            log["flags"].add(flag)

        def add_optimization_profile(self, profile):
            log["profiles"].append(profile.shapes)
            return len(log["profiles"]) - 1

        def set_calibration_profile(self, profile):
            log["calibration_profile"] = profile.shapes
            return True

        def create_timing_cache(self, data):
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            if cache.data and cache.data != b"fake-timing-cache":
                return False  # another device's cache
            self.timing, log["timing_loaded"] = cache, cache.data
            return True

        def get_timing_cache(self):
            return self.timing

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            log["network_flags"] = flags
            self.network = Network()
            return self.network

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            log["builds"] += 1
            calibrator = config.int8_calibrator
            if calibrator is not None and calibrator.read_calibration_cache() is None:
                name = network.get_input(0).name
                shape = (log["calibration_profile"][name][1] if log["calibration_profile"]
                         else network.get_input(0).shape)
                while (ptrs := calibrator.get_batch([name])):
                    raw = ctypes.string_at(ptrs[0], int(np.prod(shape)) * 4)
                    log["fed"].append(np.frombuffer(raw, np.float32).reshape(shape).copy())
                calibrator.write_calibration_cache(memoryview(b"TRT-fake-EntropyCalibration2\n"))
            return memoryview(b"fake-engine") if build_ok else None

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    return trt


@pytest.fixture
def fake_trt(monkeypatch):
    """Install a fake tensorrt (see _fake_tensorrt); call it again with other options to replace it."""
    def install(**options):
        trt = _fake_tensorrt(**options)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        te._logger.cache_clear()
        return trt

    monkeypatch.setattr(te, "check_tensorrt", lambda: None)
    monkeypatch.setattr(te, "_CALIB_DEVICE", "cpu")
    yield install
    te._logger.cache_clear()  # never leave a fake logger behind for a real TensorRT


def test_fake_fp32_static_build_writes_engine_and_reuses_timing_cache(tmp_path, fake_trt):
    trt = fake_trt()
    onnx_path, engine = _relu_onnx(tmp_path / "m.onnx", 1), tmp_path / "out" / "m.engine"
    first = te.build_engine_file(onnx_path, engine, input_name="input", example_shape=(1, 3, 8, 8), workspace_bytes=1 << 20)
    assert engine.read_bytes() == b"fake-engine"
    assert first.timing_cache_path == str(engine) + ".timing" and not first.timing_cache_reused
    assert (tmp_path / "out" / "m.engine.timing").read_bytes() == b"fake-timing-cache"
    assert trt.log["profiles"] == [] and trt.log["flags"] == set() and trt.log["network_flags"] == 0
    assert trt.log["workspace"] == ("WORKSPACE", 1 << 20)
    assert first.batch_range is None and first.calibration_cache_path is None and first.tensorrt_version == "10.3.0"
    second = te.build_engine_file(onnx_path, engine, input_name="input", example_shape=(1, 3, 8, 8))
    assert second.timing_cache_reused and trt.log["timing_loaded"] == b"fake-timing-cache"

    shared = tmp_path / "shared.cache"
    shared.write_bytes(b"a cache from another GPU")
    third = te.build_engine_file(onnx_path, engine, input_name="input", example_shape=(1, 3, 8, 8), timing_cache_path=shared)
    assert not third.timing_cache_reused and third.timing_cache_path == str(shared)
    assert shared.read_bytes() == b"fake-timing-cache"  # replaced by this device's cache


def test_fake_explicit_batch_flag_before_tensorrt_10(tmp_path, fake_trt):
    trt = fake_trt(version="8.6.1")
    te.build_engine_file(_relu_onnx(tmp_path / "m.onnx", 1), tmp_path / "m.engine", input_name="input",
                         example_shape=(1, 3, 8, 8))
    assert trt.log["network_flags"] == 1  # 1 << EXPLICIT_BATCH


def test_fake_profiles_for_dynamic_and_fixed_batch(tmp_path, fake_trt):
    trt = fake_trt()
    onnx_path = _relu_onnx(tmp_path / "m.onnx", "batch")
    b = te.build_engine_file(onnx_path, tmp_path / "d.engine", input_name="input", example_shape=(2, 3, 8, 8),
                             dynamic_batch=True, max_batch=6, precision="fp16")
    assert trt.log["profiles"] == [{"input": ((1, 3, 8, 8), (2, 3, 8, 8), (6, 3, 8, 8))}]
    assert b.batch_range == (1, 2, 6) and b.dynamic_batch and trt.log["flags"] == {"FP16"}
    trt = fake_trt()
    b = te.build_engine_file(onnx_path, tmp_path / "s.engine", input_name="input", example_shape=(2, 3, 8, 8))
    assert trt.log["profiles"] == [{"input": ((2, 3, 8, 8),) * 3}] and b.batch_range is None


def test_fake_int8_calibrates_keeps_the_cache_and_reuses_it_only_for_the_same_data(tmp_path, fake_trt):
    trt = fake_trt()
    onnx_path, engine = _relu_onnx(tmp_path / "m.onnx", "batch"), tmp_path / "m.engine"
    images = np.random.default_rng(0).standard_normal((20, 3, 8, 8)).astype(np.float32)
    args = {"input_name": "input", "example_shape": (1, 3, 8, 8), "precision": "int8", "dynamic_batch": True,
            "calibration": images, "calibration_batch": 8}
    first = te.build_engine_file(onnx_path, engine, **args)
    assert trt.log["flags"] == {"INT8", "FP16"}
    assert trt.log["calibration_profile"] == {"input": ((8, 3, 8, 8),) * 3}  # our batch, not the build profile's
    assert len(trt.log["fed"]) == 2  # 20 images: two batches of 8, the partial one dropped
    np.testing.assert_array_equal(np.concatenate(trt.log["fed"]), images[:16])
    assert first.calibration_cache_path == str(engine) + ".calib" and not first.calibration_cache_reused
    assert (tmp_path / "m.engine.calib").read_bytes() == b"TRT-fake-EntropyCalibration2\n"
    assert (tmp_path / "m.engine.calib.key").is_file()

    trt = fake_trt()
    again = te.build_engine_file(onnx_path, engine, **args)
    assert again.calibration_cache_reused and trt.log["fed"] == []

    trt = fake_trt()
    new_images = te.build_engine_file(onnx_path, engine, **{**args, "calibration": images[::-1].copy()})
    assert not new_images.calibration_cache_reused and len(trt.log["fed"]) == 2  # new data: recalibrated


def test_fake_int8_on_a_fixed_batch_calibrates_at_that_batch(tmp_path, fake_trt):
    trt = fake_trt()
    images = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    te.build_engine_file(_relu_onnx(tmp_path / "m.onnx", 1), tmp_path / "m.engine", input_name="input",
                         example_shape=(1, 3, 8, 8), precision="int8", calibration=images, calibration_batch=8)
    assert trt.log["calibration_profile"] is None and len(trt.log["fed"]) == 5  # batches of the ONNX's batch, 1


def test_fake_int8_with_too_few_images_fails_before_building(tmp_path, fake_trt):
    trt = fake_trt()
    with pytest.raises(DeployKitError, match="at least 8 images") as err:
        te.build_engine_file(_relu_onnx(tmp_path / "m.onnx", "batch"), tmp_path / "m.engine", input_name="input",
                             example_shape=(1, 3, 8, 8), precision="int8", calibration=_images(3, hw=8))
    _one_line(err)
    assert trt.log["builds"] == 0


@pytest.mark.parametrize("options,kwargs,match", [
    ({"parse_ok": False}, {}, r"cannot parse m\.onnx \(In node 0 .*no importer for op Foo\): simplify"),
    ({"build_ok": False}, {"precision": "fp16"}, "could not build an engine from m.onnx .*: export fp32"),
    ({}, {"input_name": "image"}, "has no input 'image' .*input"),
    ({}, {"dynamic_batch": True}, "re-export it with a dynamic batch axis"),
    ({}, {"example_shape": (2, 3, 8, 8)}, "differs from the fixed dims"),
])
def test_fake_failures_are_one_line_and_write_nothing(tmp_path, fake_trt, options, kwargs, match):
    fake_trt(**options)
    args = {"input_name": "input", "example_shape": (1, 3, 8, 8), **kwargs}
    with pytest.raises(DeployKitError, match=match) as err:
        te.build_engine_file(_relu_onnx(tmp_path / "m.onnx", 1), tmp_path / "m.engine", **args)
    _one_line(err)
    assert not (tmp_path / "m.engine").exists()


# ---- real TensorRT engines ------------------------------------------------------------------------------------

def _sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - got) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)


@pytest.fixture(scope="module")
def conv_net(tmp_path_factory):
    """A tiny conv net (conv-bn-relu, strided conv, pooling, linear) as ONNX with a dynamic batch, and its torch self."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10),
    ).eval()
    path = tmp_path_factory.mktemp("trt") / "conv.onnx"
    with torch.no_grad():
        torch.onnx.export(net, (torch.randn(2, 3, HW, HW),), str(path), opset_version=17, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          dynamo=False)
    return path, net


def _reference(net, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
@pytest.mark.parametrize("precision,min_db", [("fp32", 40.0), ("fp16", 30.0), ("int8", 15.0)])
def test_trt_engine_matches_the_torch_model(conv_net, tmp_path, precision, min_db):
    onnx_path, net = conv_net
    engine = tmp_path / f"conv_{precision}.engine"
    # int8: the calibration batch (8) lies outside this fixed-batch build's profile (4): calibration runs at its own
    # calibration profile, independent of the build profile
    build = te.build_engine_file(onnx_path, engine, input_name="input", example_shape=(4, 3, HW, HW),
                                 precision=precision, calibration=_images(64, seed=1) if precision == "int8" else None)
    assert engine.stat().st_size > 0 and build.precision == precision and build.build_seconds > 0
    assert (build.calibration_cache_path is not None) == (precision == "int8")
    x = _images(4, seed=2)
    [[out]] = te.run_engine(engine, [x])
    assert out.shape == (4, 10) and out.dtype == np.float32
    assert _sqnr_db(_reference(net, x), out) > min_db  # signal-to-noise, not "it ran"


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
def test_trt_dynamic_batch_runs_every_batch_in_range(conv_net, tmp_path):
    onnx_path, net = conv_net
    engine = tmp_path / "dyn.engine"
    build = te.build_engine_file(onnx_path, engine, input_name="input", example_shape=(2, 3, HW, HW),
                                 dynamic_batch=True, max_batch=8)
    assert build.dynamic_batch and build.batch_range == (1, 2, 8)
    xs = [_images(b, seed=b) for b in (1, 5, 8)]
    for x, [out] in zip(xs, te.run_engine(engine, xs)):
        assert out.shape == (len(x), 10) and _sqnr_db(_reference(net, x), out) > 40.0
    with pytest.raises(DeployKitError, match=r"from \[1, 3, 32, 32\] to \[8, 3, 32, 32\], got \[9") as err:
        te.run_engine(engine, [_images(9)])
    _one_line(err)
    m = te.measure_engine(engine, (8, 3, HW, HW), QUICK)
    assert math.isfinite(m.latency_ms) and 0 < m.latency_ms < 1000 and m.extra["shape"] == [8, 3, HW, HW]


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
def test_trt_timing_cache_is_saved_and_reused(conv_net, tmp_path):
    onnx_path, _ = conv_net
    cache = tmp_path / "caches" / "timing.cache"
    first = te.build_engine_file(onnx_path, tmp_path / "a.engine", input_name="input", example_shape=(1, 3, HW, HW),
                                 precision="fp16", timing_cache_path=cache)
    assert not first.timing_cache_reused and cache.stat().st_size > 0
    second = te.build_engine_file(onnx_path, tmp_path / "b.engine", input_name="input", example_shape=(1, 3, HW, HW),
                                  precision="fp16", timing_cache_path=cache)
    assert second.timing_cache_reused and second.timing_cache_path == str(cache)


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
def test_trt_int8_calibration_cache_is_reused_for_the_same_images(conv_net, tmp_path):
    onnx_path, net = conv_net
    engine = tmp_path / "q.engine"
    args = {"input_name": "input", "example_shape": (1, 3, HW, HW), "precision": "int8", "dynamic_batch": True,
            "max_batch": 16, "calibration": _images(48, seed=3), "calibration_batch": 16}
    first = te.build_engine_file(onnx_path, engine, **args)
    assert not first.calibration_cache_reused and (tmp_path / "q.engine.calib").stat().st_size > 0
    second = te.build_engine_file(onnx_path, engine, **args)
    assert second.calibration_cache_reused
    x = _images(4, seed=4)
    [[out]] = te.run_engine(engine, [x])
    assert _sqnr_db(_reference(net, x), out) > 15.0
    third = te.build_engine_file(onnx_path, engine, **{**args, "calibration": _images(48, seed=5)})
    assert not third.calibration_cache_reused


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
def test_trt_fixed_batch_onnx_refuses_a_dynamic_batch_engine(tmp_path):
    onnx_path = zoo.export_onnx(zoo.build("mobilenet_v2", num_classes=10, width=0.25), (1, 3, HW, HW), tmp_path / "m.onnx")
    with pytest.raises(DeployKitError, match="dynamic batch axis") as err:
        te.build_engine_file(onnx_path, tmp_path / "m.engine", input_name="input", example_shape=(1, 3, HW, HW),
                             dynamic_batch=True)
    _one_line(err)
