"""ONNX -> torch conversion checked against ONNX Runtime, and the torch-cpu backend (GPU backends: their refusal here)."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from deploykit import zoo
from deploykit.errors import DeployKitError
from deploykit.kernels import Kernel
from deploykit.onnx_io import input_specs, random_feeds
from deploykit.onnx_torch import onnx_to_torch
from deploykit.profilers import get_backend
from deploykit.protocol import Protocol

pytestmark = pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
QUICK = Protocol(warmup_runs=2, warmup_s=0.05, rounds=3, round_s=0.05, min_runs_per_round=3, max_rounds=5, tolerance=0.2)
RNG = np.random.default_rng(0)


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the reference, not a fused variant
    so.log_severity_level = 3  # deprecated-attribute warnings are expected for the old-mode cases
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def assert_matches_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray] | None = None, rel: float = 1e-4) -> None:
    """Outputs of the converted module equal ONNX Runtime's within `rel` of the output scale."""
    feeds = feeds if feeds is not None else random_feeds(input_specs(model))
    module = onnx_to_torch(model)
    with torch.inference_mode():
        got = module(*(torch.from_numpy(feeds[n]) for n in module.input_names))
    got = got if isinstance(got, tuple) else (got,)
    for ref, out in zip(_ort(model, feeds), got, strict=True):
        out = out.numpy()
        assert out.shape == ref.shape
        scale = max(1.0, float(np.abs(ref).max()))
        assert float(np.abs(out.astype(np.float64) - ref).max()) <= rel * scale


def graph(nodes, inputs: dict[str, list[int]], outputs: list[str], inits: dict[str, np.ndarray] | None = None,
          opset: int = 17) -> onnx.ModelProto:
    """A float model from nodes; initializers keep their numpy dtypes."""
    g = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in (inits or {}).items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def node(op: str, inputs: list[str], outputs: list[str] | str = "y", **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [outputs] if isinstance(outputs, str) else outputs, **attrs)


def w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- networks


@pytest.fixture(scope="module")
def zoo_onnx(tmp_path_factory) -> dict[str, onnx.ModelProto]:
    d = tmp_path_factory.mktemp("zoo")
    return {name: onnx.load(zoo.export_onnx(zoo.build(name), (1, 3, 64, 64), d / f"{name}.onnx"))
            for name in zoo.list_models()}


def test_zoo_networks_match_ort(zoo_onnx):
    for name, model in zoo_onnx.items():
        assert_matches_ort(model)


KERNELS = [
    Kernel.make("conv", cin=8, cout=16, h=12, k=3, s=2, act="relu6"),
    Kernel.make("conv", cin=8, cout=16, h=12, k=1, act="silu"),
    Kernel.make("dwconv", cin=16, h=12, k=5, act="hardswish"),
    Kernel.make("dwconv", cin=16, h=12, k=3, d=2, act="relu"),
    Kernel.make("gconv", cin=16, cout=32, g=4, h=10, k=3, act="sigmoid"),
    Kernel.make("add", c=8, h=6),
    Kernel.make("mul", c=8, h=6, bcast="channel"),
    Kernel.make("concat", c=4, h=6, n=3),
    Kernel.make("shuffle", c=12, h=5, g=3),
    Kernel.make("maxpool", c=8, h=11, k=3, s=2),
    Kernel.make("avgpool", c=8, h=10, k=2, s=2),
    Kernel.make("avgpool", c=8, h=9, k=3, s=1),
    Kernel.make("gap", c=8, h=7),
    Kernel.make("se", c=16, h=6, r=4, gate="hardsigmoid"),
    Kernel.make("se", c=16, h=6, r=8, gate="sigmoid"),
    Kernel.make("linear", cin=32, cout=10),
    Kernel.make("resize", c=4, h=5, mode="nearest"),
    Kernel.make("resize", c=4, h=5, mode="linear"),
]


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.key)
def test_kernel_graphs_match_ort(kernel):
    assert_matches_ort(kernel.build_onnx())


# ---------------------------------------------------------------------------------------------- hand-made graphs


def _resize(mode, ctm, *, scales=None, sizes=None, nearest="floor", shape=(1, 3, 8, 10)):
    inputs = ["x", "", "scales" if scales is not None else "", "sizes" if sizes is not None else ""]
    inits = {"scales": f32(*scales)} if scales is not None else {"sizes": i64(*sizes)}
    return graph([node("Resize", inputs, mode=mode, coordinate_transformation_mode=ctm, nearest_mode=nearest)],
                 {"x": list(shape)}, ["y"], inits)


HAND_MADE = {
    "conv_asym_pads_dilation_groups": graph(
        [node("Conv", ["x", "w", "b"], pads=[1, 0, 2, 1], strides=[2, 1], dilations=[1, 2], group=2)],
        {"x": [1, 4, 9, 10]}, ["y"], {"w": w(6, 2, 3, 3), "b": w(6)}),
    "conv_same_upper": graph([node("Conv", ["x", "w"], auto_pad="SAME_UPPER", strides=[2, 2])],
                             {"x": [1, 3, 8, 7]}, ["y"], {"w": w(4, 3, 3, 3)}),
    "conv1d": graph([node("Conv", ["x", "w"], pads=[2, 2])], {"x": [1, 3, 16]}, ["y"], {"w": w(5, 3, 5)}),
    "conv_transpose": graph([node("ConvTranspose", ["x", "w", "b"], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1])],
                            {"x": [1, 4, 5, 6]}, ["y"], {"w": w(4, 3, 3, 3), "b": w(3)}),
    "conv_transpose_asym": graph([node("ConvTranspose", ["x", "w"], strides=[2, 2], pads=[0, 1, 1, 0])],
                                 {"x": [1, 4, 5, 6]}, ["y"], {"w": w(4, 2, 3, 3)}),
    "batchnorm_relu": graph([node("BatchNormalization", ["x", "s", "b", "m", "v"], "t", epsilon=1e-3), node("Relu", ["t"])],
                            {"x": [2, 5, 4, 4]}, ["y"],
                            {"s": w(5), "b": w(5), "m": w(5), "v": np.abs(w(5)) + 0.5}),
    "resize_nearest_asymmetric_x2": _resize("nearest", "asymmetric", scales=[1, 1, 2, 2]),
    "resize_linear_pytorch_half_pixel_x2": _resize("linear", "pytorch_half_pixel", scales=[1, 1, 2, 2]),
    "resize_linear_half_pixel_down": _resize("linear", "half_pixel", scales=[1, 1, 0.5, 0.5]),
    "resize_linear_align_corners_sizes": _resize("linear", "align_corners", sizes=[1, 3, 13, 17]),
    "resize_nearest_half_pixel_round_floor_down": _resize("nearest", "half_pixel", scales=[1, 1, 0.5, 0.5],
                                                          nearest="round_prefer_floor"),
    "resize_nearest_pytorch_half_pixel_ceil_sizes": _resize("nearest", "pytorch_half_pixel", sizes=[1, 3, 12, 15],
                                                            nearest="round_prefer_ceil"),
    "resize_linear_asymmetric_x1.5": _resize("linear", "asymmetric", scales=[1, 1, 1.5, 1.5]),
    "resize_nearest_align_corners_sizes": _resize("nearest", "align_corners", sizes=[1, 3, 5, 21], nearest="round_prefer_ceil"),
    "pad_constant_asym": graph([node("Pad", ["x", "p", "v"])], {"x": [1, 2, 5, 6]}, ["y"],
                               {"p": i64(0, 0, 1, 2, 0, 0, 3, 0), "v": f32(1.5)[0]}),
    "pad_crop_negative": graph([node("Pad", ["x", "p"])], {"x": [1, 2, 5, 6]}, ["y"], {"p": i64(0, 0, -1, 2, 0, 0, 1, -2)}),
    "pad_reflect": graph([node("Pad", ["x", "p"], mode="reflect")], {"x": [1, 2, 5, 6]}, ["y"], {"p": i64(0, 0, 1, 2, 0, 0, 2, 1)}),
    "pad_edge": graph([node("Pad", ["x", "p"], mode="edge")], {"x": [1, 2, 5, 6]}, ["y"], {"p": i64(0, 0, 1, 2, 0, 0, 2, 1)}),
    "concat": graph([node("Concat", ["a", "b", "c"], axis=1)], {"a": [1, 2, 3, 3], "b": [1, 4, 3, 3], "c": [1, 1, 3, 3]}, ["y"]),
    "channel_shuffle_zero_minus_one": graph(
        [node("Reshape", ["x", "s1"], "t1"), node("Transpose", ["t1"], "t2", perm=[0, 2, 1, 3, 4]), node("Reshape", ["t2", "s2"])],
        {"x": [2, 6, 3, 4]}, ["y"], {"s1": i64(0, 2, 3, 3, -1), "s2": i64(0, -1, 3, 4)}),
    "gemm_transA_alpha_beta": graph([node("Gemm", ["a", "b", "c"], alpha=0.5, beta=2.0, transA=1)],
                                    {"a": [6, 3]}, ["y"], {"b": w(6, 5), "c": w(1, 5)}),
    "gemm_runtime_b": graph([node("Gemm", ["a", "b"], transB=1)], {"a": [3, 6], "b": [5, 6]}, ["y"]),
    "matmul_batched": graph([node("MatMul", ["a", "b"])], {"a": [2, 3, 4, 5]}, ["y"], {"b": w(5, 7)}),
    "clip_runtime_bounds": graph([node("Clip", ["x", "lo", "hi"])], {"x": [2, 3, 4], "lo": [], "hi": []}, ["y"]),
    "clip_max_only": graph([node("Clip", ["x", "", "hi"])], {"x": [2, 3, 4]}, ["y"], {"hi": f32(0.25)[0]}),
    "clip_opset6_attrs": graph([node("Clip", ["x"], min=-0.5, max=0.5)], {"x": [2, 3, 4]}, ["y"], opset=6),
    "hardsigmoid_default": graph([node("HardSigmoid", ["x"])], {"x": [2, 3, 4]}, ["y"]),
    "hardsigmoid_mobilenet": graph([node("HardSigmoid", ["x"], alpha=1 / 6, beta=0.5)], {"x": [2, 3, 4]}, ["y"]),
    "hardswish_leakyrelu_tanh": graph([node("HardSwish", ["x"], "a"), node("LeakyRelu", ["a"], "b", alpha=0.2), node("Tanh", ["b"])],
                                      {"x": [2, 3, 4]}, ["y"]),
    "avgpool_asym_exclude_pad": graph([node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 1, 0])],
                                      {"x": [1, 2, 7, 8]}, ["y"]),
    "avgpool_include_pad_ceil": graph([node("AveragePool", ["x"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                            count_include_pad=1, ceil_mode=1)], {"x": [1, 2, 8, 8]}, ["y"]),
    "avgpool_exclude_pad_sym": graph([node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])], {"x": [1, 2, 6, 6]}, ["y"]),
    "maxpool_asym_dilated": graph([node("MaxPool", ["x"], kernel_shape=[2, 3], strides=[1, 2], pads=[1, 0, 0, 2], dilations=[2, 1])],
                                  {"x": [1, 2, 7, 8]}, ["y"]),
    "global_pools": graph([node("GlobalMaxPool", ["x"], "a"), node("GlobalAveragePool", ["x"], "b"), node("Sub", ["a", "b"])],
                          {"x": [2, 3, 5, 4]}, ["y"]),
    "broadcast_arith": graph([node("Sub", ["x", "c"], "a"), node("Div", ["a", "d"], "b"), node("Mul", ["b", "x"], "e"), node("Add", ["e", "c"])],
                             {"x": [2, 3, 4]}, ["y"], {"c": w(3, 1), "d": np.abs(w(4)) + 1}),
    "shape_glue_flatten": graph(
        [node("Shape", ["x"], "s"), node("Gather", ["s", "zero"], "n", axis=0), node("Unsqueeze", ["n", "ax0"], "n1"),
         node("Concat", ["n1", "minus1"], "shape", axis=0), node("Reshape", ["x", "shape"], "f"), node("Softmax", ["f"], axis=-1)],
        {"x": [2, 3, 4, 5]}, ["y"], {"zero": np.array(0, dtype=np.int64), "ax0": i64(0), "minus1": i64(-1)}),
    "slice_split_reduce": graph(
        [node("Slice", ["x", "st", "en", "ax", "sp"], "a"), node("Split", ["a", "sizes"], ["p", "q"], axis=1),
         node("ReduceMean", ["p"], "m", axes=[1, 2, 3], keepdims=1), node("Mul", ["q", "m"], "r"),
         node("Squeeze", ["r", "sq"])],
        {"x": [1, 5, 6, 9]}, ["y"], {"st": i64(-1, 1), "en": i64(-100, 8), "ax": i64(3, 2), "sp": i64(-2, 3),
                                     "sizes": i64(2, 3), "sq": i64(0)}, opset=17),
    "split_equal_three": graph([node("Split", ["x"], ["a", "b", "c"], axis=2, num_outputs=3), node("Concat", ["c", "a", "b"], axis=2)],
                               {"x": [1, 2, 8]}, ["y"], opset=18),
    "flatten_axis2_identity_dropout": graph([node("Flatten", ["x"], "a", axis=2), node("Identity", ["a"], "b"), node("Dropout", ["b"])],
                                            {"x": [2, 3, 4, 5]}, ["y"]),
    "opset11_glue": graph([node("Unsqueeze", ["x"], "a", axes=[0, -1]), node("Squeeze", ["a"], "b", axes=[0]),
                           node("Softmax", ["b"], "c", axis=1), node("ReduceSum", ["c"], "d", axes=[3], keepdims=0),
                           node("Slice", ["x", "st", "en", "ax"], "e"), node("Concat", ["d", "e"], axis=2)],
                          {"x": [2, 3, 4]}, ["y"], {"st": i64(1), "en": i64(3), "ax": i64(2)}, opset=11),
    "opset9_pad_slice": graph([node("Pad", ["x"], "a", pads=[0, 1, 0, 0, 2, 1], value=0.5),
                               node("Slice", ["a"], starts=[1], ends=[-1], axes=[2])], {"x": [2, 3, 4]}, ["y"], opset=9),
    "opset18_pad_axes_reduce": graph([node("Pad", ["x", "p", "", "ax"], "a"), node("ReduceMean", ["a", "rax"], keepdims=0)],
                                     {"x": [1, 2, 5, 6]}, ["y"], {"p": i64(1, 2, 3, 0), "ax": i64(-1, 1), "rax": i64(-1)}, opset=18),
    "resize_opset10": graph([node("Resize", ["x", "s"], mode="nearest")], {"x": [1, 2, 3, 4]}, ["y"], {"s": f32(1, 1, 2, 3)}, opset=10),
    "resize_nearest_tf_half_pixel": _resize("nearest", "tf_half_pixel_for_nn", scales=[1, 1, 1.7, 0.6], nearest="round_prefer_ceil"),
    "resize_nearest_ceil_float32_size": _resize("nearest", "asymmetric", scales=[1, 1, 2.5, 0.7], nearest="ceil"),
    "conv3d_asym": graph([node("Conv", ["x", "w"], pads=[1, 0, 1, 1, 0, 1])], {"x": [1, 2, 5, 6, 4]}, ["y"], {"w": w(3, 2, 3, 3, 3)}),
    "conv_transpose_dilated_groups": graph([node("ConvTranspose", ["x", "w"], strides=[2, 1], dilations=[1, 2], group=2)],
                                           {"x": [1, 4, 5, 6]}, ["y"], {"w": w(4, 3, 3, 3)}),
    "maxpool_same_upper": graph([node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")],
                                {"x": [1, 2, 7, 8]}, ["y"]),
    "maxpool_ceil": graph([node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)], {"x": [1, 2, 8, 8]}, ["y"]),
    "avgpool_same_lower": graph([node("AveragePool", ["x"], kernel_shape=[3, 2], strides=[2, 2], auto_pad="SAME_LOWER")],
                                {"x": [1, 2, 7, 8]}, ["y"]),
    "slice_negative_steps": graph([node("Slice", ["x", "st", "en", "ax", "sp"])], {"x": [4, 10]}, ["y"],
                                  {"st": i64(0, 9), "en": i64(4, 0), "ax": i64(0, 1), "sp": i64(2, -3)}),
    "prelu_elu_softplus": graph([node("PRelu", ["x", "s"], "a"), node("Elu", ["a"], "b", alpha=0.7), node("Softplus", ["b"])],
                                {"x": [1, 3, 4, 4]}, ["y"], {"s": w(3, 1, 1)}),
    "expand_greater_where": graph([node("Expand", ["x", "sh"], "a"), node("Greater", ["a", "z"], "m"), node("Where", ["m", "a", "z"])],
                                  {"x": [3, 1]}, ["y"], {"sh": i64(2, 1, 4), "z": f32(0.1)}),
    "constant_node": graph([node("Constant", [], "c", value=numpy_helper.from_array(w(3), "c")), node("Add", ["x", "c"])],
                           {"x": [2, 3]}, ["y"]),
}


@pytest.mark.parametrize("name", list(HAND_MADE))
def test_hand_made_graphs_match_ort(name):
    model = HAND_MADE[name]
    feeds = random_feeds(input_specs(model))
    if name == "clip_runtime_bounds":
        feeds.update(lo=np.array(-0.3, np.float32), hi=np.array(0.7, np.float32))
    assert_matches_ort(model, feeds)


def test_layers_keep_onnx_names_and_constants_fold():
    model = graph([node("Constant", [], "c", value=numpy_helper.from_array(f32(2.0), "c"), name="make_c"),
                   node("Mul", ["x", "c"], "a", name="scale.me"), node("Relu", ["a"])], {"x": [1, 4]}, ["y"])
    module = onnx_to_torch(model)
    assert module.folded == ["make_c"]
    assert [(m.onnx_name, m.onnx_op_type) for m in module.node_modules()] == [("scale.me", "Mul"), ("Relu_2", "Relu")]
    assert all("." not in key for key in module.layers)


def test_unsupported_op_is_a_one_line_deploykit_error():
    model = graph([node("Einsum", ["x", "x"], equation="ij,ij->ij", name="my_einsum")], {"x": [2, 3]}, ["y"], opset=17)
    with pytest.raises(DeployKitError, match=r"torch backends cannot run ONNX op 'Einsum' \(node 'my_einsum'\): use --backend ort-cpu"):
        onnx_to_torch(model)
    custom = helper.make_model(helper.make_graph([helper.make_node("Fancy", ["x"], ["y"], domain="com.example")], "t",
                                                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    with pytest.raises(DeployKitError, match="com.example.Fancy"):
        onnx_to_torch(custom)


# ---------------------------------------------------------------------------------------------- torch-cpu


def test_torch_cpu_measure_is_sane(zoo_onnx):
    backend = get_backend("torch-cpu", threads=1)
    before = torch.get_num_threads()
    model = zoo_onnx["mobilenet_v2"]
    m = backend.measure(model, input_specs(model), QUICK)
    assert torch.get_num_threads() == before  # restored
    assert math.isfinite(m.latency_ms) and 0 < m.latency_ms < 1000
    assert m.stats.count >= 9 and len(m.round_medians_ms) >= 3
    fp = backend.fingerprint()
    assert fp["backend"] == "torch-cpu" and fp["runtime"] == "torch" and fp["runtime_version"] == torch.__version__
    assert fp["threads"] == 1 and fp["precision"] == "fp32" and fp["cpu_model"]


def test_torch_cpu_measure_module_takes_a_plain_module():
    module = zoo.build("resnet18", num_classes=10, width=0.25)
    m = get_backend("torch-cpu").measure_module(module, torch.randn(1, 3, 32, 32), QUICK)
    assert 0 < m.latency_ms < 1000
    assert next(module.parameters()).device.type == "cpu"


def test_torch_cpu_layers_cover_every_compute_node(zoo_onnx):
    backend = get_backend("torch-cpu", threads=1)
    model = zoo_onnx["mobilenet_v2"]
    specs = input_specs(model)
    e2e = backend.measure(model, specs, QUICK)
    profile = backend.measure_layers(model, specs, e2e)
    glue = {"Constant", "Identity"}
    compute = [n.name for n in model.graph.node if n.op_type not in glue]
    names = [layer.name for layer in profile.layers]
    assert names == compute  # one layer per executed node, in graph order
    assert all(layer.source_nodes == [layer.name] for layer in profile.layers)
    assert {layer.op_type for layer in profile.layers} >= {"Conv", "Clip", "Add", "GlobalAveragePool", "Flatten", "Gemm"}
    assert all(layer.latency_ms >= 0 and layer.raw_ms >= 0 for layer in profile.layers)
    assert 0.5 <= profile.sum_ratio <= 1.5, profile.to_dict()
    assert "calibrated" in profile.method and profile.profiled_runs >= 20


# ---------------------------------------------------------------------------------------------- GPU backends refuse here


def test_torch_cuda_refuses_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(DeployKitError, match=r"torch-cuda needs a CUDA GPU.*torch.cuda.is_available\(\) is False"):
        get_backend("torch-cuda")


def test_tensorrt_refuses_without_tensorrt_or_gpu():
    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT and a CUDA GPU are present")
    with pytest.raises(DeployKitError, match=r"tensorrt needs TensorRT and a CUDA GPU: pip install deploykit\[tensorrt\]"):
        get_backend("tensorrt")


def test_gpu_backend_precisions():
    from deploykit.profilers import backend_class

    assert backend_class("torch-cuda").precisions == ("fp32", "fp16")
    assert backend_class("tensorrt")(precision="fp16").precision == "fp16"
    with pytest.raises(DeployKitError, match="int8"):
        backend_class("tensorrt")(precision="int8")
    with pytest.raises(DeployKitError, match="does not support precision"):
        backend_class("torch-cpu")(precision="fp16")
