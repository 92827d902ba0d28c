"""`deploykit search` end to end on the real digits and this machine's ONNX Runtime: the run directory's contents,
resuming, and every user error as one line with exit code 2."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from .conftest import one_error_line, run_cli

DEVICE = "epyc-2c-ort-t1"
TINY = ["--epochs", "1", "--finetune-epochs", "1", "--measure-n", "6", "--no-progress"]
REPORT_KEYS = ("budget_ms", "predicted_latency_ms", "measured_latency_ms", "accuracy", "onnx_path")


def budget_of_this_machine() -> float:
    """The middle of the digits space's range measured here, so the test holds on a slower or faster CI machine."""
    from deploykit.archspace import DIGITS_SPACE
    from deploykit.predictor import KernelPredictor
    from deploykit.profilers import get_backend
    from deploykit.search import space_range_ms

    lo, hi, _ = space_range_ms(DIGITS_SPACE, KernelPredictor.for_device(DEVICE), get_backend("ort-cpu", threads=1))
    return round((lo + hi) / 2, 4)


@pytest.fixture(scope="module")
def budget() -> float:
    return budget_of_this_machine()


@pytest.fixture(scope="module")
def evolution_run(tmp_path_factory, budget):
    out = tmp_path_factory.mktemp("search") / "evo"
    args = ["search", "--device", DEVICE, "--budget-ms", budget, "--out", out, "--population", "4", "--generations", "2",
            *TINY]
    proc = run_cli(*args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, args, proc


def test_search_writes_a_deployable_run(evolution_run, budget, digits):
    out, _, proc = evolution_run
    report = json.loads((out / "report.json").read_text())
    for key in REPORT_KEYS:
        assert report[key] is not None, key
    assert report["budget_ms"] == budget and report["method"] == "evolution"
    m = report["measured"]
    assert m["latency_ms"] == report["measured_latency_ms"] and m["p90_ms"] >= m["latency_ms"] and m["runs"] > 0
    assert m["latency_ms"] < 1.5 * budget  # measured on the device, near the budget (timing noise aside)
    assert 0.3 < report["accuracy"] <= 1.0  # far above chance (0.1) after one epoch of each phase
    assert report["onnx_check"]["top1_agreement"] == 1.0
    assert report["verification"]["tried"] and report["search"]["rejected"] >= 0
    assert f"{budget:g} ms" in (out / "report.md").read_text()
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "arch.json").read_text()) == report["arch"]

    # the ONNX model is the trained network: same predictions as the PyTorch weights in model.pt
    saved = torch.load(out / "model.pt", weights_only=True)
    from deploykit.archspace import Arch, SpaceSpec, build_network

    net = build_network(SpaceSpec.from_dict(saved["spec"]), Arch.from_dict(saved["arch"]))
    net.load_state_dict(saved["state_dict"])
    sess = ort.InferenceSession(report["onnx_path"], providers=["CPUExecutionProvider"])
    x = digits.val_x[:8]
    got = np.concatenate([sess.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    with torch.no_grad():
        assert np.allclose(net.eval()(x).numpy(), got, atol=1e-4)
    assert "measured" in proc.stdout and "model.onnx" in proc.stdout


def test_search_resumes_from_its_run_directory(evolution_run):
    out, args, _ = evolution_run
    before = json.loads((out / "report.json").read_text())
    log_lines = (out / "evolution.jsonl").read_text().count("\n")
    proc = run_cli(*args, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads((out / "report.json").read_text())
    assert after["arch"] == before["arch"] and after["accuracy"] == pytest.approx(before["accuracy"])
    assert (out / "evolution.jsonl").read_text().count("\n") == log_lines  # nothing evaluated again
    assert "supernet_s" in after["seconds"] and after["seconds"]["train_s"] < before["seconds"]["train_s"] + 5


def test_search_refuses_other_settings_in_the_same_run_directory(evolution_run, budget):
    out, args, _ = evolution_run
    run_json = (out / "run.json").read_text()
    other = [str(a) for a in args]
    other[other.index("--budget-ms") + 1] = str(round(budget * 1.05, 4))
    line = one_error_line(run_cli(*other))
    assert "holds a run with budget_ms" in line and "another --out" in line
    assert (out / "run.json").read_text() == run_json


def test_differentiable_search(evolution_run, tmp_path, budget):
    out = tmp_path / "darts"
    out.mkdir()
    shutil.copy(evolution_run[0] / "latency_model.json", out)  # the same space and device: reused, not rebuilt
    proc = run_cli("search", "--device", DEVICE, "--budget-ms", budget, "--out", out, "--method", "differentiable",
                   "--epochs", "1", "--finetune-epochs", "3", "--measure-n", "6", "--no-progress", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "differentiable" and report["training"]["init"] == "scratch"
    assert report["search"]["probabilities"] and len(report["search"]["history"]) == 1
    assert report["measured_latency_ms"] < 1.5 * budget
    assert report["accuracy"] > 0.5  # three epochs from scratch: far above chance (0.1)


@pytest.mark.parametrize("case", ["above", "below"])
def test_budget_outside_the_feasible_range(tmp_path, case):
    budget = "50" if case == "above" else "0.001"
    line = one_error_line(run_cli("search", "--device", DEVICE, "--budget-ms", budget, "--out", tmp_path / "r", *TINY))
    assert "outside the feasible range" in line and "ms (measured)" in line and "--budget-ms" in line
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_bad_data(tmp_path):
    missing = one_error_line(run_cli("search", "--device", DEVICE, "--budget-ms", "0.05", "--out", tmp_path / "r",
                                     "--data", tmp_path / "nope", *TINY))
    assert "not found" in missing
    (tmp_path / "empty").mkdir()
    empty = one_error_line(run_cli("search", "--device", DEVICE, "--budget-ms", "0.05", "--out", tmp_path / "r",
                                   "--data", tmp_path / "empty", *TINY))
    assert "empty" in empty
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    bad = one_error_line(run_cli("search", "--device", DEVICE, "--budget-ms", "0.05", "--out", tmp_path / "r",
                                 "--data", tmp_path / "bad.npz", *TINY))
    assert "bad.npz" in bad
    assert not (tmp_path / "r").exists()


def test_unknown_device(tmp_path):
    line = one_error_line(run_cli("search", "--device", "no-such-device", "--budget-ms", "0.05", "--out", tmp_path / "r"))
    assert "deploykit profile --name no-such-device" in line


def test_ctrl_c_leaves_a_run_that_resumes(evolution_run, tmp_path, budget):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "interrupted"
    out.mkdir()
    shutil.copy(evolution_run[0] / "latency_model.json", out)
    args = [sys.executable, "-m", "deploykit", "search", "--device", DEVICE, "--budget-ms", str(budget), "--out", str(out),
            "--epochs", "3", "--finetune-epochs", "1", "--measure-n", "6", "--population", "4", "--generations", "1",
            "--no-progress"]
    # a terminal's Ctrl-C: SIGINT at its default, even when this suite was started in the background, where
    # the shell hands every child an ignored SIGINT and the signal below would be lost
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not (out / "supernet.ckpt").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (out / "supernet.ckpt").exists(), "the supernet wrote no checkpoint after its first epoch"
    proc.send_signal(signal.SIGINT)  # Ctrl-C during the second epoch
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "rerun the same command to resume" in err, err[-2000:]
    assert not (out / "report.json").exists()

    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["search"]["supernet"]["epochs"] == 3 and len(report["search"]["supernet"]["epoch_losses"]) == 3
