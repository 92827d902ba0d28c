"""Kernel space and samplers: graphs build, run and fuse in ONNX Runtime; the prior looks like real CNNs."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from deploykit.kernels import (DEFAULT_KIND_WEIGHTS, DEFAULT_MAX_MACS, KERNEL_KINDS, SHAPE_PRIOR, Kernel,
                               KindSpec, kind_spec, propose_adaptive, register_kind, sample_kernels)
from deploykit.kernels import space
from deploykit.kernels.space import POPULAR_CHANNELS

BUILTIN_KINDS = {"conv", "dwconv", "gconv", "add", "mul", "concat", "shuffle", "maxpool", "avgpool", "gap",
                 "se", "linear", "resize", "split", "act"}
SAMPLED_KINDS = tuple(k for k in KERNEL_KINDS if kind_spec(k).sampled)  # "net" (calibration networks) is not
CONV_KINDS = ("conv", "dwconv", "gconv")


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pool_side(p: dict, side: int) -> int:
    pad = 1 if p["k"] == 3 else 0  # documented: 3x3 pools pad 1, 2x2 pools none
    return (side + 2 * pad - p["k"]) // p["s"] + 1


# Output shape implied by the parameters, written independently of the specs
EXPECTED_OUT = {
    **{k: lambda p: [1, p["cout"], _ceil_div(p["h"], p["s"]), _ceil_div(p["w"], p["s"])] for k in CONV_KINDS},
    "add": lambda p: [1, p["c"], p["h"], p["w"]],
    "mul": lambda p: [1, p["c"], p["h"], p["w"]],
    "concat": lambda p: [1, p["n"] * p["c"], p["h"], p["w"]],
    "shuffle": lambda p: [1, p["c"], p["h"], p["w"]],
    "maxpool": lambda p: [1, p["c"], _pool_side(p, p["h"]), _pool_side(p, p["w"])],
    "avgpool": lambda p: [1, p["c"], _pool_side(p, p["h"]), _pool_side(p, p["w"])],
    "gap": lambda p: [1, p["c"], 1, 1],
    "se": lambda p: [1, p["c"], p["h"], p["w"]],
    "linear": lambda p: [1, p["cout"]],
    "resize": lambda p: [1, p["c"], 2 * p["h"], 2 * p["w"]],
    "split": lambda p: [1, p["c"] // p["n"], p["h"], p["w"]],
    "act": lambda p: [1, p["c"], p["h"], p["w"]],
}

# Small hand-written cases per kind (odd sizes, strides and groups on purpose), cheap enough for the reference evaluator
SMALL = {
    "conv": dict(cin=8, cout=16, h=9, w=11, k=3, s=2, d=1, g=1, act="hardswish"),
    "dwconv": dict(cin=16, cout=16, g=16, h=10, w=10, k=3, s=1, d=2, act="relu6"),
    "gconv": dict(cin=12, cout=24, g=3, h=8, w=8, k=5, s=2, d=1, act="silu"),
    "add": dict(c=8, h=7, w=9),
    "mul": dict(c=8, h=7, w=7, bcast="channel"),
    "concat": dict(n=3, c=8, h=5, w=5),
    "shuffle": dict(c=12, g=3, h=4, w=6),
    "maxpool": dict(c=8, h=9, w=9, k=3, s=2),
    "avgpool": dict(c=8, h=9, w=8, k=2, s=2),
    "gap": dict(c=16, h=7, w=7),
    "se": dict(c=32, h=6, w=6, r=4, gate="hardsigmoid"),
    "linear": dict(cin=64, cout=10),
    "resize": dict(c=8, h=5, w=6, mode="linear"),
    "split": dict(c=12, h=5, w=6, n=3),
    "act": dict(c=8, h=5, w=7, op="silu"),
}


def _session(model: onnx.ModelProto, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
             optimized_path: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = level
    so.intra_op_num_threads = 1
    so.log_severity_level = 3  # the NCHWc serialisation warning is expected
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _feeds(kernel: Kernel, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in kernel.input_shapes().items()}


def test_registry_has_builtin_kinds_and_weights():
    assert BUILTIN_KINDS == set(SAMPLED_KINDS) and set(KERNEL_KINDS) - BUILTIN_KINDS == {"net"}
    assert set(DEFAULT_KIND_WEIGHTS) == BUILTIN_KINDS
    assert set(EXPECTED_OUT) == set(SMALL) == BUILTIN_KINDS
    with pytest.raises(ValueError, match="already registered"):
        register_kind("conv")(KindSpec)


@pytest.mark.parametrize("kind", SAMPLED_KINDS)
def test_build_run_and_shape(kind):
    small = Kernel.make(kind, **SMALL[kind])
    prior = sample_kernels(3, np.random.default_rng(11), kinds=[kind], max_macs=30_000_000)
    assert len(prior) == 3
    for kernel in [small, *prior]:
        model = kernel.build_onnx()
        onnx.checker.check_model(model, full_check=True)
        y = _session(model).run(None, _feeds(kernel))[0]  # split has further outputs of the same shape
        expected = EXPECTED_OUT[kind](dict(kernel.params))
        assert list(y.shape) == expected == kernel.output_shape(), kernel.key
        assert np.isfinite(y).all(), kernel.key


@pytest.mark.parametrize("kind", SAMPLED_KINDS)
def test_ort_matches_reference_semantics(kind):
    """ORT's fused, optimised execution computes the same function as the unfused graph."""
    kernel = Kernel.make(kind, **SMALL[kind])
    model, feeds = kernel.build_onnx(seed=3), _feeds(kernel, seed=4)
    for got, want in zip(_session(model).run(None, feeds), ReferenceEvaluator(model).run(None, feeds), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)  # float32 reassociation in fused kernels


TORCH_ACTS = {"none": lambda t: t, "relu": F.relu, "relu6": F.relu6, "hardswish": F.hardswish,
              "silu": F.silu, "sigmoid": torch.sigmoid}


@pytest.mark.parametrize("kind", CONV_KINDS)
@pytest.mark.parametrize("act", sorted(TORCH_ACTS))
def test_conv_graph_matches_pytorch(kind, act):
    """Padding, stride, dilation, groups, BN and activations mean what PyTorch means by them."""
    p = {**SMALL[kind], "act": act}
    kernel = Kernel.make(kind, **p)
    model = kernel.build_onnx(seed=1)
    w, scale, bias, mean, var = (torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer[:5])
    x = _feeds(kernel)["x"]
    ref = F.conv2d(torch.from_numpy(x), w, stride=p["s"], padding=p["d"] * (p["k"] - 1) // 2, dilation=p["d"],
                   groups=p["g"])
    ref = TORCH_ACTS[act](F.batch_norm(ref, mean, var, scale, bias, eps=1e-5))
    (got,) = _session(model).run(None, {"x": x})
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-5)


def test_shuffle_permutes_channels():
    kernel = Kernel.make("shuffle", c=6, g=2, h=1, w=1)
    x = np.arange(6, dtype=np.float32).reshape(1, 6, 1, 1)
    (y,) = _session(kernel.build_onnx()).run(None, {"x": x})
    assert y.ravel().tolist() == [0, 3, 1, 4, 2, 5]  # ShuffleNet: groups of 3 interleaved


def test_conv_bn_relu_is_fused_by_ort(tmp_path):
    kernel = Kernel.make("conv", cin=32, cout=64, h=28, k=3, act="relu")
    model = kernel.build_onnx()
    assert {"Conv", "BatchNormalization", "Relu"} <= {n.op_type for n in model.graph.node}
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        path = str(tmp_path / f"opt_{int(level)}.onnx")
        _session(model, level, path)
        ops = [n.op_type for n in onnx.load(path).graph.node]
        assert "BatchNormalization" not in ops and "Relu" not in ops, ops
        assert any("Conv" in op for op in ops), ops


@pytest.mark.parametrize("kind", SAMPLED_KINDS)
def test_key_round_trip(kind):
    for kernel in [Kernel.make(kind, **SMALL[kind]), *sample_kernels(5, np.random.default_rng(2), kinds=[kind])]:
        d = json.loads(json.dumps(kernel.to_dict()))
        assert d["kind"] == kind
        back = Kernel.from_dict(d)
        assert back == kernel and back.key == kernel.key and hash(back) == hash(kernel)
        assert Kernel.from_key(kernel.key) == kernel
        assert kernel.key.startswith(f"{kind}:") and kernel.key == f"{kind}:" + ",".join(
            f"{n}={v}" for n, v in sorted(kernel.to_dict().items()) if n != "kind")


def test_key_is_canonical_and_defaults_fill():
    a = Kernel.make("conv", cin=32, cout=64, h=56, w=56, k=3, s=1, d=1, g=1, act="relu")
    b = Kernel.make("conv", act="relu", k=3, h=56, cout=64, cin=np.int64(32))
    assert a == b and a.key == "conv:act=relu,cin=32,cout=64,d=1,g=1,h=56,k=3,s=1,w=56"
    assert Kernel.make("dwconv", cin=24, h=14, k=5).key == "dwconv:act=none,cin=24,cout=24,d=1,g=24,h=14,k=5,s=1,w=14"
    assert a.get("cout") == 64 and a.macs == 64 * 56 * 56 * 32 * 9


@pytest.mark.parametrize("kind, params, message", [
    ("conv2d", {}, "valid: conv"),
    ("conv", dict(SMALL["conv"], bias=1), "unknown params \\['bias'\\]; valid"),
    ("conv", {k: v for k, v in SMALL["conv"].items() if k != "cin"}, "missing params \\['cin'\\]"),
    ("conv", dict(SMALL["conv"], k=4), "k=4 not in 1/3/5/7"),
    ("conv", dict(SMALL["conv"], act="gelu"), "act='gelu' not in none/relu"),
    ("conv", dict(SMALL["conv"], cin=32.0), "cin=32.0"),
    ("conv", dict(SMALL["conv"], s=True), "s=True"),
    ("conv", dict(SMALL["conv"], cin=0), "cin=0 not in 1..8192"),
    ("conv", dict(SMALL["conv"], g=2), "g must be 1"),
    ("dwconv", dict(SMALL["dwconv"], cout=32), "g == cin == cout"),
    ("gconv", dict(SMALL["gconv"], cin=13), "divisible by g"),
    ("gconv", dict(SMALL["gconv"], g=12, cin=12), "1 < g < cin"),
    ("shuffle", dict(SMALL["shuffle"], c=10), "divisible by g"),
    ("se", dict(SMALL["se"], c=8, r=16), "smaller than reduction"),
    ("maxpool", dict(SMALL["maxpool"], h=2), "smaller than k"),
    ("mul", dict(SMALL["mul"], bcast="spatial"), "bcast='spatial'"),
])
def test_make_rejects_bad_params(kind, params, message):
    with pytest.raises(ValueError, match=message):
        Kernel.make(kind, **params)


def test_build_rejects_old_opset():
    with pytest.raises(ValueError, match="opset"):
        Kernel.make("add", c=8, h=8).build_onnx(opset=11)


def test_features_are_stable_numeric_per_kind():
    for kind in SAMPLED_KINDS:
        feats = [k.features() for k in sample_kernels(20, np.random.default_rng(5), kinds=[kind])]
        assert all(f.keys() == feats[0].keys() for f in feats), kind
        assert all(math.isfinite(v) and v >= 0 for f in feats for v in f.values()), kind
        assert {"macs", "in_bytes", "out_bytes"} <= feats[0].keys()
    conv = Kernel.make("conv", **SMALL["conv"]).features()
    assert conv["act=hardswish"] == 1.0 and conv["act=relu"] == 0.0 and conv["cin"] == 8.0


# ---------------------------------------------------------------- prior sampling

@pytest.fixture(scope="module")
def prior() -> list[Kernel]:
    return sample_kernels(2000, np.random.default_rng(0))


def _channel_params(kernel: Kernel) -> list[str]:
    return list(kind_spec(kernel.kind).channel_params)


def test_prior_respects_cap_and_is_unique(prior):
    assert len(prior) == 2000 and len({k.key for k in prior}) == 2000
    assert max(k.macs for k in prior) <= DEFAULT_MAX_MACS
    small = sample_kernels(300, np.random.default_rng(1), max_macs=10_000_000)
    assert len(small) == 300 and max(k.macs for k in small) <= 10_000_000


def test_prior_covers_every_kind_in_proportion():
    kernels = sample_kernels(1500, np.random.default_rng(3))
    counts = Counter(k.kind for k in kernels)
    assert set(counts) == set(SAMPLED_KINDS)
    assert min(counts.values()) >= 40  # enough per kind to fit a regressor
    total = sum(DEFAULT_KIND_WEIGHTS.values())
    for kind, w in DEFAULT_KIND_WEIGHTS.items():
        assert abs(counts[kind] - 1500 * w / total) <= 1, kind  # largest-remainder quotas are exact


def test_prior_ranges_follow_the_joint_table(prior):
    rows = {h: (lo, hi) for h, lo, hi, _ in SHAPE_PRIOR}
    for k in prior:
        p = dict(k.params)
        if k.kind == "linear":
            assert 64 <= p["cin"] <= 4096 and 10 <= p["cout"] <= 1000
            continue
        assert p["h"] == p["w"] and p["h"] in rows, k.key
        lo, hi = rows[p["h"]]
        for name in _channel_params(k):
            assert lo <= p[name] <= hi, k.key
    # the brief's example: nothing wide at high resolution
    assert not [k for k in prior if k.kind in CONV_KINDS and k.get("h") >= 112 and k.get("cout") >= 1024]


def test_prior_channels_shrink_with_resolution(prior):
    def median_channels(h):
        at_h = [k for k in prior if k.kind != "linear" and k.get("h") == h]
        return np.median([k.get(n) for k in at_h for n in _channel_params(k)])
    medians = [median_channels(h) for h in (224, 112, 56, 28, 14, 7)]
    assert medians == sorted(medians)  # monotone: wider as maps get smaller
    assert medians[-1] > 4 * medians[0]


def test_prior_channel_values_are_network_like(prior):
    for k in prior:
        for name in _channel_params(k):
            c, g = k.get(name), dict(k.params).get("g", 1)
            stem = k.kind == "conv" and name == "cin" and c == 3
            classes = k.kind == "linear" and name == "cout" and c in (10, 100, 1000)  # CIFAR/ImageNet heads
            grouped = k.kind in ("gconv", "shuffle") and c % g == 0  # snapped to the group count
            ok = c % 8 == 0 or classes or c in POPULAR_CHANNELS or stem or grouped
            assert ok, k.key
    share8 = np.mean([k.get(n) % 8 == 0 for k in prior for n in _channel_params(k)])
    assert share8 > 0.5  # "mostly multiples of 8"
    stems = [k for k in prior if k.kind == "conv" and k.get("cin") == 3]
    assert stems and all(k.get("s") == 2 and k.get("h") >= 128 for k in stems)


def test_prior_couples_cout_to_cin_and_stride_to_even_maps(prior):
    convs = [k for k in prior if k.kind == "conv" and k.get("cin") >= 8]
    cin = np.array([k.get("cin") for k in convs])
    cout = np.array([k.get("cout") for k in convs])
    same_h = np.array([k.get("h") for k in convs])
    # baseline: pair each cin with the cout of another conv at the same resolution (independent draw)
    rng = np.random.default_rng(0)
    shuffled = cout.copy()
    for h in np.unique(same_h):
        idx = np.flatnonzero(same_h == h)
        shuffled[idx] = cout[rng.permutation(idx)]
    assert np.mean(cout == cin) > 2 * np.mean(shuffled == cin)
    strided = [k for k in prior if dict(k.params).get("s") == 2]
    assert np.mean([k.get("h") % 2 == 0 for k in strided]) > 0.5


def test_prior_is_deterministic(prior):
    again = sample_kernels(2000, np.random.default_rng(0))
    assert [k.key for k in again] == [k.key for k in prior]
    other = sample_kernels(2000, np.random.default_rng(1))
    assert [k.key for k in other] != [k.key for k in prior]


def test_sampler_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="valid: conv"):
        sample_kernels(10, np.random.default_rng(0), kinds=["conv", "lstm"])


def test_registered_kind_is_sampled_and_built(monkeypatch):
    monkeypatch.setattr(space, "_REGISTRY", dict(space._REGISTRY))
    monkeypatch.setattr(space, "KERNEL_KINDS", space.KERNEL_KINDS)

    @register_kind("neg")
    class NegSpec(KindSpec):
        domains = {"c": space.CHANNELS, "h": space.SPATIAL, "w": space.SPATIAL}
        channel_params = ("c",)

        def sample(self, rng, site):
            return dict(c=site.channels(rng), h=site.h, w=site.h)

        def build(self, g, p):
            return g.op("Neg", "x")

    assert space.KERNEL_KINDS[-1] == "neg"
    kernels = sample_kernels(len(SAMPLED_KINDS) * 30 + 30, np.random.default_rng(0))
    negs = [k for k in kernels if k.kind == "neg"]
    assert negs
    x = _feeds(negs[0])
    (y,) = _session(negs[0].build_onnx()).run(None, x)
    np.testing.assert_array_equal(y, -x["x"])


# ---------------------------------------------------------------- adaptive proposals

def _step_latency(kernels, kinds_with_step=("conv",)):
    """1 ns per MAC, 3x slower above the median conv cost: a cache cliff."""
    threshold = float(np.median([k.macs for k in kernels if k.kind in kinds_with_step]))
    return threshold, [(k, k.macs * 1e-9 * (3.0 if k.kind in kinds_with_step and k.macs > threshold else 1.0))
                       for k in kernels]


def test_proposals_concentrate_near_a_latency_step():
    measured_kernels = sample_kernels(600, np.random.default_rng(4), kinds=["conv"])
    threshold, measured = _step_latency(measured_kernels)
    proposals = propose_adaptive(measured, 200, np.random.default_rng(5))
    assert len(proposals) == 200 and all(k.kind == "conv" for k in proposals)
    # one perturbation scales at most two channel params by <= 4/3 each: that far from the step is "near"
    band = 2 * math.log(4 / 3)

    def near(kernels):
        return np.mean([abs(math.log(k.macs / threshold)) <= band for k in kernels])

    assert near(proposals) > 2 * near(measured_kernels)


def test_proposals_go_to_the_kind_with_error():
    kernels = sample_kernels(800, np.random.default_rng(6), kinds=["conv", "dwconv"])
    _, measured = _step_latency(kernels, kinds_with_step=("conv",))
    counts = Counter(k.kind for k in propose_adaptive(measured, 200, np.random.default_rng(7)))
    measured_share = np.mean([k.kind == "conv" for k in kernels])
    assert counts["conv"] / 200 > measured_share  # dwconv latency is an exact power law: nothing to learn


def test_unexplored_kind_gets_proposals():
    kernels = sample_kernels(300, np.random.default_rng(8), kinds=["conv"])
    linear = sample_kernels(3, np.random.default_rng(8), kinds=["linear"])
    _, measured = _step_latency(kernels + linear)
    counts = Counter(k.kind for k in propose_adaptive(measured, 100, np.random.default_rng(9)))
    assert counts["linear"] > 0


def test_proposals_are_new_capped_deterministic(prior):
    _, measured = _step_latency(prior)
    cap = 100_000_000
    first = propose_adaptive(measured, 150, np.random.default_rng(10), max_macs=cap)
    again = propose_adaptive(measured, 150, np.random.default_rng(10), max_macs=cap)
    assert [k.key for k in first] == [k.key for k in again]
    keys = {k.key for k in first}
    assert len(keys) == 150 and not keys & {k.key for k in prior}
    assert max(k.macs for k in first) <= cap
    second = propose_adaptive(measured, 150, np.random.default_rng(10), max_macs=cap, exclude_keys=keys)
    assert len(second) == 150 and not {k.key for k in second} & keys
    for k in first:  # proposals stay in the kinds' valid spaces: construction re-validates
        assert Kernel.from_dict(k.to_dict()) == k


def test_proposals_without_measurements_fall_back_to_prior():
    kernels = propose_adaptive([], 30, np.random.default_rng(0))
    assert len(kernels) == 30 and len(set(kernels)) == 30
    assert propose_adaptive([], 0, np.random.default_rng(0)) == []
