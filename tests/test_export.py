"""deploykit export: real exporters, onnx-simplifier, ONNX Runtime sessions and the ORT format; verification against
PyTorch; the closed loop on this machine's CPU. TensorRT legs are in test_export_tensorrt.py."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from deploykit.errors import DeployKitError
from deploykit.export.pipeline import export_model
from deploykit.export.verify import THRESHOLDS, compare, verification_inputs
from tests.conftest import one_error_line, run_cli
from tests.export_models import resnet_basic
from tests.families import FAMILIES, INPUT_SHAPE, randomize_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_exports_and_verifies(family, tmp_path):
    torch.manual_seed(0)
    net = randomize_batchnorm(FAMILIES[family]())
    result = export_model(net, INPUT_SHAPE, tmp_path, measure=False, verify_inputs=4)
    assert result.passed, result.verification.summary()
    m = result.manifest
    assert m["max_abs_error"] <= 1e-4
    assert m["opset"] == 17 and m["precision"] == "fp32"
    model = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(model)
    assert m["simplifier"]["applied"] and m["simplifier"]["nodes_after"] <= m["simplifier"]["nodes_before"]


def test_ort_format_is_verified_and_measured_against_plain_onnx_and_pytorch(tmp_path):
    result = export_model(resnet_basic(), INPUT_SHAPE, tmp_path, format="ort", verify_inputs=4)
    assert result.passed
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["artifact"]["path"] == "model.ort" and (tmp_path / "model.opt.onnx").is_file()
    sess = ort.InferenceSession(str(tmp_path / "model.ort"), providers=["CPUExecutionProvider"])  # loads as ORT format
    x = np.random.default_rng(1).standard_normal(INPUT_SHAPE).astype(np.float32)
    with torch.no_grad():
        ref = resnet_basic().eval()(torch.from_numpy(x)).numpy()
    assert np.abs(sess.run(None, {"input": x})[0] - ref).max() <= 1e-4
    assert m["verification"]["artifact"]["passed"] and m["verification"]["onnx"]["passed"]
    cmp = m["comparison"]
    for k in ("artifact", "plain_onnx", "pytorch_eager"):
        assert cmp[k]["latency_ms"] > 0 and cmp[k]["runs"] >= 1 and cmp[k]["p90_ms"] >= cmp[k]["latency_ms"] * 0.5
    assert len(cmp["rounds_ms"]) == 3
    assert m["measured_latency_ms"] == cmp["artifact"]["latency_ms"]
    assert cmp["slower_than_plain_onnx"] == (cmp["latency_ratio_vs_plain_onnx"] > 1.05)
    assert m["model_sha256"] == m["artifact"]["sha256"] and len(m["model_sha256"]) == 64
    assert m["input"] == {"name": "input", "shape": list(INPUT_SHAPE), "dtype": "float32", "dynamic_batch": False,
                          "batch_range": None}
    assert m["device"]["fingerprint"]["backend"] == "ort-cpu"
    if m["predicted_latency_ms"] is not None:  # a table recorded on this machine was found
        p, meas = m["predicted_latency_ms"], m["measured_latency_ms"]
        assert m["prediction_error"] == pytest.approx((p - meas) / meas)


def test_dynamic_batch_runs_other_batches(tmp_path):
    result = export_model(resnet_basic(), INPUT_SHAPE, tmp_path, dynamic_batch=True, max_batch=4, measure=False,
                          verify_inputs=3)
    assert result.passed
    model = onnx.load(str(tmp_path / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"input": np.zeros((5, 3, 32, 32), np.float32)})[0].shape == (5, 10)
    assert result.manifest["verification"]["onnx"]["inputs"] == 4  # three of batch 1, one of batch 4
    assert result.manifest["input"]["batch_range"] == [1, 1, 4]


def test_fp16_onnx_is_checked_at_fp16_thresholds(tmp_path):
    result = export_model(resnet_basic(), INPUT_SHAPE, tmp_path, precision="fp16", verify_inputs=4, measure=False)
    assert result.passed, result.verification.summary()
    m = result.manifest
    assert m["artifact"]["path"] == "model.fp16.onnx" and m["precision"] == "fp16"
    model = onnx.load(str(tmp_path / "model.fp16.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert m["verification"]["artifact"]["thresholds"] == THRESHOLDS["fp16"]
    assert 0 < m["max_abs_error"]  # FP16 is not bit-exact


def test_int8_from_digits_and_reexport_of_a_quantized_onnx(tmp_path, digits):
    from deploykit.train import train_network
    from tests.test_quant import tiny_net

    net = tiny_net()
    train_network(net, digits, epochs=2, lr=1e-2, progress=False)
    images = digits.val_x.numpy()
    result = export_model(net, INPUT_SHAPE, tmp_path / "a", precision="int8", data=images, verify_inputs=32,
                          measure=False)
    assert result.passed, result.verification.summary()
    q = onnx.load(str(tmp_path / "a" / "model.int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    top1 = result.manifest["verification"]["artifact"]["outputs"][0]["top1_agreement"]
    assert top1 >= THRESHOLDS["int8"]["top1"]
    # compression's QDQ output given back as ONNX: checked at INT8 thresholds against the graph as given
    again = export_model(tmp_path / "a" / "model.int8.onnx", None, tmp_path / "b", format="ort", data=images,
                         verify_inputs=8, measure=False)
    assert again.passed and again.manifest["precision"] == "int8"
    assert again.manifest["source"]["kind"] == "onnx"


def test_multiple_outputs_are_each_verified(tmp_path):
    from tests.export_models import two_heads

    result = export_model(two_heads(), INPUT_SHAPE, tmp_path, measure=False, verify_inputs=3)
    assert result.passed
    assert [o["name"] for o in result.manifest["verification"]["onnx"]["outputs"]] == ["output_0", "output_1"]


def test_compare_names_the_worst_output():
    rng = np.random.default_rng(0)
    ref = [[rng.standard_normal((1, 10)).astype(np.float32), rng.standard_normal((1, 4)).astype(np.float32)]
           for _ in range(3)]
    good = [[r[0] + 1e-7, r[1].copy()] for r in ref]
    bad = [[r[0] + 1e-7, r[1] + 0.05] for r in ref]
    assert compare(ref, good, ["a", "b"], "fp32").passed
    v = compare(ref, bad, ["a", "b"], "fp32")
    assert not v.passed and v.worst.name == "b" and "max_abs_error" in v.worst.failures[0]
    shape_bad = [[r[0][:, :5], r[1]] for r in ref]
    assert not compare(ref, shape_bad, ["a", "b"], "fp32").passed


def test_verification_inputs_batches_user_images():
    images = np.arange(5 * 3 * 2 * 2, dtype=np.float32).reshape(5, 3, 2, 2)
    xs = verification_inputs((2, 3, 2, 2), 3, images=images, extra_batch=4)
    assert [x.shape[0] for x in xs] == [2, 2, 2, 4]
    assert np.array_equal(xs[2][1], images[0])  # wraps around


# -- the command line ----------------------------------------------------------------------------------------------------

def test_cli_onnx_export_writes_manifest(tmp_path):
    proc = run_cli("export", "--model", "tests.export_models:resnet_basic", "--example-shape", "1,3,32,32",
                   "--out", tmp_path, "--verify-inputs", "4")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["verified"] and m["artifact"]["path"] == "model.onnx"
    assert m["measured_latency_ms"] > 0 and "max_abs_error" in proc.stdout


def test_cli_verification_failure_exits_1_naming_the_output(tmp_path):
    proc = run_cli("export", "--model", "tests.export_models:trace_hazard", "--example-shape", "1,3,32,32",
                   "--out", tmp_path, "--verify-inputs", "4")
    assert proc.returncode == 1, proc.stderr
    assert "verification failed: output 'output'" in proc.stderr
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["verified"] is False and m["measured_latency_ms"] is None


def test_cli_unexportable_op_is_one_line(tmp_path):
    line = one_error_line(run_cli("export", "--model", "tests.export_models:unexportable", "--example-shape",
                                  "1,3,16,16", "--out", tmp_path))
    assert "cummax" in line and "opset" in line


def test_cli_dynamic_onnx_without_example_shape_is_one_line(tmp_path):
    export_model(resnet_basic(), INPUT_SHAPE, tmp_path / "dyn", dynamic_batch=True, measure=False, verify_inputs=1)
    line = one_error_line(run_cli("export", "--model", tmp_path / "dyn" / "model.onnx", "--out", tmp_path / "o"))
    assert "dynamic dims" in line and "--example-shape 1,3,32,32" in line
    proc = run_cli("export", "--model", tmp_path / "dyn" / "model.onnx", "--out", tmp_path / "o", "--example-shape",
                   "2,3,32,32", "--no-measure", "--verify-inputs", "2")
    assert proc.returncode == 0, proc.stderr


def test_cli_pytorch_model_without_example_shape_is_one_line(tmp_path):
    line = one_error_line(run_cli("export", "--model", "tests.export_models:resnet_basic", "--out", tmp_path))
    assert "--example-shape" in line


def test_cli_tensorrt_without_tensorrt_or_gpu_is_one_line(tmp_path):
    pytest.importorskip("torch")
    try:
        from deploykit.export.tensorrt_engine import check_tensorrt

        check_tensorrt()
        pytest.skip("TensorRT and a GPU are present")
    except DeployKitError:
        pass
    line = one_error_line(run_cli("export", "--model", "tests.export_models:resnet_basic", "--example-shape",
                                  "1,3,32,32", "--format", "tensorrt", "--out", tmp_path / "t"))
    assert "TensorRT" in line
    assert not (tmp_path / "t").exists()  # refused before any work


@pytest.mark.parametrize("args, expect", [
    (["--int8"], "--data"),
    (["--device", "no-such-table"], "no-such-table"),
    (["--example-shape", "1,3,x"], "--example-shape"),
])
def test_cli_bad_settings_are_one_line(tmp_path, args, expect):
    base = ["export", "--model", "tests.export_models:resnet_basic", "--out", tmp_path]
    if "--example-shape" not in args:
        base += ["--example-shape", "1,3,32,32"]
    assert expect in one_error_line(run_cli(*base, *args))


def test_cli_corrupt_onnx_is_one_line(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    assert "bad.onnx" in one_error_line(run_cli("export", "--model", bad, "--out", tmp_path / "o"))


def test_ort_runtime_style_is_portable_and_verified(tmp_path):
    result = export_model(resnet_basic(), INPUT_SHAPE, tmp_path, format="ort", ort_style="runtime", measure=False,
                          verify_inputs=3)
    assert result.passed
    assert result.manifest["ort"]["style"] == "runtime" and result.manifest["ort"]["level"] == "extended"
    with pytest.raises(DeployKitError, match="ORT optimisation style"):
        export_model(resnet_basic(), INPUT_SHAPE, tmp_path / "x", format="ort", ort_style="eager", measure=False)
