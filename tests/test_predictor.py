"""Kernel decomposition, JSON regressors, the kernel-level predictor and its CLI."""
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from sklearn.ensemble import GradientBoostingRegressor, RandomForestRegressor
from sklearn.neural_network import MLPRegressor
from torch import nn

from deploykit import predictor, zoo
from deploykit.decompose import decompose
from deploykit.errors import DeployKitError
from deploykit.kernels import Kernel, sample_kernels
from deploykit.onnx_io import input_specs, load_onnx
from deploykit.predictor import (FORMAT_VERSION, KernelPredictor, _CalNet, fit_context, fit_overhead, fit_predictor,
                                 network_features, predictor_path)
from deploykit.regressors import METHODS, KindRegressor, _fit_residual, _predict_residual, select
from deploykit.table import LatencyTable, TableEntry, resolve_device

from .conftest import one_error_line, run_cli


def _export(model: nn.Module, res: int, path: Path) -> onnx.ModelProto:
    return load_onnx(zoo.export_onnx(model.eval(), (1, 3, res, res), path))


def _dec(model: onnx.ModelProto, **kw):
    return decompose(model, input_specs(model), **kw)


# ------------------------------------------------------------------------------------ decomposition
def test_mobilenet_v2_kernels_and_fused_residuals(zoo_onnx):
    model = load_onnx(zoo_onnx["mobilenet_v2"])
    dec = _dec(model)
    kinds = Counter(mk.kernel.kind for mk in dec.kernels)
    assert kinds == {"conv": 35, "dwconv": 17, "add": 10, "gap": 1, "linear": 1}
    assert not dec.unsupported and dec.runtime_fusion
    # every original node is covered exactly once: by a kernel, as free, or as folded by the runtime
    covered = [n for mk in dec.kernels for n in mk.nodes] + dec.free_nodes + dec.folded_nodes
    assert sorted(covered) == sorted(n.name for n in model.graph.node)
    acts = Counter(mk.kernel.get("act") for mk in dec.kernels if mk.kernel.kind in ("conv", "dwconv"))
    assert acts == {"relu6": 35, "none": 17}  # expand + depthwise carry ReLU6, projections none
    first = dec.kernels[0].kernel
    assert first.key == "conv:act=relu6,cin=3,cout=32,d=1,g=1,h=96,k=3,s=2,w=96"


def test_runtime_fusion_marks_residual_adds(zoo_onnx):
    model = load_onnx(zoo_onnx["resnet18"])
    with_rt, rules_only = _dec(model), _dec(model, runtime_fusion=False)
    adds = [mk for mk in with_rt.kernels if mk.kernel.kind == "add"]
    assert len(adds) == 8 and all("Relu" in mk.op_type for mk in adds)  # ReLU(x + y) is one kernel
    assert all(mk.fused for mk in adds)  # ONNX Runtime folds Add+ReLU into the conv producing one operand
    assert not any(mk.fused for mk in rules_only.kernels) and not rules_only.runtime_fusion


class _Blocks(nn.Module):
    """SE (SiLU mid), SiLU/Hardswish convs, channel split, shuffle, concat, pools, resize, broadcast mul."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.SiLU())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(32, 8, 1), nn.SiLU(), nn.Conv2d(8, 32, 1), nn.Sigmoid())
        self.branch = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.Hardswish())
        self.gconv = nn.Conv2d(32, 64, 3, 1, 1, groups=4)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x * self.se(x)
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        x = self.pool(nn.functional.interpolate(self.gconv(x), scale_factor=2.0, mode="nearest"))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_every_block_pattern_is_recognised(tmp_path):
    model = _export(_Blocks(), 32, tmp_path / "blocks.onnx")
    dec = _dec(model)
    assert not dec.unsupported, [(mk.op_type, mk.note) for mk in dec.unsupported]
    by_kind = {mk.kernel.kind: mk.kernel for mk in dec.kernels}
    assert set(by_kind) == {"conv", "se", "split", "dwconv", "concat", "shuffle", "gconv", "resize", "maxpool", "gap",
                            "linear"}
    assert by_kind["conv"].get("act") == "silu" and by_kind["dwconv"].get("act") == "hardswish"
    assert by_kind["se"].key == "se:c=32,gate=sigmoid,h=16,r=4,w=16"
    assert by_kind["shuffle"].key == "shuffle:c=32,g=2,h=16,w=16"
    assert by_kind["gconv"].get("g") == 4 and by_kind["split"].get("n") == 2


def _graph_model(nodes, inputs, outputs, inits=()):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, inputs[0][1]) for n in outputs], list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_standalone_activation_is_a_kernel_and_unsupported_op_is_named():
    model = _graph_model([helper.make_node("Relu", ["x"], ["r"], name="lonely_relu"),
                          helper.make_node("Softmax", ["r"], ["y"], name="soft", axis=1)], [("x", [1, 8, 4, 4])], ["y"])
    dec = _dec(model)
    assert [mk.kernel.key for mk in dec.kernels if mk.kernel] == ["act:c=8,h=4,op=relu,w=4"]
    assert [(mk.name, mk.kernel) for mk in dec.unsupported] == [("soft", None)]
    assert "no kernel kind covers Softmax" in dec.unsupported[0].note


# ------------------------------------------------------------------------------------ regressors
def _synthetic(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = [{"c": float(rng.integers(8, 512)), "h": float(rng.choice([7, 14, 28, 56])), "flag": float(rng.random() < .5)}
            for _ in range(n)]
    ms = np.array([1e-4 * r["c"] * r["h"] ** 2 * (1.5 if r["flag"] else 1.0) + 0.01 for r in rows])
    return rows, ms


@pytest.mark.parametrize("method", METHODS)
def test_regressor_json_round_trip_and_accuracy(method):
    rows, ms = _synthetic(300)
    model = KindRegressor.fit(method, rows[:240], ms[:240])
    back = KindRegressor(json.loads(json.dumps(model.to_json())))
    np.testing.assert_array_equal(back.predict_ms(rows[240:]), model.predict_ms(rows[240:]))
    rel = np.abs(back.predict_ms(rows[240:]) / ms[240:] - 1)
    assert np.median(rel) < 0.10, (method, np.median(rel))


def test_numpy_evaluation_matches_scikit_learn():
    rng = np.random.default_rng(1)
    x, r = rng.normal(size=(200, 4)), rng.normal(size=200)
    xt = rng.normal(size=(50, 4))
    sk = {"forest": RandomForestRegressor(n_estimators=60, min_samples_leaf=2, max_features=0.6, random_state=3, n_jobs=1),
          "gbdt": GradientBoostingRegressor(n_estimators=600, max_depth=4, learning_rate=0.05, subsample=0.8, random_state=3),
          "mlp": MLPRegressor(hidden_layer_sizes=(64, 64), alpha=1e-3, learning_rate_init=3e-3, max_iter=2000,
                              early_stopping=True, n_iter_no_change=30, random_state=3)}
    for method, est in sk.items():
        ours = _predict_residual(method, json.loads(json.dumps(_fit_residual(method, x, r, 3))), xt)
        np.testing.assert_allclose(ours, est.fit(x, r).predict(xt), rtol=1e-4, atol=1e-5, err_msg=method)


def test_select_keeps_the_best_on_held_out_entries():
    rows, ms = _synthetic(200, seed=2)
    model, report = select(rows, ms)
    assert set(report["holdout"]) == set(METHODS) and report["n"] == 200
    best = min(report["holdout"].values(), key=lambda s: s["mape"])
    assert report["holdout"][report["chosen"]] == best and model.method == report["chosen"]


def test_overhead_fit_recovers_a_known_composition():
    rng = np.random.default_rng(0)
    rows = np.column_stack([rng.uniform(1, 50, 30), rng.uniform(0, 1, 30), rng.integers(10, 80, 30),
                            rng.uniform(1, 20, 30), rng.uniform(1, 30, 30), np.ones(30)])
    true = np.array([0.9, 0.3, -0.01, 0.02, 0.01, 0.05])
    coef, report = fit_overhead(rows, rows @ true)
    np.testing.assert_allclose(coef, true, atol=1e-8)
    assert report["leave_one_out"]["within_5"] == 1.0


def test_context_models_learn_in_network_cost():
    """Known in-network costs (a depthwise conv at half its standalone latency, a conv at 1.2x) are learned
    from per-kernel in-network times, and the estimates a network gets come from models fitted without it."""
    rng = np.random.default_rng(0)
    nets = []
    for i in range(12):
        ks = sample_kernels(16, rng, {"dwconv": 0.5, "conv": 0.5})
        alone = np.array([1e-6 * k.spec.macs(dict(k.params)) + 0.01 for k in ks])
        in_net = np.array([(0.5 if k.kind == "dwconv" else 1.2) * a for k, a in zip(ks, alone)])
        in_net[0] = np.nan  # a runtime node spanning two kernels teaches nothing
        nets.append(_CalNet(f"n{i}", float(in_net[1:].sum()), ks, [False] * len(ks), alone, in_net))
    nets.append(_CalNet("unprofiled", 1.0, nets[0].kernels, nets[0].fused, nets[0].standalone, None))
    models, report, estimates = fit_context(nets)
    assert set(models) == {"conv", "dwconv"}
    assert report["dwconv"]["in_network_over_standalone"] == pytest.approx(0.5, rel=1e-6)
    assert report["dwconv"]["out_of_fold"]["mape"] < 0.1 and report["conv"]["out_of_fold"]["mape"] < 0.1
    assert report["dwconv"]["standalone"]["mape"] == pytest.approx(1.0, rel=1e-6)  # alone it is twice the truth
    for n, est in zip(nets, estimates):
        ratio = est / n.standalone
        assert np.allclose(ratio[[k.kind == "dwconv" for k in n.kernels]], 0.5, rtol=0.15)
    few = fit_context(nets[:5])
    assert few[0] == {} and "no context models" in few[1]["note"]


def test_context_models_see_the_network_around_a_kernel(monkeypatch):
    """The same kernels cost twice their standalone latency in networks whose weights outgrow the cache: the context
    models tell the two apart by the network's weight footprint (`network_features`), out of fold, once there are
    enough profiled networks (16 here: the threshold is lowered to that)."""
    rng = np.random.default_rng(1)
    big = Kernel.from_dict({"kind": "linear", "cin": 4096, "cout": 4096})  # 67 MB of weights
    nets = []
    for i in range(16):
        ks = [Kernel.from_dict({"kind": "conv", "cin": int(rng.choice([8, 16, 32, 64])), "cout": int(rng.choice([8, 16, 32, 64])),
                                "k": int(rng.choice([1, 3])), "s": 1, "d": 1, "g": 1, "h": int(h), "w": int(h), "act": "relu"})
              for h in rng.choice([8, 16, 32], 12)] + ([big] if i % 2 else [])  # under 2 MB of weights, or 67 MB more
        alone = np.array([1e-6 * k.spec.macs(dict(k.params)) + 0.01 for k in ks])
        in_net = alone * (2.0 if i % 2 else 1.0)
        nets.append(_CalNet(f"n{i}", float(in_net.sum()), ks, [False] * len(ks), alone, in_net))
    assert network_features(nets[1].kernels)["net_weight_mb"] > 60 > 2 > network_features(nets[0].kernels)["net_weight_mb"]
    assert fit_context(nets)[1]["conv"]["out_of_fold"]["mape"] > 0.2  # 16 < NETWORK_FEATURES_MIN_NETS: not used
    monkeypatch.setattr(predictor, "NETWORK_FEATURES_MIN_NETS", 16)
    _, report, estimates = fit_context(nets)
    assert report["conv"]["standalone"]["mape"] == pytest.approx(0.25, rel=1e-6)  # half the instances at 2x
    assert report["conv"]["out_of_fold"]["mape"] < 0.1
    for n, est in zip(nets, estimates):
        conv = [k.kind == "conv" for k in n.kernels]
        assert np.median(est[conv] / n.standalone[conv]) == pytest.approx(2.0 if n.kernels[-1] is big else 1.0, rel=0.15)


# ------------------------------------------------------------------------------------ predictor
@pytest.fixture(scope="module")
def small_table(tmp_path_factory) -> Path:
    """The shipped table cut to 40 kernels per kind plus its calibration networks: fits in seconds."""
    src = LatencyTable.load(resolve_device("epyc-2c-ort-t1"))
    path = tmp_path_factory.mktemp("tables") / "small.jsonl"
    table = LatencyTable.create(path, "small", src.device, src.header.get("protocol"))
    per_kind: Counter = Counter()
    for e in src.entries.values():
        kind = e.kernel["kind"]
        if kind == "net" and not e.layers:
            continue  # the networks with per-layer profiles teach the context models too
        if per_kind[kind] < (12 if kind == "net" else 40):
            per_kind[kind] += 1
            table.append(TableEntry(key=e.key, kernel=e.kernel, stats=e.stats, spread=e.spread, noisy=e.noisy,
                                    measured_utc=e.measured_utc, layers=e.layers))
    assert per_kind["net"] == 12
    return path


@pytest.fixture(scope="module")
def fitted(small_table) -> KernelPredictor:
    return fit_predictor(LatencyTable.load(small_table), progress=False).save_beside(small_table)


def test_fit_chooses_per_kind_and_calibrates(fitted, small_table):
    doc = json.loads(predictor_path(small_table).read_text())
    assert doc["format"] == "deploykit-predictor" and doc["format_version"] == FORMAT_VERSION
    assert set(doc["kinds"]) >= {"conv", "dwconv", "add", "linear", "gap"} and "net" not in doc["kinds"]
    assert all(v["chosen"] in METHODS for v in doc["selection"].values())
    calib = doc["overhead"]["calibration"]
    assert calib["n"] >= 8 and "leave_one_out" in calib
    conv = doc["context_report"]["conv"]  # 12 profiled networks hold far more than 40 convolutions
    assert conv["n"] >= 40 and conv["nets"] == 12 and 0 < conv["out_of_fold"]["mape"] < 1
    assert "without_context" in calib  # kept or left out, the choice was made on leave-one-out errors
    assert ("conv" in doc["context"]) == ("note" not in calib)
    assert KernelPredictor.load(predictor_path(small_table)).doc == fitted.doc


def test_prediction_sums_its_layers_and_tracks_size(fitted, zoo_onnx, tmp_path):
    small = load_onnx(zoo_onnx["mobilenet_v2"])
    pred = fitted.predict_onnx(small, input_specs(small))
    assert pred.latency_ms == pytest.approx(sum(x.latency_ms for x in pred.layers) + pred.overhead_ms)
    assert all(x.latency_ms >= 0 and x.kernel_ms > 0 for x in pred.layers) and len(pred.layers) == 64
    big = _export(zoo.build("mobilenet_v2", num_classes=10), 160, tmp_path / "big.onnx")
    assert fitted.predict_onnx(big, input_specs(big)).latency_ms > 1.8 * pred.latency_ms  # 2.8x the pixels


def test_batched_network_prediction_matches_one_by_one(fitted):
    from deploykit.archspace import MBV2_SPACE, arch_kernels, sample_arch

    rng = np.random.default_rng(0)
    nets = [arch_kernels(MBV2_SPACE, sample_arch(MBV2_SPACE, rng)) for _ in range(5)]
    np.testing.assert_allclose(fitted.predict_networks(nets), [fitted.predict_kernels(ks) for ks in nets], rtol=1e-12)


def test_predictor_refuses_other_device_and_version(fitted, small_table, tmp_path):
    doc = json.loads(json.dumps(fitted.doc))
    doc["device"]["cpu_model"] = "Some Other CPU"
    path = predictor_path(small_table)
    original = path.read_text()
    try:
        path.write_text(json.dumps(doc))
        with pytest.raises(DeployKitError, match="fitted for another device"):
            KernelPredictor.for_device(str(small_table))
        path.write_text(json.dumps({**fitted.doc, "format_version": 99}))
        with pytest.raises(DeployKitError, match="format_version 99.*refit"):
            KernelPredictor.for_device(str(small_table))
    finally:
        path.write_text(original)


def test_missing_kind_is_named():
    with pytest.raises(DeployKitError, match="no 'resize' kernels.*--kinds resize"):
        pred = KernelPredictor.__new__(KernelPredictor)
        pred.kinds, pred.doc = {}, {"table": "t"}
        pred.kernel_ms([Kernel.make("resize", c=8, h=8, mode="nearest")])


def test_cli_predict_json_and_unsupported_op(fitted, small_table, zoo_onnx, tmp_path):
    proc = run_cli("predict", zoo_onnx["resnet18"], "--device", small_table, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["latency_ms"] > 0 and {"name", "op_type", "latency_ms"} <= out["layers"][0].keys()
    bad = _graph_model([helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                        helper.make_node("Softmax", ["c"], ["y"], name="soft", axis=1)], [("x", [1, 8, 16, 16])], ["y"],
                       [onnx.numpy_helper.from_array(np.ones((8, 8, 3, 3), np.float32), "w")])
    onnx.save(bad, tmp_path / "bad.onnx")
    line = one_error_line(run_cli("predict", tmp_path / "bad.onnx", "--device", small_table))
    assert "Softmax" in line and "soft" in line and "--allow-missing" in line
    proc = run_cli("predict", tmp_path / "bad.onnx", "--device", small_table, "--allow-missing", "--json")
    assert proc.returncode == 0 and "Softmax" in proc.stderr
    out = json.loads(proc.stdout)
    assert [m["name"] for m in out["missing"]] == ["soft"] and len(out["layers"]) == 1


def test_cli_evaluate_reports_accuracy_and_plot(fitted, small_table, zoo_onnx, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for name, path in zoo_onnx.items():
        (models / f"{name}.onnx").write_bytes(Path(path).read_bytes())
    proc = run_cli("predictor", "evaluate", "--device", small_table, "--models", models, "--out", tmp_path / "eval",
                   "--force", "--json", "--no-progress", "--passes", "2", "--drift-nets", "2")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passes"] == 2 and report["predictor"]["n"] == 2
    assert report["drift"]["n"] == 2 and 0.5 < report["drift"]["now_over_table"] < 2  # the table's nets, re-measured here and {"within_5", "within_10", "mape", "rmse_ms", "kendall_tau"} <= report["predictor"].keys()
    assert (tmp_path / "eval" / "predicted_vs_measured.png").read_bytes()[:4] == b"\x89PNG"
    line = one_error_line(run_cli("predictor", "evaluate", "--device", small_table, "--models", tmp_path / "none"))
    assert "not a directory" in line
    line = one_error_line(run_cli("predictor", "evaluate", "--device", small_table, "--models", models, "--drift-nets", "999"))
    assert "calibration networks" in line and "give 0 to" in line
