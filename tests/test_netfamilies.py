"""Network families, the evaluation set and random networks: they build, export to the predictor's op vocabulary
(BatchNorm folded, nothing unexpected), ONNX Runtime agrees with PyTorch, and random networks are reproducible."""
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from deploykit import zoo
from deploykit.errors import DeployKitError
from deploykit.netfamilies import (
    BLOCK_TYPES,
    FAMILIES,
    RANDOM_MACS_224,
    build_family,
    eval_specs,
    network_from_arch,
    random_network,
    random_network_arch,
)

RES = 64
NUM_CLASSES = 10
# What the exported graphs are made of: no BatchNormalization (folded), no Identity (deduplicated initialisers),
# no shape arithmetic (Shape/Gather/Slice from x.chunk).
ALLOWED_OPS = {"Conv", "Relu", "Clip", "HardSwish", "Sigmoid", "HardSigmoid", "Mul", "Add", "Concat", "Reshape", "Transpose",
               "Split", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Gemm", "Constant"}
# Seeds whose architectures together use every block type (and both shuffle variants, a 3-group shuffle).
RANDOM_SEEDS = {1: (1, 2, 3, 11), 2: (0, 1, 8)}  # per generator version: seeds covering every block type


def _x(res: int = RES) -> torch.Tensor:
    return torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(0))


def _export_and_check(model: torch.nn.Module, path: Path, res: int = RES) -> Counter:
    """Export, check the op types, and compare ONNX Runtime's output with PyTorch's; returns the op counts."""
    zoo.export_onnx(model, (1, 3, res, res), path)
    graph = onnx.load(path).graph
    ops = Counter(n.op_type for n in graph.node)
    assert set(ops) <= ALLOWED_OPS, set(ops) - ALLOWED_OPS
    x = _x(res)
    with torch.no_grad():
        ref = model(x).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x.numpy()})[0]
    assert out.shape == ref.shape == (1, NUM_CLASSES)
    scale = float(np.abs(ref).max())
    assert scale > 0 and np.isfinite(out).all()
    assert np.abs(out - ref).max() <= 1e-3 * scale
    return ops


# Patterns each family is about, as op counts of its exported graph (width 0.5)
SIGNATURES = {
    "mobilenet_v3": {"HardSigmoid": 8, "Gemm": 2},
    "efficientnet": {"GlobalAveragePool": 17},  # 16 SE blocks + the head
    "shufflenet_v2": {"Split": 13, "Transpose": 16},
    "inception": {"Concat": 9},
    "densenet": {"Concat": 32, "AveragePool": 3},
    "squeezenet": {"Concat": 8},
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_builds_and_exports(family, tmp_path):
    for width in (1.0, 0.5):
        model = build_family(family, width, NUM_CLASSES)
        assert not model.training
        with torch.no_grad():
            assert model(_x()).shape == (1, NUM_CLASSES)
    ops = _export_and_check(model, tmp_path / f"{family}.onnx")
    assert ops["Conv"] > 5 and ops["Gemm"] >= 1
    for op, n in SIGNATURES.get(family, {}).items():
        assert ops[op] == n, (op, ops[op])


def test_build_family_deterministic_and_errors():
    a, b = build_family("regnet", 0.5), build_family("regnet", 0.5)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(DeployKitError, match=r"unknown network family 'resnet9'.*resnet_basic.*squeezenet"):
        build_family("resnet9")
    with pytest.raises(DeployKitError, match="width must be positive"):
        build_family("vgg", 0)


def test_eval_specs():
    specs = eval_specs()
    assert specs == eval_specs()  # deterministic
    assert 50 <= len(specs) <= 70
    names = [s.name for s in specs]
    assert len(set(names)) == len(names)
    assert {s.family for s in specs} == set(FAMILIES)
    for family in FAMILIES:
        mine = [s for s in specs if s.family == family]
        assert 2 <= len({s.width for s in mine}) <= 4 and 2 <= len({s.resolution for s in mine}) <= 4
    assert {s.width for s in specs} <= {0.5, 0.75, 1.0, 1.25, 1.5}
    assert {s.resolution for s in specs} <= {96, 128, 160, 192, 224}
    assert specs[0].name == "resnet_basic_w0.5_r128"
    assert all(re.fullmatch(r"[a-z_0-9]+_w[0-9.]+_r[0-9]+", n) for n in names)


@pytest.mark.parametrize("gen", sorted(RANDOM_SEEDS))
def test_random_networks_cover_the_vocabulary(tmp_path, gen):
    types, ops, widths = set(), Counter(), set()
    for seed in RANDOM_SEEDS[gen]:
        arch = random_network_arch(seed, RES, gen)
        types |= {s["type"] for s in arch["stages"]}
        widths |= {s["out"] for s in arch["stages"]}
        ops += _export_and_check(random_network(seed, RES, NUM_CLASSES, gen), tmp_path / f"r{seed}.onnx")
    assert types == set(BLOCK_TYPES)
    assert {"Split", "Transpose", "Concat", "Add", "AveragePool", "MaxPool", "GlobalAveragePool"} <= set(ops)
    # generation 1 keeps every stage width a multiple of 8; generation 2 also draws unaligned ones
    assert all(w % 8 == 0 for w in widths) == (gen == 1)


def test_generation_one_is_unchanged():
    """Tables name their calibration networks by (gen, seed): a generation must keep meaning the same networks."""
    arch = random_network_arch(5, RES, 1)
    assert [s["out"] for s in arch["stages"]] == [152, 368, 344, 832, 1560] and arch["gen"] == 1


def test_random_network_deterministic(tmp_path):
    a, b = random_network(3, RES, NUM_CLASSES), random_network(3, RES, NUM_CLASSES)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    paths = [zoo.export_onnx(m, (1, 3, RES, RES), tmp_path / f"{i}.onnx") for i, m in enumerate((a, b))]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    arch = random_network_arch(3, RES)
    assert arch == random_network_arch(3, RES)
    assert arch["stages"] != random_network_arch(4, RES)["stages"]
    # a description read back from JSON rebuilds the same network
    sc = network_from_arch(json.loads(json.dumps(arch)), NUM_CLASSES).state_dict()
    assert all(torch.equal(sa[k], sc[k]) for k in sa)
    with pytest.raises(DeployKitError, match="not a random_network_arch description"):
        network_from_arch({"seed": 3}, NUM_CLASSES)


def test_random_network_arch():
    lo, hi = RANDOM_MACS_224
    arch = random_network_arch(2, 96)
    assert json.loads(json.dumps(arch)) == arch
    assert arch["resolution"] == 96 and 3 <= len(arch["stages"]) <= 6
    assert 0.7 * lo <= arch["macs_224"] <= 1.3 * hi and arch["macs"] < arch["macs_224"]
    # the architecture does not depend on the resolution, only its cost does
    other = random_network_arch(2, 224)
    assert other["stages"] == arch["stages"] and other["macs"] == other["macs_224"]
    with pytest.raises(DeployKitError, match="seed"):
        random_network(-1, 64)
    with pytest.raises(DeployKitError, match="resolution"):
        random_network(0, 16)


def _tool():
    path = Path(__file__).resolve().parents[1] / "tools" / "make_eval_set.py"
    spec = importlib.util.spec_from_file_location("make_eval_set", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_eval_set(tmp_path, capsys):
    tool = _tool()
    assert tool.main(["--out", str(tmp_path), "--families", "squeezenet", "--limit", "1"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["squeezenet_w1_r128.onnx"]
    assert "1 exported, 0 already there" in capsys.readouterr().out
    assert tool.main(["--out", str(tmp_path), "--families", "squeezenet", "--limit", "1"]) == 0
    assert "0 exported, 1 already there" in capsys.readouterr().out
    assert tool.main(["--out", str(tmp_path), "--families", "vgg,alexnet"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "unknown family 'alexnet'" in err[0] and "resnet_basic" in err[0]
