"""`deploykit compress` end to end in a fresh process: real pruning, training, ONNX Runtime measurement."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.conftest import one_error_line, run_cli

DEVICE = "epyc-2c-ort-t1"
TINY = "tests.compress_models:tiny_resnet"
PRUNED_SHAPE = "1,3,32,32"


def _compress(out, *extra, model=TINY, method="prune", budget="0.05", shape="1,3,16,16"):
    return run_cli("compress", "--model", model, "--method", method, "--device", DEVICE, "--budget-ms", budget,
                   "--example-shape", shape, "--out", out, "--no-progress", *extra, timeout=900)


@pytest.mark.parametrize("model, fragment", [
    ("no_such_module_xyz:build", "cannot import"),
    ("tests.compress_models:missing", "has no function"),
    ("tests.compress_models:not_a_module", "not an nn.Module"),
    ("tests.compress_models:needs_arguments", "without arguments"),
    ("missing_file.pt2", "not found"),
])
def test_bad_entry_point_is_one_line(tmp_path, model, fragment):
    proc = _compress(tmp_path / "run", model=model)
    assert fragment in one_error_line(proc)
    assert not (tmp_path / "run").exists()


def test_wrong_example_shape_is_one_line(tmp_path):
    line = one_error_line(_compress(tmp_path / "run", shape="1,1,16,16"))
    assert "--example-shape" in line
    line = one_error_line(_compress(tmp_path / "run", shape="1,3,16"))
    assert "1,C,H,W" in line


def test_torchscript_file_cannot_be_pruned(tmp_path):
    from tests.compress_models import tiny_resnet

    path = tmp_path / "net.ts"
    torch.jit.save(torch.jit.trace(tiny_resnet().eval(), torch.zeros(1, 3, 16, 16)), str(path))
    assert "--method int8" in one_error_line(_compress(tmp_path / "run", model=path))


def test_unreachable_budget_is_one_line(tmp_path):
    line = one_error_line(_compress(tmp_path / "run", budget="0.0001"))
    assert "below what pruning can reach" in line and "--budget-ms" in line


def test_int8_needs_data(tmp_path):
    assert "--data" in one_error_line(_compress(tmp_path / "run", method="int8"))


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "run"
    # budget: 60% of the tiny network's latency on this machine, measured in the run itself. 32x32 inputs: at 16x16
    # the network runs in ~0.04 ms, mostly per-run overhead, and a noisy moment put even its narrowest pruning
    # above 60% of the original
    probe = _compress(out / "probe", "--data", "digits", budget="1000", shape=PRUNED_SHAPE)
    line = one_error_line(probe)
    original_ms = float(line.split(" runs in ")[1].split(" ms")[0])
    budget = f"{0.6 * original_ms:.5f}"
    proc = _compress(out, "--data", "digits", "--finetune-epochs", "1", budget=budget, shape=PRUNED_SHAPE)
    return out, proc, float(budget)


def test_already_within_budget_refuses(pruned_run):
    out, _, _ = pruned_run
    assert not (out / "probe" / "report.json").exists()


def test_prune_run_writes_a_verified_report(pruned_run):
    out, proc, budget = pruned_run
    report = json.loads((out / "report.json").read_text())
    assert proc.returncode == (0 if report["within_budget"] else 2), proc.stderr
    for key in ("method", "original_latency_ms", "measured_latency_ms", "predicted_latency_ms", "budget_ms",
                "original_accuracy", "accuracy"):
        assert key in report
    assert report["budget_ms"] == pytest.approx(budget)
    assert report["measured_latency_ms"] < report["original_latency_ms"]
    assert report["within_budget"] == (report["measured_latency_ms"] <= budget)
    assert report["params"] < report["original_params"]
    assert report["measured"]["runs"] > 0 and report["measured"]["p90_ms"] >= report["measured_latency_ms"]
    assert 0.0 <= report["accuracy"] <= 1.0 and report["finetune"]["epochs"] == 1
    assert report["prune"]["attempts"] and report["prune"]["keep"]
    # the artifacts: ONNX runs in ONNX Runtime and agrees with the torch.export archive
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    sess = ort.InferenceSession(report["onnx_path"], providers=["CPUExecutionProvider"])
    y_onnx = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    y_torch = torch.export.load(report["model_path"]).module()(torch.from_numpy(x)).detach().numpy()
    assert y_onnx.shape == (1, 10)
    np.testing.assert_allclose(y_onnx, y_torch, atol=1e-4)


def test_prune_run_resumes_without_redoing_work(pruned_run):
    out, proc, budget = pruned_run
    before = json.loads((out / "run.json").read_text())
    again = _compress(out, "--data", "digits", "--finetune-epochs", "1", budget=f"{budget:.5f}", shape=PRUNED_SHAPE)
    after = json.loads((out / "run.json").read_text())
    assert after["phases"]["prune"] == before["phases"]["prune"]
    report = json.loads((out / "report.json").read_text())
    assert report["finetune"]["resumed_from_epoch"] == 1
    # the final latency is measured anew on resume, so a network pruned close to the budget may land on either side
    assert again.returncode == (0 if report["within_budget"] else 2), again.stderr


def test_other_settings_in_the_same_out_are_refused(pruned_run):
    out, _, budget = pruned_run
    line = one_error_line(_compress(out, "--data", "digits", "--finetune-epochs", "2", budget=f"{budget:.5f}",
                                    shape=PRUNED_SHAPE))
    assert "finetune_epochs" in line


def _compress_fraction(out, fraction: str, *extra):
    return run_cli("compress", "--model", TINY, "--method", "prune", "--device", DEVICE, "--budget-fraction", fraction,
                   "--example-shape", PRUNED_SHAPE, "--out", out, "--no-progress", *extra, timeout=900)


def test_budget_fraction_arguments_are_checked(tmp_path):
    assert "--budget-fraction must be between 0 and 1" in one_error_line(_compress_fraction(tmp_path / "bad", "1.5"))
    both = _compress_fraction(tmp_path / "both", "0.5", "--budget-ms", "1")
    assert both.returncode == 2 and "not allowed with" in both.stderr
    assert not (tmp_path / "bad").exists() and not (tmp_path / "both").exists()


@pytest.mark.slow  # a whole pruning run, about 100 s: `python -m pytest -m slow`
def test_budget_fraction_is_judged_against_the_original_measured_in_alternation(tmp_path):
    out = tmp_path / "run"
    proc = _compress_fraction(out, "0.6", "--finetune-epochs", "0")
    report = json.loads((out / "report.json").read_text())
    assert report["budget_fraction"] == 0.6
    assert report["budget_ms"] == pytest.approx(0.6 * report["original_latency_ms"])
    assert report["latency_ms_vs_original"] == pytest.approx(report["original_latency_ms"] / report["speedup"])
    assert report["within_budget"] == (report["latency_ms_vs_original"] <= report["budget_ms"])
    assert proc.returncode == (0 if report["within_budget"] else 2), proc.stderr
    assert all(len(a) and a["measured"] for a in report["prune"]["attempts"])
