"""Structured channel pruning on the 12 architecture families: pruning must equal zeroing the dropped channels at
their producers, keep the output shape, shrink the model, export to ONNX and re-analyse to the new sizes."""

from __future__ import annotations

import copy

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from deploykit import zoo
from deploykit.compress.prune import analyze, channel_counts, importance, prune, select
from deploykit.errors import DeployKitError
from tests.families import FAMILIES, INPUT_SHAPE, NUM_CLASSES, randomize_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = sorted(FAMILIES)
_BUILT: dict[str, tuple[nn.Module, torch.Tensor, object]] = {}


def built(name: str):
    """(network with random BN statistics, example input, its PruneGraph), built once per family."""
    if name not in _BUILT:
        torch.manual_seed(0)
        net = randomize_batchnorm(FAMILIES[name]()).eval()
        x = torch.randn(INPUT_SHAPE)
        _BUILT[name] = (net, x, analyze(net, x))
    return _BUILT[name]


def drop_half(graph, seed: int = 0) -> dict[int, torch.Tensor]:
    """A random ~50% of every group's channels, respecting min_channels, divisor and per-block balance."""
    gen = torch.Generator().manual_seed(seed)
    keep = {}
    for g in graph.groups:
        per_block = max(1, (g.channels // 2) // g.blocks)
        width = g.channels // g.blocks
        idx = torch.cat([torch.randperm(width, generator=gen)[:per_block] + b * width for b in range(g.blocks)])
        keep[g.id] = idx.sort().values
    return keep


def masked_copy(net: nn.Module, graph, keep) -> nn.Module:
    """A copy whose producers' outputs are multiplied by a 0/1 mask of the kept channels (forward hooks)."""
    masked = copy.deepcopy(net)
    for g in graph.groups:
        if g.id not in keep:
            continue
        mask = torch.zeros(g.channels)
        mask[keep[g.id]] = 1.0
        for name in g.producers:
            def hook(_m, _inp, out, mask=mask, dim=g.channel_dim):
                shape = [1] * out.dim()
                shape[dim] = -1
                return out * mask.view(shape)
            masked.get_submodule(name).register_forward_hook(hook)
    return masked


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_analyze_finds_consistent_groups(name):
    net, x, graph = built(name)
    assert len(graph.groups) >= 1
    assert [g.id for g in graph.groups] == list(range(len(graph.groups)))
    out_channels = {}
    def record(name):
        def hook(_m, _i, out):
            out_channels[name] = out.shape[1]
        return hook
    hooks = [m.register_forward_hook(record(n)) for n, m in net.named_modules() if n]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    for g in graph.groups:
        assert g.producers and g.weights
        assert all(out_channels[p] == g.channels for p in g.producers)
        assert all(net.get_submodule(w).weight.shape[0] == g.channels for w in g.weights)
        assert g.channels % g.divisor == 0 and g.min_channels >= 1
    skipped_names = {n for n, _ in graph.skipped}
    if name == "custom_unprunable":
        assert "gate" in skipped_names
        assert any("fx cannot trace" in reason for n, reason in graph.skipped if n == "gate")
        frozen = {p for g in graph.groups for p in g.weights}
        assert "features.0" not in frozen and "tail.0.0" in frozen  # channels entering the gate are kept
    # the classifier's outputs are the network's outputs: never in a group, reported as kept
    classifier = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))][-1]
    assert all(classifier not in g.weights for g in graph.groups)
    assert (classifier, "network output channels: left intact") in graph.skipped


@pytest.mark.parametrize("name", NAMES)
def test_pruned_equals_masked_and_is_smaller(name):
    net, x, graph = built(name)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    keep = drop_half(graph)
    pruned = prune(net, graph, keep)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the input model is untouched
    assert all(g.mask_exact for g in graph.groups)  # these families gate only where f(0) == 0 reaches consumers
    masked = masked_copy(net, graph, keep).eval()
    with torch.no_grad():
        expected, got, full = masked(x), pruned.eval()(x), net(x)
    assert got.shape == full.shape == (1, NUM_CLASSES)
    assert not torch.allclose(expected, full, atol=1e-3)  # the masks really changed the output
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert n_params(pruned) < n_params(net)
    pruned.train()
    out = pruned(torch.randn(2, *INPUT_SHAPE[1:]))
    out.sum().backward()
    assert out.shape == (2, NUM_CLASSES) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_pruned_model_exports_to_onnx(name, tmp_path):
    net, x, graph = built(name)
    pruned = prune(net, graph, drop_half(graph, seed=1))
    path = zoo.export_onnx(pruned, INPUT_SHAPE, tmp_path / f"{name}.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        torch_out = pruned.eval()(x).numpy()
    np.testing.assert_allclose(onnx_out, torch_out, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_reanalysis_gives_new_channel_counts(name):
    net, x, graph = built(name)
    keep = drop_half(graph, seed=2)
    pruned = prune(net, graph, keep)
    again = analyze(pruned, x)
    assert [g.producers for g in again.groups] == [g.producers for g in graph.groups]
    assert channel_counts(pruned, x) == {g.id: len(keep[g.id]) for g in graph.groups}
    assert all(a.channels < b.channels for a, b in zip(again.groups, graph.groups))


def test_importance_scores():
    net, x, graph = built("resnet_basic")
    mag, bn = importance(net, graph, "magnitude"), importance(net, graph, "bn")
    assert set(mag) == set(bn) == {g.id for g in graph.groups}
    for g in graph.groups:
        assert mag[g.id].shape == bn[g.id].shape == (g.channels,)
        assert mag[g.id].dtype == torch.float32 and bool((mag[g.id] >= 0).all())
    assert any(not torch.allclose(mag[i], bn[i]) for i in mag)
    # a group with one conv: its filters' L1 norms divided by their mean
    single = next(g for g in graph.groups if len(g.weights) == 1)
    l1 = net.get_submodule(single.weights[0]).weight.detach().abs().flatten(1).sum(1)
    torch.testing.assert_close(mag[single.id], l1 / l1.mean())
    gamma = net.get_submodule(single._bns[0]).weight.detach().abs()
    torch.testing.assert_close(bn[single.id], gamma / gamma.mean())
    # a residual group sums every coupled conv's normalised norms
    residual = next(g for g in graph.groups if len(g.weights) == 3)
    expected = sum(w / w.mean() for w in (net.get_submodule(n).weight.detach().abs().flatten(1).sum(1)
                                          for n in residual.weights))
    torch.testing.assert_close(mag[residual.id], expected)
    with pytest.raises(DeployKitError, match="unknown importance method"):
        importance(net, graph, "taylor")


def test_select_keeps_top_channels_and_balances_blocks():
    scores = {0: torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2])}
    keep = select(scores, {0: 3})
    assert keep[0].tolist() == [1, 2, 3] and keep[0].dtype == torch.int64
    net, x, graph = built("regnet")
    scores = importance(net, graph)
    blocked = next(g for g in graph.groups if g.blocks > 1)
    keep = select(scores, {blocked.id: blocked.channels // 2}, graph=graph)[blocked.id]
    width = blocked.channels // blocked.blocks
    assert torch.bincount(keep // width, minlength=blocked.blocks).tolist() == [width // 2] * blocked.blocks
    assert torch.equal(select(scores, {blocked.id: blocked.channels // 2})[blocked.id], keep)  # scores know blocks
    pruned = prune(net, graph, {blocked.id: keep})
    grouped = [m for m in pruned.modules() if isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels]
    assert any(m.in_channels == blocked.channels // 2 for m in grouped)
    with pytest.raises(DeployKitError):
        select(scores, {blocked.id: 0})
    with pytest.raises(DeployKitError, match="multiple of"):
        select(scores, {blocked.id: blocked.blocks + 1})


def test_prune_validates_keep():
    net, x, graph = built("regnet")
    plain = next(g for g in graph.groups if g.divisor == 1)
    blocked = next(g for g in graph.groups if g.divisor > 1)
    bad = [
        {plain.id: [0, plain.channels]},                         # out of range
        {plain.id: [-1, 2]},
        {plain.id: [1, 1, 2]},                                   # duplicate
        {plain.id: []},                                          # below min_channels
        {plain.id: torch.tensor([0.0, 1.0])},                    # not integers
        {len(graph.groups): [0]},                                # no such group
        {blocked.id: list(range(blocked.divisor + 1))},          # not a multiple of the divisor
        {blocked.id: list(range(blocked.divisor))},              # a multiple, but all in the first block
    ]
    for keep in bad:
        with pytest.raises(DeployKitError) as err:
            prune(net, graph, keep)
        assert "\n" not in str(err.value)
    assert n_params(prune(net, graph, {})) == n_params(net)


class _Unknowns(nn.Module):
    """Ops deploykit must leave intact (fixed channel slices, fixed-size split, channel reductions, a per-channel
    parameter, GroupNorm, LayerNorm) between layers that must still prune exactly."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.c = nn.Conv2d(16, 12, 1)
        self.gn = nn.GroupNorm(4, 12)
        self.d = nn.Sequential(nn.Conv2d(12, 8, 1), nn.ReLU())
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.e = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.f = nn.Sequential(nn.Conv2d(16, 16, 1), nn.ReLU())
        self.ln = nn.LayerNorm(16)
        self.fc = nn.Linear(16, NUM_CLASSES)

    def forward(self, x):
        x = self.a(self.pre(x))
        x = torch.cat([x[:, :8], self.b(x)[:, 8:]], 1)                  # fixed slices of two groups
        y, z = torch.split(x, [8, 8], dim=1)                            # fixed split sizes
        x = (y + z) * torch.sigmoid(x.mean(1, keepdim=True)).mean()     # spatial attention: mean over channels
        x = self.d(self.gn(self.c(torch.cat([x, z], 1))))
        x = self.f(self.e(x * self.scale))
        return self.fc(self.ln(x.mean((2, 3))))


def test_unknown_ops_are_left_intact_and_the_rest_prunes_exactly():
    torch.manual_seed(0)
    net = randomize_batchnorm(_Unknowns()).eval()
    x = torch.randn(INPUT_SHAPE)
    graph = analyze(net, x)
    reasons = " | ".join(f"{n}: {r}" for n, r in graph.skipped)
    for needle in ("indexing channels at fixed positions", "split of channels at fixed sizes", "reduction over channels",
                   "GroupNorm", "LayerNorm", "per-channel tensor of unknown origin"):
        assert needle in reasons, reasons
    weights = {w for g in graph.groups for w in g.weights}
    assert weights == {"pre.0", "e.0"}, weights  # the convs whose outputs meet none of the above
    keep = drop_half(graph)
    pruned = prune(net, graph, keep)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked_copy(net, graph, keep)(x), atol=1e-4, rtol=1e-4)


def test_pre_activation_concat_is_flagged_not_mask_exact():
    class PreAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(16)
            self.c = nn.Conv2d(16, 8, 1)
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, NUM_CLASSES))

        def forward(self, x):
            return self.head(self.c(torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))))

    net = randomize_batchnorm(PreAct()).eval()
    x = torch.randn(INPUT_SHAPE)
    graph = analyze(net, x)
    flags = {tuple(g.weights): g.mask_exact for g in graph.groups}
    assert flags == {("a",): False, ("b",): False, ("c",): True}
    keep = drop_half(graph)
    pruned = prune(net, graph, keep)  # still a valid pruning: the BN is sliced with the concatenated channels
    assert pruned.bn.num_features == 8 and pruned.c.in_channels == 8


def test_model_that_cannot_be_traced_raises_one_line():
    class TopLevelControlFlow(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(DeployKitError) as err:
        analyze(TopLevelControlFlow(), torch.randn(INPUT_SHAPE))
    assert "cannot trace" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DeployKitError):
        analyze(FAMILIES["vgg"](), torch.randn(1, 3, 16, 16))  # flatten of a 2x2 map does not fit Linear(1024, .)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_zoo_networks_prune_exactly(name):
    torch.manual_seed(0)
    net = randomize_batchnorm(zoo.build(name, num_classes=NUM_CLASSES, width=0.25)).eval()
    x = torch.randn(INPUT_SHAPE)
    graph = analyze(net, x)
    keep = drop_half(graph)
    pruned = prune(net, graph, keep)
    assert n_params(pruned) < 0.6 * n_params(net)
    with torch.no_grad():
        torch.testing.assert_close(pruned.eval()(x), masked_copy(net, graph, keep)(x), atol=1e-4, rtol=1e-4)
