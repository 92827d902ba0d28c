"""`deploykit agent serve|token|ping`: the measurement agent on a device, and its token. Imports no torch."""
from __future__ import annotations

import json

from .errors import DeployKitError


def register(subparsers) -> None:
    from .agent import DEFAULT_MAX_MEASURE_S, DEFAULT_MAX_MODEL_MB, DEFAULT_MAX_QUEUE, DEFAULT_READ_TIMEOUT_S

    p = subparsers.add_parser("agent", help="measurement agent for a remote device (phone, board, edge box)")
    asub = p.add_subparsers(dest="agent_cmd", required=True)
    q = asub.add_parser("serve", help="measure ONNX models sent by `--backend remote` clients (run this on the device)")
    q.add_argument("--port", type=int, required=True, help="TCP port (0: any free port, printed at start)")
    q.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 serves the network)")
    q.add_argument("--token-file", required=True, help="shared token (`deploykit agent token --out F` makes one)")
    q.add_argument("--max-model-mb", type=float, default=DEFAULT_MAX_MODEL_MB,
                   help=f"largest model accepted (default {DEFAULT_MAX_MODEL_MB:g} MB)")
    q.add_argument("--max-measure-s", type=float, default=DEFAULT_MAX_MEASURE_S,
                   help=f"longest one measurement may run (default {DEFAULT_MAX_MEASURE_S:g} s)")
    q.add_argument("--read-timeout-s", type=float, default=DEFAULT_READ_TIMEOUT_S,
                   help=f"longest a request may take to arrive (default {DEFAULT_READ_TIMEOUT_S:g} s)")
    q.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"requests waiting for the device before new ones get 503 (default {DEFAULT_MAX_QUEUE})")
    q = asub.add_parser("token", help="write a new random token file (mode 600); copy it to the client")
    q.add_argument("--out", required=True, help="token file to create")
    q = asub.add_parser("ping", help="check an agent: reachable, token accepted, same protocol; print its device")
    q.add_argument("--url", required=True, help="http://HOST:PORT the agent printed at start")
    q.add_argument("--token-file", required=True)
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--remote-backend", default="ort-cpu", help="the backend on the device (default ort-cpu)")
    q.add_argument("--json", action="store_true")
    p.set_defaults(fn=run)


def run(args) -> int:
    from . import agent

    if args.agent_cmd == "token":
        path = agent.new_token_file(args.out)
        print(f"{path}: new token (readable by you only); start the agent with --token-file {path} and give the "
              "client a copy")
        return 0
    if args.agent_cmd == "serve":
        if not 0 <= args.port <= 65535:
            raise DeployKitError(f"--port must be 0-65535, got {args.port}")
        return agent.serve(args.host, args.port, args.token_file, max_model_mb=args.max_model_mb,
                           max_measure_s=args.max_measure_s, read_timeout_s=args.read_timeout_s,
                           max_queue=args.max_queue)
    from .profilers import get_backend

    backend = get_backend("remote", threads=args.threads, url=args.url, token_file=args.token_file,
                          device_backend=args.remote_backend)
    info, fp = backend.info(), backend.fingerprint()
    if args.json:
        print(json.dumps({"info": info, "fingerprint": fp}))
        return 0
    ok = [name for name, why in info["backends"].items() if why == "ok" and name != "remote"]
    print(f"{backend.url}: deploykit {info['deploykit_version']} agent, protocol {info['protocol']}; backends "
          f"{', '.join(ok)}; {info['served']} requests served, {sum(info['refused'].values())} refused")
    print("device: " + ", ".join(f"{k}={v}" for k, v in fp.items()))
    return 0
