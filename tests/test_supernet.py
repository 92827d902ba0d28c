"""The weight-sharing supernet: sliced sub-networks, bilateral channel fairness, BatchNorm calibration, extraction
into standalone networks, training on real digits, and resumable checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deploykit.archspace import DIGITS_SPACE, SPACES, Arch, SpaceSpec, build_network, sample_arch, stage_channels
from deploykit.data import DataSplit
from deploykit.errors import DeployKitError
from deploykit.supernet import (
    Supernet,
    calibrate_bn,
    channel_usage,
    evaluate_arch,
    extract,
    largest_arch,
    load_checkpoint,
    score_arch,
    smallest_arch,
    train_supernet,
    training_subnets,
)

SPEC = DIGITS_SPACE


pytestmark = pytest.mark.usefixtures("one_thread")


def subset(d: DataSplit, n_train: int, n_val: int | None = None) -> DataSplit:
    return DataSplit(d.train_x[:n_train], d.train_y[:n_train], d.val_x[:n_val], d.val_y[:n_val], d.num_classes,
                     d.class_names, d.source, d.mean, d.std)


def random_archs(n: int, seed: int = 0) -> list[Arch]:
    rng = np.random.default_rng(seed)
    return [sample_arch(SPEC, rng) for _ in range(n)]


def x_batch(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# -- sub-networks ----------------------------------------------------------------------------------

def test_forward_shape_for_random_archs():
    net = Supernet(SPEC)
    x = x_batch()
    for arch in [largest_arch(SPEC), smallest_arch(SPEC), *random_archs(6)]:
        out = net(x, arch)
        assert out.shape == (8, SPEC.num_classes) and torch.isfinite(out).all()


def test_supernet_holds_the_largest_shapes():
    net = Supernet(SPEC)
    assert SPEC.widest_channels() == [16, 24, 32, 64]
    blk = net.blocks[-1]  # stage 3, block 1: 64 in, expansion 6, kernel 7
    assert blk.expand.conv.weight.shape == (64 * 6, 64, 1, 1)
    assert blk.dw.conv.weight.shape == (64 * 6, 1, 7, 7)
    assert net.blocks[0].expand is None and net.blocks[0].dw.conv.weight.shape[-1] == 3  # the fixed k3e1 first stage
    state = torch.get_rng_state()
    a, b, c = (Supernet(SPEC, seed=s).stem.conv.weight for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)  # initial weights are a function of the seed
    assert torch.equal(torch.get_rng_state(), state)  # and leave the caller's RNG alone


def test_sides_differ_in_bilateral_mode_only():
    bilateral, left = Supernet(SPEC, "bilateral"), Supernet(SPEC, "left")
    x = x_batch()
    for arch in random_archs(6, seed=1):
        assert (bilateral(x, arch, "left") - bilateral(x, arch, "right")).abs().max() > 1e-3, arch  # other channels
        assert torch.equal(left(x, arch, "left"), left(x, arch, "right"))  # left mode ignores the side
    # the largest network uses every channel: both sides are the same network
    top = largest_arch(SPEC)
    torch.testing.assert_close(bilateral(x, top, "left"), bilateral(x, top, "right"))


def test_right_side_uses_the_last_channels():
    """Zeroing the first C - c channels of a stage's weights leaves the right-side sub-network unchanged."""
    net = Supernet(SPEC)
    arch = Arch(ops=("k3e3",) * 6, widths=(1.0, 1.0, 1.0, 0.5), resolution=32)
    x = x_batch()
    before = net(x, arch, "right")
    c, C = stage_channels(SPEC, arch)[3], SPEC.widest_channels()[3]
    with torch.no_grad():
        for blk in net.blocks[-2:]:  # stage 3: its blocks' outputs
            blk.project.conv.weight[:C - c] = 0.0
        net.blocks[-1].expand.conv.weight[:, :C - c] = 0.0  # and the inputs of the layers that read them
        net.head.conv.weight[:, :C - c] = 0.0
    torch.testing.assert_close(net(x, arch, "right"), before)
    assert (net(x, arch, "left") - before).abs().max() > 1e-3


def test_kernel_is_the_centre_crop():
    net = Supernet(SPEC)
    x = x_batch()
    k3 = Arch(ops=("k3e6",) * 6, widths=(1.0,) * 4, resolution=32)
    k5 = Arch(ops=("k5e6",) * 6, widths=(1.0,) * 4, resolution=32)
    before3, before5 = net(x, k3), net(x, k5)
    with torch.no_grad():
        for blk in net.blocks[1:]:  # the searched blocks hold 7x7 depthwise kernels
            w = blk.dw.conv.weight
            assert w.shape[-1] == 7
            centre = w[..., 2:5, 2:5].clone()
            w.zero_()
            w[..., 2:5, 2:5] = centre
    torch.testing.assert_close(net(x, k3), before3, rtol=0, atol=0)  # a k3 sub-network sees only the centre 3x3
    assert (net(x, k5) - before5).abs().max() > 1e-3  # a k5 one sees the ring that was zeroed


# -- channel fairness ------------------------------------------------------------------------------

@pytest.mark.parametrize("space", sorted(SPACES))
def test_bilateral_channel_usage_is_uniform(space):
    spec = SPACES[space]
    for stage, (bi, lo) in enumerate(zip(channel_usage(spec, "bilateral"), channel_usage(spec, "left"))):
        assert bi.min() > 0 and bi.max() / bi.min() == 1.0, (stage, bi)  # every channel serves as many widths
        assert lo.max() / lo.min() >= 1.5, (stage, lo)  # left-aligned: the first channels serve every width,
        assert lo[0] == lo.max() and lo[-1] == lo.min()  # the last ones only the widest


def test_training_subnets_pair_complementary_widths():
    arch = Arch(ops=("k5e3",) * 6, widths=(0.5, 0.5, 0.75, 1.0), resolution=32)
    subnets = training_subnets(SPEC, arch, "bilateral")
    assert len(subnets) == 4 and {sn.side for sn in subnets} == {"left", "right"}
    widths = sorted({tuple(b.cout for b in sn.plan if b.index == 0) for sn in subnets})
    assert widths == [(8, 8, 8, 64), (8, 16, 24, 64)]  # C - c: 8 of 16, 16 of 24, 24 of 32; a full stage stays full
    assert len(training_subnets(SPEC, arch, "left")) == 1
    assert len(training_subnets(SPEC, largest_arch(SPEC), "bilateral")) == 1  # the same network on both sides


# -- BatchNorm calibration and extraction -----------------------------------------------------------

def test_eval_forward_needs_calibration(digits):
    net = Supernet(SPEC).eval()
    arch = random_archs(1)[0]
    with pytest.raises(DeployKitError, match=r"not calibrated for this sub-network: call calibrate_bn"):
        net(x_batch(), arch)
    calibrate_bn(net, arch, digits.train_x[:128], "left")
    net(x_batch(), arch, "left")
    with pytest.raises(DeployKitError, match="not calibrated"):
        net(x_batch(), arch, "right")  # the right side is another sub-network
    assert not net.training  # calibration keeps the caller's mode


def test_calibration_matches_batchnorm_statistics(digits):
    """One batch: the calibrated running mean of the stem BN is the batch mean of the stem conv's output."""
    net = Supernet(SPEC)
    x = digits.train_x[:64]
    calibrate_bn(net, largest_arch(SPEC), x, batches=1, batch_size=64)
    with torch.no_grad():
        y = torch.nn.functional.conv2d(x, net.stem.conv.weight, None, 2, 1)
    torch.testing.assert_close(net.stem.bn.running_mean, y.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_extract_matches_supernet(digits, side):
    net = Supernet(SPEC)
    for arch in [largest_arch(SPEC), smallest_arch(SPEC), *random_archs(3, seed=2)]:
        calibrate_bn(net, arch, digits.train_x[:256], side)
        standalone = extract(net, arch, side)
        assert type(standalone) is type(build_network(SPEC, arch)) and not standalone.training
        assert sum(p.numel() for p in standalone.parameters()) == sum(p.numel() for p in build_network(SPEC, arch).parameters())
        net.eval()
        with torch.no_grad():
            diff = (standalone(digits.val_x[:64]) - net(digits.val_x[:64], arch, side)).abs().max()
        net.train()
        assert diff < 1e-4, (arch, diff)


def test_channel_divisor_one_keeps_exact_widths(digits):
    """A tiny space rounds widths to single channels; supernet, sides and extracted networks follow it."""
    tiny = SpaceSpec(name="tiny", resolutions=(32,), num_classes=10, stem_channels=4, head_channels=16, kernel_sizes=(3,),
                     expansions=(3,), width_ratios=(0.25, 0.5, 1.0), channel_divisor=1,
                     stages=((4, 1, 1), (6, 1, 2), (8, 1, 2)))
    arch = Arch(ops=("k3e3", "k3e3"), widths=(0.25, 0.5, 1.0), resolution=32)
    assert stage_channels(tiny, arch) == [1, 3, 8] and tiny.widest_channels() == [4, 6, 8]
    assert stage_channels(DIGITS_SPACE, arch) == [8, 16, 32]  # MobileNet's rounding to multiples of 8
    net = Supernet(tiny, "bilateral")
    calibrate_bn(net, arch, digits.train_x[:128], "right")
    standalone = extract(net, arch, "right")
    net.eval()
    with torch.no_grad():
        diff = (standalone(digits.val_x[:16]) - net(digits.val_x[:16], arch, "right")).abs().max()
    assert diff < 1e-4


def test_extract_needs_calibration():
    with pytest.raises(DeployKitError, match=r"extract needs this sub-network's BatchNorm statistics: call calibrate_bn"):
        extract(Supernet(SPEC), largest_arch(SPEC))


# -- training and evaluation ------------------------------------------------------------------------

def test_training_learns_digits(digits):
    data = subset(digits, 384)
    net = Supernet(SPEC, "bilateral")
    report = train_supernet(net, data, epochs=2, batch_size=32, random_archs=1, progress=False)
    assert report["epochs"] == report["epochs_run"] == 2 and report["steps_run"] == 24
    assert report["epoch_losses"][1] < report["epoch_losses"][0] < 2.4  # ln(10) = 2.30 is chance
    assert report["subnets_per_step"] > 4  # bilateral: both sides and complementary widths
    top = score_arch(net, largest_arch(SPEC), data)
    assert top["accuracy"] > 0.5 and top["loss"] < 2.0, top
    assert evaluate_arch(net, largest_arch(SPEC), data) == top["accuracy"]
    # side None in bilateral mode is the mean of both sides
    arch = Arch(ops=("k5e6",) * 6, widths=(0.5,) * 4, resolution=32)
    left, right = evaluate_arch(net, arch, data, "left"), evaluate_arch(net, arch, data, "right")
    assert evaluate_arch(net, arch, data) == pytest.approx((left + right) / 2)
    assert net.training  # evaluation restores the training mode


def test_wrong_dataset_and_arguments(digits):
    net = Supernet(SPEC)
    four = DataSplit(digits.train_x[:8], digits.train_y[:8] % 4, digits.val_x[:8], digits.val_y[:8] % 4, 4,
                     ("0", "1", "2", "3"), "four")
    with pytest.raises(DeployKitError, match="has 4 classes, space 'digits' 10: use a space with num_classes=4"):
        train_supernet(net, four, epochs=1, progress=False)
    with pytest.raises(DeployKitError, match="width_mode must be one of"):
        Supernet(SPEC, "right")
    with pytest.raises(DeployKitError, match="side must be one of"):
        net(x_batch(), largest_arch(SPEC), "middle")


# -- checkpoints -------------------------------------------------------------------------------------

TINY = dict(batch_size=32, random_archs=1, progress=False)


class Stop(Exception):
    pass


def test_checkpoint_resume(digits, tmp_path):
    data = subset(digits, 96)
    ckpt = tmp_path / "ckpt" / "supernet.pt"
    first = train_supernet(Supernet(SPEC, "left"), data, epochs=1, checkpoint=ckpt, **TINY)
    assert first["epochs"] == 1 and ckpt.exists()
    assert load_checkpoint(ckpt)["epoch"] == 1
    assert not [p for p in ckpt.parent.iterdir() if p != ckpt]  # no temporary files left behind
    second = train_supernet(Supernet(SPEC, "left"), data, epochs=2, checkpoint=ckpt, **TINY)
    assert second["resumed_from_epoch"] == 1 and second["epochs_run"] == 1 and second["epochs"] == 2
    assert len(second["epoch_losses"]) == 2 and second["epoch_losses"][0] == first["epoch_losses"][0]
    done = train_supernet(Supernet(SPEC, "left"), data, epochs=2, checkpoint=ckpt, **TINY)
    assert done["epochs_run"] == 0 and done["steps_run"] == 0  # nothing left to do


def test_interrupt_saves_and_resume_is_exact(digits, tmp_path):
    data = subset(digits, 96)  # 3 steps per epoch
    ckpt = tmp_path / "supernet.pt"

    def interrupt(info: dict) -> None:
        if info["epoch"] == 1 and info["step"] == 2:
            raise KeyboardInterrupt  # as Ctrl-C between two steps

    with pytest.raises(KeyboardInterrupt):
        train_supernet(Supernet(SPEC, "bilateral"), data, epochs=2, checkpoint=ckpt, on_step=interrupt, **TINY)
    saved = load_checkpoint(ckpt)
    assert (saved["epoch"], saved["step"]) == (1, 2)
    resumed_net = Supernet(SPEC, "bilateral")
    resumed = train_supernet(resumed_net, data, epochs=2, checkpoint=ckpt, **TINY)
    assert (resumed["resumed_from_epoch"], resumed["resumed_from_step"], resumed["steps_run"]) == (1, 2, 1)
    straight_net = Supernet(SPEC, "bilateral")
    straight = train_supernet(straight_net, data, epochs=2, **TINY)
    assert resumed["epoch_losses"] == pytest.approx(straight["epoch_losses"], rel=1e-5)
    for name, value in straight_net.state_dict().items():
        torch.testing.assert_close(resumed_net.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_bad_checkpoints(digits, tmp_path):
    data = subset(digits, 64)
    ckpt = tmp_path / "left.pt"
    train_supernet(Supernet(SPEC, "left"), data, epochs=1, checkpoint=ckpt, **TINY)
    with pytest.raises(DeployKitError, match=r"belongs to space 'digits' in 'left' mode, not 'digits' in 'bilateral' mode"):
        train_supernet(Supernet(SPEC, "bilateral"), data, epochs=2, checkpoint=ckpt, **TINY)
    with pytest.raises(DeployKitError, match="was trained with seed=0, not 1: pass seed=0 to resume"):
        train_supernet(Supernet(SPEC, "left"), data, epochs=2, checkpoint=ckpt, seed=1, **TINY)
    good = ckpt.read_bytes()
    for name, data_bytes in (("junk.pt", b"not a checkpoint"), ("cut.pt", good[:len(good) // 2]), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(data_bytes)
        with pytest.raises(DeployKitError, match=rf"cannot read supernet checkpoint .*{name} .*delete it to start training over"):
            train_supernet(Supernet(SPEC, "left"), data, epochs=1, checkpoint=tmp_path / name, **TINY)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(DeployKitError, match="is not a deploykit supernet checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_expansion_one_and_several_resolutions(digits):
    """A space with expansion 1 (no expand conv: the depthwise filters of the input channels) and two resolutions
    (inputs are resized to the architecture's); extraction stays exact on both sides."""
    spec = SpaceSpec(name="tiny", resolutions=(16, 24), num_classes=10, stem_channels=8, head_channels=32,
                     stages=((8, 1, 1), (16, 2, 2), (24, 1, 2)), kernel_sizes=(3, 5), expansions=(1, 4),
                     width_ratios=(0.5, 1.0))
    net = Supernet(spec)
    rng = np.random.default_rng(4)
    archs = [Arch(ops=("k5e1", "k3e1", "k5e1"), widths=(0.5, 0.5, 0.5), resolution=16),
             *[sample_arch(spec, rng) for _ in range(3)]]
    for arch in archs:
        for side in ("left", "right"):
            calibrate_bn(net, arch, digits.train_x[:128], side)  # 32 x 32 images, resized to 16 or 24
            standalone = extract(net, arch, side)
            x = torch.nn.functional.interpolate(digits.val_x[:16], size=(arch.resolution,) * 2, mode="bilinear",
                                                align_corners=False, antialias=True)
            net.eval()
            with torch.no_grad():
                assert (standalone(x) - net(digits.val_x[:16], arch, side)).abs().max() < 1e-4
            net.train()
