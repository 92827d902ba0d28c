"""INT8 static quantization on a real (briefly trained) digits net: QDQ models that ONNX Runtime runs and fuses,
accuracy and SQNR close to float, float_nodes respected, and the mixed-precision policy's accounting."""
from __future__ import annotations

import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from deploykit.compress.quant import (ImageReader, make_reader, measure_speedup, mixed_precision, name_nodes,
                                      onnx_accuracy, quantizable_nodes, quantize_int8, refuse_if_slower, sqnr_db)
from deploykit.compress.quant import _logits as logits
from deploykit.errors import DeployKitError
from deploykit.train import train_network
from deploykit.zoo import export_onnx

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(conv_bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=conv_bias), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, 2, 1, bias=conv_bias), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 32, 3, 2, 1, bias=conv_bias), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """(float ONNX model, calibration images, eval images, eval labels) of a tiny net trained 3 epochs on digits."""
    net = tiny_net()
    train_network(net, digits, epochs=3, lr=1e-2, progress=False)
    path = export_onnx(net, (1, 3, 32, 32), tmp_path_factory.mktemp("quant") / "tiny.onnx")
    return onnx.load(str(path)), digits.train_x[:64].numpy(), digits.val_x.numpy(), digits.val_y.numpy()


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def weight_is_quantized(model: onnx.ModelProto, node_name: str) -> bool:
    """True when the node's weight (input 1) comes out of a DequantizeLinear."""
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == node_name)
    return producers.get(node.input[1]) == "DequantizeLinear"


def ort_optimised_ops(model: onnx.ModelProto, tmp_path) -> dict[str, int]:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # fusions, no NCHWc layout
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return op_counts(onnx.load(str(tmp_path / "optimised.onnx")))


def test_int8_model_is_qdq_runs_in_ort_and_keeps_accuracy(trained):
    model, calib, x, y = trained
    q = quantize_int8(model, calib)
    ops = op_counts(q)
    assert ops.get("QuantizeLinear", 0) >= 4 and ops.get("DequantizeLinear", 0) >= 8, ops
    float_acc, int8_acc = onnx_accuracy(model, x, y), onnx_accuracy(q, x, y)
    assert float_acc > 0.5  # the net really learned, so the comparison means something
    assert abs(float_acc - int8_acc) <= 0.03, (float_acc, int8_acc)
    assert sqnr_db(logits(model, x), logits(q, x)) > 15.0
    # the float model scored here agrees with torch-free recomputation of its own argmax
    assert onnx_accuracy(model, x, y) == pytest.approx(float(np.mean(logits(model, x).argmax(1) == y)))


def test_shared_biases_are_split_so_every_conv_fuses_to_qlinearconv(digits, tmp_path):
    # bias-free convs + untrained BatchNorm fold into all-zero biases, which the exporter dedups into one initializer
    path = export_onnx(tiny_net(conv_bias=False).eval(), (1, 3, 32, 32), tmp_path / "untrained.onnx")
    model = onnx.load(str(path))
    assert "Identity" in op_counts(model)  # the shared bias reaches the second conv through an Identity
    q = quantize_int8(model, digits.train_x[:16].numpy())
    ops = ort_optimised_ops(q, tmp_path)
    assert ops.get("QLinearConv", 0) == 3 and ops.get("Conv", 0) == 0, ops


@pytest.mark.parametrize("method", ["minmax", "entropy", "percentile"])
def test_every_calibration_method_gives_a_working_model(trained, method):
    model, calib, x, y = trained
    q = quantize_int8(model, calib[:32], method=method)
    assert "QuantizeLinear" in op_counts(q)
    assert abs(onnx_accuracy(model, x, y) - onnx_accuracy(q, x, y)) <= 0.05


def test_unknown_method_and_bad_inputs_are_user_errors(trained):
    model, calib, x, y = trained
    with pytest.raises(DeployKitError, match="calibration method"):
        quantize_int8(model, calib, method="kl")
    with pytest.raises(DeployKitError, match="float_nodes"):
        quantize_int8(model, calib, float_nodes=["no_such_node"])
    with pytest.raises(DeployKitError, match="model takes 3x32x32"):
        quantize_int8(model, calib[:, :, :16, :16])
    with pytest.raises(DeployKitError, match="labels"):
        onnx_accuracy(model, x, y[:-1])


def test_calibration_temp_dirs_are_removed_even_on_error(trained, tmp_path, monkeypatch):
    model, calib, _, _ = trained
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    quantize_int8(model, calib[:8], method="entropy")
    with pytest.raises(DeployKitError):
        quantize_int8(model, calib[:8], float_nodes=["no_such_node"])
    assert list(tmp_path.iterdir()) == []


def test_float_nodes_stay_float(trained):
    model, calib, x, y = trained
    layers = quantizable_nodes(model)
    assert [n.split("/")[-1] for n in layers] == ["Conv", "Conv", "Conv", "Gemm"]
    keep = [layers[0], layers[-1]]
    q = quantize_int8(model, calib, float_nodes=keep)
    assert [weight_is_quantized(q, n) for n in layers] == [False, True, True, False]
    assert abs(onnx_accuracy(model, x, y) - onnx_accuracy(q, x, y)) <= 0.03


def test_nameless_nodes_get_deterministic_unique_names(trained):
    model, calib, _, _ = trained
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    for n in bare.graph.node:
        n.name = ""
    names = [n.name for n in name_nodes(bare).graph.node]
    assert names == [n.name for n in name_nodes(bare).graph.node] and len(set(names)) == len(names) and all(names)
    layers = quantizable_nodes(bare)
    assert len(layers) == 4 and all(name in names for name in layers)
    q = quantize_int8(bare, calib[:16], float_nodes=[layers[1]])  # names from quantizable_nodes address the same nodes
    assert not weight_is_quantized(q, layers[1]) and weight_is_quantized(q, layers[2])


def test_reader_feeds_whole_batches_for_a_fixed_batch_model(tmp_path):
    path = export_onnx(tiny_net().eval(), (4, 3, 16, 16), tmp_path / "b4.onnx")
    images = np.zeros((10, 3, 16, 16), np.float32)
    reader = make_reader(onnx.load(str(path)), images)
    shapes = [b["input"].shape for b in iter(reader.get_next, None)]
    assert shapes == [(4, 3, 16, 16)] * 2  # the 2-image remainder cannot fill the fixed batch
    reader.rewind()
    assert reader.get_next()["input"].shape == (4, 3, 16, 16)
    with pytest.raises(DeployKitError, match="full batch"):
        ImageReader(images[:3], "input", batch=4)


def test_mixed_precision_within_bound_returns_all_int8(trained):
    model, calib, x, y = trained
    r = mixed_precision(model, calib, x, y, max_drop=1.0, progress=False)
    assert r.met and r.float_nodes == [] and r.evaluations == 1 and r.sensitivity == {}
    assert r.accuracy == r.int8_accuracy == pytest.approx(onnx_accuracy(r.model, x, y))
    assert all(weight_is_quantized(r.model, n) for n in quantizable_nodes(model))
    with pytest.raises(DeployKitError, match="max_drop"):
        mixed_precision(model, calib, x, y, max_drop=-1.0, progress=False)


def test_mixed_precision_keeps_sensitive_layers_float_when_int8_drops(trained):
    model, calib, x, y = trained
    bad_calib = calib * 0.5  # half-contrast calibration images: clipped ranges, the all-INT8 model collapses
    r = mixed_precision(model, bad_calib, x, y, max_drop=0.0, progress=False)
    assert r.float_accuracy - r.int8_accuracy > 0.1, r.summary()
    layers = quantizable_nodes(model)
    assert sorted(r.sensitivity) == sorted(layers) and r.float_nodes
    assert r.met == (r.drop <= 0.0) and r.drop == pytest.approx(r.float_accuracy - r.accuracy)
    assert r.accuracy == pytest.approx(onnx_accuracy(r.model, x, y))
    assert all(not weight_is_quantized(r.model, n) for n in r.float_nodes)
    assert r.evaluations == 1 + len(layers) + len(r.steps) - 1
    # the first layer kept float is the most sensitive one
    assert r.steps[1]["added"] == max(r.sensitivity, key=r.sensitivity.get)

    drops = []
    for k in range(len(layers) + 1):
        rk = mixed_precision(model, bad_calib, x, y, max_drop=0.0, max_float_layers=k, progress=False)
        assert len(rk.float_nodes) <= k and rk.met == (rk.drop <= 0.0)
        drops.append(rk.drop)
    assert drops[0] == pytest.approx(r.float_accuracy - r.int8_accuracy)  # k=0: nothing float, bound not met
    assert all(b <= a + 1e-12 for a, b in zip(drops, drops[1:])), drops
    assert drops[-1] < drops[0] - 0.1


def test_measure_speedup_reports_both_latencies(trained):
    model, calib, _, _ = trained
    q = quantize_int8(model, calib[:16])
    rep = measure_speedup(model, q, "ort-cpu", (1, 3, 32, 32))
    assert rep["float_ms"] > 0 and rep["int8_ms"] > 0
    assert rep["speedup"] == pytest.approx(rep["float_ms"] / rep["int8_ms"])
    assert rep["float"]["latency_ms"] == rep["float_ms"] and rep["int8"]["runs"] >= 10


def test_refuse_if_slower():
    with pytest.raises(DeployKitError, match=r"slower than its input on laptop \(2.000 ms vs 1.500 ms\)") as e:
        refuse_if_slower(1.5, 2.0, "laptop")
    assert "\n" not in str(e.value)
    with pytest.raises(DeployKitError):
        refuse_if_slower(1.5, 1.5, "laptop")
    refuse_if_slower(1.5, 0.9, "laptop")  # faster: no error
