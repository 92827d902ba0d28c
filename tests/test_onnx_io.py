import numpy as np
import pytest
from onnx import TensorProto, helper

from deploykit.errors import DeployKitError
from deploykit.onnx_io import input_specs, load_onnx, parse_shape


def _dynamic_model():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g", [x], [y])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_load_errors(tmp_path, zoo_onnx):
    with pytest.raises(DeployKitError, match="not found"):
        load_onnx(tmp_path / "missing.onnx")
    with pytest.raises(DeployKitError, match="directory"):
        load_onnx(tmp_path)
    (tmp_path / "text.onnx").write_text("not a model")
    with pytest.raises(DeployKitError, match="not a readable ONNX|no ONNX graph"):
        load_onnx(tmp_path / "text.onnx")
    data = zoo_onnx["resnet18"].read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(DeployKitError, match="ONNX"):
        load_onnx(tmp_path / "trunc.onnx")


def test_dynamic_dims_need_shape():
    m = _dynamic_model()
    with pytest.raises(DeployKitError, match="dynamic dims .* --shape"):
        input_specs(m)
    (spec,) = input_specs(m, (2, 3, 32, 48))
    assert spec.shape == (2, 3, 32, 48) and spec.dtype is np.float32
    with pytest.raises(DeployKitError, match="conflicts with the fixed dims"):
        input_specs(m, (1, 4, 32, 32))
    with pytest.raises(DeployKitError, match="has 3 dims"):
        input_specs(m, (1, 3, 32))


@pytest.mark.parametrize("text", ["", "1,a,3", "1,-3,4", "0,3"])
def test_parse_shape_rejects(text):
    with pytest.raises(DeployKitError, match="shape"):
        parse_shape(text)


def test_parse_shape():
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224)
