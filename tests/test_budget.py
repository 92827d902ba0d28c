"""Budgeted pruning: widths from the device table, rounding to fast counts, steering to the budget."""
import numpy as np
import pytest
import torch

from deploykit.compress.budget import _aim, allocate, model_ms, plan, prune_to_budget
from deploykit.compress.latency import fast_count, predict_ms
from deploykit.errors import DeployKitError
from deploykit.predictor import KernelPredictor
from tests.families import FAMILIES, INPUT_SHAPE


@pytest.fixture(scope="module")
def predictor():
    return KernelPredictor.for_device("epyc-2c-ort-t1")


def _predicted(predictor):
    return lambda net: predict_ms(predictor, net, INPUT_SHAPE)


def test_fast_count_takes_free_channels_and_steps_down():
    flat = np.full(101, 1.0)
    assert fast_count(flat, 50, 1, 100) == 54  # a flat step: the widest count within 8% costs the same
    stairs = 1.0 + (np.arange(101) >= 48) + (np.arange(101) >= 51)
    assert fast_count(stairs, 50, 1, 100) == 47  # just above a step, and a step up next: the widest count below it
    assert fast_count(stairs, 49, 1, 100) == 50  # same cost up to 50
    rising = np.arange(101, dtype=float)
    assert fast_count(rising, 50, 1, 100) == 50
    assert fast_count(flat, 50, 1, 100, divisor=4) % 4 == 0
    assert fast_count(flat, 99, 1, 100) == 100


def test_aim_interpolates_between_bracketing_observations():
    known = [(1.0, 2.0), (4.0, 8.0)]  # observed = 2 x modelled
    assert _aim(known, 4.0) == pytest.approx(2.0)
    assert _aim([(1.0, 2.0)], 6.0) == pytest.approx(3.0)  # outside: the nearest pair's ratio


@pytest.mark.parametrize("family", ["resnet_basic", "mobilenet_v2", "regnet", "densenet"])
def test_allocation_meets_the_aim_and_is_monotone(predictor, family):
    torch.manual_seed(0)
    net = FAMILIES[family]().eval()
    p = plan(net, torch.zeros(INPUT_SHAPE), predictor, _predicted(predictor))
    assert p.full_ms > p.min_ms > 0
    previous = None
    for frac in (0.3, 0.5, 0.7, 0.9):
        aim = p.min_ms + frac * (p.full_ms - p.min_ms)
        counts = allocate(p, aim)
        assert model_ms(p, [counts])[0] <= aim + 1e-9
        assert all(p.min_keep[g] <= c <= p.full[g] for g, c in counts.items())
        if previous is not None:
            assert all(counts[g] >= previous[g] for g in counts)  # a larger aim never narrows a group
        previous = counts


def test_prune_to_budget_on_predictions_lands_in_band(predictor):
    torch.manual_seed(0)
    net = FAMILIES["resnet_basic"]().eval()
    x = torch.zeros(INPUT_SHAPE)
    full_ms = predict_ms(predictor, net, INPUT_SHAPE)
    budget = 0.6 * full_ms
    result = prune_to_budget(net, x, predictor, None, budget, progress=False)
    assert result.measured is None
    assert result.attempts and all(a["measured"] is False for a in result.attempts)
    got = result.predicted_ms  # the kept attempt's, not necessarily the last one's
    assert got in [a["observed_ms"] for a in result.attempts]
    assert result.met == (0.9 * budget <= got <= budget)
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in net.parameters())
    assert result.model(x).shape == net(x).shape
    # the recorded kept channels rebuild the same network
    from deploykit.compress.prune import analyze, prune
    again = prune(net, analyze(net, x), {g: torch.tensor(ix) for g, ix in result.keep.items()})
    torch.testing.assert_close(again.eval()(x), result.model.eval()(x))


def test_unreachable_budget_names_the_narrowest_latency(predictor):
    torch.manual_seed(0)
    net = FAMILIES["vgg"]().eval()
    with pytest.raises(DeployKitError, match="below what pruning can reach"):
        prune_to_budget(net, torch.zeros(INPUT_SHAPE), predictor, None, 1e-6, progress=False)
