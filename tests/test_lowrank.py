"""Trained low-rank decomposition: exact factorisations at full rank, cheaper and monotone truncations, TRP training
on real digits that lowers the weights' rank, ONNX export checked with ONNX Runtime, resumable checkpoints."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deploykit import zoo
from deploykit.compress.lowrank import (SCHEMES, TRPConfig, decompose, decomposable_layers, decomposed_report,
                                        factorize_layer, is_cheaper, ranks_for_energy, singular_values, trp_train)
from deploykit.data import DataSplit, load_dataset
from deploykit.errors import DeployKitError
from deploykit.train import accuracy, train_network

pytestmark = pytest.mark.usefixtures("one_thread")

EXCLUDE = ("stem.0", "fc")  # the first conv and the classifier, as a user would leave them
LR, BATCH = 1e-2, 32  # converges in 2 epochs on 16x16 digits


class TinyResNet(nn.Module):
    """A stem, one residual block of two 3x3 convs with BatchNorm, a strided 3x3 conv, pooling and a classifier."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(self.down(x).mean((2, 3)))


def fresh_net(seed: int = 0) -> TinyResNet:
    torch.manual_seed(seed)
    return TinyResNet()


def small(d: DataSplit, n: int) -> DataSplit:
    return DataSplit(d.train_x[:n], d.train_y[:n], d.val_x, d.val_y, d.num_classes, d.class_names, d.source, d.mean, d.std)


def effective_weight(seq: nn.Sequential, scheme: str) -> torch.Tensor:
    """The single layer's weight the two factor layers compose to."""
    first, second = seq[0].weight.detach().double(), seq[1].weight.detach().double()
    if first.dim() == 2:
        return second @ first
    if scheme == "channel":
        return torch.einsum("or,rihw->oihw", second[:, :, 0, 0], first)
    return torch.einsum("orb,ria->oiab", second[:, :, 0, :], first[:, :, :, 0])


@pytest.fixture(scope="module")
def digits16() -> DataSplit:
    return load_dataset("digits", 16)


@pytest.fixture(scope="module")
def trained(digits16):
    """The same net (seed, data, epochs, recipe) trained plainly and with TRP."""
    plain = fresh_net()
    plain_report = train_network(plain, digits16, epochs=2, lr=LR, batch_size=BATCH, progress=False)
    trp = fresh_net()
    config = TRPConfig(scheme="channel", energy=0.95, project_every=20, exclude=EXCLUDE)
    trp_report = trp_train(trp, digits16, epochs=2, config=config, lr=LR, batch_size=BATCH, progress=False)
    return plain, plain_report, trp, trp_report


# -- factorisation ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("layer", [
    nn.Conv2d(6, 10, 3, stride=2, padding=1),
    nn.Conv2d(5, 12, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    nn.Conv2d(4, 8, 3, padding="same", padding_mode="reflect", bias=False),
    nn.Linear(24, 9),
], ids=["conv-s2-bias", "conv-3x5-dilated", "conv-reflect-nobias", "linear"])
def test_full_rank_factorisation_is_exact(layer, scheme):
    torch.manual_seed(1)
    layer.reset_parameters()
    x = torch.randn(3, 24) if isinstance(layer, nn.Linear) else torch.randn(2, layer.in_channels, 11, 13)
    seq = factorize_layer(layer, 10_000, scheme)  # clipped to the full rank
    with torch.no_grad():
        assert (seq(x) - layer(x)).abs().max().item() < 1e-4
    assert seq[0].bias is None and (seq[1].bias is not None) == (layer.bias is not None)
    if isinstance(layer, nn.Conv2d) and scheme == "spatial":  # vertical then horizontal filters
        kh, kw = layer.kernel_size
        assert seq[0].kernel_size == (kh, 1) and seq[1].kernel_size == (1, kw)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_decompose_whole_net_at_full_rank_is_exact_and_leaves_input_alone(scheme):
    net = fresh_net().eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    full = ranks_for_energy(net, 1.0, scheme)
    assert set(full) == set(decomposable_layers(net, scheme)) and "fc" in full
    same = decompose(net, full, scheme, only_cheaper=False).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert (same(x) - net(x)).abs().max().item() < 1e-4
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(same.conv1, nn.Sequential) and isinstance(net.conv1, nn.Conv2d)
    kept = decompose(net, full, scheme)  # by default only where cheaper, and a full rank never is
    assert isinstance(kept.conv1, nn.Conv2d) and isinstance(kept.fc, nn.Linear)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_truncation_is_cheaper_and_error_falls_with_rank(scheme):
    torch.manual_seed(2)
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    full = min(32, 16 * 9) if scheme == "channel" else min(16 * 3, 32 * 3)
    errors = [(effective_weight(factorize_layer(conv, r, scheme), scheme) - conv.weight.double()).norm().item()
              for r in range(1, full + 1)]
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4 * errors[0]

    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    ranks = {"0": 4, "3": 5}
    small_net = decompose(net, ranks, scheme)
    rep = decomposed_report(net, small_net, (1, 16, 16, 16))
    assert rep["params_after"] < rep["params_before"] and rep["macs_after"] < rep["macs_before"]
    assert {row["name"]: row["rank"] for row in rep["layers"]} == ranks
    conv_row = rep["layers"][0]
    assert conv_row["scheme"] == scheme and conv_row["macs_after"] < conv_row["macs_before"]
    assert conv_row["macs_before"] == 32 * 8 * 8 * 16 * 9
    # a rank too high to pay off keeps the layer as it is
    assert not is_cheaper(conv, full, scheme)
    kept = decompose(net, {"0": full - 1}, scheme)
    assert isinstance(kept[0], nn.Conv2d)
    assert decomposed_report(net, kept)["layers"] == []


def test_ranks_for_energy_is_monotone_and_full_at_one():
    net = fresh_net()
    for scheme in SCHEMES:
        spectra = singular_values(net, scheme)
        assert all(torch.all(s[:-1] >= s[1:]) for s in spectra.values())
        full = {name: len(s) for name, s in spectra.items()}
        assert ranks_for_energy(net, 1.0, scheme) == full
        previous = None
        for energy in np.linspace(0.05, 1.0, 40):
            ranks = ranks_for_energy(net, float(energy), scheme)
            assert all(1 <= ranks[n] <= full[n] for n in ranks)
            if previous is not None:
                assert all(ranks[n] >= previous[n] for n in ranks)
            previous = ranks
        assert ranks_for_energy(net, 0.05, scheme) != full
    # the cached spectrum follows in-place edits of the weight
    assert ranks_for_energy(net, 0.9)["conv1"] > 1
    with torch.no_grad():
        net.conv1.weight.copy_(torch.ones_like(net.conv1.weight))
    assert ranks_for_energy(net, 0.9)["conv1"] == 1
    assert "stem.0" not in ranks_for_energy(net, 0.9, exclude=["stem"])  # a parent's name excludes its children


@pytest.mark.parametrize("scheme", SCHEMES)
def test_nuclear_subgradient_is_the_gradient_of_the_nuclear_norm(scheme):
    from deploykit.compress.lowrank import _layers, _nuclear_subgradient, _to_matrix

    torch.manual_seed(3)
    conv = nn.Conv2d(6, 10, (3, 5))
    conv.weight.grad = torch.zeros_like(conv.weight)
    _nuclear_subgradient(_layers(conv, scheme, ()), scheme, 0.5)
    weight = conv.weight.detach().double().requires_grad_()
    torch.linalg.matrix_norm(_to_matrix(weight, "conv", scheme), "nuc").backward()
    torch.testing.assert_close(conv.weight.grad.double(), 0.5 * weight.grad, atol=1e-5, rtol=1e-4)


# -- training ----------------------------------------------------------------------------------------------------------

def test_trp_lowers_rank_and_still_learns(trained, digits16):
    plain, plain_report, trp, trp_report = trained
    assert set(trp_report) >= {"accuracy", "epochs", "epoch_losses", "seconds", "ranks"}
    assert trp_report["epochs"] == 2 and len(trp_report["epoch_losses"]) == 2
    assert trp_report["projections"] == (2 * (len(digits16.train_x) // BATCH)) // 20
    assert trp_report["accuracy"] > 0.5 and trp_report["accuracy"] == pytest.approx(accuracy(trp, digits16))
    assert trp_report["ranks"] == ranks_for_energy(trp, 0.95, "channel", EXCLUDE)
    assert set(trp_report["ranks"]) == {"conv1", "conv2", "down.0"}
    plain_ranks = ranks_for_energy(plain, 0.95, "channel", EXCLUDE)
    assert np.mean(list(trp_report["ranks"].values())) < np.mean(list(plain_ranks.values())) - 1, \
        (trp_report["ranks"], plain_ranks)


def test_projection_touches_only_the_layers_not_excluded(digits16):
    net = fresh_net()
    before = {k: v.clone() for k, v in net.state_dict().items() if k.endswith("weight")}
    full = ranks_for_energy(net, 0.95, "channel", EXCLUDE)
    config = TRPConfig(energy=0.8, project_every=1, exclude=EXCLUDE)
    rep = trp_train(net, small(digits16, 64), epochs=1, config=config, lr=0.0, batch_size=BATCH, progress=False)
    assert rep["projections"] == 2  # lr 0: the projections alone change the weights
    after = net.state_dict()
    assert torch.equal(after["stem.0.weight"], before["stem.0.weight"]) and torch.equal(after["fc.weight"], before["fc.weight"])
    assert all(rep["ranks"][name] < full[name] for name in full), (rep["ranks"], full)
    assert not torch.equal(after["conv1.weight"], before["conv1.weight"])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_decomposed_net_exports_to_onnx_and_runtime_agrees(trained, scheme, tmp_path):
    trp = trained[2]
    ranks = ranks_for_energy(trp, 0.9, scheme, EXCLUDE)
    small_net = decompose(trp, ranks, scheme).eval()
    rep = decomposed_report(trp, small_net, (1, 3, 16, 16))
    assert rep["layers"] and rep["macs_after"] < rep["macs_before"]
    path = zoo.export_onnx(small_net, (1, 3, 16, 16), tmp_path / f"lowrank-{scheme}.onnx")
    convs = sum(node.op_type == "Conv" for node in onnx.load(path).graph.node)
    assert convs == 4 + sum(1 for row in rep["layers"] if row["type"] == "Conv2d")
    x = torch.randn(1, 3, 16, 16)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        want = small_net(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_checkpoint_resumes_from_the_finished_epoch(digits16, tmp_path):
    data = small(digits16, 320)
    config = TRPConfig(project_every=4, exclude=EXCLUDE)
    ckpt = tmp_path / "trp.ckpt"
    first = trp_train(fresh_net(), data, epochs=1, config=config, lr=LR, batch_size=BATCH, progress=False, checkpoint=ckpt)
    assert first["resumed_from_epoch"] == 0 and first["projections"] == 2
    net = fresh_net(seed=1)  # other initial weights: the first epoch must come from the checkpoint
    second = trp_train(net, data, epochs=2, config=config, lr=LR, batch_size=BATCH, progress=False, checkpoint=ckpt)
    assert second["resumed_from_epoch"] == 1 and second["epochs"] == 2 and second["projections"] == 5
    assert second["epoch_losses"][0] == first["epoch_losses"][0] and len(second["epoch_losses"]) == 2
    with pytest.raises(DeployKitError, match="energy"):  # other TRP settings: refused, not silently mixed
        trp_train(fresh_net(), data, epochs=2, config=TRPConfig(energy=0.9, project_every=4, exclude=EXCLUDE), lr=LR,
                  batch_size=BATCH, progress=False, checkpoint=ckpt)
    with pytest.raises(DeployKitError, match="already holds 2 epochs"):
        trp_train(fresh_net(), data, epochs=1, config=config, lr=LR, batch_size=BATCH, progress=False, checkpoint=ckpt)


# -- user errors ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"scheme": "tucker"}, {"energy": 0.0}, {"energy": 1.5}, {"energy": -0.1},
                                    {"project_every": 0}, {"nuclear_weight": -1.0}, {"exclude": [3]}])
def test_bad_config_is_a_user_error(kwargs):
    with pytest.raises(DeployKitError):
        TRPConfig(**kwargs)


def test_bad_arguments_are_user_errors():
    net = fresh_net()
    with pytest.raises(DeployKitError, match="not modules"):
        decomposable_layers(net, exclude=("no.such.layer",))
    with pytest.raises(DeployKitError, match="not decomposable"):
        decompose(net, {"bn1": 2})
    with pytest.raises(DeployKitError, match="positive integer"):
        decompose(net, {"conv1": 0})
    with pytest.raises(DeployKitError):
        ranks_for_energy(net, 0.0)
    with pytest.raises(DeployKitError):
        factorize_layer(nn.Conv2d(4, 4, 1), 2, "spatial")
    with pytest.raises(DeployKitError, match="scheme"):
        decomposable_layers(net, "tucker")
