"""Benchmark for the architecture-level latency MLP (arXiv 2001.06392). Prints a Markdown table and writes JSON.

  accuracy     train on n_train measured architectures, >= 95% of n_test held-out ones within +-10%
  small data   the same on the first 100 / 300 / 1000 training architectures
  throughput   >= 100,000 predictions/s, batch 4096 on CPU (median of several rounds)
  pretrained   with --kernel-predictor: pre-train on kernel-predictor labels, correct with 50 / 100 / 300 / 1000 measured

  repeatable   the held-out set is timed in 2 x --passes passes: the median of the odd passes against the
               median of the even ones says how far the ground truth itself repeats (the ceiling of any predictor)

Usage: python tools/bench_archmlp.py [--space mbv2] [--n-train 1000] [--n-test 200] [--passes 3]
       [--data-dir tools/out/archmlp-passes] [--kernel-predictor PATH] [--pretrain-n 5000]
Passes interleave: test pass 1, train pass 1, test pass 2, test pass 3, train pass 2, ... so the training and
held-out latencies are medians over the same stretch of time. Measurements are resumable: a rerun reuses the
JSONL files in --data-dir. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deploykit.archmlp import evaluate, fit_arch_mlp, measure_archs, pretrain_targets, read_measurements
from deploykit.archspace import Arch, SpaceSpec, encode, encoding_size, get_space, groups

TRAIN_SEED, TEST_SEED, PRETRAIN_SEED = 0, 1000, 2000
CURVE = (100, 300, 1000)
FINETUNE = (50, 100, 300, 1000)
BATCH = 4096


def _count(path: Path) -> int:
    return len(read_measurements(path)[1]) if path.exists() else 0


def measure_interleaved(spec: SpaceSpec, backend, train: tuple[Path, int, int], test: tuple[Path, int, int],
                        passes: int) -> tuple[list[dict], list[dict], list[dict]]:
    """Train records (`passes` each) and test records (2 x `passes` each), passes interleaved in time."""
    (train_path, n_train, train_seed), (test_path, n_test, test_seed) = train, test
    before = {train_path: _count(train_path), test_path: _count(test_path)}
    t0 = time.monotonic()
    for r in range(1, passes + 1):
        measure_archs(spec, n_test, backend, test_path, seed=test_seed, passes=2 * r - 1)
        train_records = measure_archs(spec, n_train, backend, train_path, seed=train_seed, passes=r)
        test_records = measure_archs(spec, n_test, backend, test_path, seed=test_seed, passes=2 * r)
    seconds = time.monotonic() - t0
    now = sum(_count(p) - c for p, c in before.items())
    meas = []
    for path, records in ((train_path, train_records), (test_path, test_records)):
        lat = np.array([r["latency_ms"] for r in records])
        meas.append({"file": str(path), "n": len(records), "passes": min(r.get("passes", 1) for r in records),
                     "timings_now": _count(path) - before[path], "s_per_timing": seconds / now if now else None,
                     "latency_ms_range": [float(lat.min()), float(lat.max())]})
    return train_records, test_records, meas


def arrays(spec: SpaceSpec, records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    return np.stack([encode(spec, Arch.from_dict(r["arch"])) for r in records]), np.array([r["latency_ms"] for r in records])


def halves(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Median of the odd passes and of the even passes of each record: two independent ground truths."""
    odd = np.array([np.median(r.get("pass_latencies_ms", [r["latency_ms"]])[0::2]) for r in records])
    even = np.array([np.median(r.get("pass_latencies_ms", [r["latency_ms"]] * 2)[1::2]) for r in records])
    return odd, even


def repeatability(odd: np.ndarray, even: np.ndarray) -> dict:
    """How far two independent measurements of the same architectures agree (the ceiling for any predictor)."""
    rel = np.abs(odd / even - 1)
    return {"within_5": float(np.mean(rel <= 0.05)), "within_10": float(np.mean(rel <= 0.10)),
            "median_abs_diff": float(np.median(rel)), "ratio_median": float(np.median(odd / even))}


@dataclass
class Heldout:
    x: np.ndarray  # encodings
    y: np.ndarray  # median over all passes: the ground truth the target is judged on
    odd: np.ndarray  # median over the odd passes
    even: np.ndarray  # ... and over the even ones


def fit_and_score(spec: SpaceSpec, x: np.ndarray, y: np.ndarray, test: Heldout, epochs: int, **kw) -> dict:
    t0 = time.monotonic()
    model = fit_arch_mlp(spec, x, y, epochs=epochs, seed=0, **kw)
    return {"n_train": len(x), "fit_s": round(time.monotonic() - t0, 2), **evaluate(model, test.x, test.y), "model": model,
            "within_10_odd": evaluate(model, test.x, test.odd)["within_10"],
            "within_10_even": evaluate(model, test.x, test.even)["within_10"],
            **({"correction": model.correction} if hasattr(model, "correction") else {})}


def throughput(spec: SpaceSpec, model, threads: int, rounds: int = 15) -> dict:
    """Predictions per second on a batch of random one-hot encodings, numpy in and out (inference only)."""
    rng = np.random.default_rng(0)
    x = np.zeros((BATCH, encoding_size(spec)), np.float32)
    for _, start, size in groups(spec):
        x[np.arange(BATCH), start + rng.integers(size, size=BATCH)] = 1.0
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model.predict_ms(x)  # warm-up
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            model.predict_ms(x)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    median_s = float(np.median(times))
    return {"batch": BATCH, "torch_threads": threads, "median_ms": median_s * 1000, "predictions_per_s": BATCH / median_s}


def kernel_predictor(path: str | None):
    """`kernels -> ms` from the kernel-level predictor (deploykit.predictor), or None when there is none to use."""
    if not path:
        return None
    try:
        from deploykit.predictor import KernelPredictor
    except ImportError:
        print(f"note: deploykit.predictor is not available: skipping the pre-trained rows for {path}")
        return None
    predictor = KernelPredictor.load(path)
    return predictor.predict_networks


def pretrained_rows(spec: SpaceSpec, predict, n: int, x: np.ndarray, y: np.ndarray, test: Heldout, epochs: int) -> list[dict]:
    t0 = time.monotonic()
    xp, yp = pretrain_targets(spec, n, PRETRAIN_SEED, predict_networks=predict)
    label_s = time.monotonic() - t0
    pre = fit_and_score(spec, xp, yp, test, epochs)
    rows = [{"setting": f"pre-trained on {n} kernel-predictor labels, no measurement", **pre, "label_s": round(label_s, 1)}]
    for m in (m for m in FINETUNE if m <= len(x)):
        tuned = fit_and_score(spec, x[:m], y[:m], test, epochs, init=pre["model"])
        rows.append({"setting": f"pre-trained ({n}) + corrected with {m} measured (chose: {tuned['correction']})", **tuned})
    return rows


def markdown(rows: list[dict], tps: list[dict], meas: list[dict], repeat: dict) -> str:
    lines = ["| setting | n train | within 5% | within 10% | MAPE | Kendall tau | within 10% of odd / even passes | fit s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['n_train']} | {r['within_5']:.1%} | {r['within_10']:.1%} | {r['mape']:.2%} | "
                     f"{r['kendall_tau']:.3f} | {r['within_10_odd']:.1%} / {r['within_10_even']:.1%} | {r['fit_s']:.1f} |")
    lines.append("")
    lines.append(f"ground truth repeats (median of odd passes against median of even passes, held-out set): "
                 f"{repeat['within_10']:.1%} within 10%, {repeat['within_5']:.1%} within 5%, median |diff| "
                 f"{repeat['median_abs_diff']:.2%}, odd/even {repeat['ratio_median']:.3f}")
    lines += [f"throughput: {tp['predictions_per_s']:,.0f} predictions/s (batch {tp['batch']}, {tp['median_ms']:.2f} ms, "
              f"{tp['torch_threads']} torch thread(s))" for tp in tps]
    for m in meas:
        per = f"{m['s_per_timing']:.2f} s per timing" if m["s_per_timing"] else "already measured"
        lines.append(f"data: {m['file']}: {m['n']} archs x {m['passes']} passes ({m['timings_now']} timings now, {per}), "
                     f"{m['latency_ms_range'][0]:.2f}..{m['latency_ms_range'][1]:.2f} ms")
    return "\n".join(lines)


def main() -> None:
    from deploykit.profilers import get_backend  # installed as deploykit.profilers from ./profilers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--space", default="mbv2")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--passes", type=int, default=3, help="timings per training architecture (held-out: twice as many)")
    ap.add_argument("--data-dir", default="tools/out/archmlp-passes")
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=400)
    ap.add_argument("--kernel-predictor", help="kernel-level predictor file for the pre-trained rows")
    ap.add_argument("--pretrain-n", type=int, default=5000)
    args = ap.parse_args()
    if args.passes < 1:
        ap.error(f"--passes must be >= 1, got {args.passes}")

    spec = get_space(args.space)
    backend = get_backend(args.backend, threads=args.threads)
    out = Path(args.data_dir)
    train, test, meas = measure_interleaved(spec, backend, (out / f"{spec.name}-train.jsonl", args.n_train, TRAIN_SEED),
                                            (out / f"{spec.name}-test.jsonl", args.n_test, TEST_SEED), args.passes)
    x, y = arrays(spec, train)
    held = Heldout(*arrays(spec, test), *halves(test))
    repeat = repeatability(held.odd, held.even)

    full = fit_and_score(spec, x, y, held, args.epochs)
    rows = [{"setting": f"measured only, all {len(x)}", **full}]
    rows += [{"setting": f"measured only, first {m}", **fit_and_score(spec, x[:m], y[:m], held, args.epochs)}
             for m in CURVE if m < len(x)]
    predict = kernel_predictor(args.kernel_predictor)
    if predict is not None:
        rows += pretrained_rows(spec, predict, args.pretrain_n, x, y, held, args.epochs)
    # one thread is the conservative figure (what a search gets beside other work); all cores for reference
    tps = [throughput(spec, full["model"], 1), throughput(spec, full["model"], torch.get_num_threads())]

    print(markdown(rows, tps, meas, repeat))
    targets = {"within_10_ge_95": full["within_10"] >= 0.95 and len(x) <= 1000,
               "throughput_ge_100k_1_thread": tps[0]["predictions_per_s"] >= 1e5}
    print("targets: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in targets.items()))
    result = {"space": spec.to_dict(), "device": backend.fingerprint(), "n_test": len(held.y), "measurements": meas,
              "repeatability": repeat,
              "rows": [{k: v for k, v in r.items() if k != "model"} for r in rows], "throughput": tps, "targets": targets}
    path = out / f"results-{spec.name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
