"""Benchmark the kernel-level latency predictor on the held-out evaluation networks.

    python tools/bench_predictor.py [--device epyc-2c-ort-t1] [--models tools/out/evalset] [--out tools/out/predictor]
                                    [--passes 3] [--drift-nets 20]

Exports the hand-written evaluation networks (`deploykit.netfamilies.eval_specs()`, never used in
fitting) if they are not there yet, measures each on this machine with the table's backend and
threads (the set three times over, each model's median), predicts it, and prints a Markdown summary:
the predictor against the plain sum of kernel predictions (no network calibration) and against
latency proportional to MACs, plus the per-kind held-out errors of the chosen regressors. In the same
passes it re-measures --drift-nets of the table's own calibration networks: how far the device moved since
it was profiled, and the predictor's accuracy with that factor applied (reported beside the raw figure).
Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from deploykit.cli import _backend_for_table
from deploykit.evaluate import accuracy, drift, evaluate_models, plot, reference_networks, summarise, write_json
from deploykit.predictor import KernelPredictor
from deploykit.table import LatencyTable, resolve_device

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="epyc-2c-ort-t1")
    ap.add_argument("--models", default=str(ROOT / "tools/out/evalset"))
    ap.add_argument("--out", default=str(ROOT / "tools/out/predictor"))
    ap.add_argument("--passes", type=int, default=3, help="measure the set this many times over; each model's median")
    ap.add_argument("--drift-nets", type=int, default=20, help="table calibration networks re-measured in the same passes")
    args = ap.parse_args()
    models, out = Path(args.models), Path(args.out)
    if not any(models.glob("*.onnx")):
        subprocess.run([sys.executable, str(ROOT / "tools/make_eval_set.py"), "--out", str(models)], check=True)
    predictor = KernelPredictor.for_device(args.device)
    backend = _backend_for_table(predictor.device)
    t0 = time.time()
    refs = reference_networks(LatencyTable.load(resolve_device(args.device)), args.drift_nets)
    rows = evaluate_models(predictor, models, backend, passes=args.passes, references=refs)
    moved = drift(refs)
    # beside the raw figure, not instead of it: predictions scaled by the device's move since profiling, measured on
    # the table's own calibration networks (never on the evaluation set)
    adjusted = accuracy(np.array([r.predicted_ms for r in rows]) * moved.get("now_over_table", 1.0),
                        np.array([r.measured_ms for r in rows]))
    report = {"device": args.device, "seconds": time.time() - t0, "passes": args.passes, **summarise(rows),
              "drift": moved, "predictor_drift_adjusted": adjusted,
              "selection": predictor.doc["selection"], "calibration": predictor.doc["overhead"]["calibration"]}
    write_json(report, out / "bench_predictor.json")
    plot(rows, out / "predicted_vs_measured.png", f"{args.device}: {len(rows)} held-out networks")

    print(f"## Kernel predictor, {len(rows)} held-out networks, {args.device} ({backend.name}, {backend.threads} thread)\n")
    print("| method | within 5% | within 10% | MAPE | RMSE ms | Kendall tau |\n|---|---|---|---|---|---|")
    for name, key in (("deploykit predictor", "predictor"), ("plain kernel sum", "kernel_sum"),
                      ("latency ∝ MACs", "macs_baseline"), ("predictor x device drift", "predictor_drift_adjusted")):
        a = report[key]
        print(f"| {name} | {a['within_5']:.1%} | {a['within_10']:.1%} | {a['mape']:.1%} | {a['rmse_ms']:.3f} | {a['kendall_tau']:.3f} |")
    if moved["n"]:
        print(f"\ndrift: {moved['n']} of the table's calibration networks measure {moved['now_over_table']:.3f}x their table "
              f"latency now (10th-90th percentile {moved['p10']:.3f}-{moved['p90']:.3f})")
    worst = sorted(rows, key=lambda r: -abs(r.rel_error))[:5]
    print("\nworst: " + ", ".join(f"{r.model} {r.rel_error:+.1%}" for r in worst))
    print("\n| kind | chosen | held-out MAPE of interp / forest / gbdt / mlp | entries |\n|---|---|---|---|")
    for kind, sel in sorted(predictor.doc["selection"].items()):
        h = sel["holdout"]
        print(f"| {kind} | {sel['chosen']} | " + " / ".join(f"{h[m]['mape']:.1%}" for m in ("interp", "forest", "gbdt", "mlp") if m in h)
              + f" | {sel['n']} |")
    ctx = predictor.doc.get("context_report", {})
    if any("out_of_fold" in v for v in ctx.values()):
        print("\n| kind | in-network / standalone | in-network MAPE: context model (out of fold) / standalone | instances |")
        print("|---|---|---|---|")
        for kind, v in sorted(ctx.items()):
            if "out_of_fold" in v:
                oof, alone = v["out_of_fold"]["mape"], v["standalone"]["mape"]
                print(f"| {kind} | {v['in_network_over_standalone']:.2f} | {oof:.1%} / {alone:.1%} | {v['n']} |")
    cal = report["calibration"]
    if "leave_one_out" in cal:
        without = f"; without the context models {cal['without_context']['mape']:.1%}" if cal.get("without_context") else ""
        print(f"\ncalibration: {cal['n']} networks, leave-one-out MAPE {cal['leave_one_out']['mape']:.1%} "
              f"(plain sum {cal['plain_sum']['mape']:.1%}{without})")
    print(f"\n{time.time() - t0:.0f} s; report {out / 'bench_predictor.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
