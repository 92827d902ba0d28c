"""Differentiable search (PC-DARTS with Gumbel-softmax and a latency loss): the result's contract, the latency loss
pulling the architecture under a budget, partial channels, several resolutions, exact resume, and bad inputs.

The latency model is a real ArchLatencyMLP fitted on architectures labelled with their MACs (1 ms per million):
in these tests it stands in for a device predictor, which would need a profiled device."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deploykit.archmlp import ArchLatencyMLP, fit_arch_mlp, plan_archs
from deploykit.archspace import (
    DIGITS_SPACE,
    Arch,
    SpaceSpec,
    arch_macs,
    build_network,
    check_arch,
    encode,
    encoding_size,
    groups,
    stage_channels,
)
from deploykit.darts import (
    DartsSupernet,
    MixedOp,
    differentiable_search,
    expected_encoding,
    load_checkpoint,
    split_halves,
)
from deploykit.data import DataSplit
from deploykit.errors import DeployKitError

SPEC = DIGITS_SPACE
FAST = dict(batch_size=32, progress=False)

pytestmark = pytest.mark.usefixtures("one_thread")


def subset(d: DataSplit, n_train: int, n_val: int | None = None) -> DataSplit:
    return DataSplit(d.train_x[:n_train], d.train_y[:n_train], d.val_x[:n_val], d.val_y[:n_val], d.num_classes,
                     d.class_names, d.source, d.mean, d.std)


def macs_latency_model(spec: SpaceSpec, n: int = 300, seed: int = 0) -> tuple[ArchLatencyMLP, np.ndarray]:
    """An ArchLatencyMLP fitted on n architectures at 1 ms per million MACs, and those labels."""
    archs = plan_archs(spec, n, seed)
    ms = np.array([arch_macs(spec, a) / 1e6 for a in archs])
    return fit_arch_mlp(spec, np.stack([encode(spec, a) for a in archs]), ms, epochs=60, seed=seed), ms


@pytest.fixture(scope="module")
def latency():
    return macs_latency_model(SPEC)


def start_latency_ms(model: ArchLatencyMLP, spec: SpaceSpec = SPEC) -> float:
    with torch.no_grad():
        return float(model(expected_encoding(spec, torch.zeros(encoding_size(spec)))))


# -- the result ------------------------------------------------------------------------------------

@pytest.mark.parametrize("partial_channels", [1, 2])
def test_result_contract(digits, latency, partial_channels):
    model, ms = latency
    data = subset(digits, 256)
    data.val_x = torch.full_like(data.val_x, float("nan"))  # the search must not read the validation split
    entries = []
    result = differentiable_search(SPEC, data, model, float(np.median(ms)), epochs=2, warmup_epochs=1,
                                   partial_channels=partial_channels, on_epoch=entries.append, **FAST)
    assert entries == result.history
    check_arch(SPEC, result.arch)
    assert result.logits.shape == (encoding_size(SPEC),) and np.isfinite(result.logits).all()
    assert list(result.probabilities) == [name for name, _, _ in groups(SPEC)]
    for name, p in result.probabilities.items():
        assert sum(p) == pytest.approx(1.0, abs=1e-5), name
    assert [h["epoch"] for h in result.history] == [1, 2]
    warm, search = result.history
    assert warm["arch_loss"] is None and warm["tau"] == 5.0  # warm-up: weights only, the first temperature
    assert search["arch_loss"] is not None and search["tau"] == pytest.approx(0.5)  # annealed to tau_end at the last step
    assert search["arch"] == result.arch.to_dict() and search["latency_ms"] == pytest.approx(result.expected_latency_ms)
    with torch.no_grad():
        assert result.arch_latency_ms == pytest.approx(float(model(torch.as_tensor(encode(SPEC, result.arch)))))
    assert search["arch_latency_ms"] == pytest.approx(result.arch_latency_ms)
    assert all(math.isfinite(h["train_loss"]) and h["seconds"] > 0 for h in result.history)
    assert result.history[1]["train_loss"] < 2.3  # ln(10) is chance: the weights learn digits
    with torch.no_grad():
        out = build_network(SPEC, result.arch)(digits.val_x[:4])
    assert out.shape == (4, SPEC.num_classes)


def test_latency_loss_pulls_under_the_budget(digits, latency):
    model, ms = latency
    budget_ms = float(np.percentile(ms, 20))
    data = subset(digits, 256)
    common = dict(epochs=3, warmup_epochs=1, arch_lr=0.05, seed=3, **FAST)
    free = differentiable_search(SPEC, data, model, budget_ms, latency_weight=0.0, **common)
    pulled = differentiable_search(SPEC, data, model, budget_ms, latency_weight=20.0, **common)
    start = start_latency_ms(model)
    assert pulled.expected_latency_ms < 0.85 * start, (pulled.expected_latency_ms, start)
    assert pulled.expected_latency_ms < 0.85 * free.expected_latency_ms, (pulled.expected_latency_ms, free.expected_latency_ms)
    assert [h["latency_ms"] for h in pulled.history][1:] == sorted([h["latency_ms"] for h in pulled.history][1:], reverse=True)
    # the discrete answer follows the probabilities: narrower widths than the unconstrained search
    assert sum(pulled.arch.widths) <= sum(free.arch.widths)


# -- partial channels and the search network ---------------------------------------------------------

def test_partial_channels_feed_a_fraction_of_a_block(digits):
    seen: dict[str, int] = {}

    def record(name):
        def hook(module, inputs):
            seen[name] = inputs[0].shape[1]
        return hook

    for k in (1, 2, 4):
        net = DartsSupernet(SPEC, partial_channels=k)
        first, kept = net.blocks[1], net.blocks[2]  # stage 1: block 0 (16 -> 24, stride 2) and block 1 (24 -> 24)
        assert isinstance(first, MixedOp) and isinstance(kept, MixedOp)
        first.candidates[0].register_forward_pre_hook(record(f"first{k}"))
        kept.candidates[0].register_forward_pre_hook(record(f"kept{k}"))
        out = net(digits.train_x[:8], expected_encoding(SPEC, net.arch_logits.detach()))
        assert out.shape == (8, SPEC.num_classes)
        assert seen[f"first{k}"] == 16  # the shape changes: every channel goes through
        assert seen[f"kept{k}"] == 24 // k  # only C // K channels go through the candidates
        assert kept.op_names[-1] == "skip" and "skip" not in first.op_names


def test_mixed_op_keeps_channels_in_place():
    """Channels offset::K go through the candidates and back to their places; the others bypass them unchanged."""
    x = torch.randn(2, 24, 5, 5)
    for offset in (0, 1):
        op = MixedOp(("k3e3", "skip"), 24, 24, 1, partial_channels=2, offset=offset)
        assert torch.equal(op(x, torch.tensor([0.0, 1.0])), x)  # all weight on skip: the identity
        out = op(x, torch.tensor([1.0, 0.0]))
        other = 1 - offset
        assert torch.equal(out[:, other::2], x[:, other::2])
        torch.testing.assert_close(out[:, offset::2], x[:, offset::2] + op.candidates[0].block(x[:, offset::2]))


def test_width_mask_zeroes_channels_past_the_width(digits):
    """One-hot widths: a stage's output keeps its first make_divisible(C * r) channels and zeroes the rest."""
    net = DartsSupernet(SPEC)
    arch = Arch(ops=("k3e3",) * 6, widths=(1.0, 0.5, 1.0, 1.0), resolution=32)
    seen = {}

    def record(module, inputs):  # stage 2's first block receives stage 1's masked output
        seen["s1 out"] = inputs[0]

    net.blocks[3].register_forward_pre_hook(record)
    net(digits.train_x[:4], torch.as_tensor(encode(SPEC, arch)))
    x = seen["s1 out"]
    assert x.shape[1] == 24 and stage_channels(SPEC, arch)[1] == 16
    assert x[:, 16:].abs().max() == 0 and (x[:, :16].abs().amax(dim=(0, 2, 3)) > 0).all()


def test_halves_are_disjoint_and_fixed():
    a, b = split_halves(101, seed=0)
    assert len(a) == 51 and len(b) == 50 and not set(a) & set(b) and set(a) | set(b) == set(range(101))
    assert all(np.array_equal(x, y) for x, y in zip((a, b), split_halves(101, seed=0)))
    assert not np.array_equal(a, split_halves(101, seed=1)[0])


def test_several_resolutions_train_the_resolution_logits(digits):
    spec = SpaceSpec(name="tiny", resolutions=(16, 24), num_classes=10, stem_channels=8, head_channels=32,
                     stages=((8, 1, 1), (16, 2, 2), (24, 1, 2)), kernel_sizes=(3, 5), expansions=(1, 4),
                     width_ratios=(0.5, 1.0))
    model, ms = macs_latency_model(spec, n=120)
    result = differentiable_search(spec, subset(digits, 128), model, float(np.percentile(ms, 20)), epochs=2,
                                   warmup_epochs=1, arch_lr=0.05, latency_weight=5.0, **FAST)
    check_arch(spec, result.arch)
    res = result.probabilities["resolution"]
    assert res[0] > res[1]  # the lower resolution is cheaper: the latency loss reaches the hard-sampled choice
    assert result.arch.resolution == 16


# -- checkpoints --------------------------------------------------------------------------------------

class InterruptAt:
    """The latency model, raising KeyboardInterrupt (as Ctrl-C would) on its n-th call."""

    def __init__(self, model: ArchLatencyMLP, n: int):
        self.model, self.n, self.calls = model, n, 0

    def __call__(self, encoding: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.model(encoding)


def test_interrupt_mid_epoch_and_resume_match_an_uninterrupted_search(digits, latency, tmp_path):
    model, ms = latency
    data, budget_ms = subset(digits, 192), float(np.median(ms))  # halves of 96: 3 steps of 32 per epoch
    settings = dict(epochs=3, warmup_epochs=1, arch_lr=0.05, **FAST)
    ckpt = tmp_path / "ckpt" / "darts.pt"
    # calls: 1 the check at the start, 2-3 the end of warm-up, 4 the first search step, 5 the second one's arch step
    with pytest.raises(KeyboardInterrupt):
        differentiable_search(SPEC, data, InterruptAt(model, 5), budget_ms, checkpoint=ckpt, **settings)
    saved = load_checkpoint(ckpt)
    assert (saved["epoch"], saved["step"], len(saved["history"])) == (1, 1, 1)  # the interrupted step is not half done
    assert not [p for p in ckpt.parent.iterdir() if p != ckpt]  # no temporary files left behind
    resumed = differentiable_search(SPEC, data, model, budget_ms, checkpoint=ckpt, **settings)
    straight = differentiable_search(SPEC, data, model, budget_ms, **settings)
    assert resumed.resumed_from_epoch == 1 and straight.resumed_from_epoch == 0
    np.testing.assert_allclose(resumed.logits, straight.logits, rtol=1e-5, atol=1e-6)
    assert resumed.arch == straight.arch
    assert len(resumed.history) == len(straight.history) == 3
    for a, b in zip(resumed.history, straight.history):
        assert a["arch"] == b["arch"] and a["epoch"] == b["epoch"]
        numbers = ("train_loss", "arch_loss", "latency_ms", "arch_latency_ms", "tau")
        assert [a[k] for k in numbers] == pytest.approx([b[k] for k in numbers], rel=1e-5)
    done = differentiable_search(SPEC, data, model, budget_ms, checkpoint=ckpt, **settings)  # nothing left to do
    assert done.resumed_from_epoch == 3 and np.array_equal(done.logits, resumed.logits)
    with pytest.raises(DeployKitError, match=r"was written with epochs=3, not 4: pass epochs=3 to resume, or pass another"):
        differentiable_search(SPEC, data, model, budget_ms, checkpoint=ckpt, **{**settings, "epochs": 4})
    with pytest.raises(DeployKitError, match=r"was written with budget_ms=.*, not 9.0: pass budget_ms="):
        differentiable_search(SPEC, data, model, 9.0, checkpoint=ckpt, **settings)
    with pytest.raises(DeployKitError, match=r"was written with seed=0, not 1: pass seed=0 to resume"):
        differentiable_search(SPEC, data, model, budget_ms, checkpoint=ckpt, seed=1, **settings)


def test_foreign_and_damaged_checkpoints(digits, latency, tmp_path):
    model, ms = latency
    data = subset(digits, 64)
    torch.save({"format": "deploykit-supernet-checkpoint", "format_version": 1}, tmp_path / "supernet.pt")
    with pytest.raises(DeployKitError, match=r"is not a deploykit differentiable-search checkpoint: delete it"):
        differentiable_search(SPEC, data, model, 1.0, epochs=1, warmup_epochs=0, checkpoint=tmp_path / "supernet.pt", **FAST)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DeployKitError, match=r"cannot read differentiable-search checkpoint .*junk.pt .*delete it to start the search over"):
        differentiable_search(SPEC, data, model, 1.0, epochs=1, warmup_epochs=0, checkpoint=tmp_path / "junk.pt", **FAST)


# -- bad inputs ---------------------------------------------------------------------------------------

def test_bad_inputs(digits, latency):
    model, _ = latency
    data = subset(digits, 64)
    for budget in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(DeployKitError, match="budget_ms must be a positive, finite number of milliseconds"):
            differentiable_search(SPEC, data, model, budget, **FAST)
    four = DataSplit(data.train_x, data.train_y % 4, data.val_x, data.val_y % 4, 4, ("0", "1", "2", "3"), "four")
    with pytest.raises(DeployKitError, match="has 4 classes, space 'digits' 10: use a space with num_classes=4"):
        differentiable_search(SPEC, four, model, 1.0, **FAST)
    with pytest.raises(DeployKitError, match=r"warmup_epochs must be an integer in 0..epochs-1 \(1\), got 2"):
        differentiable_search(SPEC, data, model, 1.0, epochs=2, warmup_epochs=2, **FAST)
    with pytest.raises(DeployKitError, match=r"partial_channels must be .* \[24, 32, 64\], got 3: use one of \[1, 2, 4, 8\]"):
        differentiable_search(SPEC, data, model, 1.0, partial_channels=3, **FAST)
    with pytest.raises(DeployKitError, match="too few for two halves of batch_size=64: pass batch_size <= 32"):
        differentiable_search(SPEC, data, model, 1.0, batch_size=64, progress=False)
    grey = DataSplit(data.train_x[:, :1], data.train_y, data.val_x[:, :1], data.val_y, 10, data.class_names, "grey")
    with pytest.raises(DeployKitError, match=r"search inputs are \(N, 3, H, W\) images"):
        differentiable_search(SPEC, grey, model, 1.0, **FAST)
    with pytest.raises(DeployKitError, match="not differentiable in the encoding: pass a torch model such as ArchLatencyMLP"):
        differentiable_search(SPEC, data, lambda enc: model(enc).detach(), 1.0, epochs=1, warmup_epochs=0, **FAST)
    other = ArchLatencyMLP(encoding_size(SPEC) + 1)
    with pytest.raises(DeployKitError, match=r"latency_ms fails on an encoding of 52 entries .*: pass a latency model fitted"):
        differentiable_search(SPEC, data, other, 1.0, epochs=1, warmup_epochs=0, **FAST)
