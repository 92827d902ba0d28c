"""GPU backends (torch-cuda, tensorrt) on a small zoo network; skipped cleanly without a GPU / TensorRT.

The TensorRT layer-name mapping is plain string work and is tested everywhere.
"""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import onnx
import pytest

from deploykit import zoo
from deploykit.onnx_io import input_specs, random_feeds
from deploykit.profilers import get_backend
from deploykit.profilers.tensorrt import trt_layer_sources
from deploykit.protocol import Protocol

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
QUICK = Protocol(warmup_runs=5, warmup_s=0.1, rounds=3, round_s=0.05, min_runs_per_round=5, max_rounds=5, tolerance=0.2)
HAS_CUDA = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
needs_trt = pytest.mark.skipif(not (HAS_CUDA and HAS_TRT), reason="needs TensorRT and a CUDA GPU")


@pytest.fixture(scope="module")
def small_net(tmp_path_factory) -> onnx.ModelProto:
    path = tmp_path_factory.mktemp("gpu") / "mobilenet_v2.onnx"
    return onnx.load(zoo.export_onnx(zoo.build("mobilenet_v2", num_classes=100, width=0.5), (1, 3, 64, 64), path))


def _check_profile(model: onnx.ModelProto, profile, band: tuple[float, float]) -> None:
    compute = {n.name for n in model.graph.node if n.op_type not in ("Constant", "Identity")}
    covered = {s for layer in profile.layers for s in layer.source_nodes}
    assert profile.layers and all(layer.latency_ms >= 0 for layer in profile.layers)
    assert {n for n in compute if "Conv" in n} <= covered  # every conv is timed somewhere
    assert band[0] <= profile.sum_ratio <= band[1], profile.to_dict()


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("name,runtime", [
    pytest.param("torch-cuda", "torch", marks=needs_cuda),
    pytest.param("tensorrt", "tensorrt", marks=[pytest.mark.tensorrt, needs_trt]),
])
def test_gpu_backend_measures_network_and_layers(small_net, name, runtime, precision):
    backend = get_backend(name, precision=precision)
    specs = input_specs(small_net)
    m = backend.measure(small_net, specs, QUICK)
    assert math.isfinite(m.latency_ms) and 0 < m.latency_ms < 1000
    profile = backend.measure_layers(small_net, specs, m)
    _check_profile(small_net, profile, (0.3, 3.0))
    fp = backend.fingerprint()
    assert fp["runtime"] == runtime and fp["precision"] == precision
    if name == "torch-cuda":
        assert fp["gpu_name"] and fp["cuda_version"]


@pytest.mark.gpu
@needs_cuda
def test_torch_cuda_fp32_matches_ort(small_net):
    import onnxruntime as ort

    from deploykit.onnx_torch import onnx_to_torch

    feeds = random_feeds(input_specs(small_net))
    ref = ort.InferenceSession(small_net.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    module = onnx_to_torch(small_net).cuda()
    with torch.inference_mode():
        got = module(torch.from_numpy(feeds["input"]).cuda()).cpu().numpy()
    assert np.abs(got - ref).max() <= 1e-2 * max(1.0, np.abs(ref).max())  # TF32 convolutions may be on


@pytest.mark.gpu
@needs_cuda
def test_torch_cuda_measure_module_leaves_the_callers_module_alone():
    module = zoo.build("resnet18", num_classes=10, width=0.25)
    m = get_backend("torch-cuda", precision="fp16").measure_module(module, torch.randn(1, 3, 32, 32), QUICK)
    assert 0 < m.latency_ms < 1000
    p = next(module.parameters())
    assert p.device.type == "cpu" and p.dtype == torch.float32


def test_trt_layer_names_map_to_onnx_nodes():
    nodes = [("/0/Conv", ["a"]), ("/0/Relu", ["b"]), ("/0/Conv_1", ["c"]), ("/1/0/Conv", ["d"]), ("/2/Add", ["e"]),
             ("/3/Gemm", ["out"])]
    assert trt_layer_sources("/0/Conv + /0/Relu", nodes) == ["/0/Conv", "/0/Relu"]
    assert trt_layer_sources("/0/Conv_1", nodes) == ["/0/Conv_1"]  # not also "/0/Conv"
    assert trt_layer_sources("PWN(/0/Relu)", nodes) == ["/0/Relu"]
    assert trt_layer_sources("/1/0/Conv", nodes) == ["/1/0/Conv"]  # not "/0/Conv" inside it
    assert trt_layer_sources("{ForeignNode[/0/Conv_1.../3/Gemm]}", nodes) == ["/0/Conv_1", "/1/0/Conv", "/2/Add", "/3/Gemm"]
    assert trt_layer_sources("Reformatting CopyNode for Input Tensor 0 to /2/Add", nodes) == ["/2/Add"]
    assert trt_layer_sources("out", nodes) == ["/3/Gemm"]  # by output tensor name
    assert trt_layer_sources("input_reformatter", nodes) == []
