"""The measurement agent: `deploykit agent serve` on the device, measuring ONNX models its clients send.

Needs only the measuring part of deploykit (onnx, onnxruntime, numpy: `pip install deploykit[agent]`, no torch).
The wire protocol is in `deploykit.wire`. What keeps the device safe:

- every request is authenticated with a shared token (compared in constant time) before its body is read;
- only ONNX bytes are accepted, with a size limit, and a model that refers to files (external data) is refused:
  nothing from the client names a path, a pickle or code on the device (weights marked for the agent to fill are
  filled from memory, and count against the size limit);
- one measurement at a time, in arrival order (a queue of bounded length), so two never share the device's cores;
- reading a request is bounded by --read-timeout-s, a measurement by --max-measure-s, and a measurement whose client
  has gone away stops at its next run instead of holding the device.
"""
from __future__ import annotations

import hmac
import json
import math
import os
import secrets
import select
import socket
import stat
import sys
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from . import __version__
from .errors import DeployKitError
from .wire import (
    DTYPES,
    MAX_INPUT_ELEMENTS,
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    REQUEST_HEADER,
    STATUS,
    fill_arrays,
    fill_bytes,
    fill_specs,
    layers_to_wire,
    materialize,
    measurement_from_wire,
    measurement_to_wire,
    protocol_from_wire,
)

MIN_TOKEN_CHARS = 16
DEFAULT_MAX_MODEL_MB = 256.0
DEFAULT_MAX_MEASURE_S = 300.0
DEFAULT_READ_TIMEOUT_S = 30.0
DEFAULT_MAX_QUEUE = 16
_GONE_CHECK_S = 0.05  # how often a running measurement looks whether its client is still there


class Refused(Exception):
    """A request the agent will not serve: `code` picks the HTTP status (wire.STATUS)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class _Gone(Exception):
    """The client closed its connection: the measurement is dropped."""


# -- tokens ------------------------------------------------------------------------------------

def new_token_file(path: str | os.PathLike) -> Path:
    """A fresh random token in `path`, readable by its owner only; refuses to overwrite."""
    path = Path(path)
    if path.exists():
        raise DeployKitError(f"{path} already exists: use it as it is, or delete it to make a new token")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    return path


def read_token(path: str | os.PathLike | None) -> bytes:
    if not path:
        raise DeployKitError("a token file is required (--token-file F): create one with `deploykit agent token --out F` "
                             "and copy it to both machines")
    path = Path(path)
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise DeployKitError(f"token file {path} not found: create it with `deploykit agent token --out {path}`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DeployKitError(f"token file {path} is unreadable ({e}): recreate it with `deploykit agent token`") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise DeployKitError(f"token file {path} holds no usable token (at least {MIN_TOKEN_CHARS} characters, one line): "
                             "recreate it with `deploykit agent token`")
    return token.encode("ascii")


# -- checking what a client sends -------------------------------------------------------------

def _tensors(graph, initializers: bool = True):
    """Every TensorProto of a graph (but its initializers when told so), its node attributes and subgraphs."""
    if initializers:
        yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    for node in graph.node:
        yield from _attr_tensors(node.attribute)


def _attr_tensors(attributes):
    for a in attributes:
        if a.HasField("t"):
            yield a.t
        yield from a.tensors
        if a.HasField("g"):
            yield from _tensors(a.g)
        for g in a.graphs:
            yield from _tensors(g)


def parse_onnx(body: bytes, fill_weights: bool = False):
    """(the ModelProto in `body`, the initializers the agent is to fill), or Refused("not_onnx"). A model with
    external data would make the runtime open a path the client chose: refused too, but for the initializers
    marked for filling (wire.strip_weights) when the request asked for `fill_weights`."""
    import onnx
    from google.protobuf.message import DecodeError

    model = onnx.ModelProto()
    try:
        model.ParseFromString(body)
    except (DecodeError, ValueError, RuntimeError):
        raise Refused("not_onnx", "the body is not an ONNX model (it does not parse as one): send the .onnx file's "
                                  "bytes") from None
    if model.ir_version < 3 or not model.opset_import or not model.HasField("graph") or not model.graph.node:
        raise Refused("not_onnx", "the body is not an ONNX model (no graph, IR version or opset): send the .onnx "
                                  "file's bytes")
    specs = []
    if fill_weights:  # every external top-level initializer must be one the agent fills
        try:
            specs = fill_specs(model)
        except ValueError as e:
            raise Refused("not_onnx", f"{e}: the agent fills only what wire.strip_weights marks") from None
    tensors = list(_tensors(model.graph, initializers=not fill_weights))
    for fn in model.functions:
        for node in fn.node:
            tensors.extend(_attr_tensors(node.attribute))
    if any(t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) for t in tensors):
        raise Refused("not_onnx", "the model keeps tensors in external files: the agent loads nothing from its disk; "
                      "save the model with its weights inside (onnx.save(model, f, save_as_external_data=False))")
    return model, specs


def parse_request(header: str | None) -> dict:
    if not header:
        raise Refused("bad_request", f"missing {REQUEST_HEADER} header")
    try:
        req = json.loads(header)
    except ValueError:
        raise Refused("bad_request", f"{REQUEST_HEADER} is not JSON") from None
    if not isinstance(req, dict):
        raise Refused("bad_request", f"{REQUEST_HEADER} must be a JSON object")
    inputs = req.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise Refused("bad_request", "inputs must be a non-empty list of {name, shape, dtype}")
    for spec in inputs:
        ok = (isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec.get("dtype") in DTYPES
              and isinstance(spec.get("shape"), list)
              and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d for d in spec["shape"]))
        if not ok:
            raise Refused("bad_request", f"bad input {spec!r}: need name, shape (ints >= 0), dtype in {', '.join(DTYPES)}")
        n = math.prod(spec["shape"])
        if n > MAX_INPUT_ELEMENTS:
            raise Refused("bad_request", f"input {spec['name']} has {n} elements, above the agent's {MAX_INPUT_ELEMENTS}")
    if not isinstance(req.get("fill_weights", False), bool):
        raise Refused("bad_request", "fill_weights must be true or false")
    try:
        req["protocol_obj"] = protocol_from_wire(req.get("protocol") or {})
    except (ValueError, TypeError) as e:
        raise Refused("bad_request", str(e)) from None
    return req


def _client_gone(sock) -> bool:
    """True once the peer has closed its end (a readable socket with nothing to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


# -- the agent --------------------------------------------------------------------------------

def _probe_backends() -> dict:
    """Each backend's name -> "ok", or why it cannot run on this device."""
    from .profilers import backend_class, list_backends

    available = {}
    for name in list_backends():
        try:
            backend_class(name).check_available()
            available[name] = "ok"
        except DeployKitError as e:
            available[name] = str(e)
    return available


class Agent:
    def __init__(self, token: bytes, *, max_model_bytes: int, max_measure_s: float, read_timeout_s: float,
                 max_queue: int = DEFAULT_MAX_QUEUE, log=None):
        self.token = token
        self.max_model_bytes = max_model_bytes
        self.max_measure_s = max_measure_s
        self.read_timeout_s = read_timeout_s
        self.max_queue = max_queue
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.queue = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deploykit-measure")  # one at a time, FIFO
        self.lock = threading.Lock()
        self.waiting = 0
        self.served = 0
        self.refused: Counter = Counter()
        self._backends: dict = {}
        self.available = _probe_backends()  # once: probing imports torch where it is installed

    def info(self) -> dict:
        return {"protocol": PROTOCOL_VERSION, "deploykit_version": __version__, "backends": self.available,
                "limits": {"max_model_bytes": self.max_model_bytes, "max_measure_s": self.max_measure_s,
                           "read_timeout_s": self.read_timeout_s, "max_queue": self.max_queue},
                "queued": self.waiting, "served": self.served, "refused": dict(self.refused)}

    def backend(self, req: dict):
        """The backend a request names, made once per (name, threads, precision) and reused."""
        from .profilers import backend_class, get_backend

        name = req.get("backend", "ort-cpu")
        if name == "remote" or not isinstance(name, str):
            raise Refused("bad_request", f"backend {name!r} cannot run on an agent")
        threads, precision = req.get("threads", 1), req.get("precision")
        if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= (os.cpu_count() or 1) * 4:
            raise Refused("bad_request", f"threads must be an integer from 1 to {(os.cpu_count() or 1) * 4}")
        key = (name, threads, precision)
        if key not in self._backends:
            try:
                backend_class(name)
            except DeployKitError as e:
                raise Refused("bad_request", str(e)) from None
            try:
                self._backends[key] = get_backend(name, threads=threads, precision=precision)
            except DeployKitError as e:
                raise Refused("backend_unavailable", f"on the agent: {e}") from None
        return self._backends[key]

    def run_job(self, fn, sock):
        """Run fn() on the measuring thread, after every job before it; raise its exception here."""
        with self.lock:
            if self.waiting >= self.max_queue:
                raise Refused("busy", f"the agent's queue is full ({self.max_queue} waiting): retry later")
            self.waiting += 1
        queued_at = time.monotonic()

        def job():
            with self.lock:
                self.waiting -= 1
            if _client_gone(sock):
                raise _Gone()
            started = time.monotonic()
            return fn(), started - queued_at, time.monotonic() - started

        return self.queue.submit(job).result()

    def measure(self, model, fill: list, body: bytes, req: dict, sock) -> dict:
        """`model` is `body` parsed and `fill` the initializers to fill (both from parse_onnx)."""
        from .onnx_io import InputSpec

        import numpy as np

        if fill and len(body) + fill_bytes(fill) > self.max_model_bytes:
            raise Refused("too_large", f"the model with its filled weights is {len(body) + fill_bytes(fill)} bytes, "
                                       f"above the agent's limit of {self.max_model_bytes} bytes (start it with a "
                                       "larger --max-model-mb)")

        inputs = [InputSpec(s["name"], tuple(s["shape"]), np.dtype(s["dtype"]).type) for s in req["inputs"]]
        protocol = req["protocol_obj"]
        backend = self.backend(req)
        deadline = time.monotonic() + self.max_measure_s
        last_check = [0.0]

        def between_runs() -> None:
            now = time.monotonic()
            if now > deadline:
                raise Refused("time_limit", f"the measurement ran past the agent's --max-measure-s {self.max_measure_s:g}: "
                                            "ask for fewer rounds, or start the agent with a larger limit")
            if now - last_check[0] >= _GONE_CHECK_S:
                last_check[0] = now
                if _client_gone(sock):
                    raise _Gone()

        def work() -> dict:
            backend.between_runs = between_runs
            sent = body if backend.measures_bytes else model  # 40 ms less for a 40 MB model than re-serializing
            if fill:  # made here, so that only the running measurement holds them
                t0 = time.monotonic()
                if backend.takes_initializers:
                    backend.initializers = fill_arrays(fill)
                else:
                    materialize(model, fill_arrays(fill))
                    sent = model
                fill_s[0] = time.monotonic() - t0
            try:
                if req.get("per_layer"):
                    e2e = measurement_from_wire(req["end_to_end"]) if req.get("end_to_end") else None
                    prof = backend.measure_layers(model, inputs, end_to_end=e2e)
                    return {"measurement": None, "layers": layers_to_wire(prof)}
                return {"measurement": measurement_to_wire(backend.measure(sent, inputs, protocol)), "layers": None}
            except (Refused, _Gone):
                raise
            except NotImplementedError:
                raise Refused("bad_request", f"backend {backend.name} has no per-layer profiler") from None
            except Exception as e:  # the runtime's own error types: the model's fault, reported to the client
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise Refused("runtime_rejected", f"the device's runtime cannot run the model: {first}") from None
            finally:
                backend.between_runs = None
                backend.initializers = None

        fill_s = [0.0]
        result, queued_s, measure_s = self.run_job(work, sock)
        return {**result, "fingerprint": backend.fingerprint(),
                "seconds": {"queued": queued_s, "measure": measure_s, "fill": fill_s[0]}}


def _handler_class(agent: Agent):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: a profile sends thousands of requests over one connection
        server_version = f"deploykit-agent/{__version__}"
        timeout = agent.read_timeout_s  # reading a request line, headers or body
        # headers and body go out as two writes: with Nagle on, the body would wait ~40 ms for the client's delayed
        # ACK of the headers on every back-to-back request of a profile
        disable_nagle_algorithm = True

        def log_message(self, format, *args):  # noqa: A002  (the stdlib's name)
            pass  # one line per request is written by _finish instead

        def do_GET(self):
            self._serve()

        def do_POST(self):
            self._serve()

        def do_PUT(self):
            self._serve()

        def do_DELETE(self):
            self._serve()

        def _serve(self):
            t0 = time.monotonic()
            try:
                status, body = 200, self._route()
                agent.served += 1
            except Refused as r:
                status, body = STATUS[r.code], {"error": str(r), "code": r.code}
                agent.refused[r.code] += 1
                self.close_connection = True  # the body may be unread: never parse it as the next request
            except _Gone:
                agent.log(f"deploykit agent: {self.client_address[0]} went away: its measurement was dropped")
                self.close_connection = True
                return
            except Exception:  # an agent bug: say so, keep serving
                agent.log(traceback.format_exc())
                status, body = 500, {"error": "internal error in the agent (see its log)", "code": "internal"}
                self.close_connection = True
            self._reply(status, body)
            if body.get("code") == "too_large":
                self._drain()
            agent.log(f"deploykit agent: {self.command} {self.path} {status} {body.get('code', 'ok')} "
                      f"{time.monotonic() - t0:.3f}s")

        def _reply(self, status: int, body: dict) -> None:
            data = json.dumps({"protocol": PROTOCOL_VERSION, **body}).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header(PROTOCOL_HEADER, str(PROTOCOL_VERSION))
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Bearer realm="deploykit-agent"')
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError, socket.timeout):
                self.close_connection = True

        def _route(self) -> dict:
            given = self.headers.get("Authorization", "")
            token = given[len("Bearer "):].encode("utf-8", "replace") if given.startswith("Bearer ") else b""
            if not hmac.compare_digest(token, agent.token):
                raise Refused("unauthorized", "missing or wrong token: use the agent's token file (--token-file)")
            version = self.headers.get(PROTOCOL_HEADER)
            if version != str(PROTOCOL_VERSION):
                raise Refused("protocol_version", f"this agent speaks deploykit protocol {PROTOCOL_VERSION} "
                              f"(deploykit {__version__}), the request {version or 'none'}: install the same deploykit "
                              "version on both machines")
            path = self.path.split("?", 1)[0]
            if (self.command, path) == ("GET", "/v1/info"):
                return agent.info()
            if (self.command, path) == ("POST", "/v1/fingerprint"):
                req = self._json_body(64 * 1024)
                return {"fingerprint": agent.backend(req).fingerprint()}
            if (self.command, path) == ("POST", "/v1/measure"):
                req = parse_request(self.headers.get(REQUEST_HEADER))
                body = self._body(agent.max_model_bytes)
                model, fill = parse_onnx(body, fill_weights=req.get("fill_weights", False))
                return agent.measure(model, fill, body, req, self.connection)
            raise Refused("not_found", f"no {self.command} {path}: the agent serves GET /v1/info, POST /v1/fingerprint, "
                                       "POST /v1/measure")

        def _drain(self, max_s: float = 5.0) -> None:
            """Read and drop an unwanted body for a few seconds after refusing it, so that the client, still
            sending, gets to read the refusal instead of a broken connection."""
            left = int(self.headers.get("Content-Length") or 0)
            give_up = time.monotonic() + max_s
            try:
                self.connection.settimeout(1.0)
                while left > 0 and time.monotonic() < give_up:
                    chunk = self.rfile.read1(min(left, 1 << 20))
                    if not chunk:
                        break
                    left -= len(chunk)
            except OSError:
                pass

        def _body(self, limit: int) -> bytes:
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise Refused("length_required", "send the body with a Content-Length")
            n = int(length)
            if n > limit:
                raise Refused("too_large", f"{n} bytes is above the agent's limit of {limit} bytes "
                                           "(start it with a larger --max-model-mb)")
            try:
                body = self.rfile.read(n)
            except socket.timeout:
                raise Refused("read_timeout", f"the body did not arrive within {agent.read_timeout_s:g} s") from None
            if len(body) != n:
                raise _Gone()
            return body

        def _json_body(self, limit: int) -> dict:
            try:
                req = json.loads(self._body(limit) or b"{}")
            except ValueError:
                raise Refused("bad_request", "the body is not JSON") from None
            if not isinstance(req, dict):
                raise Refused("bad_request", "the body must be a JSON object")
            return req

    return Handler


class AgentServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def make_server(host: str, port: int, token: bytes, *, max_model_mb: float = DEFAULT_MAX_MODEL_MB,
                max_measure_s: float = DEFAULT_MAX_MEASURE_S, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
                max_queue: int = DEFAULT_MAX_QUEUE, log=None) -> tuple[AgentServer, Agent]:
    for name, v in (("--max-model-mb", max_model_mb), ("--max-measure-s", max_measure_s),
                    ("--read-timeout-s", read_timeout_s), ("--max-queue", max_queue)):
        if not v > 0:
            raise DeployKitError(f"{name} must be > 0, got {v}")
    agent = Agent(token, max_model_bytes=int(max_model_mb * 1024 * 1024), max_measure_s=max_measure_s,
                  read_timeout_s=read_timeout_s, max_queue=int(max_queue), log=log)
    try:
        server = AgentServer((host, port), _handler_class(agent))
    except OSError as e:
        raise DeployKitError(f"cannot listen on {host}:{port} ({e.strerror or e}): choose another --port or --host") from None
    return server, agent


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def serve(host: str, port: int, token_file, **limits) -> int:
    token = read_token(token_file)
    mode = Path(token_file).stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        print(f"deploykit agent: warning: {token_file} is readable by other users: chmod 600 {token_file}",
              file=sys.stderr, flush=True)
    server, agent = make_server(host, port, token, **limits)
    bound_host, bound_port = server.server_address[:2]
    ok = [name for name, why in agent.available.items() if why == "ok" and name != "remote"]
    where = ("localhost only: pass --host 0.0.0.0 to accept other machines" if _loopback(host) else
             "reachable from the network over plain HTTP: use it on a trusted network or through an SSH tunnel")
    print(f"deploykit agent {__version__}: serving on http://{bound_host}:{bound_port} ({where}); protocol "
          f"{PROTOCOL_VERSION}; backends {', '.join(ok)}; one measurement at a time", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("deploykit agent: stopped", file=sys.stderr, flush=True)
    finally:
        server.server_close()
        agent.queue.shutdown(wait=False, cancel_futures=True)
    return 0


def spawn(token_file, port: int = 0, *args: str, log_path=None, python: str | None = None, env: dict | None = None,
          startup_s: float = 60.0):
    """Start `deploykit agent serve` as a child process on loopback; returns (process, url) once it listens.

    For tests, benchmarks and scripts driving an agent on this machine; its log (stderr) goes to `log_path`
    (appended), else nowhere."""
    import re
    import subprocess

    cmd = [python or sys.executable, "-m", "deploykit", "agent", "serve", "--port", str(port), "--token-file",
           str(token_file), *args]
    log = open(log_path, "a", encoding="utf-8") if log_path else subprocess.DEVNULL  # noqa: SIM115 (the child owns it)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"})
    if log_path:
        log.close()  # the child holds its own descriptor
    give_up = time.monotonic() + startup_s
    while time.monotonic() < give_up:
        readable, _, _ = select.select([proc.stdout], [], [], 0.2)
        if readable:
            line = proc.stdout.readline()
            found = re.search(r"serving on (http://\S+?:\d+)", line)
            if found:
                return proc, found.group(1)
        if proc.poll() is not None:
            why = Path(log_path).read_text(encoding="utf-8").strip()[-500:] if log_path else f"exit {proc.returncode}"
            raise DeployKitError(f"the agent exited at start: {why}")
    proc.kill()
    raise DeployKitError(f"the agent did not start within {startup_s:g} s")
