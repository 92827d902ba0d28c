"""A device measured over the network: `--backend remote --url http://HOST:PORT --token-file F`.

The device runs `deploykit agent serve`; this client sends it ONNX models under the wire protocol of
`deploykit.wire` and gets the same Measurement and LayerProfile a local backend returns. The fingerprint is the
agent's backend's own (the device's CPU, runtime and threads), so a table profiled remotely is the device's table.
"""
from __future__ import annotations

import http.client
import json
import socket
import time
from urllib.parse import urlsplit

import numpy as np
import onnx

from deploykit.errors import DeployKitError, TransportError
from deploykit.fingerprint import mismatches
from deploykit.onnx_io import InputSpec
from deploykit.protocol import MODEL_PROTOCOL, Measurement, Protocol
from deploykit.wire import (
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    REQUEST_HEADER,
    layers_from_wire,
    measurement_from_wire,
    measurement_to_wire,
    strip_weights,
)

from . import register_backend
from .base import Backend, LayerProfile

DEFAULT_TIMEOUT_S = 900.0  # queue wait + the agent's own --max-measure-s
DEFAULT_RETRY_S = 10.0  # how long a dropped or refused connection is retried (an agent restarting, Wi-Fi dropping)
_ASK_LIMIT_ABOVE = 1 << 20  # bytes
_MODEL_FAULTS = ("runtime_rejected", "time_limit")  # the model's fault: a profile counts it and goes on


@register_backend("remote")
class RemoteBackend(Backend):
    precisions = ("fp32", "fp16", "int8")  # the agent's backend decides what it supports

    def __init__(self, threads: int | None = None, precision: str | None = None, *, url: str | None = None,
                 token_file: str | None = None, device_backend: str = "ort-cpu", timeout_s: float = DEFAULT_TIMEOUT_S,
                 retry_s: float = DEFAULT_RETRY_S):
        from deploykit.agent import read_token

        super().__init__(threads, precision)
        if not url:
            raise DeployKitError("--backend remote needs --url http://HOST:PORT of a `deploykit agent serve` and "
                                 "--token-file with its token")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DeployKitError(f"--url {url!r} is not http://HOST:PORT: give the address the agent printed at start")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._token = read_token(token_file).decode("ascii")
        self.device_backend = device_backend
        self.timeout_s, self.retry_s = timeout_s, retry_s
        self._conn: http.client.HTTPConnection | None = None
        self._fingerprint: dict | None = None
        self._max_model_bytes: int | None = None
        self.last_seconds: dict = {}  # the agent's queue and measure time of the latest request

    @property
    def _config(self) -> dict:
        return {"backend": self.device_backend, "threads": self.threads, "precision": self.precision}

    # -- the three Backend methods ----------------------------------------------------------

    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = self._request("POST", "/v1/fingerprint", json.dumps(self._config).encode(),
                                              {"Content-Type": "application/json"})["fingerprint"]
        return dict(self._fingerprint)

    def measure(self, model: onnx.ModelProto, inputs: list[InputSpec], protocol: Protocol = MODEL_PROTOCOL) -> Measurement:
        from dataclasses import asdict

        reply = self._measure_request(model, inputs, {"protocol": asdict(protocol)})
        return measurement_from_wire(reply["measurement"])

    def measure_layers(self, model: onnx.ModelProto, inputs: list[InputSpec],
                       end_to_end: Measurement | None = None) -> LayerProfile:
        extra = {"per_layer": True, "end_to_end": measurement_to_wire(end_to_end) if end_to_end is not None else None}
        return layers_from_wire(self._measure_request(model, inputs, extra)["layers"])

    def info(self) -> dict:
        return self._request("GET", "/v1/info")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- the wire ---------------------------------------------------------------------------

    def _measure_request(self, model: onnx.ModelProto, inputs: list[InputSpec], extra: dict) -> dict:
        req = {**self._config, "inputs": [{"name": s.name, "shape": [int(d) for d in s.shape],
                                           "dtype": np.dtype(s.dtype).name} for s in inputs], **extra}
        filled = 0
        if self.weights_are_arbitrary:  # large random weights travel as shapes; the agent fills them
            model, filled = strip_weights(model)
            if filled:
                req["fill_weights"] = True
        body = model.SerializeToString()
        size = len(body) + filled  # what the agent holds either way
        if size > _ASK_LIMIT_ABOVE:  # a large model: learn the agent's limit first rather than send it in vain
            if self._max_model_bytes is None:
                self._max_model_bytes = int(self.info()["limits"]["max_model_bytes"])
            if size > self._max_model_bytes:
                raise TransportError(f"the model is {size} bytes, above the {self._max_model_bytes} bytes the agent "
                                     f"at {self.url} accepts: restart it with a larger --max-model-mb")
        reply = self._request("POST", "/v1/measure", body,
                              {"Content-Type": "application/octet-stream", REQUEST_HEADER: json.dumps(req)})
        self.last_seconds = reply.get("seconds", {})
        theirs = reply.get("fingerprint") or {}
        if self._fingerprint is None:
            self._fingerprint = theirs
        elif mismatches(self._fingerprint, theirs):  # the URL now reaches another device (an agent moved, a new port)
            raise TransportError(f"the agent at {self.url} now measures another device "
                                 f"({mismatches(self._fingerprint, theirs)[0]}): point --url at the device this run began on")
        return reply

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            self._conn = cls(self._host, self._port, timeout=self.timeout_s)
        return self._conn

    def _request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> dict:
        headers = {**(headers or {}), "Authorization": f"Bearer {self._token}", PROTOCOL_HEADER: str(PROTOCOL_VERSION)}
        give_up = time.monotonic() + self.retry_s
        while True:
            try:
                conn = self._connection()
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if resp.getheader("Connection", "").lower() == "close":
                    self.close()
                break
            except socket.timeout:
                self.close()
                raise TransportError(f"the agent at {self.url} did not answer within {self.timeout_s:g} s: check that "
                                     "it still runs, then rerun (a profile: with --resume)") from None
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                self.close()
                if time.monotonic() >= give_up:
                    why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
                    raise TransportError(f"the measurement agent at {self.url} is unreachable ({why}): start it on the "
                                         "device with `deploykit agent serve --port PORT --token-file F`, then rerun "
                                         "(a profile: with --resume)") from None
                time.sleep(0.25)
        return self._reply(resp, data)

    def _reply(self, resp, data: bytes) -> dict:
        theirs = resp.getheader(PROTOCOL_HEADER)
        if theirs is None:
            raise TransportError(f"{self.url} is not a deploykit agent (no {PROTOCOL_HEADER} in its reply, HTTP "
                                 f"{resp.status}): check --url")
        try:
            doc = json.loads(data)
        except ValueError:
            raise TransportError(f"the agent at {self.url} sent a reply that is not JSON (HTTP {resp.status})") from None
        if resp.status == 200 and theirs == str(PROTOCOL_VERSION):
            return doc
        code, msg = doc.get("code", "?"), doc.get("error", f"HTTP {resp.status}")
        if code == "protocol_version" or theirs != str(PROTOCOL_VERSION):
            raise TransportError(f"the agent at {self.url} speaks deploykit protocol {theirs}, this client "
                                 f"{PROTOCOL_VERSION}: install the same deploykit version on both machines")
        if code == "unauthorized":
            raise TransportError(f"the agent at {self.url} refused the token (HTTP 401): pass --token-file with the "
                                 "file the agent was started with")
        if code in _MODEL_FAULTS:
            raise DeployKitError(f"agent at {self.url}: {msg}")
        raise TransportError(f"the agent at {self.url} refused the request (HTTP {resp.status} {code}): {msg}")
