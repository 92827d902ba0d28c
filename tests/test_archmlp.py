"""Architecture spaces and the architecture-level latency MLP: encodings, networks, gradients, fitting, files, CLI."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from torch import nn

from deploykit import archmlp
from deploykit.archcli import register, run
from deploykit.archmlp import (
    ArchLatencyMLP,
    evaluate,
    fit_arch_mlp,
    load_arch_mlp,
    load_measurements,
    measure_archs,
    plan_archs,
    pretrain_targets,
    read_measurements,
    relaxed_encoding,
    save_arch_mlp,
)
from deploykit.archspace import (
    DIGITS_SPACE,
    MBV2_SPACE,
    SKIP,
    SPACES,
    Arch,
    SpaceSpec,
    arch_kernels,
    arch_macs,
    build_network,
    choice_groups,
    decode,
    encode,
    encoding_size,
    get_space,
    groups,
    sample_arch,
)
from deploykit.errors import DeployKitError
from deploykit.protocol import Measurement
from deploykit.stats import LatencyStats

SPACE_NAMES = sorted(SPACES)


def macs_ms(kernels) -> float:
    """A stand-in kernel predictor: 10 us per MMAC plus 5 us per kernel, depthwise 4x less efficient."""
    return sum(k.macs * (4.0 if k.kind == "dwconv" else 1.0) * 1e-8 + 0.005 for k in kernels)


def other_device_ms(kernels) -> float:
    """A 'real' device the stand-in predictor gets wrong: slower overall, depthwise relatively slower, fixed overhead."""
    return 0.2 + sum(k.macs * (7.0 if k.kind == "dwconv" else 1.0) * 1.6e-8 + 0.01 for k in kernels)


# -- spaces and encodings ----------------------------------------------------------------------

@pytest.mark.parametrize("name", SPACE_NAMES)
def test_spec_round_trips_through_json(name, tmp_path):
    spec = SPACES[name]
    text = json.dumps(spec.to_dict())
    assert SpaceSpec.from_dict(json.loads(text)) == spec
    path = tmp_path / "space.json"
    path.write_text(text)
    assert get_space(str(path)) == spec
    assert get_space(name) is spec


@pytest.mark.parametrize("change, match", [
    ({"stages": [{"channels": 16, "depth": 1, "stride": 3}]}, "stride"),
    ({"kernel_sizes": [3, 4]}, "kernel_sizes"),
    ({"resolutions": []}, "resolutions"),
    ({"width_ratios": [0.5, 0.5]}, "width_ratios"),
    ({"num_classes": 0}, "num_classes"),
    ({"channel_divisor": 0}, "channel_divisor"),
    ({"depth_multiplier": 2}, "unknown fields"),
])
def test_bad_spec_is_one_clear_error(change, match):
    with pytest.raises(DeployKitError, match=match) as e:
        SpaceSpec.from_dict({**DIGITS_SPACE.to_dict(), **change})
    assert "\n" not in str(e.value)


def test_unknown_space_names_the_choices():
    with pytest.raises(DeployKitError, match="mbv2"):
        get_space("no-such-space")


@pytest.mark.parametrize("name", SPACE_NAMES)
def test_encoding_round_trips_and_groups_tile_it(name):
    spec = SPACES[name]
    slices = groups(spec)
    assert [s for _, s, _ in slices] == list(np.cumsum([0] + [n for _, _, n in slices[:-1]]))
    assert sum(n for _, _, n in slices) == encoding_size(spec)
    for g in choice_groups(spec):  # skip never replaces a shape-changing first block
        assert (SKIP in g.choices) == (g.name.endswith(".op") and not g.name.endswith(".b0.op"))
    rng = np.random.default_rng(0)
    for _ in range(20):
        arch = sample_arch(spec, rng)
        e = encode(spec, arch)
        assert e.dtype == np.float32 and e.shape == (encoding_size(spec),)
        assert all(e[s:s + n].sum() == 1.0 for _, s, n in slices)
        assert decode(spec, e) == arch
        assert Arch.from_dict(json.loads(json.dumps(arch.to_dict()))) == arch


def test_encode_refuses_choices_outside_the_space():
    arch = sample_arch(DIGITS_SPACE, np.random.default_rng(0))
    bad = Arch(("skip",) + arch.ops[1:], arch.widths, arch.resolution)  # skip on a first block
    with pytest.raises(DeployKitError, match="s1.b0.op"):
        encode(DIGITS_SPACE, bad)
    with pytest.raises(DeployKitError, match="widths"):
        encode(DIGITS_SPACE, Arch(arch.ops, arch.widths[:-1], arch.resolution))


def torch_macs(net: nn.Module, resolution: int) -> int:
    """MACs of every Conv2d and Linear, counted from the shapes torch really produces."""
    total = 0

    def hook(m, _inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:
            total += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        out = net(torch.randn(1, 3, resolution, resolution))
    for h in handles:
        h.remove()
    return total, out


@pytest.mark.parametrize("name", SPACE_NAMES)
def test_network_runs_and_kernels_describe_it(name):
    spec = SPACES[name]
    rng = np.random.default_rng(1)
    for _ in range(3):
        arch = sample_arch(spec, rng)
        net = build_network(spec, arch)
        assert not net.training
        macs, out = torch_macs(net, arch.resolution)
        assert out.shape == (1, spec.num_classes)
        assert arch_macs(spec, arch) == pytest.approx(macs, rel=0.01)
        kernels = arch_kernels(spec, arch)
        n_dw = sum(1 for m in net.modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
        assert sum(k.kind == "dwconv" for k in kernels) == n_dw
        assert [k.kind for k in kernels[-3:]] == ["conv", "gap", "linear"]


# -- the model: gradients, relaxation, fitting ---------------------------------------------------

def test_gradient_matches_finite_differences():
    spec = DIGITS_SPACE
    torch.manual_seed(0)
    model = ArchLatencyMLP(encoding_size(spec), hidden=(32, 32)).double()
    with torch.no_grad():
        model.in_mean.uniform_(0.1, 0.3)
        model.in_std.uniform_(0.3, 0.6)
        model.out_mean.fill_(1.0)
        model.out_std.fill_(0.5)
    logits = torch.randn(3, encoding_size(spec), dtype=torch.float64, requires_grad=True)
    def latency_of_logits(lg: torch.Tensor) -> torch.Tensor:
        return model(relaxed_encoding(spec, lg, tau=0.7, gumbel=False))

    assert torch.autograd.gradcheck(latency_of_logits, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)
    enc = relaxed_encoding(spec, logits.detach(), gumbel=False).requires_grad_(True)
    assert torch.autograd.gradcheck(model, (enc,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("gumbel", [True, False])
@pytest.mark.parametrize("hard", [True, False])
def test_relaxed_encoding_is_a_distribution_per_group(gumbel, hard):
    spec = MBV2_SPACE
    logits = torch.randn(5, encoding_size(spec), requires_grad=True)
    r = relaxed_encoding(spec, logits, tau=0.5, hard=hard, gumbel=gumbel)
    assert r.shape == logits.shape
    for _, s, n in groups(spec):
        part = r[:, s:s + n]
        assert torch.allclose(part.sum(-1), torch.ones(5), atol=1e-5)
        assert bool((part >= 0).all())
        if hard:
            assert bool(((part == 0) | (part == 1)).all())
    r.sum().backward()
    assert logits.grad is not None
    with pytest.raises(DeployKitError, match="entries"):
        relaxed_encoding(spec, torch.zeros(3, 7))


def test_fit_learns_a_synthetic_target_deterministically():
    spec = DIGITS_SPACE
    x, y = pretrain_targets(spec, 400, seed=0, predict_kernels=macs_ms)
    xt, yt = pretrain_targets(spec, 100, seed=1, predict_kernels=macs_ms)
    model = fit_arch_mlp(spec, x, y, epochs=150, seed=0)
    result = evaluate(model, xt, yt)
    assert result["within_10"] >= 0.95 and result["kendall_tau"] > 0.9, result
    again = fit_arch_mlp(spec, x, y, epochs=150, seed=0)
    assert np.array_equal(again.predict_ms(xt), model.predict_ms(xt))
    assert np.all(model.predict_ms(xt) > 0)


def test_fine_tuning_corrects_a_pretrained_model_with_few_measurements():
    spec = DIGITS_SPACE
    x, y = pretrain_targets(spec, 400, seed=0, predict_kernels=macs_ms)
    pre = fit_arch_mlp(spec, x, y, epochs=100, seed=0)
    xr, yr = pretrain_targets(spec, 40, seed=2, predict_kernels=other_device_ms)
    xt, yt = pretrain_targets(spec, 100, seed=3, predict_kernels=other_device_ms)
    assert evaluate(pre, xt, yt)["within_10"] < 0.2  # the pretrained scale is wrong on this device
    tuned = fit_arch_mlp(spec, xr, yr, epochs=50, seed=0, init=pre)
    assert evaluate(tuned, xt, yt)["within_10"] >= 0.9
    assert np.array_equal(pre.predict_ms(xt), fit_arch_mlp(spec, x, y, epochs=100, seed=0).predict_ms(xt))  # init untouched


def test_predict_ms_batches_numpy_and_keeps_tensors_differentiable():
    spec = MBV2_SPACE
    model = ArchLatencyMLP(encoding_size(spec))
    enc = np.stack([encode(spec, a) for a in plan_archs(spec, 10, seed=0)])
    out = model.predict_ms(enc)
    assert isinstance(out, np.ndarray) and out.shape == (10,)
    assert np.isclose(model.predict_ms(enc[0]), out[0])
    t = torch.as_tensor(enc, dtype=torch.float32).requires_grad_(True)
    model.predict_ms(t).sum().backward()
    assert t.grad is not None and t.grad.shape == t.shape


# -- files -----------------------------------------------------------------------------------------

def test_model_file_round_trips_exactly_and_refuses_other_versions(tmp_path):
    spec = DIGITS_SPACE
    x, y = pretrain_targets(spec, 60, seed=0, predict_kernels=macs_ms)
    model = fit_arch_mlp(spec, x, y, epochs=20, seed=0)
    path = save_arch_mlp(model, spec, tmp_path / "m.json", {"note": "test"}, device={"backend": "ort-cpu"})
    loaded, spec2, meta = load_arch_mlp(path)
    assert spec2 == spec and meta["note"] == "test" and meta["device"] == {"backend": "ort-cpu"}
    assert np.array_equal(loaded.predict_ms(x), model.predict_ms(x))
    doc = json.loads(path.read_text())
    (tmp_path / "v2.json").write_text(json.dumps({**doc, "format_version": 2}))
    with pytest.raises(DeployKitError, match="format_version 2"):
        load_arch_mlp(tmp_path / "v2.json")
    (tmp_path / "other.json").write_text(json.dumps({**doc, "format": "something-else"}))
    with pytest.raises(DeployKitError, match="not a deploykit architecture predictor"):
        load_arch_mlp(tmp_path / "other.json")
    (tmp_path / "cut.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "linear"}))
    with pytest.raises(DeployKitError, match="malformed"):
        load_arch_mlp(tmp_path / "cut.json")


class CountingBackend:
    """Wraps a real backend and counts its measurements."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def fingerprint(self) -> dict:
        return self.inner.fingerprint()

    def measure(self, model, inputs, protocol):
        self.calls += 1
        return self.inner.measure(model, inputs, protocol)


def test_measure_archs_writes_one_line_each_and_resumes(tmp_path):
    from deploykit.profilers import get_backend

    backend = CountingBackend(get_backend("ort-cpu", threads=1))
    out = tmp_path / "digits.jsonl"
    first = measure_archs(DIGITS_SPACE, 3, backend, out, seed=0, progress=False)
    assert backend.calls == 3 and len(out.read_text().splitlines()) == 4
    header, records, torn = read_measurements(out)
    assert header["spec"] == DIGITS_SPACE.to_dict() and header["device"]["backend"] == "ort-cpu" and not torn
    assert all(r["latency_ms"] > 0 and r["count"] >= 3 and {"p90_ms", "std_ms"} <= set(r) for r in records)
    with open(out, "a") as f:
        f.write('{"arch": {"ops": ["k3')  # a kill in mid-write
    again = measure_archs(DIGITS_SPACE, 4, backend, out, seed=0, progress=False)
    assert backend.calls == 4 and again[:3] == first
    assert len(out.read_text().splitlines()) == 5 and not read_measurements(out)[2]
    with pytest.raises(DeployKitError, match="another search space"):
        measure_archs(MBV2_SPACE, 1, backend, out, progress=False)


class FakeBackend:
    """No device: latency is the stand-in predictor's, so files for fit/evaluate are instant to make."""

    def __init__(self, cpu="fake-cpu"):
        self.cpu = cpu

    def fingerprint(self) -> dict:
        return {"backend": "fake", "cpu_model": self.cpu, "threads": 1}


@pytest.fixture
def fake_measure(monkeypatch):
    def measure_arch(spec, arch, backend, protocol):
        ms = macs_ms(arch_kernels(spec, arch))
        return Measurement(LatencyStats(ms, ms * 1.05, ms * 0.01, ms, 9), [ms] * 3, 0.0, False)

    monkeypatch.setattr(archmlp, "measure_arch", measure_arch)


def test_measure_archs_refuses_another_device(tmp_path, fake_measure):
    out = tmp_path / "a.jsonl"
    measure_archs(DIGITS_SPACE, 2, FakeBackend(), out, progress=False)
    with pytest.raises(DeployKitError, match="another device"):
        measure_archs(DIGITS_SPACE, 3, FakeBackend("other-cpu"), out, progress=False)


def test_measure_archs_passes_keep_the_median_and_resume(tmp_path, monkeypatch):
    calls = []

    def measure_arch(spec, arch, backend, protocol):  # timing k (from 1) reads k ms: which pass made which median shows
        calls.append(arch.key)
        if len(calls) == 4:
            raise KeyboardInterrupt
        ms = float(len(calls))
        return Measurement(LatencyStats(ms, ms, 0.0, ms, 3), [ms] * 3, 0.0, False)

    monkeypatch.setattr(archmlp, "measure_arch", measure_arch)
    out = tmp_path / "p.jsonl"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C in pass 2: the three timings taken stay in the file
        measure_archs(DIGITS_SPACE, 2, FakeBackend(), out, passes=3, progress=False)
    records = measure_archs(DIGITS_SPACE, 2, FakeBackend(), out, passes=3, progress=False)
    a, b = plan_archs(DIGITS_SPACE, 2, 0)
    assert calls == [a.key, b.key, a.key, b.key, b.key, a.key, b.key]
    # a: timings 1, 3, 6 -> 3 ms; b: 2, 5 (4 was interrupted), 7 -> 5 ms
    assert [r["pass_latencies_ms"] for r in records] == [[1.0, 3.0, 6.0], [2.0, 5.0, 7.0]]
    assert [r["latency_ms"] for r in records] == [3.0, 5.0] and [r["passes"] for r in records] == [3, 3]
    assert measure_archs(DIGITS_SPACE, 2, FakeBackend(), out, passes=2, progress=False) == records and len(calls) == 7
    _, _, archs, lat = load_measurements([out])
    assert [x.key for x in archs] == [a.key, b.key] and list(lat) == [3.0, 5.0]
    with pytest.raises(DeployKitError, match="--passes"):
        measure_archs(DIGITS_SPACE, 2, FakeBackend(), out, passes=0, progress=False)
    with pytest.raises(DeployKitError, match="--passes"):
        cli("arch-predictor", "measure", "--space", "digits", "--n", "2", "--out", str(tmp_path / "q.jsonl"), "--passes", "0")
    assert not (tmp_path / "q.jsonl").exists()


def cli(*argv: str) -> int:
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers(dest="cmd", required=True))
    args = ap.parse_args(list(argv))
    assert args.fn is run
    return args.fn(args)


def test_cli_fit_evaluate_predict(tmp_path, fake_measure, capsys):
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    measure_archs(DIGITS_SPACE, 240, FakeBackend(), train, seed=0, progress=False)
    measure_archs(DIGITS_SPACE, 60, FakeBackend(), test, seed=1, progress=False)
    model = tmp_path / "model.json"
    assert cli("arch-predictor", "fit", "--data", str(train), "--out", str(model), "--epochs", "60", "--holdout", "40") == 0
    assert "held out:" in capsys.readouterr().out
    assert cli("arch-predictor", "evaluate", "--model", str(model), "--data", str(test), "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 60 and result["within_10"] >= 0.9
    arch = sample_arch(DIGITS_SPACE, np.random.default_rng(5))
    (tmp_path / "arch.json").write_text(json.dumps(arch.to_dict()))
    assert cli("arch-predictor", "predict", "--model", str(model), "--arch", str(tmp_path / "arch.json")) == 0
    assert float(capsys.readouterr().out.split()[0]) > 0
    with pytest.raises(DeployKitError, match="--holdout"):
        cli("arch-predictor", "fit", "--data", str(test), "--out", str(model), "--holdout", "55")
    _, _, archs, lat = load_measurements([train, test])
    assert len(archs) == len(lat) <= 300


def test_cli_fit_from_kernel_predictor_labels_alone(tmp_path, capsys):
    from deploykit.predictor import KernelPredictor

    model = tmp_path / "pre.json"
    assert cli("arch-predictor", "fit", "--space", "digits", "--pretrain-device", "epyc-2c-ort-t1", "--pretrain-n", "1000",
               "--epochs", "100", "--out", str(model)) == 0
    assert "no measurement" in capsys.readouterr().out
    mlp, spec, meta = load_arch_mlp(model)
    assert spec == DIGITS_SPACE and meta["n_train"] == 0 and meta["pretrained_on"]["n"] == 1000
    x, y = pretrain_targets(DIGITS_SPACE, 100, seed=9,
                            predict_networks=KernelPredictor.for_device("epyc-2c-ort-t1").predict_networks)
    assert evaluate(mlp, x, y)["within_10"] >= 0.9  # it learned the kernel predictor's labels of unseen architectures
    with pytest.raises(DeployKitError, match="--pretrain-device and --space"):
        cli("arch-predictor", "fit", "--space", "digits", "--out", str(model))
