"""The real CLI in fresh processes: outputs, error paths (one line, exit 2) and resume after kill -9."""
import json
import os
import signal
import subprocess
import sys
import time

from onnx import TensorProto, helper, save

from deploykit.table import LatencyTable

from .conftest import one_error_line, run_cli


def test_measure_json(zoo_onnx):
    p = run_cli("measure", zoo_onnx["mobilenet_v2"], "--json", "--per-layer")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    for k in ("latency_ms", "p90_ms", "std_ms", "cv", "runs", "device", "layers"):
        assert k in out
    assert out["device"]["backend"] == "ort-cpu" and out["device"]["threads"] == 1
    layer = out["layers"][0]
    assert {"name", "op_type", "latency_ms", "source_nodes"} <= set(layer)


def test_measure_dynamic_shape(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g", [x], [y])
    path = tmp_path / "dyn.onnx"
    save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    assert "--shape" in one_error_line(run_cli("measure", path))
    p = run_cli("measure", path, "--shape", "4,8", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["inputs"] == {"x": [4, 8]}


def test_measure_error_paths(tmp_path, zoo_onnx):
    (tmp_path / "text.onnx").write_text("hello")
    data = zoo_onnx["resnet18"].read_bytes()
    (tmp_path / "trunc.onnx").write_bytes(data[: len(data) // 2])
    assert "not found" in one_error_line(run_cli("measure", tmp_path / "missing.onnx"))
    assert "ONNX" in one_error_line(run_cli("measure", tmp_path / "text.onnx"))
    assert "ONNX" in one_error_line(run_cli("measure", tmp_path / "trunc.onnx"))
    assert "unknown backend 'tpu'" in one_error_line(run_cli("measure", zoo_onnx["resnet18"], "--backend", "tpu"))


def test_table_errors(tmp_path):
    assert "run `deploykit profile --name nowhere` first" in one_error_line(run_cli("table", "show", "nowhere", cwd=tmp_path))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"format": "deploykit-latency-table", "format_version": 1, "device": {}}\n{oops}\n{}\n')
    assert "corrupt at line 2" in one_error_line(run_cli("table", "validate", bad))


def _wait_for_entries(path, n, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and len(path.read_text().splitlines()) > n:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    raise AssertionError("profile made no progress")


def test_profile_kill9_then_resume(tmp_path):
    table = tmp_path / "latency_tables" / "dev.jsonl"
    args = [sys.executable, "-m", "deploykit", "profile", "--name", "dev", "--kernels", "60", "--minutes", "5", "--no-progress"]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_entries(table, 8, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = LatencyTable.load(table)
    assert len(before.entries) >= 8
    before_lines = [ln for ln in table.read_text().splitlines() if ln.endswith("}")]

    # without --resume the table is refused, untouched
    assert "--resume" in one_error_line(run_cli("profile", "--name", "dev", "--kernels", "60", cwd=tmp_path))
    done = run_cli("profile", "--name", "dev", "--kernels", "60", "--nets", "2", "--resume", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "latency_tables" / "dev.predictor.json").exists()  # fitted at the end of the profile
    after = LatencyTable.load(table)
    nets = [k for k in after.entries if k.startswith("net:")]
    assert len(after.entries) == 62 and len(nets) == 2 and after.validate() == []
    for key in nets:  # calibration networks carry their per-layer profile, each layer naming the nodes it covers
        layers = after.entries[key].layers
        assert layers and all(op and ms >= 0 and isinstance(nodes, list) for op, ms, nodes in layers)
        assert any(nodes for _, _, nodes in layers)
    # nothing finished before the kill was lost or rewritten
    after_lines = table.read_text().splitlines()
    assert all(line in after_lines for line in before_lines[1:])
    for key, e in before.entries.items():
        assert after.entries[key].stats == e.stats

    show = run_cli("table", "show", "dev", "--json", cwd=tmp_path)
    assert show.returncode == 0 and json.loads(show.stdout)["kernels"] == 60 and json.loads(show.stdout)["nets"] == 2
    assert run_cli("table", "validate", "dev", cwd=tmp_path).returncode == 0


def test_profile_time_bound(tmp_path):
    t0 = time.time()
    p = run_cli("profile", "--name", "quick", "--kernels", "100000", "--minutes", "0.15", "--no-progress", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert time.time() - t0 < 60 and "--resume" in p.stdout
    assert 1 <= len(LatencyTable.load(tmp_path / "latency_tables" / "quick.jsonl").entries) < 100000


def test_profile_refuses_other_device_on_resume(tmp_path):
    assert run_cli("profile", "--name", "d", "--kernels", "3", "--nets", "0", "--no-fit", "--no-progress",
                   cwd=tmp_path).returncode == 0
    line = one_error_line(run_cli("profile", "--name", "d", "--kernels", "6", "--threads", "2", "--resume", cwd=tmp_path))
    assert "another device" in line
