"""The fused graph ONNX Runtime runs, mapped back to the original nodes."""
import pytest

from deploykit.onnx_io import input_specs, load_onnx
from deploykit.profilers import get_backend


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_every_original_node_claimed_once(zoo_onnx, name):
    model = load_onnx(zoo_onnx[name])
    backend = get_backend("ort-cpu", threads=1)
    prof = backend.measure_layers(model, input_specs(model))
    claimed = [s for layer in prof.layers for s in layer.source_nodes]
    assert sorted(claimed) == sorted(n.name for n in model.graph.node)
    # fusion really happened: fewer layers run than nodes exist, and conv layers own their activation
    assert len(prof.layers) < len(model.graph.node)
    by_source = {s: layer for layer in prof.layers for s in layer.source_nodes}
    act = "Clip" if name == "mobilenet_v2" else "Relu"
    fused = [n for n in model.graph.node if n.op_type == act and by_source[n.name].op_type == "Conv"]
    assert fused, "activations should be fused into the convolution that produces their input"


def test_residual_add_goes_to_the_conv_that_fused_it(zoo_onnx):
    model = load_onnx(zoo_onnx["resnet18"])
    prof = get_backend("ort-cpu", threads=1).measure_layers(model, input_specs(model))
    owner = {s: layer for layer in prof.layers for s in layer.source_nodes}
    adds = [n for n in model.graph.node if n.op_type == "Add"]
    assert adds
    for add in adds:
        assert owner[add.name].op_type in {"Conv", "Add", "Sum"}, (add.name, owner[add.name].name)


def test_renamed_fused_activation_claims_its_nodes(tmp_path):
    """ONNX Runtime fuses x * sigmoid(x) into QuickGelu on fresh tensors; the node is named after the Mul."""
    import torch

    from deploykit.zoo import export_onnx

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(16, 16, 3, padding=1),
                              torch.nn.SiLU()).eval()
    model = load_onnx(export_onnx(net, (1, 3, 32, 32), tmp_path / "silu.onnx"))
    prof = get_backend("ort-cpu", threads=1).measure_layers(model, input_specs(model))
    claimed = [s for layer in prof.layers for s in layer.source_nodes]
    assert sorted(claimed) == sorted(n.name for n in model.graph.node)
    by_type = {n.name: n.op_type for n in model.graph.node}
    gelu = [layer for layer in prof.layers if layer.op_type == "QuickGelu"]
    assert gelu, "this ONNX Runtime no longer fuses SiLU into QuickGelu: revisit the test"
    for layer in gelu:
        assert sorted(by_type[s] for s in layer.source_nodes) == ["Mul", "Sigmoid"]
