"""How much this device's latency moved since a measurement file was written: re-measure its architectures.

    python tools/check_drift.py [--data tools/out/archmlp/mbv2-test.jsonl] [--out tools/out/archmlp/mbv2-test-now.jsonl]
                                [--seed 1000] [--kernel-predictor latency_tables/epyc-2c-ort-t1.predictor.json]

Re-measures every architecture of --data (same space, same protocol, a fresh file, resumable) and prints the
ratio now / then (median, 10th and 90th percentile) and, with --kernel-predictor, how the kernel predictor and
an MLP pre-trained on its labels score against the old and the new measurements. On a shared machine the
ground truth itself moves; a +-10% accuracy figure means little without this number beside it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from deploykit.archmlp import evaluate, fit_arch_mlp, load_measurements, measure_archs, pretrain_targets
from deploykit.archspace import Arch, arch_kernels, encode
from deploykit.cli import _backend_for_table

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT / "tools/out/archmlp/mbv2-test.jsonl"))
    ap.add_argument("--out", default=str(ROOT / "tools/out/archmlp/mbv2-test-now.jsonl"))
    ap.add_argument("--kernel-predictor", default=str(ROOT / "latency_tables/epyc-2c-ort-t1.predictor.json"))
    ap.add_argument("--seed", type=int, default=1000, help="plan seed of --data (bench_archmlp test set: 1000)")
    ap.add_argument("--pretrain-n", type=int, default=5000)
    args = ap.parse_args()
    spec, device, archs, then = load_measurements([args.data])
    backend = _backend_for_table(device)
    records = measure_archs(spec, len(archs), backend, Path(args.out), seed=args.seed, progress=True)
    now_by_key = {Arch.from_dict(r["arch"]).key: r["latency_ms"] for r in records}
    keep = [i for i, a in enumerate(archs) if a.key in now_by_key]
    if not keep:
        print(f"{args.out} holds none of the architectures of {args.data}: pass the seed they were planned with", file=sys.stderr)
        return 2
    then = np.asarray(then)[keep]
    now = np.array([now_by_key[archs[i].key] for i in keep])
    ratio = now / then
    print(f"{len(keep)} architectures: now / then median {np.median(ratio):.3f}, "
          f"10th-90th percentile {np.percentile(ratio, 10):.3f}-{np.percentile(ratio, 90):.3f}")
    if args.kernel_predictor:
        from deploykit.predictor import KernelPredictor

        kp = KernelPredictor.load(Path(args.kernel_predictor))
        direct = kp.predict_networks([arch_kernels(spec, archs[i]) for i in keep])
        x, y = pretrain_targets(spec, args.pretrain_n, 2000, predict_networks=kp.predict_networks)
        mlp = fit_arch_mlp(spec, x, y, seed=0)
        enc = np.stack([encode(spec, archs[i]) for i in keep])
        for name, truth in (("then", then), ("now", now)):
            rel = np.abs(direct / truth - 1)
            print(f"against {name}: kernel predictor {np.mean(rel <= 0.1):.1%} within 10%, "
                  f"pre-trained MLP {evaluate(mlp, enc, truth)['within_10']:.1%} within 10%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
