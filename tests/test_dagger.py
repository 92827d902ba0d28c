"""Dagger filter importance on a real pretrained tiny CNN (digits at 16x16): gate shapes and ranges, the latency
target reached, the model left as given, weights read (zeroed filters rank low), latency prices obeyed, bad input."""
import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deploykit.compress.dagger import DaggerConfig, GateSpec, dagger_importance
from deploykit.errors import DeployKitError
from deploykit.train import train_network


class TinyResNet(nn.Module):
    """conv-bn-relu, then a residual block (conv1-bn1-relu-conv2-bn2 + skip-bn_skip, add, relu), then conv3, pool, fc."""

    def __init__(self):
        super().__init__()
        self.conv0, self.bn0, self.relu0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.skip, self.bn_skip, self.relu2 = nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(16, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU()
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.relu0(self.bn0(self.conv0(x)))
        y = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(y)) + self.bn_skip(self.skip(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


GROUPS = [GateSpec(0, 8, ["bn0"], ["conv0"]),
          GateSpec(1, 16, ["bn1"], ["conv1"]),
          GateSpec(2, 16, ["bn2", "bn_skip"], ["conv2", "skip"]),  # the residual add: two producers
          GateSpec(3, 24, ["bn3"], ["conv3"])]
MS = {0: 0.02, 1: 0.03, 2: 0.04, 3: 0.05}
FIXED_MS = 0.5


def full_ms(ms: dict[int, float]) -> float:
    return FIXED_MS + sum(ms[g.id] * g.channels for g in GROUPS)


def gated_ms(importance: dict[int, torch.Tensor], ms: dict[int, float]) -> float:
    return FIXED_MS + sum(ms[g] * float(v.sum()) for g, v in importance.items())


@pytest.fixture(scope="module")
def data16(digits):
    """The digits at 16x16 (2x2 average of the 32x32 fixture): a quarter of the compute."""
    return dataclasses.replace(digits, train_x=F.avg_pool2d(digits.train_x, 2), val_x=F.avg_pool2d(digits.val_x, 2))


@pytest.fixture(scope="module")
def pretrained(one_thread, data16):
    torch.manual_seed(0)
    net = TinyResNet()
    result = train_network(net, data16, epochs=3, lr=1e-2, progress=False)
    assert result["accuracy"] > 0.8, result  # a network with something to lose
    return net


def run(net, data, ms=MS, target_fraction=0.6, **config):
    return dagger_importance(net, GROUPS, data, ms_per_channel=ms, fixed_ms=FIXED_MS,
                             target_ms=target_fraction * full_ms(ms), config=DaggerConfig(**config), progress=False)


def test_gates_reach_the_latency_target_and_leave_the_model_as_given(pretrained, data16):
    net = copy.deepcopy(pretrained)
    net.train()
    net.bn3.eval()  # a mixed train/eval state must come back module by module
    net.fc.bias.requires_grad_(False)
    flags = {name: m.training for name, m in net.named_modules()}
    grads = {name: p.requires_grad for name, p in net.named_parameters()}
    state = copy.deepcopy(net.state_dict())
    rng = torch.random.get_rng_state()
    target_ms = 0.6 * full_ms(MS)

    res = run(net, data16)

    assert sorted(res.importance) == [g.id for g in GROUPS]
    for g in GROUPS:
        gate = res.importance[g.id]
        assert gate.shape == (g.channels,) and gate.dtype == torch.float32
        assert torch.isfinite(gate).all() and (gate > 0).all() and (gate < 1).all()
    epochs = DaggerConfig().epochs
    assert len(res.expected_latency_ms) == epochs and len(res.task_loss) == epochs
    assert all(math.isfinite(x) for x in res.task_loss) and res.seconds > 0
    assert res.target_latency_ms == pytest.approx(target_ms)
    # falls from the full latency to the target: the two-sided adaptive regulariser ends within a few percent of it
    lat = res.expected_latency_ms
    assert all(x < 0.9 * full_ms(MS) for x in lat), lat
    assert abs(lat[-1] - target_ms) < abs(full_ms(MS) - target_ms) / 5, (lat, target_ms)
    assert abs(lat[-1] / target_ms - 1) < 0.1, (lat, target_ms)
    assert min(lat) > 0.85 * target_ms, (lat, target_ms)  # never far below
    assert gated_ms(res.importance, MS) == pytest.approx(lat[-1], rel=1e-5)  # the gates returned are the last epoch's
    # some filters are cut hard, some kept: a ranking, not a uniform scale-down
    assert min(float(v.min()) for v in res.importance.values()) < 0.3
    assert max(float(v.max()) for v in res.importance.values()) > 0.9

    after = net.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    for name, m in net.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
        assert m.training == flags[name], name
    assert {name: p.requires_grad for name, p in net.named_parameters()} == grads
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_finetune_network_trains_the_weights_and_still_cleans_up(pretrained, data16, capsys):
    net = copy.deepcopy(pretrained).eval()
    res = dagger_importance(net, GROUPS, data16, ms_per_channel=MS, fixed_ms=FIXED_MS, target_ms=0.8 * full_ms(MS),
                            config=DaggerConfig(epochs=1, finetune_network=True), progress=True)
    assert "dagger" in capsys.readouterr().err  # the progress bar goes to stderr
    assert all(torch.isfinite(v).all() for v in res.importance.values())
    assert not torch.equal(net.conv1.weight, pretrained.conv1.weight)  # the network's own weights moved
    assert all(not m.training and not m._forward_hooks for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())


def test_zeroed_filters_rank_low(pretrained, data16):
    """The module reads the weights: a channel whose filter and BatchNorm affine are zero ranks in its group's bottom third."""
    net = copy.deepcopy(pretrained)
    dead = {1: ("conv1", "bn1", 5), 3: ("conv3", "bn3", 11)}
    with torch.no_grad():
        for conv, bn, c in dead.values():
            net.get_submodule(conv).weight[c].zero_()
            net.get_submodule(bn).weight[c] = 0.0
            net.get_submodule(bn).bias[c] = 0.0
    untrained = run(net, data16, target_fraction=0.7, epochs=1, lr=1e-12)  # the module's answer before any learning
    trained = run(net, data16, target_fraction=0.7)
    for gid, (_, _, c) in dead.items():
        gate = untrained.importance[gid]
        assert int((gate < gate[c]).sum()) == 0, (gid, gate.tolist())  # from the weights alone: the lowest
        gate = trained.importance[gid]
        rank = int((gate < gate[c]).sum())  # 0 = lowest
        assert rank < len(gate) / 3, (gid, rank, gate.tolist())


def test_expensive_group_gets_lower_gates(pretrained, data16):
    @dataclasses.dataclass
    class Group:  # duck-typed like prune.Group, with its extra fields
        id: int
        channels: int
        producers: list
        weights: list
        divisor: int = 1
        min_channels: int = 1

    groups = [Group(g.id, g.channels, g.producers, g.weights) for g in GROUPS]
    mean_gate = {}
    for label, ms3 in (("cheap", 0.01), ("dear", 0.2)):
        ms = {**MS, 3: ms3}
        res = dagger_importance(pretrained, groups, data16, ms_per_channel=ms, fixed_ms=FIXED_MS,
                                target_ms=0.7 * full_ms(ms), progress=False)
        mean_gate[label] = {g: float(v.mean()) for g, v in res.importance.items()}
    assert mean_gate["dear"][3] < mean_gate["cheap"][3] - 0.1, mean_gate
    # the cut moves onto the dear group: the others keep more
    assert sum(mean_gate["dear"][g] for g in (0, 1, 2)) > sum(mean_gate["cheap"][g] for g in (0, 1, 2)), mean_gate


class TokenMixer(nn.Module):
    """Patches as tokens, then a Linear over [N, tokens, features]: its channels are the last dim (channel_dim=-1)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, 4)
        self.up, self.act, self.head = nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 10)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # [N, 16, 8]
        return self.head(self.act(self.up(tokens)).mean(1))


def test_channels_on_the_last_dim(one_thread, data16):
    torch.manual_seed(0)
    net = TokenMixer()
    train_network(net, data16, epochs=1, lr=1e-2, progress=False)
    groups = [GateSpec(0, 8, ["patch"], ["patch"]), GateSpec(1, 32, ["up"], ["up"], channel_dim=-1)]
    ms = {0: 0.05, 1: 0.05}
    res = dagger_importance(net, groups, data16, ms_per_channel=ms, fixed_ms=0.2, target_ms=0.2 + 0.7 * 40 * 0.05,
                            config=DaggerConfig(epochs=2), progress=False)
    assert res.importance[1].shape == (32,) and res.importance[0].shape == (8,)
    assert abs(res.expected_latency_ms[-1] / res.target_latency_ms - 1) < 0.1, res.expected_latency_ms
    with pytest.raises(DeployKitError, match="without its 32 channels on dim 1"):  # dim 1 holds the 16 tokens
        dagger_importance(net, [groups[0], GateSpec(1, 32, ["up"], ["up"])], data16, ms_per_channel=ms, fixed_ms=0.2,
                          target_ms=1.0, config=DaggerConfig(epochs=1), progress=False)


def bad(net, data, groups=GROUPS, ms=MS, fixed_ms=FIXED_MS, target_ms=1.5, **config):
    return dagger_importance(net, groups, data, ms_per_channel=ms, fixed_ms=fixed_ms, target_ms=target_ms,
                             config=DaggerConfig(**{"epochs": 1, **config}), progress=False)


def test_bad_arguments_are_user_errors(pretrained, data16):
    net = copy.deepcopy(pretrained)
    with pytest.raises(DeployKitError, match="not above fixed_ms"):
        bad(net, data16, target_ms=FIXED_MS)
    with pytest.raises(DeployKitError, match="not above fixed_ms"):
        bad(net, data16, target_ms=0.1)
    with pytest.raises(DeployKitError, match="no entry for channel group 2"):
        bad(net, data16, ms={g: v for g, v in MS.items() if g != 2})
    with pytest.raises(DeployKitError, match="must be a finite non-negative"):
        bad(net, data16, ms={**MS, 1: float("nan")})
    with pytest.raises(DeployKitError, match="producer 'bn9' is not a module"):
        bad(net, data16, groups=[*GROUPS[:3], GateSpec(3, 24, ["bn9"], ["conv3"])])
    with pytest.raises(DeployKitError, match="weight layer 'conv9' is not a module"):
        bad(net, data16, groups=[*GROUPS[:3], GateSpec(3, 24, ["bn3"], ["conv9"])])
    with pytest.raises(DeployKitError, match="24 output filters but its group has 16"):
        bad(net, data16, groups=[*GROUPS[:3], GateSpec(3, 16, ["bn2"], ["conv3"])])
    with pytest.raises(DeployKitError, match="appears twice"):
        bad(net, data16, groups=[*GROUPS, GROUPS[0]])
    with pytest.raises(DeployKitError, match="epochs must be a positive integer"):
        bad(net, data16, epochs=0)
    with pytest.raises(DeployKitError, match="no channel groups"):
        bad(net, data16, groups=[])
    with pytest.raises(DeployKitError, match="cannot run on the data's images"):
        bad(net, dataclasses.replace(data16, train_x=data16.train_x[:, :1]))  # 1 channel, the model takes 3
    # a producer that does not carry the group's channels fails inside the forward pass: still a user error, still clean
    state = copy.deepcopy(net.state_dict())
    with pytest.raises(DeployKitError, match="producer 'bn2' of channel group 3 outputs .* without its 24 channels on dim 1"):
        bad(net, data16, groups=[*GROUPS[:3], GateSpec(3, 24, ["bn2"], ["conv3"])])
    assert all(not m._forward_hooks for m in net.modules())
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
