"""Standalone training on real digits: it learns, and an interrupted run resumes to the very same weights."""
from __future__ import annotations

import pytest
import torch

from deploykit.archspace import DIGITS_SPACE, build_network
from deploykit.data import DataSplit
from deploykit.errors import DeployKitError
from deploykit.supernet import smallest_arch
from deploykit.train import accuracy, train_network, validation_scores

pytestmark = pytest.mark.usefixtures("one_thread")


def small(d: DataSplit, n: int = 512) -> DataSplit:
    return DataSplit(d.train_x[:n], d.train_y[:n], d.val_x, d.val_y, d.num_classes, d.class_names, d.source, d.mean, d.std)


def fresh_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_network(DIGITS_SPACE, smallest_arch(DIGITS_SPACE))


def test_training_learns_digits(digits):
    net = fresh_net()
    before = validation_scores(net, digits)
    rep = train_network(net, digits, epochs=3, progress=False)
    assert rep["accuracy"] > max(0.5, before["accuracy"] + 0.3)
    assert rep["val_loss"] < min(1.5, before["loss"] - 0.5)  # ln(10) = 2.30 is chance
    assert rep["accuracy"] == pytest.approx(accuracy(net, digits))
    assert len(rep["epoch_losses"]) == 3 and rep["epoch_losses"][-1] < rep["epoch_losses"][0]


def test_interrupted_training_resumes_to_the_same_weights(digits, tmp_path):
    data = small(digits, 256)
    straight = fresh_net()
    train_network(straight, data, epochs=3, progress=False)

    net = fresh_net()
    calls = {"n": 0}
    steps_per_epoch = len(data.train_x) // 64

    def interrupt(module, inputs):
        calls["n"] += 1
        if calls["n"] == 2 * steps_per_epoch + 2:  # in the middle of the third epoch
            raise KeyboardInterrupt

    handle = net.register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_network(net, data, epochs=3, progress=False, checkpoint=tmp_path / "t.ckpt")
    handle.remove()
    resumed_net = fresh_net(seed=1)  # other initial weights: everything must come from the checkpoint
    rep = train_network(resumed_net, data, epochs=3, progress=False, checkpoint=tmp_path / "t.ckpt")
    assert rep["resumed_from_epoch"] == 2
    for a, b in zip(straight.state_dict().values(), resumed_net.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)


def test_checkpoint_of_other_settings_is_refused(digits, tmp_path):
    data = small(digits, 128)
    train_network(fresh_net(), data, epochs=1, progress=False, checkpoint=tmp_path / "t.ckpt")
    with pytest.raises(DeployKitError, match="written with lr=0.003, not 0.01: pass the same settings"):
        train_network(fresh_net(), data, epochs=1, lr=0.01, progress=False, checkpoint=tmp_path / "t.ckpt")
    (tmp_path / "bad.ckpt").write_bytes(b"garbage")
    with pytest.raises(DeployKitError, match="cannot read training checkpoint .*delete it"):
        train_network(fresh_net(), data, epochs=1, progress=False, checkpoint=tmp_path / "bad.ckpt")
