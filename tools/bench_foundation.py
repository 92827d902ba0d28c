"""Benchmark for the foundation targets (issue 2). Prints a Markdown table and writes JSON.

  repeatability  `deploykit measure` of the same model in N fresh processes: medians within +-3%
  per-layer      corrected per-layer sum within 5% of end-to-end (MobileNetV2- and ResNet-style)
  profile        default `deploykit profile --backend ort-cpu --threads 1`: <= 15 min, >= 1,500 kernels

Usage: python tools/bench_foundation.py [--processes 5] [--resolution 224] [--profile] [--out bench.json]
Timing on a shared machine is noisy: run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from deploykit import zoo
from deploykit.table import LatencyTable

MODELS = ("mobilenet_v2", "resnet18")


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "deploykit", *map(str, args)], capture_output=True, text=True, cwd=cwd)
    if p.returncode != 0:
        raise SystemExit(f"deploykit {' '.join(map(str, args))} failed: {p.stderr.strip()}")
    return p


def repeatability(path: Path, processes: int, threads: int) -> dict:
    medians = [json.loads(cli("measure", path, "--threads", threads, "--json").stdout)["latency_ms"] for _ in range(processes)]
    center = float(np.median(medians))
    worst = max(abs(m - center) / center for m in medians)
    return {"medians_ms": medians, "center_ms": center, "max_dev": worst, "pass": worst <= 0.03}


def per_layer(path: Path, threads: int) -> dict:
    out = json.loads(cli("measure", path, "--threads", threads, "--per-layer", "--json").stdout)
    return {"end_to_end_ms": out["end_to_end_ms"], "layers_sum_ms": out["layers_sum_ms"], "sum_ratio": out["sum_ratio"],
            "layers": len(out["layers"]), "pass": abs(out["sum_ratio"] - 1.0) <= 0.05}


def profile(threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        cli("profile", "--backend", "ort-cpu", "--threads", threads, "--name", "bench", "--no-progress", cwd=tmp)
        seconds = time.monotonic() - t0
        n = len(LatencyTable.load(Path(tmp) / "latency_tables" / "bench.jsonl").entries)
    return {"seconds": seconds, "kernels": n, "pass": seconds <= 900 and n >= 1500}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=5)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="also run the default profile (about 10-15 minutes)")
    ap.add_argument("--out", default="bench_foundation.json")
    args = ap.parse_args()

    results: dict = {"resolution": args.resolution, "threads": args.threads, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            path = zoo.export_onnx(zoo.build(name), (1, 3, args.resolution, args.resolution), Path(tmp) / f"{name}.onnx")
            results["models"][name] = {"repeatability": repeatability(path, args.processes, args.threads),
                                       "per_layer": per_layer(path, args.threads)}
    if args.profile:
        results["profile"] = profile(args.threads)
    Path(args.out).write_text(json.dumps(results, indent=1))

    print(f"| model ({args.resolution}x{args.resolution}, {args.threads} thread) | medians of {args.processes} processes (ms) "
          "| max deviation | per-layer sum / end-to-end | layers |")
    print("|---|---|---|---|---|")
    for name, r in results["models"].items():
        rep, pl = r["repeatability"], r["per_layer"]
        print(f"| {name} | {', '.join(f'{m:.2f}' for m in rep['medians_ms'])} | {rep['max_dev']:.1%} "
              f"{'pass' if rep['pass'] else 'MISS'} | {pl['sum_ratio']:.3f} {'pass' if pl['pass'] else 'MISS'} | {pl['layers']} |")
    if "profile" in results:
        p = results["profile"]
        print(f"\nprofile: {p['kernels']} kernels in {p['seconds'] / 60:.1f} min {'pass' if p['pass'] else 'MISS'}")


if __name__ == "__main__":
    main()
