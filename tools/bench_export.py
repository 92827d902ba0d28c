"""Benchmark of issue 6 (export deployable engines), on this machine's CPU with ONNX Runtime.

  python tools/bench_export.py [--resolution 32] [--only families,precision,bad] [--out tools/out/export]

- families:  the 12 architecture families of the test zoo (tests/families.py, random weights with non-trivial
             BatchNorm), each exported with `--format ort` (FP32): verification against PyTorch (max absolute error
             over 16 inputs, target <= 1e-4), and the ORT artifact, the plain ONNX and eager PyTorch measured in
             alternation, 3 rounds each, one thread (target: geometric mean of artifact / eager <= 0.6); the device
             table's prediction against the measurement.
- precision: ResNet-style digits network (trained 3 epochs here) exported FP32 / FP16 / INT8 (onnx and ort formats):
             verification and latency against the plain FP32 ONNX.
- bad:       the bad-input cases through the real CLI: exit code and the stderr line.
- update:    `deploykit export --update-table` of a family the shipped table's predictor misses by more than 10%, run
             from a scratch directory (the shipped table is copied there): prediction error before and after.
Writes OUT/results.json and prints a summary. Timing on a shared machine is noisy: figures are medians of rounds.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def families(out: Path, resolution: int) -> dict:
    from deploykit.errors import DeployKitError
    from deploykit.export.pipeline import export_model
    from tests.families import FAMILIES, randomize_batchnorm

    rows = {}
    for name in sorted(FAMILIES):
        torch.manual_seed(0)
        net = randomize_batchnorm(FAMILIES[name]())
        t0 = time.perf_counter()
        try:
            r = export_model(net, (1, 3, resolution, resolution), out / f"{name}_{resolution}", format="ort", threads=1)
        except DeployKitError as e:  # a family with a fixed-size head (vgg's flatten) at another resolution
            print(f"{name:18s} skipped: {e}", flush=True)
            continue
        m, cmp = r.manifest, r.manifest["comparison"] or {}
        rows[name] = {"verified": r.passed, "max_abs_error": m["max_abs_error"],
                      "exporter": m["exporter"]["exporter"], "nodes": m["simplifier"] and
                      [m["simplifier"]["nodes_before"], m["simplifier"]["nodes_after"], m["ort"]["nodes"]],
                      "ort_ms": m["measured_latency_ms"],
                      "plain_onnx_ms": cmp.get("plain_onnx", {}).get("latency_ms"),
                      "eager_ms": cmp.get("pytorch_eager", {}).get("latency_ms"),
                      "ratio_vs_eager": cmp.get("latency_ratio_vs_pytorch_eager"),
                      "ratio_vs_plain_onnx": cmp.get("latency_ratio_vs_plain_onnx"),
                      "predicted_ms": m["predicted_latency_ms"], "prediction_error": m["prediction_error"],
                      "seconds": round(time.perf_counter() - t0, 1)}
        row = rows[name]
        print(f"{name:18s} verified={row['verified']} max_abs={row['max_abs_error']:.1e} ort={row['ort_ms']:.3f} ms "
              f"plain={row['plain_onnx_ms']:.3f} eager={row['eager_ms']:.3f} ratio_vs_eager={row['ratio_vs_eager']:.3f} "
              + (f"predicted={row['predicted_ms']:.3f} ({row['prediction_error']:+.1%})" if row["predicted_ms"] else ""),
              flush=True)
    ratios = [r["ratio_vs_eager"] for r in rows.values()]
    errors = [abs(r["prediction_error"]) for r in rows.values() if r["prediction_error"] is not None]
    return {"resolution": resolution, "rows": rows, "families": len(rows),
            "all_verified": all(r["verified"] for r in rows.values()),
            "worst_max_abs_error": max(r["max_abs_error"] for r in rows.values()),
            "geomean_ratio_vs_eager": math.exp(np.mean(np.log(ratios))),
            "geomean_ratio_vs_plain_onnx": math.exp(np.mean(np.log([r["ratio_vs_plain_onnx"] for r in rows.values()]))),
            "prediction_within_10pct": (sum(e <= 0.10 for e in errors), len(errors)),
            "median_abs_prediction_error": float(np.median(errors)) if errors else None}


def precision(out: Path) -> dict:
    from deploykit import examples
    from deploykit.data import load_dataset
    from deploykit.export.pipeline import export_model
    from deploykit.train import accuracy, train_network

    data = load_dataset("digits", 32, seed=0)
    torch.manual_seed(0)
    net = examples.resnet_digits()
    train_network(net, data, epochs=3, lr=1e-2, seed=0, progress=False)
    acc = accuracy(net, data)
    rows = {}
    for fmt in ("onnx", "ort"):
        for prec in ("fp32", "fp16", "int8"):
            r = export_model(net, (1, 3, 32, 32), out / f"digits_{fmt}_{prec}", format=fmt, precision=prec,
                             data="digits", verify_inputs=64)
            m, cmp = r.manifest, r.manifest["comparison"] or {}
            art = m["verification"].get("artifact") or m["verification"]["onnx"]
            rows[f"{fmt}-{prec}"] = {
                "verified": r.passed, "max_abs_error": m["max_abs_error"], "cosine": art["outputs"][0]["cosine"],
                "top1_agreement": art["outputs"][0]["top1_agreement"], "measured_ms": m["measured_latency_ms"],
                "plain_onnx_ms": cmp.get("plain_onnx", {}).get("latency_ms"),
                "ratio_vs_plain_onnx": cmp.get("latency_ratio_vs_plain_onnx"),
                "ratio_vs_eager": cmp.get("latency_ratio_vs_pytorch_eager"),
                "slower_than_plain_onnx": cmp.get("slower_than_plain_onnx"), "bytes": m["artifact"]["bytes"]}
            print(f"{fmt}-{prec}: {rows[f'{fmt}-{prec}']}", flush=True)
    return {"float_accuracy": acc, "rows": rows}


BAD = {
    "unexportable op": ["--model", "tests.export_models:unexportable", "--example-shape", "1,3,16,16"],
    "dynamic shapes, no example shape": ["--model", "{dyn}"],
    "PyTorch model, no example shape": ["--model", "tests.export_models:resnet_basic"],
    "tensorrt without TensorRT/GPU": ["--model", "tests.export_models:resnet_basic", "--example-shape", "1,3,32,32",
                                      "--format", "tensorrt"],
    "corrupt ONNX": ["--model", "{bad}"],
}


def bad_inputs(out: Path) -> dict:
    from deploykit.export.pipeline import export_model
    from tests.export_models import resnet_basic

    export_model(resnet_basic(), (1, 3, 32, 32), out / "dyn", dynamic_batch=True, measure=False, verify_inputs=1)
    (out / "bad.onnx").write_bytes(b"not an onnx file")
    rows = {}
    for case, args in BAD.items():
        args = [a.format(dyn=out / "dyn" / "model.onnx", bad=out / "bad.onnx") for a in args]
        p = subprocess.run([sys.executable, "-m", "deploykit", "export", *args, "--out", str(out / "bad_out")],
                           capture_output=True, text=True, cwd=ROOT)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        rows[case] = {"exit": p.returncode, "stderr_lines": len(lines), "line": lines[-1] if lines else ""}
        print(f"{case}: exit {p.returncode}, {len(lines)} line(s): {rows[case]['line']}", flush=True)
    return rows


def update(out: Path, family: str = "mobilenet_v2") -> dict:
    import shutil

    work = out / "update_cwd"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "deploykit", "export", "--model", f"tests.export_models:{family}",
                        "--example-shape", "1,3,32,32", "--update-table", "--out", str(work / "out")],
                       capture_output=True, text=True, cwd=work, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    m = json.loads((work / "out" / "manifest.json").read_text()) if (work / "out" / "manifest.json").exists() else {}
    row = {"exit": p.returncode, "prediction_error": m.get("prediction_error"), "table_update": m.get("table_update"),
           "seconds": round(time.perf_counter() - t0, 1), "stderr_tail": p.stderr.splitlines()[-3:]}
    print(f"update {family}: {row}", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, nargs="+", default=[32])
    ap.add_argument("--only", default="families,precision,bad")
    ap.add_argument("--out", type=Path, default=ROOT / "tools" / "out" / "export")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    parts = set(args.only.split(","))
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    t0 = time.time()
    def save(key, value):  # after every part: a long run stopped midway keeps what it measured
        results[key] = value
        results["seconds"] = round(time.time() - t0, 1)
        path.write_text(json.dumps(results, indent=1, default=float))

    if "families" in parts:
        for res in args.resolution:
            save(f"families_{res}", families(args.out, res))
    if "precision" in parts:
        save("precision", precision(args.out))
    if "bad" in parts:
        save("bad", bad_inputs(args.out))
    if "update" in parts:
        save("update", update(args.out))
    for key in sorted(k for k in results if k.startswith("families_")):
        f = results[key]
        print(f"{key}: {f['families']} families, all verified {f['all_verified']}, "
              f"worst max_abs_error {f['worst_max_abs_error']:.2e}, "
              f"geomean ORT/eager {f['geomean_ratio_vs_eager']:.3f}, ORT/plain ONNX {f['geomean_ratio_vs_plain_onnx']:.3f}, "
              f"prediction within 10%: {f['prediction_within_10pct']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
