import pytest

from deploykit.errors import DeployKitError
from deploykit.onnx_io import input_specs, load_onnx
from deploykit.profilers import get_backend, list_backends
from deploykit.protocol import Protocol

FAST = Protocol(warmup_runs=2, warmup_s=0.0, rounds=3, round_s=0.02, min_runs_per_round=3)


def test_registry():
    assert "ort-cpu" in list_backends()
    with pytest.raises(DeployKitError, match="unknown backend 'nope': choose one of"):
        get_backend("nope")
    with pytest.raises(DeployKitError, match="threads"):
        get_backend("ort-cpu", threads=0)


def test_measure_and_fingerprint(zoo_onnx):
    model = load_onnx(zoo_onnx["mobilenet_v2"])
    b = get_backend("ort-cpu", threads=1)
    m = b.measure(model, input_specs(model), FAST)
    d = m.to_dict()
    assert d["latency_ms"] > 0 and d["p90_ms"] >= d["latency_ms"] * 0.5 and d["runs"] >= 9
    fp = b.fingerprint()
    for k in ("cpu_model", "logical_cores", "runtime_version", "threads", "graph_optimization", "precision"):
        assert k in fp
    assert fp["threads"] == 1 and fp["backend"] == "ort-cpu"


def test_bigger_model_is_slower(zoo_onnx, tmp_path):
    from deploykit import zoo
    small = load_onnx(zoo_onnx["mobilenet_v2"])
    big = load_onnx(zoo.export_onnx(zoo.build("mobilenet_v2", num_classes=10, width=2.0), (1, 3, 96, 96), tmp_path / "w2.onnx"))
    b = get_backend("ort-cpu", threads=1)
    assert b.measure(big, input_specs(big), FAST).latency_ms > 1.5 * b.measure(small, input_specs(small), FAST).latency_ms


def test_per_layer_sums_near_end_to_end(zoo_onnx):
    model = load_onnx(zoo_onnx["resnet18"])
    prof = get_backend("ort-cpu", threads=1).measure_layers(model, input_specs(model))
    assert all(layer.latency_ms >= 0 for layer in prof.layers)
    # a sanity band only; the 5% target is measured by tools/bench_foundation.py
    assert 0.7 < prof.sum_ratio < 1.3
