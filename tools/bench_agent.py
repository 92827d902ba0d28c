"""Benchmark of the measurement agent (`deploykit agent serve` + `--backend remote`), on this machine's CPU over loopback.

  python tools/bench_agent.py [--only agreement,overhead,bad] [--kernels 150] [--profile-kernels 60]
                              [--rounds 5] [--out tools/out/agent]

- agreement: mobilenet_v2 (width 0.5, 96x96; width 1.0, 160x160) and resnet18 (width 0.5, 96x96), exported once into
             OUT/models, measured locally (ort-cpu, 1 thread) and through the agent (ort-cpu, 1 thread, same machine)
             in alternation, `--rounds` rounds under MODEL_PROTOCOL: each side's median round, the ratio remote/local
             (median over rounds of the per-round ratio) and whether it is within +-3% (target).
- overhead:  N kernels (`--kernels`, default 150) drawn with seed 0 by the profiler's own prior sampler
             (`sample_kernels` on the prior generator `deploykit profile` uses), each measured locally and through the
             agent under KERNEL_PROTOCOL, kernel by kernel, the order alternating. As `deploykit profile` does, the
             client sends weights of 64 KB or more as shapes for the agent to fill (protocol v2). Protocol overhead of
             one kernel = client wall time of the remote measure - the agent's own measure time
             (`last_seconds["measure"]`) + the agent's filling of the weights (inside its measure time, but no local
             step): stripping, serialisation, upload, queueing, the agent's ONNX check, filling, reply and parsing.
             A local measurement also serialises the whole model (inside its session creation), so the excess over
             local is that overhead minus the whole model's serialisation; both are reported, with each kernel's
             model size (kernels above 10 MB of weights are listed). The same kernels are then measured again with
             their weights uploaded (`overhead_weights_sent`, what `measure` and `export` send of a user's model).
             Targets: <= 20 ms for every kernel (median, p90,
             max, how many exceed), and remote / local total wall time <= 1.10 ("remote profiling of the default kernel
             space takes at most 10% longer than local"); the full default space (3000 kernels) is extrapolated from
             the N kernels. As the order alternates, half the remote requests follow another remote request at once
             (as every request of a profile does), half follow a local measurement: the median overhead of each group
             is reported too. Then one small real `deploykit profile` (`--profile-kernels`, default 60, --nets 0
             --no-fit) run as a subprocess locally, then through the agent: wall seconds of each (start-up included,
             a few seconds), the profile's own kernel seconds, and the ratio of wall times.
- bad:       raw HTTP requests (http.client) against an agent of its own started with --max-model-mb 1: no token,
             wrong token, protocol version 99, a 2 MB body, a non-ONNX body, a truncated ONNX model, a model with
             external data pointing at /etc/passwd (plain, and with fill_weights asked), weights marked for filling
             that would take 4.7 MB, an op the runtime lacks, an unknown path: expected and received
             status and code. Then a real measurement through RemoteBackend (the agent still serves), the agent's
             `refused` counts, and that `served` did not grow for the refused requests.
Writes OUT/results.json (every figure, the command line, timestamps) and prints a summary. Timing on a shared machine
is noisy: local and remote are always measured in alternation, and agreement figures are medians of rounds.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {  # name -> (zoo model, width, resolution)
    "mobilenet_v2_w0.5_96": ("mobilenet_v2", 0.5, 96),
    "mobilenet_v2_w1.0_160": ("mobilenet_v2", 1.0, 160),
    "resnet18_w0.5_96": ("resnet18", 0.5, 96),
}
AGREEMENT_TOLERANCE = 0.03
SMALL_MODEL_MB = 10.0  # kernels above carry tens of MB of weights: upload and parsing grow with size
OVERHEAD_TARGET_MS = 20.0
TOTAL_RATIO_TARGET = 1.10
DEFAULT_SPACE = 3000  # deploykit.profile.DEFAULT_KERNELS


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def start_agent(out: Path, token: Path, *args: str, log: str = "agent.log"):
    from deploykit.agent import spawn

    (out / log).unlink(missing_ok=True)
    proc, url = spawn(token, 0, *args, log_path=out / log)
    print(f"agent {' '.join(args) or '(default limits)'} at {url}, log {out / log}", flush=True)
    return proc, url


def stop_agent(proc) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout:
        proc.stdout.close()


def backends(url: str, token: Path):
    from deploykit.profilers import get_backend

    return get_backend("ort-cpu", threads=1), get_backend("remote", threads=1, url=url, token_file=str(token))


# -- agreement ----------------------------------------------------------------------------------

def agreement(out: Path, url: str, token: Path, rounds: int) -> dict:
    import torch

    from deploykit.onnx_io import input_specs, load_onnx
    from deploykit.protocol import MODEL_PROTOCOL, alternate, round_ratio
    from deploykit.zoo import build, export_onnx

    local, remote = backends(url, token)
    rows = {}
    for name, (arch, width, res) in MODELS.items():
        path = out / "models" / f"{name}.onnx"
        if not path.exists():
            torch.manual_seed(0)
            export_onnx(build(arch, num_classes=10, width=width), (1, 3, res, res), path)
        model = load_onnx(path)
        specs = input_specs(model)
        t0 = time.perf_counter()
        median, every = alternate({"local": lambda: local.measure(model, specs, MODEL_PROTOCOL),
                                   "remote": lambda: remote.measure(model, specs, MODEL_PROTOCOL)}, rounds=rounds)
        ratio = round_ratio(every, "remote", "local")
        rows[name] = {"model_bytes": path.stat().st_size, "local_ms": median["local"].latency_ms,
                      "remote_ms": median["remote"].latency_ms, "ratio_remote_over_local": ratio,
                      "within_3pct": abs(ratio - 1.0) <= AGREEMENT_TOLERANCE,
                      "rounds_local_ms": [r["local"].latency_ms for r in every],
                      "rounds_remote_ms": [r["remote"].latency_ms for r in every],
                      "noisy_rounds": sum(r[k].noisy for r in every for k in ("local", "remote")),
                      "seconds": round(time.perf_counter() - t0, 1)}
        r = rows[name]
        print(f"{name:24s} local {r['local_ms']:8.3f} ms  remote {r['remote_ms']:8.3f} ms  ratio {ratio:.4f}  "
              f"within 3%: {r['within_3pct']}  ({r['noisy_rounds']} noisy of {2 * rounds}, {r['seconds']} s)", flush=True)
    same_device = local.fingerprint() == remote.fingerprint()
    remote.close()
    return {"rounds": rounds, "tolerance": AGREEMENT_TOLERANCE, "same_fingerprint": same_device, "rows": rows,
            "all_within_3pct": all(r["within_3pct"] for r in rows.values()),
            "worst_abs_deviation": max(abs(r["ratio_remote_over_local"] - 1.0) for r in rows.values())}


# -- overhead -----------------------------------------------------------------------------------

def overhead(out: Path, url: str, token: Path, n: int, fill: bool = True) -> dict:
    from deploykit.errors import DeployKitError
    from deploykit.kernels import sample_kernels
    from deploykit.profile import kernel_inputs
    from deploykit.protocol import KERNEL_PROTOCOL

    local, remote = backends(url, token)
    remote.weights_are_arbitrary = fill  # as `deploykit profile` sets it: large random weights travel as shapes
    remote.fingerprint()  # connect once outside the timing, as a profile does before its first kernel
    kernels = sample_kernels(n, np.random.default_rng([0, 0]))  # profile_device's prior generator for --seed 0
    rows, failed = [], []
    last = "local"  # which side measured last: a remote request right after another is what a profile sends
    t_start = time.perf_counter()
    for i, kernel in enumerate(kernels):
        model, inputs = kernel.build_onnx(), kernel_inputs(kernel)
        t0 = time.perf_counter()
        size = len(model.SerializeToString())  # what a local measure also pays, inside its session creation
        row = {"key": kernel.key, "kind": kernel.kind, "after_remote": i % 2 == 1 and last == "remote",
               "model_mb": size / 1e6, "serialize_ms": (time.perf_counter() - t0) * 1000.0}

        def run_local():
            t0 = time.perf_counter()
            m = local.measure(model, inputs, KERNEL_PROTOCOL)
            row.update(local_s=time.perf_counter() - t0, local_ms=m.latency_ms)

        def run_remote():
            t0 = time.perf_counter()
            m = remote.measure(model, inputs, KERNEL_PROTOCOL)
            wall = time.perf_counter() - t0
            agent_s = remote.last_seconds
            # the agent's filling of the weights is inside its measure time, but a local measurement has no such
            # step: counted as overhead
            row.update(remote_s=wall, remote_ms=m.latency_ms, agent_measure_s=agent_s["measure"],
                       agent_queued_s=agent_s["queued"], agent_fill_ms=agent_s.get("fill", 0.0) * 1000.0,
                       overhead_ms=(wall - agent_s["measure"] + agent_s.get("fill", 0.0)) * 1000.0)

        try:
            for run in ((run_local, run_remote) if i % 2 == 0 else (run_remote, run_local)):
                run()
                last = "remote" if run is run_remote else "local"
        except DeployKitError as e:  # rejected by the runtime: a profile skips it too
            failed.append({"key": kernel.key, "error": str(e)[:200]})
            last = "local"
            continue
        rows.append(row)
        if (i + 1) % 25 == 0:
            print(f"  {i + 1}/{n} kernels, {time.perf_counter() - t_start:.0f} s", flush=True)
    remote.close()
    ov = np.array([r["overhead_ms"] for r in rows])
    # beyond what local measurement pays too: the client's serialization is in `overhead_ms`, the local side does the
    # same inside its session creation, so remote - local wall time per kernel is overhead_ms - serialize_ms
    excess = np.array([r["overhead_ms"] - r["serialize_ms"] for r in rows])
    mb = np.array([r["model_mb"] for r in rows])
    small = mb < SMALL_MODEL_MB
    local_s, remote_s = sum(r["local_s"] for r in rows), sum(r["remote_s"] for r in rows)
    back = np.array([r["after_remote"] for r in rows])
    per_kernel_ratio = np.array([r["remote_ms"] / r["local_ms"] for r in rows])
    res = {"kernels": n, "measured": len(rows), "failed": failed, "seed": 0, "weights": "filled" if fill else "sent",
           "agent_fill_ms_max": max(r["agent_fill_ms"] for r in rows),
           "overhead_ms": {"median": float(np.median(ov)), "p90": float(np.percentile(ov, 90)), "max": float(ov.max()),
                           "mean": float(ov.mean())},
           # the order alternates, so about half the remote requests follow another one at once, as in a profile
           "overhead_ms_median_after_remote": float(np.median(ov[back])) if back.any() else None,
           "overhead_ms_median_after_local": float(np.median(ov[~back])) if (~back).any() else None,
           "over_target": int((ov > OVERHEAD_TARGET_MS).sum()), "overhead_target_ms": OVERHEAD_TARGET_MS,
           "excess_over_local_ms": {"median": float(np.median(excess)), "p90": float(np.percentile(excess, 90)),
                                    "max": float(excess.max()), "over_target": int((excess > OVERHEAD_TARGET_MS).sum())},
           "model_mb": {"median": float(np.median(mb)), "max": float(mb.max())},
           f"overhead_ms_max_below_{SMALL_MODEL_MB:g}_mb": float(ov[small].max()) if small.any() else None,
           f"kernels_of_{SMALL_MODEL_MB:g}_mb_or_more": [{"kind": r["kind"], "model_mb": round(r["model_mb"], 1),
                                                          "overhead_ms": round(r["overhead_ms"], 1),
                                                          "excess_over_local_ms": round(r["overhead_ms"] - r["serialize_ms"], 1)}
                                                         for r in rows if r["model_mb"] >= SMALL_MODEL_MB],
           "agent_queued_ms_max": 1000.0 * max(r["agent_queued_s"] for r in rows),
           "local_total_s": local_s, "remote_total_s": remote_s,
           "agent_measure_total_s": sum(r["agent_measure_s"] for r in rows),
           "ratio_remote_over_local_total": remote_s / local_s,
           "within_total_target": remote_s / local_s <= TOTAL_RATIO_TARGET, "total_ratio_target": TOTAL_RATIO_TARGET,
           "extrapolated_default_space": {"kernels": DEFAULT_SPACE, "local_s": local_s / len(rows) * DEFAULT_SPACE,
                                          "remote_s": remote_s / len(rows) * DEFAULT_SPACE},
           "kernel_latency_ratio_median": float(np.median(per_kernel_ratio)),
           "rows": rows}
    o = res["overhead_ms"]
    print(f"weights {res['weights']}: overhead per kernel: median {o['median']:.2f} ms, p90 {o['p90']:.2f}, max {o['max']:.2f} "
          f"({res['over_target']} of {len(rows)} above {OVERHEAD_TARGET_MS:g} ms; median right after a remote request "
          f"{res['overhead_ms_median_after_remote']:.2f}, after a local one {res['overhead_ms_median_after_local']:.2f}); "
          f"beyond local (the client's serialization, which local measurement pays too, subtracted): median "
          f"{res['excess_over_local_ms']['median']:.2f} ms, max {res['excess_over_local_ms']['max']:.2f} "
          f"({res['excess_over_local_ms']['over_target']} above {OVERHEAD_TARGET_MS:g} ms); models: median "
          f"{res['model_mb']['median']:.2f} MB, max {res['model_mb']['max']:.1f} MB; max overhead below "
          f"{SMALL_MODEL_MB:g} MB {res[f'overhead_ms_max_below_{SMALL_MODEL_MB:g}_mb']:.2f} ms; "
          f"{SMALL_MODEL_MB:g} MB or more: {res[f'kernels_of_{SMALL_MODEL_MB:g}_mb_or_more']}; "
          f"total local {local_s:.1f} s, "
          f"remote {remote_s:.1f} s, ratio {res['ratio_remote_over_local_total']:.3f}", flush=True)
    return res


def profile_both(out: Path, url: str, token: Path, k: int) -> dict:
    tables = out / "tables"
    shutil.rmtree(tables, ignore_errors=True)
    base = [sys.executable, "-m", "deploykit", "profile", "--kernels", str(k), "--nets", "0", "--no-fit", "--no-progress",
            "--out-dir", str(tables)]
    runs = {"local": ["--name", "bench-local"],
            "remote": ["--name", "bench-remote", "--backend", "remote", "--url", url, "--token-file", str(token)]}
    res = {"kernels": k}
    for side, extra in runs.items():
        t0 = time.perf_counter()
        p = subprocess.run(base + extra, capture_output=True, text=True, cwd=ROOT)
        lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip()]
        done = [ln for ln in lines if "measured now in" in ln]
        found = re.search(r"measured now in (\d+) s", done[-1]) if done else None
        res[side] = {"exit": p.returncode, "wall_s": time.perf_counter() - t0, "last_line": lines[-1] if lines else "",
                     "kernels_s": int(found.group(1)) if found else None}  # the profile's own count, whole seconds
        print(f"profile {side}: exit {p.returncode}, {res[side]['wall_s']:.1f} s: {res[side]['last_line']}", flush=True)
    res["ratio_remote_over_local"] = res["remote"]["wall_s"] / res["local"]["wall_s"]  # includes ~4 s of start-up
    return res


# -- bad requests -------------------------------------------------------------------------------

def _conv_model():
    """A small valid model (18 KB): Conv 16->32 3x3 + Relu on 1x16x32x32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((32, 16, 3, 3)).astype(np.float32), "W")
    g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
                           helper.make_node("Relu", ["c"], ["y"])], "conv",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 32, 32])], initializer=[w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _external_data_model(location: str = "/etc/passwd", dims: tuple[int, ...] | None = None):
    from onnx import TensorProto

    model = _conv_model()
    w = model.graph.initializer[0]
    w.ClearField("raw_data")
    if dims is not None:
        del w.dims[:]
        w.dims.extend(dims)
    w.data_location = TensorProto.EXTERNAL
    entry = w.external_data.add()
    entry.key, entry.value = "location", location
    return model


def _unknown_op_model():
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.example")], "unknown_op",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 32, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 32, 32])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
                             ir_version=8)


def raw_request(url: str, method: str, path: str, body: bytes | None, headers: dict) -> dict:
    """One request on a fresh connection; the status and code of the reply, or what broke instead."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    send_error = None
    try:
        try:
            conn.request(method, path, body=body, headers=headers)
        except OSError as e:  # the agent may refuse and close before the whole body is sent
            send_error = type(e).__name__
        try:
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            return {"status": None, "code": None, "error": f"no reply: {type(e).__name__}", "send_error": send_error}
        try:
            doc = json.loads(data)
        except ValueError:
            doc = {}
        return {"status": resp.status, "code": doc.get("code"), "error": doc.get("error"), "send_error": send_error,
                "protocol_header": resp.getheader("X-Deploykit-Protocol")}
    finally:
        conn.close()


def bad(out: Path, token: Path) -> dict:
    from deploykit.agent import read_token
    from deploykit.profilers import get_backend
    from deploykit.protocol import KERNEL_PROTOCOL
    from deploykit.wire import PROTOCOL_HEADER, PROTOCOL_VERSION, REQUEST_HEADER

    good = _conv_model()
    good_bytes = good.SerializeToString()
    req = {"backend": "ort-cpu", "threads": 1, "precision": None, "protocol": asdict(KERNEL_PROTOCOL),
           "inputs": [{"name": "x", "shape": [1, 16, 32, 32], "dtype": "float32"}]}
    auth = {"Authorization": f"Bearer {read_token(token).decode()}", PROTOCOL_HEADER: str(PROTOCOL_VERSION)}
    measure = {**auth, REQUEST_HEADER: json.dumps(req), "Content-Type": "application/octet-stream"}
    no_token = {k: v for k, v in measure.items() if k != "Authorization"}
    fill = {**measure, REQUEST_HEADER: json.dumps({**req, "fill_weights": True})}
    from deploykit.wire import FILL_LOCATION
    cases = {  # name -> (method, path, body, headers, expected statuses, expected codes)
        "no token": ("POST", "/v1/measure", good_bytes, no_token, (401,), ("unauthorized",)),
        "wrong token": ("POST", "/v1/measure", good_bytes, {**measure, "Authorization": "Bearer " + "x" * 43}, (401,),
                        ("unauthorized",)),
        "protocol version 99": ("POST", "/v1/measure", good_bytes, {**measure, PROTOCOL_HEADER: "99"}, (400,),
                                ("protocol_version",)),
        "2 MB body, limit 1 MB": ("POST", "/v1/measure", b"\0" * (2 << 20), measure, (413,), ("too_large",)),
        "non-ONNX body": ("POST", "/v1/measure", b"not a model" * 100, measure, (415,), ("not_onnx",)),
        "truncated ONNX": ("POST", "/v1/measure", good_bytes[:len(good_bytes) // 2], measure, (415, 422),
                           ("not_onnx", "runtime_rejected")),
        "external data -> /etc/passwd": ("POST", "/v1/measure", _external_data_model().SerializeToString(), measure,
                                         (415,), ("not_onnx",)),
        "fill_weights + path": ("POST", "/v1/measure", _external_data_model().SerializeToString(), fill,
                                (415,), ("not_onnx",)),
        "fill_weights, 4.7 MB to fill": ("POST", "/v1/measure",
                                         _external_data_model(FILL_LOCATION, (512, 256, 3, 3)).SerializeToString(), fill,
                                         (413,), ("too_large",)),
        "op the runtime lacks": ("POST", "/v1/measure", _unknown_op_model().SerializeToString(), measure, (422,),
                                 ("runtime_rejected",)),
        "unknown path": ("GET", "/v1/nothing", None, auth, (404,), ("not_found",)),
    }
    proc = None
    try:
        proc, url = start_agent(out, token, "--max-model-mb", "1", log="agent_bad.log")
        client = get_backend("remote", threads=1, url=url, token_file=str(token))
        before = client.info()
        rows = {}
        for name, (method, path, body, headers, statuses, codes) in cases.items():
            got = raw_request(url, method, path, body, headers)
            rows[name] = {"expected": list(statuses), "expected_code": list(codes), **got,
                          "ok": got["status"] in statuses and got["code"] in codes}
        after = client.info()
        t0 = time.perf_counter()
        try:
            m = client.measure(good, [_spec(s) for s in req["inputs"]], KERNEL_PROTOCOL)
            still = {"ok": True, "latency_ms": m.latency_ms, "seconds": time.perf_counter() - t0}
        except Exception as e:  # noqa: BLE001  (reported, not raised: the point is whether it works)
            still = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        final = client.info()
        client.close()
    finally:
        stop_agent(proc)
    print(f"{'case':30s} {'expected':>9s} {'got':>5s} {'code':18s} ok", flush=True)
    for name, r in rows.items():
        extra = f"  (send: {r['send_error']})" if r.get("send_error") else ""
        extra += f"  {r['error']}" if r["status"] is None else ""
        print(f"{name:30s} {'/'.join(map(str, r['expected'])):>9s} {str(r['status']):>5s} {str(r['code']):18s} "
              f"{r['ok']}{extra}", flush=True)
    refused_delta = {c: after["refused"].get(c, 0) - before["refused"].get(c, 0)
                     for c in sorted(set(after["refused"]) | set(before["refused"]))}
    # `served` counts a request when it is answered: the first info() call itself is the only one served in between.
    served_by_refused = after["served"] - before["served"] - 1
    print(f"refused during the cases: {refused_delta}; served grew by {served_by_refused} for them; "
          f"measure afterwards: {still}", flush=True)
    return {"rows": rows, "all_ok": all(r["ok"] for r in rows.values()), "refused_before": before["refused"],
            "refused_after": after["refused"], "refused_delta": refused_delta, "served_before": before["served"],
            "served_after": after["served"], "served_final": final["served"], "served_by_refused": served_by_refused,
            "still_serves": still, "truncated_onnx_status": rows["truncated ONNX"]["status"]}


def _spec(s: dict):
    from deploykit.onnx_io import InputSpec

    return InputSpec(s["name"], tuple(s["shape"]), np.dtype(s["dtype"]).type)


# -- main ---------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="agreement,overhead,bad")
    ap.add_argument("--kernels", type=int, default=150, help="kernels of the overhead part (default 150)")
    ap.add_argument("--profile-kernels", type=int, default=60, help="kernels of the real `deploykit profile` runs "
                                                                     "(default 60; 0: skip them)")
    ap.add_argument("--rounds", type=int, default=5, help="alternation rounds of the agreement part (default 5)")
    ap.add_argument("--out", type=Path, default=ROOT / "tools" / "out" / "agent")
    args = ap.parse_args()
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - {"agreement", "overhead", "bad"}
    if unknown:
        ap.error(f"unknown part(s) {sorted(unknown)}: choose from agreement, overhead, bad")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["run"] = {"command": [sys.executable, *sys.argv], "started_utc": utc_now()}
    t0 = time.time()

    def save(key, value):  # after every part, atomically: a long run stopped midway keeps what it measured
        results[key] = {**value, "finished_utc": utc_now()} if isinstance(value, dict) else value
        results["run"]["seconds"] = round(time.time() - t0, 1)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=1, default=float))
        os.replace(tmp, path)

    from deploykit.agent import new_token_file

    token = out / "token"
    token.unlink(missing_ok=True)
    new_token_file(token)
    proc = None
    try:
        if parts & {"agreement", "overhead"}:
            proc, url = start_agent(out, token)
            if "agreement" in parts:
                save("agreement", agreement(out, url, token, args.rounds))
            if "overhead" in parts:
                res = overhead(out, url, token, args.kernels)
                if args.profile_kernels > 0:
                    res["profile"] = profile_both(out, url, token, args.profile_kernels)
                save("overhead", res)
                # the same kernels with their weights uploaded (what `measure` and `export` send of a user's model)
                save("overhead_weights_sent", overhead(out, url, token, args.kernels, fill=False))
    finally:
        stop_agent(proc)
    if "bad" in parts:
        save("bad", bad(out, token))
    save("run", {**results["run"], "finished_utc": utc_now()})

    print("\nsummary")
    if "agreement" in results:
        a = results["agreement"]
        print(f"agreement: {sum(r['within_3pct'] for r in a['rows'].values())}/{len(a['rows'])} models within +-3% "
              f"(worst {a['worst_abs_deviation']:.1%}); " + ", ".join(f"{n} {r['ratio_remote_over_local']:.3f}"
                                                                        for n, r in a["rows"].items()))
    for key in ("overhead", "overhead_weights_sent"):
        if key not in results:
            continue
        o = results[key]
        ov = o["overhead_ms"]
        print(f"{key} (weights {o.get('weights', 'sent')}): {o['measured']} kernels, per kernel median "
              f"{ov['median']:.2f} ms, p90 {ov['p90']:.2f}, max "
              f"{ov['max']:.2f} ({o['over_target']} above {o['overhead_target_ms']:g} ms); remote/local total "
              f"{o['ratio_remote_over_local_total']:.3f} (target <= {o['total_ratio_target']:.2f}); 3000 kernels: "
              f"local {o['extrapolated_default_space']['local_s'] / 60:.1f} min, remote "
              f"{o['extrapolated_default_space']['remote_s'] / 60:.1f} min")
        if "profile" in o:
            p = o["profile"]
            print(f"profile --kernels {p['kernels']}: local {p['local']['wall_s']:.1f} s (exit {p['local']['exit']}, "
                  f"kernels {p['local']['kernels_s']} s), remote {p['remote']['wall_s']:.1f} s (exit "
                  f"{p['remote']['exit']}, kernels {p['remote']['kernels_s']} s), ratio of wall times "
                  f"{p['ratio_remote_over_local']:.3f}")
    if "bad" in results:
        b = results["bad"]
        print(f"bad: {sum(r['ok'] for r in b['rows'].values())}/{len(b['rows'])} cases as expected, truncated ONNX -> "
              f"{b['truncated_onnx_status']}; served grew by {b['served_by_refused']} for refused requests; still "
              f"serves: {b['still_serves']['ok']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
