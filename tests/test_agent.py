"""The measurement agent (`deploykit agent serve`) as a real process on loopback, driven by the real client
(`--backend remote`) and by raw HTTP for the requests a client would never send."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from deploykit.agent import new_token_file, spawn
from deploykit.errors import DeployKitError, TransportError
from deploykit.fingerprint import mismatches
from deploykit.onnx_io import input_specs
from deploykit.profilers import get_backend
from deploykit.protocol import KERNEL_PROTOCOL, Protocol
from deploykit.wire import FILL_LOCATION, PROTOCOL_HEADER, PROTOCOL_VERSION, REQUEST_HEADER, fill_specs, strip_weights

from .conftest import one_error_line, run_cli

QUICK = Protocol(warmup_runs=2, warmup_s=0.01, rounds=2, round_s=0.02, min_runs_per_round=3, tolerance=0.5, max_rounds=3)


def conv_model(c: int = 8, hw: int = 16) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, [c, c, 3, 3], rng.standard_normal(c * c * 9).astype(np.float32))
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
                           helper.make_node("Relu", ["c"], ["y"], name="relu")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, hw, hw])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def token(tmp_path_factory) -> Path:
    return new_token_file(tmp_path_factory.mktemp("agent") / "token")


@pytest.fixture(scope="module")
def agent(token, tmp_path_factory):
    log = tmp_path_factory.mktemp("agentlog") / "agent.log"
    proc, url = spawn(token, 0, "--max-model-mb", "4", log_path=log)
    yield url, log
    proc.kill()
    proc.wait()


@pytest.fixture
def remote(agent, token):
    backend = get_backend("remote", threads=1, url=agent[0], token_file=str(token))
    yield backend
    backend.close()


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def good_headers(token: Path, request: dict | None = None) -> dict:
    h = {"Authorization": f"Bearer {token.read_text().strip()}", PROTOCOL_HEADER: str(PROTOCOL_VERSION)}
    if request is not None:
        h[REQUEST_HEADER] = json.dumps(request)
    return h


MEASURE_REQ = {"backend": "ort-cpu", "threads": 1, "inputs": [{"name": "x", "shape": [1, 8, 16, 16], "dtype": "float32"}],
               "protocol": {"rounds": 2, "round_s": 0.02, "warmup_s": 0.01, "max_rounds": 3, "tolerance": 0.5}}


# -- measuring through the agent ------------------------------------------------------------

def test_remote_measure_is_the_local_measurement_of_this_device(remote):
    model = conv_model()
    specs = input_specs(model)
    local = get_backend("ort-cpu", threads=1)
    assert mismatches(remote.fingerprint(), local.fingerprint()) == []  # the agent's device is this machine
    assert remote.fingerprint()["backend"] == "ort-cpu"
    got = remote.measure(model, specs, KERNEL_PROTOCOL)
    here = local.measure(model, specs, KERNEL_PROTOCOL)
    assert got.stats.count >= 3 * KERNEL_PROTOCOL.min_runs_per_round and got.stats.p90_ms >= got.latency_ms > 0
    assert 0.33 < got.latency_ms / here.latency_ms < 3.0  # same kernel, same device (the +-3% figure is the benchmark's)
    assert remote.last_seconds["measure"] > 0 and remote.last_seconds["queued"] >= 0


def test_remote_per_layer_maps_layers_to_the_sent_graph(remote):
    model = conv_model()
    prof = remote.measure_layers(model, input_specs(model))
    names = {n.name for n in model.graph.node}
    assert prof.layers and prof.end_to_end_ms > 0
    assert {s for layer in prof.layers for s in layer.source_nodes} <= names
    assert any("conv" in layer.source_nodes for layer in prof.layers)


def test_measure_cli_through_the_agent(agent, token, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(), path)
    proc = run_cli("measure", path, "--backend", "remote", "--url", agent[0], "--token-file", token, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["latency_ms"] > 0 and out["device"]["backend"] == "ort-cpu" and out["runs"] > 0


def test_one_measurement_at_a_time(agent, token):
    """Two clients at once: the second waits in the queue while the first measures."""
    model, replies = conv_model(16, 32), []

    def client():
        b = get_backend("remote", threads=1, url=agent[0], token_file=str(token))
        b.measure(model, input_specs(model), Protocol(rounds=3, round_s=0.3, tolerance=1.0, max_rounds=3))
        replies.append(dict(b.last_seconds))
        b.close()

    threads = [threading.Thread(target=client) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(replies) == 2
    first, second = sorted(replies, key=lambda s: s["queued"])
    assert second["queued"] >= 0.8 * first["measure"]  # it waited for the whole of the other measurement


# -- what the agent refuses, and keeps serving --------------------------------------------------

def test_bad_requests_are_refused_and_the_agent_keeps_serving(agent, token, remote):
    url = agent[0]
    body = conv_model().SerializeToString()
    served_before = remote.info()["served"]
    bad_token = {"Authorization": "Bearer " + "x" * 43, PROTOCOL_HEADER: str(PROTOCOL_VERSION),
                 REQUEST_HEADER: json.dumps(MEASURE_REQ)}
    external = conv_model()
    w = external.graph.initializer[0]
    w.ClearField("raw_data")
    del w.float_data[:]
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value="/etc/passwd")
    unknown_op = conv_model()
    unknown_op.graph.node[1].op_type, unknown_op.graph.node[1].domain = "NoSuchOp", "com.example"
    unknown_op.opset_import.append(helper.make_opsetid("com.example", 1))
    cases = [
        ("no token", {PROTOCOL_HEADER: str(PROTOCOL_VERSION), REQUEST_HEADER: json.dumps(MEASURE_REQ)}, body, 401,
         "unauthorized"),
        ("wrong token", bad_token, body, 401, "unauthorized"),
        ("protocol 99", {**good_headers(token, MEASURE_REQ), PROTOCOL_HEADER: "99"}, body, 400, "protocol_version"),
        ("oversized", good_headers(token, MEASURE_REQ), b"\0" * (5 << 20), 413, "too_large"),
        ("not ONNX", good_headers(token, MEASURE_REQ), b"not a model " * 100, 415, "not_onnx"),
        ("external data", good_headers(token, MEASURE_REQ), external.SerializeToString(), 415, "not_onnx"),
        ("unknown op", good_headers(token, MEASURE_REQ), unknown_op.SerializeToString(), 422, "runtime_rejected"),
        ("bad inputs", good_headers(token, {**MEASURE_REQ, "inputs": [{"name": "x", "shape": [-1], "dtype": "f"}]}),
         body, 400, "bad_request"),
        ("too many rounds", good_headers(token, {**MEASURE_REQ, "protocol": {"rounds": 500, "max_rounds": 500}}),
         body, 400, "bad_request"),
    ]
    for name, headers, payload, status, code in cases:
        got_status, doc = raw(url, "POST", "/v1/measure", payload, headers)
        assert (got_status, doc.get("code")) == (status, code), (name, doc)
        assert doc["protocol"] == PROTOCOL_VERSION and doc["error"]
    # a truncated model: refused, as not ONNX or as a model the runtime cannot load
    got_status, doc = raw(url, "POST", "/v1/measure", body[: len(body) // 2], good_headers(token, MEASURE_REQ))
    assert got_status in (415, 422) and doc["code"] in ("not_onnx", "runtime_rejected")
    assert raw(url, "GET", "/v1/nothing", None, good_headers(token))[0] == 404
    assert raw(url, "GET", "/v1/info")[0] == 401
    info = remote.info()
    assert info["served"] == served_before + 1  # the info request just made; nothing refused counted as served
    assert info["refused"]["unauthorized"] >= 3 and info["refused"]["not_onnx"] >= 2
    model = conv_model()
    assert remote.measure(model, input_specs(model), QUICK).latency_ms > 0  # still serving


# -- filled weights: large random weights travel as shapes -------------------------------------

def test_strip_weights_sends_shapes_and_leaves_the_model_alone():
    model = conv_model(256, 8)  # 2.4 MB of weights
    before = model.SerializeToString()
    stripped, left_out = strip_weights(model)
    assert model.SerializeToString() == before  # the caller's model is untouched
    assert left_out == 256 * 256 * 9 * 4 and len(stripped.SerializeToString()) < 2000
    assert fill_specs(stripped) == [("w", (256, 256, 3, 3), TensorProto.FLOAT)]
    assert [n.op_type for n in stripped.graph.node] == ["Conv", "Relu"] and stripped.opset_import == model.opset_import
    small = conv_model(8, 16)  # 2.3 KB: sent as it is
    assert strip_weights(small) == (small, 0)


def test_filled_weights_are_measured_per_model_and_per_layer(agent, token):
    model = conv_model(256, 8)
    specs = input_specs(model)
    for device_backend in ("ort-cpu", "torch-cpu"):  # the runtime takes them from memory / they are written in
        b = get_backend("remote", threads=1, url=agent[0], token_file=str(token), device_backend=device_backend)
        b.weights_are_arbitrary = True
        assert b.measure(model, specs, QUICK).latency_ms > 0
        if device_backend == "ort-cpu":
            prof = b.measure_layers(model, specs)
            assert any("conv" in layer.source_nodes for layer in prof.layers) and prof.end_to_end_ms > 0
        b.close()
    big = conv_model(384, 4)  # 5.3 MB sent as shapes still counts against the agent's 4 MB
    b = get_backend("remote", threads=1, url=agent[0], token_file=str(token))
    b.weights_are_arbitrary = True
    with pytest.raises(TransportError, match="above the 4194304 bytes the agent.*--max-model-mb"):
        b.measure(big, input_specs(big), QUICK)
    b.close()


def marked(model: onnx.ModelProto, location: str = FILL_LOCATION, data_type: int | None = None) -> bytes:
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    del w.float_data[:]
    if data_type is not None:
        w.data_type = data_type
    w.data_location = TensorProto.EXTERNAL
    w.external_data.add(key="location", value=location)
    return model.SerializeToString()


def test_bad_fill_requests_are_refused(agent, token):
    fill = {**MEASURE_REQ, "fill_weights": True}
    huge = conv_model()
    del huge.graph.initializer[0].dims[:]
    huge.graph.initializer[0].dims.extend([4096, 4096, 3, 3])  # 600 MB to fill
    cases = [
        ("a path, with fill_weights", fill, marked(conv_model(), "/etc/passwd"), 415, "not_onnx"),
        ("an int64 tensor", fill, marked(conv_model(), data_type=TensorProto.INT64), 415, "not_onnx"),
        ("marked, without fill_weights", MEASURE_REQ, marked(conv_model()), 415, "not_onnx"),
        ("above the limit once filled", fill, marked(huge), 413, "too_large"),
        ("fill_weights not a bool", {**fill, "fill_weights": "yes"}, marked(conv_model()), 400, "bad_request"),
    ]
    for name, req, payload, status, code in cases:
        got_status, doc = raw(agent[0], "POST", "/v1/measure", payload, good_headers(token, req))
        assert (got_status, doc.get("code")) == (status, code), (name, doc)
    got_status, doc = raw(agent[0], "POST", "/v1/measure", marked(conv_model()), good_headers(token, fill))
    assert got_status == 200 and doc["measurement"]["stats"]["median_ms"] > 0  # the same, well formed


def test_client_messages(agent, token, tmp_path, monkeypatch):
    model_path = tmp_path / "m.onnx"
    onnx.save(conv_model(), model_path)
    wrong = tmp_path / "wrong"
    wrong.write_text("y" * 40)
    line = one_error_line(run_cli("measure", model_path, "--backend", "remote", "--url", agent[0], "--token-file", wrong))
    assert "refused the token" in line and "--token-file" in line
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    line = one_error_line(run_cli("measure", model_path, "--backend", "remote", "--url", f"http://127.0.0.1:{free}",
                                  "--token-file", token))
    assert "unreachable" in line and "deploykit agent serve" in line
    line = one_error_line(run_cli("measure", model_path, "--backend", "remote", "--token-file", token))
    assert "--url" in line
    line = one_error_line(run_cli("measure", model_path, "--url", agent[0]))
    assert "--backend remote" in line

    import deploykit.profilers.remote as client

    monkeypatch.setattr(client, "PROTOCOL_VERSION", PROTOCOL_VERSION + 1)  # a newer client against this agent
    b = get_backend("remote", threads=1, url=agent[0], token_file=str(token), retry_s=0)
    with pytest.raises(TransportError, match=f"speaks deploykit protocol {PROTOCOL_VERSION}, this client "
                                             f"{PROTOCOL_VERSION + 1}.*same deploykit version"):
        b.fingerprint()
    monkeypatch.undo()
    unknown_op = conv_model()
    unknown_op.graph.node[1].op_type = "NoSuchOp"
    b = get_backend("remote", threads=1, url=agent[0], token_file=str(token))
    with pytest.raises(DeployKitError, match="runtime cannot run the model") as e:
        b.measure(unknown_op, input_specs(unknown_op), QUICK)
    assert not isinstance(e.value, TransportError)  # the model's fault: a profile counts it and goes on
    big = conv_model(384, 4)  # 5.3 MB of weights, above the agent's --max-model-mb 4
    with pytest.raises(TransportError, match="above the 4194304 bytes the agent.*--max-model-mb"):
        b.measure(big, input_specs(big), QUICK)


def test_a_client_that_goes_away_does_not_wedge_the_agent(agent, token):
    url = urlsplit(agent[0])
    body = conv_model(16, 32).SerializeToString()
    long = {**MEASURE_REQ, "inputs": [{"name": "x", "shape": [1, 16, 32, 32], "dtype": "float32"}],
            "protocol": {"rounds": 20, "round_s": 2.0, "max_rounds": 20, "tolerance": 1.0}}  # 40 s if left to run
    head = (f"POST /v1/measure HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in good_headers(token, long).items()) + "\r\n").encode()
    with socket.create_connection((url.hostname, url.port)) as s:
        s.sendall(head + body)
        time.sleep(1.0)  # it is measuring now
    t0 = time.monotonic()
    b = get_backend("remote", threads=1, url=agent[0], token_file=str(token))
    model = conv_model()
    assert b.measure(model, input_specs(model), QUICK).latency_ms > 0
    assert time.monotonic() - t0 < 20  # the abandoned measurement stopped; the device was not held for 40 s
    deadline = time.monotonic() + 10
    while "went away" not in agent[1].read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "went away" in agent[1].read_text()


# -- the agent process --------------------------------------------------------------------------

def test_agent_start_errors_are_one_line(tmp_path, token):
    line = one_error_line(run_cli("agent", "serve", "--port", "0", "--token-file", tmp_path / "missing"))
    assert "deploykit agent token --out" in line
    short = tmp_path / "short"
    short.write_text("abc\n")
    assert "no usable token" in one_error_line(run_cli("agent", "serve", "--port", "0", "--token-file", short))
    assert "already exists" in one_error_line(run_cli("agent", "token", "--out", token))
    assert token.stat().st_mode & 0o077 == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert "choose another --port" in one_error_line(run_cli("agent", "serve", "--port", taken, "--token-file", token))


def test_agent_says_where_it_listens(token):
    proc, url = spawn(token, 0, "--host", "0.0.0.0")
    proc.kill()
    proc.wait()
    rest = proc.stdout.read()
    assert url.startswith("http://0.0.0.0:") and rest == ""
    proc, url = spawn(token, 0)
    proc.kill()
    proc.wait()
    assert url.startswith("http://127.0.0.1:")


def test_agent_runs_without_torch(token, tmp_path):
    """The device needs only the measuring part: an agent whose Python cannot import torch, scikit-learn, tqdm or
    matplotlib measures all the same."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'sklearn', 'tqdm', 'matplotlib', 'onnxsim', 'onnxscript'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n")
    log = tmp_path / "agent.log"
    proc, url = spawn(token, 0, env={"PYTHONPATH": str(blocker)}, log_path=log)
    try:
        b = get_backend("remote", threads=1, url=url, token_file=str(token))
        model = conv_model()
        assert b.measure(model, input_specs(model), QUICK).latency_ms > 0
        assert b.measure_layers(model, input_specs(model)).layers
        assert b.info()["backends"]["ort-cpu"] == "ok"
    finally:
        proc.kill()
        proc.wait()
    assert "Traceback" not in log.read_text()


# -- a profile through the agent, which is killed and restarted -----------------------------------

def test_profile_survives_an_agent_restart(token, tmp_path):
    import subprocess
    import sys

    tables = tmp_path / "tables"
    table = tables / "phone.jsonl"
    proc, url = spawn(token, 0)
    port = urlsplit(url).port
    args = ["profile", "--backend", "remote", "--url", url, "--token-file", token, "--name", "phone", "--kernels", "40",
            "--nets", "0", "--no-fit", "--no-progress", "--out-dir", tables, "--kinds", "act,maxpool"]
    prof = subprocess.Popen([sys.executable, "-m", "deploykit", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while (prof.poll() is None and (not table.exists() or len(table.read_text().splitlines()) < 6)
               and time.monotonic() < deadline):
            time.sleep(0.05)
        proc.kill()  # mid-profile
        proc.wait()
        _, err = prof.communicate(timeout=120)
    finally:
        prof.kill()
    assert prof.returncode == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unreachable" in lines[0] and "--resume" in lines[0]
    kept = table.read_text().splitlines()
    assert 6 <= len(kept) < 41

    proc, url2 = spawn(token, port)  # the agent comes back on its port
    try:
        done = run_cli(*args, "--resume", timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert done.returncode == 0, done.stderr
    after = table.read_text().splitlines()
    assert after[:len(kept)] == kept  # nothing lost or rewritten
    from deploykit.table import LatencyTable

    t = LatencyTable.load(table)
    assert sum(1 for e in t.entries.values() if e.kernel["kind"] != "net") == 40
    assert t.device["backend"] == "ort-cpu"  # the device's own fingerprint, from the agent


# -- the other commands that take a remote device ---------------------------------------------------

def test_predictor_evaluate_and_export_measure_on_the_agent(agent, token, tmp_path):
    from deploykit import zoo

    models = tmp_path / "models"
    models.mkdir()
    zoo.export_onnx(zoo.build("mobilenet_v2", num_classes=10, width=0.35), (1, 3, 32, 32), models / "mbv2.onnx")
    out = tmp_path / "eval"
    proc = run_cli("predictor", "evaluate", "--device", "epyc-2c-ort-t1", "--models", models, "--out", out, "--force",
                   "--backend", "remote", "--url", agent[0], "--token-file", token, "--no-progress", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["predictor"]["n"] == 1 and (out / "evaluation.json").exists()

    proc = run_cli("export", "--model", models / "mbv2.onnx", "--format", "ort", "--out", tmp_path / "exp",
                   "--backend", "remote", "--url", agent[0], "--token-file", token)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "exp" / "manifest.json").read_text())
    assert manifest["measured_latency_ms"] > 0 and any(agent[0] in n for n in manifest["notes"])
    assert manifest["device"]["fingerprint"]["backend"] == "ort-cpu"
    line = one_error_line(run_cli("export", "--model", models / "mbv2.onnx", "--format", "tensorrt", "--out",
                                  tmp_path / "trt", "--backend", "remote", "--url", agent[0], "--token-file", token))
    assert "TensorRT" in line
